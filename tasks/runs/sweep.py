"""The layer sweep's comparison table: one row per (layer, classifier), as Markdown, CSV, PNG.

This is the original notebook's experiment (block3/4/5_pool + PCA + SVM) in one table.
"""

from __future__ import annotations

import csv
from pathlib import Path

from tasks.runs.folder import atomic_write, write_text
from tasks.runs.markdown import Picture, linked_picture, md_table
from tasks.runs.plots import bar_chart_png
from tasks.runs.schema import RunReport

CHART_FILE = "sweep.png"
CHART_CAPTION = "test accuracy per layer and classifier"

COLUMNS = (
    "layer",
    "classifier",
    "accuracy",
    "macro_f1",
    "n_components",
    "n_features",
    "reduce_seconds",
    "fit_seconds",
)


def sweep_rows(layers: dict[str, dict], reports: dict[str, RunReport]) -> list[dict]:
    """Flatten per-layer summaries and their run reports into table rows."""
    rows = []
    for layer, info in layers.items():
        for name, entry in reports[layer].classifiers.items():
            rows.append(
                {
                    "layer": layer,
                    "classifier": name,
                    "accuracy": round(entry.accuracy, 4),
                    "macro_f1": round(entry.metrics["macro"]["f1"], 4),
                    "n_components": info["n_components"],
                    "n_features": info.get("n_features"),
                    "reduce_seconds": round(info.get("reduce_seconds") or 0.0, 2),
                    "fit_seconds": round(entry.fit_seconds or 0.0, 2),
                }
            )
    return rows


def sweep_markdown(rows: list[dict], title: str, picture: Picture) -> str:
    """The comparison table and the chart (sweep.png), as sweep.md or a Prefect artifact."""
    table = md_table(list(COLUMNS), [[row[c] for c in COLUMNS] for row in rows])
    return "\n\n".join([f"# {title}", table, picture(CHART_CAPTION, CHART_FILE)]) + "\n"


def write_sweep(rows: list[dict], folder: Path, title: str) -> dict[str, Path]:
    """sweep.md, sweep.csv and sweep.png (accuracy per layer and classifier) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / "sweep.csv", "md": folder / "sweep.md", "png": folder / CHART_FILE}

    def write_csv(temp: Path) -> None:
        with open(temp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(paths["csv"], write_csv)
    write_text(paths["md"], sweep_markdown(rows, title, linked_picture))
    bar_chart_png(
        [f"{r['layer']}\n{r['classifier']}" for r in rows],
        [r["accuracy"] for r in rows],
        paths["png"],
        "test accuracy",
    )
    return paths

"""The layer sweep's comparison table: one row per (layer, classifier), as Markdown, CSV, PNG.

This is the original notebook's experiment (block3/4/5_pool + PCA + SVM) in one table.
"""

from __future__ import annotations

import csv
from pathlib import Path

from tasks.runs.plots import bar_chart_png

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


def sweep_rows(layers: dict[str, dict], reports: dict[str, dict]) -> list[dict]:
    """Flatten per-layer summaries and their run reports into table rows."""
    rows = []
    for layer, info in layers.items():
        report = reports[layer]
        for name, entry in report["classifiers"].items():
            rows.append(
                {
                    "layer": layer,
                    "classifier": name,
                    "accuracy": round(entry["metrics"]["accuracy"], 4),
                    "macro_f1": round(entry["metrics"]["macro"]["f1"], 4),
                    "n_components": info["n_components"],
                    "n_features": info.get("n_features"),
                    "reduce_seconds": round(info.get("reduce_seconds") or 0.0, 2),
                    "fit_seconds": round(entry.get("fit_seconds") or 0.0, 2),
                }
            )
    return rows


def write_sweep(rows: list[dict], folder: Path, title: str) -> dict[str, Path]:
    """sweep.md, sweep.csv and sweep.png (accuracy per layer and classifier) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / "sweep.csv", "md": folder / "sweep.md", "png": folder / "sweep.png"}
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    paths["md"].write_text("\n".join(lines) + "\n")
    bar_chart_png(
        [f"{r['layer']}\n{r['classifier']}" for r in rows],
        [r["accuracy"] for r in rows],
        paths["png"],
        "test accuracy",
    )
    return paths

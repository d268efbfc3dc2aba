"""report.md and the Prefect report artifact: one Markdown text, two ways to show pictures.

report.md links its PNGs by file name (they sit beside it); the artifact is read in a browser
that may be on another machine, so it carries its pictures inline as data URIs and names the
run folder as host and path instead of a file:// link nobody else can open.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.features.near_copies import LEAK_FIX, LEAKY_SHARE
from tasks.runs.folder import file_listing
from tasks.runs.schema import ClassifierReport, RunReport

# Inline pictures beyond this many bytes (all together) are named, not embedded: the artifact
# lives in Prefect's database and is sent whole to every browser that opens it.
INLINE_BUDGET = 1_500_000

RUN_PICTURES = {"class_map": "2-D map of the rows", "pca_variance": "PCA explained variance"}

Picture = Callable[[str, str], str]  # (caption, file in the run) -> Markdown
FileRef = Callable[[str], str]  # file in the run -> Markdown naming it


def metrics_table(report: RunReport) -> list[dict]:
    """Rows for a Prefect table artifact: one per classifier."""
    return [
        {
            "classifier": name,
            "accuracy": entry.accuracy,
            "macro_f1": entry.metrics["macro"]["f1"],
            "weighted_f1": entry.metrics["weighted"]["f1"],
            "fit_seconds": entry.fit_seconds,
        }
        for name, entry in report.classifiers.items()
    ]


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _md_value(value: Any, limit: int = 200) -> str:
    """Compact JSON for a bullet; long values are cut (report.json keeps them whole)."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + " … (full value in report.json)"


def _md_bullets(mapping: dict) -> str:
    return "\n".join(f"- **{key}**: `{_md_value(value)}`" for key, value in mapping.items())


def run_summary_markdown(report: RunReport) -> str:
    """What ran and how each classifier scored: the head of report.md and of the artifact."""
    rows = [
        [
            f"**{row['classifier']}**"
            if row["classifier"] == report.best_classifier
            else row["classifier"],
            f"{row['accuracy']:.4f}",
            f"{row['macro_f1']:.4f}",
            f"{row['weighted_f1']:.4f}",
            f"{row['fit_seconds']:.2f}",
        ]
        for row in metrics_table(report)
    ]
    header = ["classifier", "accuracy", "macro F1", "weighted F1", "fit s"]
    context = ", ".join(
        f"{key} `{report.setting(key)}`" for key in ("dataset", "backbone", "layer")
    )
    return "\n\n".join(
        [
            f"# Run {report.run_id}",
            f"Created {report.created}; {context}; {report.n_test} test images; "
            f"best: **{report.best_classifier}**.",
            md_table(header, rows),
        ]
    )


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def near_copies_markdown(report: RunReport, file_ref: FileRef) -> str | None:
    """How many test images have a near-copy among the training images, and each classifier's
    accuracy on those and on the others: the accuracy to expect on new photos is the latter."""
    check = report.near_copies
    if check is None:
        return None
    with_copy, n_test = check["test_with_copy"], check["n_test"]
    rows = [
        [name, _score(check["accuracy_with"][name]), _score(check["accuracy_without"][name])]
        for name in check["accuracy_with"]
    ]
    verdict = (
        " **Most test images have a near-copy in training: the test accuracy overstates "
        f"accuracy on new images** ({LEAK_FIX})."
        if check["share"] > LEAKY_SHARE
        else ""
    )
    return "\n\n".join(
        [
            "## Near-copies of test images in training",
            f"{with_copy} of {n_test} test images ({check['share']:.1%}) have a training image "
            f"at cosine similarity >= {check['threshold']} in the stored features.{verdict}"
            + (
                f" Each test image's nearest training image: {file_ref(check['file'])}."
                if "file" in check
                else ""
            ),
            md_table(
                [
                    "classifier",
                    f"accuracy with a near-copy ({with_copy})",
                    f"accuracy without ({n_test - with_copy})",
                ],
                rows,
            ),
        ]
    )


def _classifier_markdown(
    name: str, entry: ClassifierReport, class_names: list[str], picture: Picture, file_ref: FileRef
) -> str:
    per_class = entry.metrics["per_class"]
    class_rows = [
        [
            c,
            *(f"{per_class[c][m]:.4f}" for m in ("precision", "recall", "f1")),
            per_class[c]["support"],
        ]
        for c in class_names
    ]
    confusion_rows = [
        [f"**{c}**", *counts] for c, counts in zip(class_names, entry.confusion, strict=True)
    ]
    pictures = [picture(f"{kind} {name}", file) for kind, file in entry.images.items()]
    return "\n\n".join(
        [
            f"## {name}",
            f"Best parameters: `{_md_value(entry.best_params)}`",
            f"Fit {entry.fit_seconds:.2f} s, predict {entry.predict_seconds:.3f} s. "
            f"Model `{entry.model_file}` (sha256 `{entry.model_sha256}`). "
            f"{entry.n_misclassified} misclassified: "
            f"{file_ref(entry.misclassified_file)}"
            + (
                " (gallery: the most confident mistakes first)."
                if "gallery" in entry.images
                else "."
            ),
            md_table(["class", "precision", "recall", "F1", "support"], class_rows),
            "Confusion matrix (rows true, columns predicted):",
            md_table(["true \\ predicted", *class_names], confusion_rows),
            *pictures,
        ]
    )


def _markdown(report: RunReport, picture: Picture, file_ref: FileRef) -> str:
    sections = [run_summary_markdown(report)]
    if (near := near_copies_markdown(report, file_ref)) is not None:
        sections.append(near)
    sections += [
        picture(RUN_PICTURES.get(kind, kind), file) for kind, file in report.images.items()
    ]
    sections += [
        "## Settings\n\n" + _md_bullets(report.settings),
        "## Keys\n\n" + _md_bullets(report.keys),
    ]
    if report.extras:
        sections.append("## Extras\n\n" + _md_bullets(report.extras))
    sections += [
        _classifier_markdown(name, entry, report.class_names, picture, file_ref)
        for name, entry in report.classifiers.items()
    ]
    return "\n\n".join(sections) + "\n"


def linked_picture(caption: str, file: str) -> str:
    """A picture beside the Markdown file, linked by its name."""
    return f"![{caption}]({file})"


def report_markdown(report: RunReport) -> str:
    """The full report.md: summary and pictures, inputs, then one section per classifier."""
    return _markdown(report, linked_picture, lambda file: f"[{file}]({file})")


def inline_pictures(run_dir: Path) -> Picture:
    """Pictures as data URIs while the budget lasts, then as a line naming the file."""
    left = [INLINE_BUDGET]

    def picture(caption: str, file: str) -> str:
        data = (run_dir / file).read_bytes()
        encoded = base64.b64encode(data).decode("ascii")
        if len(encoded) > left[0]:
            return f"*{caption}: `{file}` in the run folder ({len(data) // 1024} KiB).*"
        left[0] -= len(encoded)
        return f"![{caption}](data:image/png;base64,{encoded})"

    return picture


def folder_markdown(run_dir: Path) -> str:
    """Where the run folder is (host and path, as text) and what it holds."""
    run_dir = Path(run_dir).resolve()
    rows = [[f"`{name}`", f"{size / 1024:,.1f}"] for name, size in file_listing(run_dir)]
    return "\n\n".join(
        [
            "## Run folder",
            f"`{run_dir}` on host `{socket.gethostname()}`; read it there with "
            f"`featurepipe runs show {run_dir.name} --runs {run_dir.parent}`.",
            md_table(["file", "KiB"], rows),
        ]
    )


def artifact_markdown(report: RunReport, run_dir: Path) -> str:
    """report.md's content for the Prefect UI, pictures inline, plus the run folder's files."""
    # Files are named as text: a relative link would point into the Prefect UI, not the run.
    text = _markdown(report, inline_pictures(Path(run_dir)), lambda file: f"`{file}`")
    return text + "\n" + folder_markdown(run_dir)

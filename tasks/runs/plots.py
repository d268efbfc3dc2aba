"""PNG figures for run reports, drawn off-screen with matplotlib's Agg backend.

Each figure gets its own Agg canvas instead of going through pyplot: no display is needed,
no global backend is switched under other code, and Prefect tasks running in threads do
not share pyplot's global figure state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from tasks.runs.folder import atomic_write

log = logging.getLogger("featurepipe.plots")

# The discriminant view is fitted in the leading components only: it is a picture, and LDA's
# SVD over all of them is slow and can fail to converge (it did on 7,467 x 1,930 blood-cell rows).
MAP_LDA_COMPONENTS = 64


def _figure(width: float, height: float) -> Figure:
    """A figure bound to an Agg canvas, so savefig never needs a GUI backend."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path, dpi: int = 100, colours: int | None = None) -> Path:
    """Saved through a temp file: a run folder never holds half a PNG. With `colours`, the PNG
    gets a palette of that many colours: a gallery or a scatter then takes about a third of
    the bytes, which matters for pictures embedded in Prefect artifacts."""
    if colours is None:
        atomic_write(path, lambda temp: figure.savefig(temp, dpi=dpi))
        return Path(path)
    figure.set_dpi(dpi)
    figure.canvas.draw()
    pixels = Image.fromarray(np.asarray(figure.canvas.buffer_rgba())).convert("RGB")
    atomic_write(path, lambda temp: pixels.quantize(colours).save(temp, optimize=True))
    return Path(path)


def confusion_png(
    confusion: Sequence[Sequence[int]], class_names: list[str], path: Path, title: str
) -> Path:
    """Heatmap of a confusion matrix (rows true, columns predicted) with counts written in."""
    counts = np.asarray(confusion, dtype=int)
    n = len(class_names)
    size = max(4.0, 0.6 * n + 2.0)
    figure = _figure(size + 1.0, size)
    axes = figure.add_subplot()
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes)
    threshold = counts.max() / 2 if counts.size else 0
    for (row, col), count in np.ndenumerate(counts):
        colour = "white" if count > threshold else "black"
        axes.text(col, row, str(count), ha="center", va="center", color=colour)
    axes.set_xticks(range(n), class_names, rotation=45, ha="right")
    axes.set_yticks(range(n), class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    return _save(figure, path)


def learning_curves_png(history: dict[str, list[float]], path: Path) -> Path:
    """Accuracy and loss per epoch, training against validation, side by side."""
    figure = _figure(10.0, 4.0)
    for axes, metric in zip(figure.subplots(1, 2), ("accuracy", "loss"), strict=True):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            if key in history:
                values = history[key]
                axes.plot(range(1, len(values) + 1), values, marker=".", label=label)
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)
        axes.set_title(metric)
        axes.legend()
    return _save(figure, path)


def explained_variance_png(
    cumulative_ratio: Sequence[float], n_components: int, target: float | None, path: Path
) -> Path:
    """Cumulative explained variance with the chosen cut marked.

    `target` is the variance fraction the cut aimed at, or None when the number of
    components was fixed rather than chosen by variance.
    """
    ratio = np.asarray(cumulative_ratio, dtype=float)
    figure = _figure(7.0, 4.5)
    axes = figure.add_subplot()
    axes.plot(range(1, len(ratio) + 1), ratio, label="cumulative explained variance")
    axes.axvline(n_components, color="tab:red", linestyle="--", label=f"{n_components} components")
    if 0 < n_components <= len(ratio):
        axes.plot(n_components, ratio[n_components - 1], "o", color="tab:red")
    if target is not None:
        axes.axhline(target, color="tab:gray", linestyle=":", label=f"target {target:g}")
    axes.set_xlabel("components")
    axes.set_ylabel("explained variance ratio")
    axes.set_ylim(0, 1.02)
    axes.legend(loc="lower right")
    return _save(figure, path)


def bar_chart_png(labels: Sequence[str], values: Sequence[float], path: Path, ylabel: str) -> Path:
    """Bars with their values written on top (e.g. test accuracy per backbone layer)."""
    figure = _figure(max(5.0, 0.8 * len(labels) + 2.0), 4.5)
    axes = figure.add_subplot()
    bars = axes.bar(range(len(labels)), values)
    axes.bar_label(bars, fmt="%.3g")
    axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axes.set_ylabel(ylabel)
    return _save(figure, path)


def gallery_png(
    tiles: Sequence[np.ndarray | None], captions: Sequence[str], path: Path, columns: int = 6
) -> Path:
    """Thumbnails in a grid, each captioned; a None tile (unreadable file) is a grey box."""
    rows = max(1, -(-len(tiles) // columns))
    figure = _figure(1.3 * columns, 1.55 * rows)
    for index, axes in enumerate(figure.subplots(rows, columns, squeeze=False).flat):
        axes.set_axis_off()
        if index >= len(tiles):
            continue
        if tiles[index] is None:
            axes.imshow(np.full((8, 8, 3), 200, dtype=np.uint8))
            axes.text(3.5, 3.5, "missing", ha="center", va="center", fontsize=7)
        else:
            axes.imshow(tiles[index])
        axes.set_title(captions[index], fontsize=6.5)
    return _save(figure, path, dpi=80, colours=128)


@dataclass(frozen=True)
class MapPanel:
    """One 2-D view of the rows for the class map."""

    points: np.ndarray  # (n_rows, 2)
    axis_labels: tuple[str, str]
    title: str


def class_map_png(
    panels: Sequence[MapPanel],
    labels: np.ndarray,
    is_test: np.ndarray,
    class_names: list[str],
    path: Path,
) -> Path:
    """2-D scatters of the same rows side by side, coloured by class: training rows as dots,
    test rows as crosses."""
    colours = matplotlib.colormaps["tab10" if len(class_names) <= 10 else "tab20"]
    figure = _figure(6.0 * len(panels), 5.5)
    grid = figure.subplots(1, len(panels), squeeze=False)
    for panel, axes in zip(panels, grid.flat, strict=True):
        for index, name in enumerate(class_names):
            colour = colours(index % colours.N)
            for test, marker, size in ((False, "o", 8), (True, "x", 14)):
                chosen = (labels == index) & (is_test == test)
                axes.scatter(
                    panel.points[chosen, 0],
                    panel.points[chosen, 1],
                    s=size,
                    marker=marker,
                    color=colour,
                    alpha=0.6,
                    linewidths=0.8 if test else 0,
                    label=None if test else name,
                )
        axes.scatter([], [], marker="x", color="black", label="test rows (x)")
        axes.legend(loc="best", fontsize=8, markerscale=2)
        axes.set_xlabel(panel.axis_labels[0])
        axes.set_ylabel(panel.axis_labels[1])
        axes.set_title(panel.title, fontsize=10)
    figure.suptitle("train (dots) and test (crosses) rows, coloured by true class")
    return _save(figure, path, colours=256)


def _two_columns(values: np.ndarray) -> np.ndarray:
    """The first two columns; a single one is drawn against zero."""
    points = np.zeros((len(values), 2))
    points[:, : min(2, values.shape[1])] = values[:, :2]
    return points


def class_map_panels(
    components: np.ndarray, labels: np.ndarray, n_train: int, cumulative_ratio: Sequence[float]
) -> list[MapPanel]:
    """Two views of the rows' PCA components (train rows first, then test): the first two
    components (where the variance is; classes need not separate there) and the linear
    discriminants fitted on the training rows (the directions that separate the classes best,
    so test rows far from their class show what a linear model gets wrong)."""
    labels = np.asarray(labels)
    kept = min(2, components.shape[1])
    shares = np.diff(np.asarray(cumulative_ratio, dtype=float)[:kept], prepend=0.0)
    pca = MapPanel(
        _two_columns(components),
        tuple(
            f"PC{i + 1} ({shares[i]:.1%} of variance)" if i < kept else f"PC{i + 1} (not kept)"
            for i in range(2)
        ),
        "first two PCA components",
    )
    leading = components[:, :MAP_LDA_COMPONENTS]
    n_discriminants = min(2, len(np.unique(labels[:n_train])) - 1, leading.shape[1])
    lda = LinearDiscriminantAnalysis(n_components=n_discriminants)
    try:
        lda.fit(leading[:n_train], labels[:n_train])
    except np.linalg.LinAlgError as error:  # a picture never costs the run its report
        log.warning("class map without the discriminant view: %s", error)
        return [pca]
    discriminants = MapPanel(
        _two_columns(lda.transform(leading)),
        tuple(f"LD{i + 1}" if i < n_discriminants else f"LD{i + 1} (none)" for i in range(2)),
        f"linear discriminants of the training rows (first {leading.shape[1]} components)",
    )
    return [pca, discriminants]


def pca_class_map_png(
    components: np.ndarray,
    labels: np.ndarray,
    n_train: int,
    cumulative_ratio: Sequence[float],
    class_names: list[str],
    path: Path,
) -> Path:
    """class_map_png of the class_map_panels views."""
    panels = class_map_panels(components, labels, n_train, cumulative_ratio)
    is_test = np.arange(len(components)) >= n_train
    return class_map_png(panels, np.asarray(labels), is_test, class_names, path)

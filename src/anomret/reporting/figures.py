"""The report's figures, drawn with matplotlib's object API on the Agg canvas.

matplotlib is imported inside the functions, so importing this module costs nothing; no pyplot state is
touched, so a caller's own backend (a notebook's) is left as it is.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anomret.files import atomic_path
from anomret.reporting.curves import Threshold, pr_points, roc_points

__all__ = ["category_figure", "figure_png", "line_style", "new_figure", "save_figure"]

NORMAL_COLOUR = "#1f77b4"
ANOMALOUS_COLOUR = "#d62728"
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_DASHES = ("-", "--", ":", "-.")


def line_style(number: int, count: int) -> dict[str, Any]:
    """Keyword arguments of ``Axes.plot`` for line ``number`` of ``count``.

    Colour, marker and dash pattern all differ between lines, and markers shrink from the first line to
    the last and alternate filled and hollow, so lines that lie on top of each other stay visible.
    """
    size = 10 - 5 * number / max(count - 1, 1)
    colour = _COLOURS[number % len(_COLOURS)]
    return {
        "color": colour,
        "marker": _MARKERS[number % len(_MARKERS)],
        "linestyle": _DASHES[number % len(_DASHES)],
        "markersize": size,
        "markerfacecolor": colour if number % 2 == 0 else "white",
        "markeredgewidth": 1.5,
        "linewidth": 1.6,
    }


def new_figure(width: float, height: float, constrained: bool = True) -> Any:
    """A figure on the Agg canvas; ``constrained=False`` leaves the layout to the caller (faster: the
    constrained layout measures every label)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained" if constrained else None)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Any, path: str | Path, dpi: int = 96) -> Path:
    """PNG, written atomically."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def figure_png(figure: Any, dpi: int = 96) -> bytes:
    """The figure as PNG bytes (for a page that holds its images itself)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _percent(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f} %"


def _legend_below(axes: Any) -> None:
    # Below the axes, so it never covers a curve.
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, fontsize="small", frameon=False)


def category_figure(
    path: str | Path,
    scores: Sequence[float],
    labels: Sequence[int],
    threshold: Threshold,
    auroc: float | None = None,
    ap: float | None = None,
) -> Path:
    """One category's image-level ROC curve, precision-recall curve and score histograms (normal vs
    anomalous) with the threshold, side by side; its operating point is marked on both curves."""
    scores_array = np.asarray(scores, dtype=np.float64)
    labels_array = np.asarray(labels).astype(bool)
    width, height = 11.5, 3.6
    # Fixed margins in inches (tick labels, titles, the legends below): the constrained layout measures
    # every label, 0.46 s a figure against 0.28 s here, and every category of every run draws one.
    figure = new_figure(width, height, constrained=False)
    figure.subplots_adjust(
        left=0.6 / width, right=1 - 0.15 / width, top=1 - 0.3 / height, bottom=1.2 / height, wspace=0.25
    )
    roc, pr, histogram = figure.subplots(1, 3)
    defined = labels_array.any() and (~labels_array).any()
    at = threshold.value
    predicted = scores_array >= at if not math.isnan(at) else np.zeros_like(labels_array)
    operating = f"at the threshold ({at:.4g})"

    if defined:
        fpr, tpr, _ = roc_points(scores_array, labels_array)
        roc.plot(fpr, tpr, color="black", linewidth=1.6, label="ROC")
        roc.plot(
            [(predicted & ~labels_array).sum() / (~labels_array).sum()],
            [(predicted & labels_array).sum() / labels_array.sum()],
            "o",
            color=ANOMALOUS_COLOUR,
            label=operating,
        )
        precision, recall, _ = pr_points(scores_array, labels_array)
        pr.plot(recall, precision, color="black", linewidth=1.6, drawstyle="steps-post", label="PR")
        prevalence = labels_array.mean()
        pr.axhline(
            prevalence, color="grey", linestyle=":", label=f"chance ({100 * prevalence:.0f} % anomalous)"
        )
        if predicted.any():
            pr.plot(
                [(predicted & labels_array).sum() / labels_array.sum()],
                [(predicted & labels_array).sum() / predicted.sum()],
                "o",
                color=ANOMALOUS_COLOUR,
                label=operating,
            )
    else:
        for axes in (roc, pr):
            axes.text(
                0.5, 0.5, "undefined: one class only", ha="center", va="center", transform=axes.transAxes
            )
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    roc.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="false positive rate", ylabel="true positive rate")
    roc.set_title(f"ROC · I-AUROC {_percent(auroc)}", fontsize="medium")
    pr.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel="recall", ylabel="precision")
    pr.set_title(f"Precision-recall · I-AP {_percent(ap)}", fontsize="medium")

    finite = scores_array[np.isfinite(scores_array)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if not math.isnan(at):
        low, high = min(low, at), max(high, at)
    bins = np.linspace(
        low, high if high > low else low + 1.0, max(8, min(40, int(np.sqrt(finite.size)) * 2)) + 1
    )
    for mask, colour, name, hatch in (
        (~labels_array, NORMAL_COLOUR, "normal", None),
        (labels_array, ANOMALOUS_COLOUR, "anomalous", "//"),
    ):
        if mask.any():
            histogram.hist(
                scores_array[mask],
                bins=bins,
                color=colour,
                alpha=0.45,
                hatch=hatch,
                edgecolor=colour,
                label=f"{name} ({int(mask.sum())})",
            )
    if not math.isnan(at):
        histogram.axvline(
            at, color="black", linestyle="--", linewidth=1.4, label=f"{threshold.source} ({at:.4g})"
        )
    histogram.set(xlabel="image score", ylabel="images")
    histogram.set_title("Image scores", fontsize="medium")
    for axes in (roc, pr, histogram):
        axes.grid(alpha=0.3)
        _legend_below(axes)
    return save_figure(figure, path)

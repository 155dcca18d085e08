"""PNG plots of evaluation runs: confusion matrices, reliability diagrams, one-vs-rest ROC curves, coverage curves.

Figures are built with matplotlib's object API on an Agg canvas, so nothing global (pyplot's figure registry, the
backend) is touched and a server process can call this from any thread; they are freed when they go out of scope.
"""
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from app.evaluation.scoring import (
    ECE_BINS,
    abstention_at,
    abstention_curve,
    classification_metrics,
    expected_calibration_error,
    reliability_bins,
)

DPI = 120
PANEL_INCHES = (6.0, 5.0)
LONG_TICK_CHARACTERS = 6        # class names longer than this get rotated tick labels
MAX_PANEL_COLUMNS = 3


@dataclass(frozen=True)
class PlotInput:
    name: str                       # the method row's display name, e.g. "kpl (transductive, sinkhorn)"
    y_true: np.ndarray              # (n,)
    probabilities: np.ndarray       # (n, c)
    threshold: float | None = None  # the abstain threshold in effect, marked on the coverage plot


def write_plots(out_dir: Path, class_names: Sequence[str], runs: Sequence[PlotInput]) -> dict[str, list[str]]:
    """Write every plot of the runs into out_dir (created); file names relative to out_dir, by kind."""
    if not runs:
        raise ValueError("no runs to plot")
    out_dir.mkdir(parents=True, exist_ok=True)
    slugs = unique_slugs([run.name for run in runs])
    written: dict[str, list[str]] = {"confusion": [], "reliability": [], "roc": [], "coverage": []}
    for run, slug in zip(runs, slugs, strict=True):
        written["confusion"].append(_save(plot_confusion(run, class_names), out_dir / f"confusion_{slug}.png"))
        written["roc"].append(_save(plot_roc(run, class_names), out_dir / f"roc_{slug}.png"))
    written["reliability"].append(_save(plot_reliability(runs), out_dir / "reliability.png"))
    written["coverage"].append(_save(plot_coverage(runs), out_dir / "coverage.png"))
    return written


def slugify(name: str) -> str:
    """Lowercase, runs of non-alphanumerics as one "-", none at the ends; "run" if nothing is left."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"


def unique_slugs(names: Sequence[str]) -> list[str]:
    """A slug per name, "-2", "-3", ... appended to repeats so no two runs write the same file."""
    taken: set[str] = set()
    slugs = []
    for name in names:
        base = slug = slugify(name)
        suffix = 2
        while slug in taken:
            slug, suffix = f"{base}-{suffix}", suffix + 1
        taken.add(slug)
        slugs.append(slug)
    return slugs


def _save(figure: Figure, path: Path) -> str:
    FigureCanvasAgg(figure)          # an Agg canvas of its own: no pyplot, no global backend switch
    figure.savefig(path, dpi=DPI)
    return path.name


def _new_figure(size_inches: tuple[float, float] = PANEL_INCHES) -> Figure:
    return Figure(figsize=size_inches, dpi=DPI, layout="constrained")


def _colours(count: int) -> list[tuple[float, float, float, float]]:
    """Distinct colours: tab10 up to 10 lines, tab20 beyond (cycling past 20)."""
    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(i % palette.N) for i in range(count)]


def _label_class_ticks(axes: Axes, class_names: Sequence[str], *, x: bool = True, y: bool = True) -> None:
    positions = np.arange(len(class_names))
    rotate = max(len(name) for name in class_names) > LONG_TICK_CHARACTERS
    if x:
        axes.set_xticks(positions, class_names, rotation=45 if rotate else 0, ha="right" if rotate else "center",
                        rotation_mode="anchor")
    if y:
        axes.set_yticks(positions, class_names)


# --- confusion -------------------------------------------------------------------------------------------------------

def plot_confusion(run: PlotInput, class_names: Sequence[str]) -> Figure:
    """Counts per (true, predicted) cell, coloured by the share of the true class's images (row-normalised)."""
    metrics = classification_metrics(run.y_true, run.probabilities, class_names, n_bootstrap=0)
    counts = np.asarray(metrics["confusion_matrix"])                        # (c, c), rows = true class
    row_totals = counts.sum(axis=1, keepdims=True)
    row_shares = np.divide(counts, row_totals, out=np.zeros(counts.shape), where=row_totals > 0)
    n_classes = len(class_names)
    side = max(PANEL_INCHES[1], 0.55 * n_classes + 2.5)                      # cells stay legible for many classes
    figure = _new_figure((side + 1.0, side))
    axes = figure.add_subplot()
    image = axes.imshow(row_shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, label="share of the true class's images")
    font_size = max(6, 11 - n_classes // 4)
    for (row, column), count in np.ndenumerate(counts):
        axes.text(column, row, str(count), ha="center", va="center", fontsize=font_size,
                  color="white" if row_shares[row, column] > 0.5 else "black")
    _label_class_ticks(axes, class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(f"{run.name}\naccuracy {metrics['accuracy']:.3f} (n = {metrics['n_images']})")
    return figure


# --- reliability -----------------------------------------------------------------------------------------------------

def plot_reliability(runs: Sequence[PlotInput], n_bins: int = ECE_BINS) -> Figure:
    """One panel per run: accuracy per top-probability bin against the diagonal, the gap to it shaded."""
    columns = min(MAX_PANEL_COLUMNS, len(runs))
    rows = math.ceil(len(runs) / columns)
    figure = _new_figure((4.5 * columns + 0.5, 4.2 * rows + 0.3) if len(runs) > 1 else PANEL_INCHES)
    panels = figure.subplots(rows, columns, squeeze=False)
    for axes, run in zip(panels.flat, runs):
        _draw_reliability(axes, run, n_bins)
    for axes in panels.flat[len(runs):]:
        axes.set_visible(False)
    figure.suptitle("Reliability (top-label confidence)")
    return figure


def _draw_reliability(axes: Axes, run: PlotInput, n_bins: int) -> None:
    bins = reliability_bins(run.y_true, run.probabilities, n_bins=n_bins)
    edges = np.asarray(bins["edges"])
    filled = np.asarray(bins["count"]) > 0
    left, width = edges[:-1][filled], np.diff(edges)[filled]
    accuracy = np.array([value for value in bins["accuracy"] if value is not None])
    confidence = np.array([value for value in bins["confidence"] if value is not None])
    axes.bar(left, accuracy, width=width, align="edge", color="tab:blue", edgecolor="navy", label="accuracy")
    axes.bar(left, confidence - accuracy, bottom=accuracy, width=width, align="edge", color="tab:red", alpha=0.3,
             edgecolor="tab:red", hatch="//", label="gap to confidence")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence (top probability)")
    axes.set_ylabel("accuracy")
    ece = expected_calibration_error(run.y_true, run.probabilities, n_bins=n_bins)
    axes.set_title(f"{run.name}\nECE {ece:.3f}", fontsize=10)
    axes.legend(loc="upper left", fontsize=8)


# --- ROC -------------------------------------------------------------------------------------------------------------

def plot_roc(run: PlotInput, class_names: Sequence[str]) -> Figure:
    """One-vs-rest ROC per class that is present but not every image; a note instead when no class qualifies."""
    metrics = classification_metrics(run.y_true, run.probabilities, class_names, n_bootstrap=0)   # validates too
    y_true = np.asarray(run.y_true)
    probabilities = np.asarray(run.probabilities, dtype=np.float64)
    figure = _new_figure()
    axes = figure.add_subplot()
    aurocs = [metrics["per_class"][name]["auroc"] for name in class_names]   # None where the ROC is undefined
    drawable = [k for k, auroc in enumerate(aurocs) if auroc is not None]
    for k, colour in zip(drawable, _colours(len(drawable)), strict=True):
        false_positive_rate, true_positive_rate, _ = roc_curve(y_true == k, probabilities[:, k])
        axes.plot(false_positive_rate, true_positive_rate, color=colour,
                  label=f"{class_names[k]} (AUROC {aurocs[k]:.3f})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    if not drawable:
        axes.text(0.5, 0.5, "ROC undefined:\nfewer than two classes in the data", ha="center", va="center",
                  fontsize=12, transform=axes.transAxes)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_aspect("equal")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title(f"{run.name}\none-vs-rest ROC")
    axes.legend(loc="lower right", fontsize=8 if len(drawable) <= 8 else 6)
    return figure


# --- coverage --------------------------------------------------------------------------------------------------------

def plot_coverage(runs: Sequence[PlotInput]) -> Figure:
    """Accuracy on the answered images against coverage as the abstain threshold rises, a line per run; the
    threshold in effect marked on its line."""
    figure = _new_figure((PANEL_INCHES[0] + 1.0, PANEL_INCHES[1] + 0.25 * len(runs)))
    axes = figure.add_subplot()
    for run, colour in zip(runs, _colours(len(runs)), strict=True):
        curve = abstention_curve(run.y_true, run.probabilities)
        answered = [(c, a) for c, a in zip(curve["coverage"], curve["accuracy"], strict=True) if a is not None]
        coverage, accuracy = zip(*answered, strict=True)
        label = run.name if run.threshold is None else f"{run.name} (\u25cf threshold {run.threshold:.2f})"
        axes.plot(coverage, accuracy, color=colour, label=label)
        if run.threshold is not None:
            point = abstention_at(run.y_true, run.probabilities, run.threshold)
            # nothing answered has no accuracy: mark coverage 0 on the x axis instead
            axes.plot(point["coverage"], point["accuracy"] if point["accuracy"] is not None else 0.0, marker="o",
                      markersize=8, color=colour, markeredgecolor="black", linestyle="none", clip_on=False)
    axes.set_xlim(-0.02, 1.02)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("coverage (share of images answered)")
    axes.set_ylabel("accuracy on answered images")
    axes.set_title("Abstention: answer only when the top probability >= threshold")
    axes.grid(alpha=0.3)
    figure.legend(loc="outside lower center", ncols=2 if len(runs) > 3 else 1, fontsize=8)   # off the curves
    return figure

"""Line charts drawn with matplotlib: the training curves of the model card.

matplotlib is imported when a chart is drawn, not with this module, so a training run pays for it only at its end.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PANEL_INCHES = (5.0, 3.8)  # width and height of one panel


@dataclass
class Series:
    """Points (x, y) drawn as a line, as markers ("o" or "*"), or both, in a matplotlib colour such as "tab:blue"."""

    points: Sequence[tuple[float, float]]
    colour: str
    label: str | None = None
    line: bool = True
    marker: str | None = None
    alpha: float = 1.0
    width: float = 2


def _draw(axes, series: Series) -> None:
    xs, ys = zip(*series.points, strict=True) if series.points else ((), ())
    axes.plot(
        xs,
        ys,
        color=series.colour,
        alpha=series.alpha,
        linewidth=series.width,
        linestyle="-" if series.line else "none",
        marker=series.marker or "",
        markersize=12 if series.marker == "*" else 5,
        label=series.label,
    )


def line_charts(panels: Sequence[tuple[str, Sequence[Series]]], x_label: str) -> "Figure":
    """Charts side by side, one a (title, series) pair, sharing the x axis's name: a Figure for `savefig`.

    Each panel has matplotlib's defaults (5% margins around the data, round ticks) with a grid, and a legend
    of its labelled series where it covers the fewest points.
    """
    from matplotlib.figure import Figure  # no pyplot: the Agg canvas, no global state

    figure = Figure(figsize=(PANEL_INCHES[0] * len(panels), PANEL_INCHES[1]), layout="constrained")
    for axes, (title, series) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for one in series:
            _draw(axes, one)
        axes.set_title(title)
        axes.set_xlabel(x_label)
        axes.grid(True, color="0.9")
        if any(one.label for one in series):
            axes.legend(loc="best")
    return figure

"""Line charts as PNG files, drawn with PIL: the training curves of the model card.

A run draws them in its last seconds; importing matplotlib and laying out a figure took about two of them (a
cold import, on the 2-core machine), longer than the rest of a short run's finish. These charts need only axes,
ticks, polylines, markers and a legend.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw, ImageFont

# matplotlib's tab10 colours, so that the charts look as TensorBoard's and matplotlib's users expect.
COLOURS = {"tab:blue": (31, 119, 180), "tab:orange": (255, 127, 14), "tab:green": (44, 160, 44)}
BLACK, GRID, WHITE = (0, 0, 0), (225, 225, 225), (255, 255, 255)
PANEL = (500, 380)  # width and height of one panel, in pixels
MARGIN = (62, 24, 30, 42)  # left, right, top, bottom: room for the tick labels and the title


@dataclass
class Series:
    """Points (x, y) drawn as a line, as markers ("o" or "*"), or both; `alpha` lightens the colour on white."""

    points: Sequence[tuple[float, float]]
    colour: str
    label: str | None = None
    line: bool = True
    marker: str | None = None
    alpha: float = 1.0
    width: int = 2


def limits(values: Sequence[float]) -> tuple[float, float]:
    """The axis range of VALUES: their span and 5% of it on either side, as matplotlib's default margins."""
    low, high = min(values), max(values)
    pad = 0.05 * (high - low) if high - low > 1e-12 else max(0.05 * abs(low), 0.05)
    return low - pad, high + pad


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """About COUNT round values (1, 2 or 5 times a power of ten apart) in [LOW, HIGH]."""
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if m * step >= raw * (1 - 1e-9))
    first = math.ceil(low / step - 1e-9)
    return [round(i * step, 12) for i in range(first, math.floor(high / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.6g}"


def _tint(colour: str, alpha: float) -> tuple[int, int, int]:
    return tuple(round(alpha * c + (1 - alpha) * 255) for c in COLOURS[colour])


def _star(draw: ImageDraw.ImageDraw, x: float, y: float, radius: float, fill) -> None:
    corners = [
        (x + r * math.sin(i * math.pi / 5), y - r * math.cos(i * math.pi / 5))
        for i, r in zip(range(10), [radius, radius * 0.45] * 5, strict=True)
    ]
    draw.polygon(corners, fill=fill)


def _panel(series: Sequence[Series], title: str, x_label: str, font) -> Image.Image:
    """One chart: the data's range and 5% margins, grid and ticks on round values, the series in order, a legend
    in the corner that covers the fewest points (matplotlib's "best")."""
    width, height = PANEL
    box = (MARGIN[0], MARGIN[2], width - MARGIN[1], height - MARGIN[3])  # left, top, right, bottom
    image = Image.new("RGB", PANEL, WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((width / 2, 8), title, fill=BLACK, font=font, anchor="mt")
    draw.text(((box[0] + box[2]) / 2, height - 6), x_label, fill=BLACK, font=font, anchor="mb")
    if series:
        (x_low, x_high), (y_low, y_high) = (limits([p[i] for s in series for p in s.points]) for i in (0, 1))

        def at(x: float, y: float) -> tuple[float, float]:  # data to pixels; y grows upwards
            fx, fy = (x - x_low) / (x_high - x_low), (y - y_low) / (y_high - y_low)
            return box[0] + fx * (box[2] - box[0]), box[3] - fy * (box[3] - box[1])

        for x in nice_ticks(x_low, x_high):
            draw.line((at(x, y_low)[0], box[1], at(x, y_low)[0], box[3]), fill=GRID)
            draw.text((at(x, y_low)[0], box[3] + 5), _label(x), fill=BLACK, font=font, anchor="mt")
        for y in nice_ticks(y_low, y_high):
            draw.line((box[0], at(x_low, y)[1], box[2], at(x_low, y)[1]), fill=GRID)
            draw.text((box[0] - 5, at(x_low, y)[1]), _label(y), fill=BLACK, font=font, anchor="rm")
        pixels = [[at(x, y) for x, y in s.points] for s in series]
        for s, points in zip(series, pixels, strict=True):
            _draw_series(draw, s, points)
        _legend(draw, [s for s in series if s.label], box, [p for points in pixels for p in points], font)
    draw.rectangle(box, outline=BLACK)
    return image


def _draw_series(draw: ImageDraw.ImageDraw, series: Series, points: Sequence[tuple[float, float]]) -> None:
    fill = _tint(series.colour, series.alpha)
    if series.line and len(points) > 1:
        draw.line(points, fill=fill, width=series.width, joint="curve")
    for x, y in points if series.marker else ():
        if series.marker == "*":
            _star(draw, x, y, 8, fill)
        else:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=fill)


def _legend(draw: ImageDraw.ImageDraw, series: Sequence[Series], box, points, font) -> None:
    """A framed key of the labelled series, placed in the corner of BOX with the fewest of POINTS under it."""
    if not series:
        return
    row, inset = 18, 6
    width = max(draw.textlength(s.label, font=font) for s in series) + 40
    height = row * len(series) + 6
    corners = [
        (box[2] - inset - width, box[1] + inset),  # upper right first, as matplotlib's order of preference
        (box[0] + inset, box[1] + inset),
        (box[0] + inset, box[3] - inset - height),
        (box[2] - inset - width, box[3] - inset - height),
    ]

    def covered(corner: tuple[float, float]) -> int:
        return sum(corner[0] <= x <= corner[0] + width and corner[1] <= y <= corner[1] + height for x, y in points)

    left, top = min(corners, key=covered)
    draw.rectangle((left, top, left + width, top + height), fill=WHITE, outline=GRID)
    for i, s in enumerate(series):
        y = top + 3 + row * i + row / 2
        if s.line:
            draw.line((left + 6, y, left + 28, y), fill=_tint(s.colour, s.alpha), width=s.width)
        if s.marker:
            _draw_series(draw, replace(s, line=False), [(left + 17, y)])
        draw.text((left + 34, y), s.label, fill=BLACK, font=font, anchor="lm")


def line_charts(panels: Sequence[tuple[str, Sequence[Series]]], x_label: str) -> Image.Image:
    """Charts side by side, one a (title, series) pair, sharing the x axis's name."""
    font = ImageFont.load_default(size=13)
    images = [_panel(series, title, x_label, font) for title, series in panels]
    chart = Image.new("RGB", (PANEL[0] * len(images), PANEL[1]), WHITE)
    for i, image in enumerate(images):
        chart.paste(image, (PANEL[0] * i, 0))
    return chart

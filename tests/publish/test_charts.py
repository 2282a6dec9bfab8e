"""The card's line charts: round ticks, 5% margins, the data where its values say, matplotlib imported only to draw."""

import subprocess
import sys

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb

from vit_hf.publish.charts import Series, line_charts


def _limits_and_ticks(values: list[float]) -> tuple[tuple[float, float], list[float]]:
    """The y range of a chart of VALUES and its tick values inside that range."""
    axes = line_charts([("y", [Series([(i, v) for i, v in enumerate(values)], "tab:blue")])], "step").axes[0]
    low, high = axes.get_ylim()
    return (low, high), [tick for tick in axes.get_yticks() if low - 1e-9 <= tick <= high + 1e-9]


def test_ticks_are_round_values_inside_the_range():
    assert _limits_and_ticks([0, 1000])[1] == pytest.approx([0, 200, 400, 600, 800, 1000])
    assert _limits_and_ticks([0.4, 0.9])[1] == pytest.approx([0.4, 0.5, 0.6, 0.7, 0.8, 0.9])


@pytest.mark.parametrize(("low", "high"), [(-50, 1050), (0.385, 0.985), (2.279, 2.3), (19, 21)])
def test_ticks_are_evenly_spaced_multiples_of_one_two_or_five_times_a_power_of_ten(low, high):
    ticks = np.array(_limits_and_ticks([low, high])[1])
    step = ticks[1] - ticks[0]
    mantissa = step / 10 ** np.floor(np.log10(step))

    assert 4 <= len(ticks) <= 10 and np.allclose(np.diff(ticks), step)
    assert min(abs(mantissa - m) for m in (1, 2, 2.5, 5)) < 1e-6  # 2.5 is matplotlib's step between 2 and 5
    assert np.allclose(ticks / step, np.round(ticks / step))


def test_limits_add_five_percent_of_the_span_on_either_side():
    assert _limits_and_ticks([0, 10, 100])[0] == pytest.approx((-5, 105))


def _pixels(figure) -> np.ndarray:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


def _where(chart: np.ndarray, colour: str) -> tuple[np.ndarray, np.ndarray]:
    rgb = np.array(to_rgb(colour)) * 255  # matplotlib's own colour of that name: the reference
    rows, columns = np.nonzero(np.abs(chart.astype(int) - rgb).sum(-1) < 10)
    return rows, columns


def test_a_falling_line_falls_and_a_rising_one_rises_in_their_own_panels():
    falling = Series([(step, 2.0 - step / 100) for step in range(1, 101)], "tab:blue")
    rising = Series([(step, step / 100) for step in range(10, 101, 10)], "tab:orange", marker="o")
    chart = _pixels(line_charts([("loss", [falling]), ("accuracy", [rising])], x_label="step"))

    height, width = chart.shape[:2]
    assert width > height
    for colour, panel, sign in (("tab:blue", 0, 1), ("tab:orange", 1, -1)):
        rows, columns = _where(chart, colour)
        assert columns.min() // (width // 2) == columns.max() // (width // 2) == panel
        # The leftmost pixels of the line are higher (a smaller row) than its rightmost for a falling line.
        left, right = rows[columns <= columns.min() + 2].mean(), rows[columns >= columns.max() - 2].mean()
        assert sign * (right - left) > 0.5 * height


def test_a_point_is_drawn_where_its_value_lies_between_the_ticks():
    # Points at y 0 and 1 and one star at y 0.5, x in the middle: the star sits halfway between the others.
    points = Series([(0, 0.0), (10, 1.0)], "tab:blue", line=False, marker="o")
    star = Series([(5, 0.5)], "tab:green", line=False, marker="*")
    chart = _pixels(line_charts([("accuracy", [points, star])], x_label="step"))

    blue_rows, blue_columns = _where(chart, "tab:blue")
    green_rows, green_columns = _where(chart, "tab:green")
    assert green_rows.mean() == pytest.approx((blue_rows.min() + blue_rows.max()) / 2, abs=3)
    assert green_columns.mean() == pytest.approx((blue_columns.min() + blue_columns.max()) / 2, abs=3)


def test_matplotlib_is_imported_to_draw_the_card_curves_not_with_the_card(tmp_path):
    code = (
        "import sys; from vit_hf.publish.card import plot_training_curves;"
        "print('matplotlib' in sys.modules);"
        f"plot_training_curves({{'train/loss': [(1, 2.0), (2, 1.5)]}}, {str(tmp_path / 'c.png')!r})"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

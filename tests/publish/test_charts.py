"""The card's line charts: round ticks, matplotlib's margins, the data where its values say, no matplotlib."""

import subprocess
import sys

import numpy as np
import pytest

from vit_hf.publish.charts import COLOURS, PANEL, Series, limits, line_charts, nice_ticks


@pytest.mark.parametrize(
    ("low", "high", "ticks"),
    [
        (0, 1000, [0, 200, 400, 600, 800, 1000]),
        (-50, 1050, [0, 200, 400, 600, 800, 1000]),
        (0.385, 0.985, [0.4, 0.5, 0.6, 0.7, 0.8, 0.9]),
        (2.279, 2.3, [2.28, 2.285, 2.29, 2.295, 2.3]),
        (19, 21, [19, 19.5, 20, 20.5, 21]),
    ],
)
def test_ticks_are_round_values_inside_the_range(low, high, ticks):
    assert nice_ticks(low, high) == pytest.approx(ticks)


def test_limits_add_five_percent_of_the_span_on_either_side():
    assert limits([0, 10, 100]) == pytest.approx((-5, 105))
    assert limits([0.08]) == pytest.approx((0.03, 0.13))  # one value: a band around it


def _where(chart: np.ndarray, colour: str) -> tuple[np.ndarray, np.ndarray]:
    rows, columns = np.nonzero(np.abs(chart.astype(int) - COLOURS[colour]).sum(-1) < 10)
    return rows, columns


def test_a_falling_line_falls_and_a_rising_one_rises_in_their_own_panels():
    falling = Series([(step, 2.0 - step / 100) for step in range(1, 101)], "tab:blue")
    rising = Series([(step, step / 100) for step in range(10, 101, 10)], "tab:orange", marker="o")
    chart = np.asarray(line_charts([("loss", [falling]), ("accuracy", [rising])], x_label="step"))

    assert chart.shape == (PANEL[1], 2 * PANEL[0], 3)
    for colour, panel, sign in (("tab:blue", 0, 1), ("tab:orange", 1, -1)):
        rows, columns = _where(chart, colour)
        assert columns.min() // PANEL[0] == columns.max() // PANEL[0] == panel
        # The leftmost pixels of the line are higher (a smaller row) than its rightmost for a falling line.
        left, right = rows[columns <= columns.min() + 2].mean(), rows[columns >= columns.max() - 2].mean()
        assert sign * (right - left) > 0.5 * PANEL[1]


def test_a_point_is_drawn_where_its_value_lies_between_the_ticks():
    # Points at y 0 and 1 and one star at y 0.5, x in the middle: the star sits halfway between the others.
    points = Series([(0, 0.0), (10, 1.0)], "tab:blue", line=False, marker="o")
    star = Series([(5, 0.5)], "tab:green", line=False, marker="*")
    chart = np.asarray(line_charts([("accuracy", [points, star])], x_label="step"))

    blue_rows, blue_columns = _where(chart, "tab:blue")
    green_rows, green_columns = _where(chart, "tab:green")
    assert green_rows.mean() == pytest.approx((blue_rows.min() + blue_rows.max()) / 2, abs=3)
    assert green_columns.mean() == pytest.approx((blue_columns.min() + blue_columns.max()) / 2, abs=3)


def test_drawing_the_card_curves_imports_no_matplotlib(tmp_path):
    code = (
        "import sys; from vit_hf.publish.hub import plot_training_curves;"
        f"plot_training_curves({{'train/loss': [(1, 2.0), (2, 1.5)]}}, {str(tmp_path / 'c.png')!r});"
        "print('matplotlib' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False" and (tmp_path / "c.png").stat().st_size > 0

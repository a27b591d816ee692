"""The range study's decision rules and the report split's separation from the tune split."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import ranges_study as rs
from benchmarks import textdata


def _row(model: str, fp32: float, **methods: tuple[float, bool]) -> dict:
    return {"model": model, "fp32": {"tune": fp32, "report": fp32},
            "methods": {m: {"tune": v, "report": v, "check_met": ok} for m, (v, ok) in methods.items()}}


ROWS = [
    # minmax is best on a, 2 points worse than mse on b; mse is 0.5 below minmax on a.
    _row("a", 0.980, minmax=(0.978, True), mse=(0.973, True), percentile=(0.970, True), entropy=(0.900, False),
         auto=(0.977, True)),
    _row("b", 0.970, minmax=(0.945, True), mse=(0.965, True), percentile=(0.966, True), entropy=(0.969, True),
         auto=(0.968, True)),
]


def test_shortfalls_are_points_beyond_the_two_slacks():
    below_fp32, below_best = rs.shortfalls(ROWS[0], "mse")
    assert below_fp32 == pytest.approx(100 * (0.980 - 0.01 - 0.973))  # -0.3: within 1 pt of fp32
    assert below_best == pytest.approx(100 * (0.978 - 0.003 - 0.973))  # +0.2: 0.5 below minmax
    assert rs.shortfalls(ROWS[1], "minmax") == pytest.approx((100 * (0.96 - 0.945), 100 * (0.966 - 0.945)))


def test_choose_default_takes_the_least_worst_shortfall():
    pick, worst = rs.choose_default(ROWS, ["minmax", "mse", "percentile", "auto"])
    assert worst["minmax"] == pytest.approx(2.1)
    assert worst["mse"] == pytest.approx(0.2)
    assert worst["auto"] == pytest.approx(-0.2)  # meets both rules on both models
    assert pick == "auto"


def test_unflagged_damage_lists_only_big_losses_with_a_passing_check():
    rows = ROWS + [_row("c", 0.95, minmax=(0.91, True), entropy=(0.50, False))]
    assert rs.unflagged_damage(rows) == ["c / minmax: 4.0 pts below fp32 on tune, check passed",
                                         "c / minmax: 4.0 pts below fp32 on report, check passed"]


def test_report_text_and_typefaces_are_not_the_tune_splits():
    sents, source = textdata.report_sentences()
    tune = set(textdata.corpus()[0])
    assert len(sents) >= 200 and not tune & set(sents)
    if textdata.LICENSE_DIR.is_dir():
        assert source == "Python standard-library docstrings"
    faces = {Path(f).name for f in textdata.report_fonts()}
    assert faces and not faces & set(textdata.FONT_NAMES)


def test_cap_counts_a_method_that_beats_fp32_at_fp32():
    rows = [_row("d", 0.9867, minmax=(0.9911, True), mse=(0.9867, True), percentile=(0.9867, True),
                 entropy=(0.9867, True))]
    assert rs.shortfalls(rows[0], "mse")[1] == pytest.approx(100 * (0.9911 - 0.003 - 0.9867))  # 0.14: missed
    assert rs.shortfalls(rows[0], "mse", cap=True)[1] == pytest.approx(-0.3)
    assert rs.choose_default(rows, ["mse", "minmax"], cap=True) == ("minmax", pytest.approx({"mse": -0.3, "minmax": -0.74}))

"""The check's sequence rule finds the word separator even where a letter outnumbers it."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.check import SequenceAgreement


def _scores(rows, classes, rng):
    """One-hot-like [N, T, C] scores (seeded noise below the winning class)."""
    out = rng.uniform(0.0, 0.1, (len(rows), len(rows[0]), classes)).astype(np.float32)
    for n, row in enumerate(rows):
        out[n, np.arange(len(row)), row] = 1.0
    return out


def test_a_doubled_letter_is_not_taken_for_the_separator():
    rng = np.random.default_rng(7)
    b, e, sep = 0, 1, 5  # blank, "e", space; 2, 3, 4, 6: "F", "B", "S", "D"
    # "Fee Bee See Dee": "e" (8) outnumbers the space (3) but doubles; the space never follows itself
    line = [b]
    for first in (2, 3, 4, 6):
        line += [first, b, e, b, e, b, sep, b]
    line = line[:-2] + [b]  # no space after the last word
    ref = _scores([line, line], 7, rng)
    # the candidate reads the same lines but one starts with a space (a crop margin)
    margin = [sep] + line[1:]
    cand = _scores([margin, line], 7, rng)
    fig = SequenceAgreement()
    fig.update(ref, cand)
    assert fig.value() == 1.0  # was 1 - 1/16/2 = 0.969 with "e" taken for the separator
    # an inner space lost still counts
    inner = line.copy()
    inner[line.index(sep)] = b
    fig = SequenceAgreement()
    fig.update(ref, _scores([inner, line], 7, rng))
    assert fig.value() == pytest.approx((1 - 1 / 15 + 1) / 2)


def test_without_a_separator_nothing_is_stripped():
    rng = np.random.default_rng(3)
    b = 0
    line = [b, 1, b, 1, b, 2, b, 2, b]  # "1122": every symbol follows itself, so none is a separator
    ref = _scores([line], 3, rng)
    cand = _scores([[2, 1] + line[2:]], 3, rng)  # a "2" read in front of the first "1"
    fig = SequenceAgreement()
    fig.update(ref, cand)
    # one insertion in 5 symbols (taking "1" for the separator stripped "11" from the reference: 0.4)
    assert fig.value() == pytest.approx(1 - 1 / 5)

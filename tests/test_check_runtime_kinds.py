"""The check judges each output's kind from what the original returns, not from its declared shape.

Real models declare wrong, symbolic or no output shapes (an OCR model declaring ``[1, seqlen]``
returns CTC logits ``[T, 1, C]``). The kind is read from the returned array's rank and type on the
first check feed; the declared shape is the fallback (nothing has run) and the cross-check (one line
in the report when it disagrees). Models are built here, seeded; the logits are the feeds
themselves (an identity Gemm), so every figure below is known exactly.
"""

from __future__ import annotations

import html
import json
import pickle

import numpy as np
import onnx
import onnx_ir as ir
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.check import (
    CheckConfig,
    OutputFigures,
    TopOneAgreement,
    check_model,
    figures_meet,
    output_kinds,
    output_verdicts,
    returned_kind,
    split_data,
)
from onnxcomp.cli import main
from onnxcomp.data import Dataset
from onnxcomp.runtime import run_model

C = 12  # classes, blank 0
#: a line of symbols; 5, the most frequent symbol that never doubles, is the separator
#: (SequenceAgreement) and sits inside, so nothing is stripped; it is the one step read differently
LINE = [3, 3, 5, 7, 7]


def _ctc_model(t: int, declared, *, bias: np.ndarray | None = None, time_major: bool = True) -> onnx.ModelProto:
    """x [N, T, C] (N = 1 in every feed) -> Reshape [T, C] -> Gemm (identity weights, ``bias``) ->
    Unsqueeze at axis N (1: time-major [T, 1, C]) or N - 1 (0: [1, T, C]): raw CTC logits equal to
    the feed (plus the bias). The axis is computed from the input's shape, so shape inference
    cannot see what is returned (as in a real export), and the output is declared ``declared``."""
    nodes = [oh.make_node("Reshape", ["x", "flat"], ["x2"]), oh.make_node("Gemm", ["x2", "w", "b"], ["g"]),
             oh.make_node("Shape", ["x"], ["xs"], start=0, end=1), oh.make_node("Sub", ["xs", "shift"], ["axes"]),
             oh.make_node("Unsqueeze", ["g", "axes"], ["y"])]
    inits = [("flat", np.array([t, C], np.int64)), ("w", np.eye(C, dtype=np.float32)),
             ("b", np.zeros(C, np.float32) if bias is None else bias.astype(np.float32)),
             ("shift", np.array([0 if time_major else 1], np.int64))]
    return make_proto(nodes, [("x", ["N", t, C])], [("y", declared)], inits)


def _feed(symbols: list[int], t: int, rng, *, close: int | None = None) -> dict[str, np.ndarray]:
    """Logits [1, T, C] whose top class spells ``symbols`` with blanks between them (margin >= 1);
    at step ``close`` the symbol beats the blank by 0.05 only."""
    x = rng.uniform(-1.0, 0.0, (t, C)).astype(np.float32)
    x[:, 0] = 2.0
    steps = np.linspace(1, t - 2, len(symbols)).round().astype(int)
    for step, s in zip(steps, symbols):
        x[step, s] = 3.0
    if close is not None:
        x[steps[close], 0] = 2.95
    return {"x": x[None]}


def _one_step_read_blank(t: int, lines: int, seed: int):
    """The original, a written model that adds 0.1 to the blank (so the one step whose symbol leads
    by 0.05, the 5 of the first line, reads blank), and ``lines`` feeds of LINE; both declare
    ``[1, seqlen]`` and return ``[T, 1, C]``."""
    rng = np.random.default_rng(seed)
    ref = _ctc_model(t, [1, "seqlen"])
    cand = _ctc_model(t, [1, "seqlen"], bias=np.eye(C)[0] * 0.1)
    return ref, cand, [_feed(LINE, t, rng, close=2 if i == 0 else None) for i in range(lines)]


def _check(ref, cand, feeds, config=None):
    ref, cand = (m if isinstance(m, ir.Model) else io.load_model(m) for m in (ref, cand))
    split = split_data(None, CheckConfig(), evaluation=Dataset(feeds, ref))
    return check_model(ref, cand, split, config or CheckConfig(), compressed=1)


def test_declared_rank_two_but_returned_ctc_logits_is_judged_as_a_time_major_sequence():
    ref, cand, feeds = _one_step_read_blank(12, 4, seed=0)
    assert output_kinds(io.load_model(ref)) == {"y": "scores"}  # what the declared shape says
    report = _check(ref, cand, feeds)
    row = report["outputs"][0]
    assert row["kind"] == "sequence" and row["rule"] == "decoded-sequence agreement >= 0.99"
    # one line reads 3 3 7 7 for 3 3 5 7 7: 1 - 1/5; the other three agree
    assert row["sequence_agreement"] == pytest.approx((3 + 0.8) / 4)
    assert row["decisions"] == 4 and report["data"]["check_samples"] == 4  # one sequence per feed, not 12
    note = ("output 'y' declares [1, seqlen] but returns [12, 1, 12]: judged as sequence (time-major [T, N, C]) "
            "from the returned shape, not scores")
    assert row["kind_note"] == note and report["kind_note"] == note
    assert not report["met"] and report["problems"] == [
        "output 'y': decoded-sequence agreement 0.9500, budget decoded-sequence agreement >= 0.99"]


def test_per_step_agreement_would_pass_where_the_decoded_sequences_fail():
    ref, cand, feeds = _one_step_read_blank(40, 5, seed=1)
    report = _check(ref, cand, feeds)
    row = report["outputs"][0]
    # per step, as the declared shape had it judged: 199 of 200 steps agree, above 0.99
    per_step = TopOneAgreement()
    for r, c in zip(run_model(io.load_model(ref), feeds), run_model(io.load_model(cand), feeds)):
        per_step.update(r[0], c[0])
    assert per_step.value() == pytest.approx(199 / 200) and per_step.value() >= 0.99
    # decoded: the first line reads 3 3 7 7 for 3 3 5 7 7: 1 - 1/5 on one of 5 lines
    assert row["kind"] == "sequence" and row["sequence_agreement"] == pytest.approx((4 + 0.8) / 5)
    assert not row["ok"] and not report["met"]
    assert row["cosine"] > 0.999  # cosine would pass too


def test_symbolic_and_absent_declared_shapes():
    rng = np.random.default_rng(2)
    t = 10
    feeds = [_feed([1, 11], t, rng) for _ in range(3)]
    # symbolic [T, N, C]: the declared view has no data to find a blank in, so it reads as values;
    # the returned logits have one (class 0 tops 80% of the steps): a sequence, said in one line
    symbolic = _ctc_model(t, ["T", "N", "C"])
    assert output_kinds(io.load_model(symbolic)) == {"y": "values"}
    report = _check(symbolic, symbolic, feeds)
    assert report["outputs"][0]["kind"] == "sequence" and report["outputs"][0]["sequence_agreement"] == 1.0
    assert report["kind_note"] == ("output 'y' declares [T, N, C] and returns [10, 1, 12]: judged as sequence "
                                   "(time-major [T, N, C]) from the returned shape, not values")
    # no declared shape at all, batch-major [1, T, C]
    absent = io.load_model(_ctc_model(t, [1, t, C], time_major=False))
    absent.graph.outputs[0].shape = None  # onnx.checker refuses such a file; a model in memory has it
    assert output_kinds(absent) == {"y": "values"}
    report = _check(absent, absent, feeds)
    assert report["outputs"][0]["kind"] == "sequence" and report["met"]
    assert report["kind_note"] == ("output 'y' declares no shape but returns [1, 10, 12]: judged as sequence "
                                   "from the returned shape, not values")
    # a Softmax with symbolic dims that admit what it returns: same kind, no note
    softmax = make_proto([oh.make_node("Softmax", ["x"], ["y"], axis=-1)], [("x", ["N", "T", C])],
                         [("y", ["N", "T", C])])
    report = _check(softmax, softmax, [{"x": f["x"]} for f in feeds])
    assert report["outputs"][0]["kind"] == "sequence" and report["kind_note"] is None
    assert "kind_note" not in report["outputs"][0]
    # symbolic rank 2 reads as scores; returning one column it is a value per sample: a regression
    # (judged by its R^2 against the original since the fourteenth session; values before)
    relu = make_proto([oh.make_node("Relu", ["v"], ["y"])], [("v", ["batch", "k"])], [("y", ["batch", "k"])])
    vfeeds = [{"v": rng.standard_normal((4, 1)).astype(np.float32)} for _ in range(3)]
    assert output_kinds(io.load_model(relu)) == {"y": "scores"}
    report = _check(relu, relu, vfeeds)
    assert report["outputs"][0]["kind"] == "regression"
    assert report["outputs"][0]["rule"] == "R^2 against the original >= 0.99"
    assert report["kind_note"] == ("output 'y' declares [batch, k] and returns [4, 1]: judged as regression "
                                   "from the returned shape, not scores")


def test_rank_three_projections_without_a_blank_stay_values():
    rng = np.random.default_rng(3)
    t = 16
    model = io.load_model(_ctc_model(t, [t, 1, C]))
    declared = output_kinds(model)["y"]
    # random logits: no class tops half of the steps
    noise = rng.standard_normal((t, 1, C)).astype(np.float32)
    assert returned_kind(declared, noise, batch=1).kind == "values"
    # one class tops 14 of 16 steps, but it is in the middle of the class axis: no CTC blank
    mid = noise.copy()
    mid[:14, 0, 5] = 10.0
    mid[14:, 0, 3] = 10.0
    assert returned_kind(declared, mid, batch=1).kind == "values"
    # the same with the dominant class first: a blank
    first = noise.copy()
    first[:14, 0, 0] = 10.0
    first[14:, 0, 3] = 10.0
    judged = returned_kind(declared, first, batch=1)
    assert judged.kind == "sequence" and judged.axes == (1, 0, 2) and judged.note == (
        "output 'y' declares [16, 1, 12] and returns [16, 1, 12]: judged as sequence (time-major [T, N, C]) "
        "from the returned shape, not values")
    # every step blank: nothing is read, no sequence
    blank = np.zeros((t, 1, C), np.float32)
    blank[..., 0] = 1.0
    assert returned_kind(declared, blank, batch=1).kind == "values"
    # too few steps (2) to tell a blank from chance
    assert returned_kind(output_kinds(io.load_model(_ctc_model(2, [2, 1, C])))["y"], first[13:15], batch=1).kind == "values"
    assert returned_kind(declared, first[:8], batch=1).kind == "values"  # 8 steps, all blank
    assert returned_kind(declared, first[7:15], batch=1).kind == "sequence"  # 8 steps, one symbol
    # a plain string kind (no declared view) stands as it is
    assert returned_kind("scores", first, batch=1).kind == "scores"


def test_time_major_is_read_from_the_feed_batch():
    model = io.load_model(_ctc_model(8, [8, 3, C]))
    declared = output_kinds(model)["y"]
    logits = np.zeros((8, 3, C), np.float32)
    logits[..., 0] = 1.0
    logits[2, :, 4] = 2.0
    assert returned_kind(declared, logits, batch=3).axes == (1, 0, 2)  # [T=8, N=3, C]
    assert returned_kind(declared, logits, batch=8).axes is None  # [N=8, T=3, C]


def test_the_fallback_judges_the_kind_the_check_judges():
    """The automatic fallback builds its figures from output_kinds (declared) and judges rows with the
    declared kind list: the rows carry the kind judged, through pickling (process executors) too."""
    ref, cand, feeds = _one_step_read_blank(12, 4, seed=4)
    ref, cand = io.load_model(ref), io.load_model(cand)
    kinds = pickle.loads(pickle.dumps(output_kinds(ref)))
    assert kinds == {"y": "scores"}
    figures = OutputFigures(["y"], kinds)
    for feed, r, c in zip(feeds, run_model(ref, feeds), run_model(cand, feeds)):
        figures.update(r, c, feed)
    rows = figures.result()
    assert figures.kinds == ["sequence"] and rows[0]["kind"] == "sequence"
    assert rows[0]["sequence_agreement"] == pytest.approx((3 + 0.8) / 4) and "top1_agreement" not in rows[0]
    config = CheckConfig()
    assert output_verdicts(["scores"], rows, config) == [
        (False, "decoded-sequence agreement >= 0.99", "decoded-sequence agreement 0.9500")]
    assert figures_meet(["scores"], rows, CheckConfig(min_agreement=0.9))


def test_cli_says_the_kind_and_the_disagreement_in_terminal_json_and_html(tmp_path, capsys):
    rng = np.random.default_rng(5)
    t = 12
    model = tmp_path / "ctc.onnx"
    onnx.save(_ctc_model(t, [1, "seqlen"]), model)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(20):
        np.savez(calib / f"{i:03d}.npz", **_feed([int(s) for s in rng.integers(1, C, 3)], t, rng))
    argv = ["quantize", str(model), "--calibration", str(calib), "--no-latency"]
    code = main([*argv, "-o", str(tmp_path / "q.onnx"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    check = json.loads(out)["check"]
    assert check["data"]["check_feeds"] == 4 and check["data"]["check_samples"] == 4
    row = check["outputs"][0]
    assert row["kind"] == "sequence" and row["sequence_agreement"] == 1.0 and check["met"]
    note = ("output 'y' declares [1, seqlen] but returns [12, 1, 12]: judged as sequence (time-major [T, N, C]) "
            "from the returned shape, not scores")
    assert check["kind_note"] == note
    code = main([*argv, "-o", str(tmp_path / "q2.onnx")])
    out, err = capsys.readouterr()
    assert code == 0, err
    text = " ".join(out.split())
    assert "check passed" in text and "y (sequence): decoded-sequence agreement 100.00%" in text and note in text
    # the HTML report of compress carries the line too
    code = main(["compress", str(model), "-o", str(tmp_path / "c.onnx"), "--recipe", "int8", "--calibration",
                 str(calib), "--report", str(tmp_path / "r.html")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert html.escape(note) in (tmp_path / "r.html").read_text()

"""The original's outputs in the check: one bounded collector (onnxcomp.runtime.KeptOutputs /
collect_outputs) for the big-model path (original first) and for the outputs kept on the split;
the same figures whichever way the original ran, and the class predictions shared with compare."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import check, io
from onnxcomp.check import CheckConfig, check_model, split_data
from onnxcomp.data import Dataset
from onnxcomp.measure import fidelity
from onnxcomp.measure.metrics import predicted_class
from onnxcomp.runtime import KeptOutputs, collect_outputs, create_session, session_options


def _pair(seed: int = 0):
    r = np.random.default_rng(seed)
    w = r.standard_normal((6, 5)).astype(np.float32)

    def model(weight):
        return io.load_model(make_proto(
            [oh.make_node("MatMul", ["x", "w"], ["z"]), oh.make_node("Softmax", ["z"], ["p"], axis=-1)],
            [("x", ["N", 6])], [("p", ["N", 5])], [("w", weight)]))

    reference = model(w)
    candidate = model(w + 0.3 * r.standard_normal(w.shape).astype(np.float32))
    feeds = [{"x": r.standard_normal((4, 6)).astype(np.float32)} for _ in range(20)]
    return reference, candidate, feeds


def test_kept_outputs_stop_at_their_bound():
    one = [np.zeros(4, np.float32), np.zeros(2, np.float64)]  # 32 bytes a feed
    kept = KeptOutputs(64)
    assert kept.add(one) and kept.add(one) and kept.nbytes == 64 and len(kept.values) == 2
    assert not kept.add(one) and kept.values is None
    assert not kept.add(one) and kept.values is None  # nothing is kept after the bound
    unbounded = KeptOutputs()
    assert all(unbounded.add(one) for _ in range(100)) and len(unbounded.values) == 100


def test_collect_outputs_runs_every_feed_or_gives_up():
    reference, _, feeds = _pair()
    session = create_session(reference, sess_options=session_options())
    outputs = collect_outputs(session, ["p"], feeds)
    assert len(outputs) == 20
    np.testing.assert_array_equal(outputs[3][0], session.run(["p"], feeds[3])[0])
    assert collect_outputs(session, ["p"], feeds, limit=4 * 5 * 4 * 20) is not None  # exactly the bound
    assert collect_outputs(session, ["p"], feeds, limit=4 * 5 * 4 * 20 - 1) is None


@pytest.mark.parametrize("path", ["side by side", "original first", "over the bound"])
def test_the_check_reads_the_same_whichever_way_the_original_runs(monkeypatch, path):
    reference, candidate, feeds = _pair()
    expected = check_model(reference, candidate, split_data(Dataset(feeds, reference), CheckConfig()), compressed=1)
    sessions = []
    real = check._session
    monkeypatch.setattr(check, "_session", lambda m, *what: sessions.append(m) or real(m, *what))
    if path != "side by side":
        monkeypatch.setattr(check, "LARGE_MODEL_BYTES", 0)
    if path == "over the bound":
        monkeypatch.setattr(check, "KEEP_REFERENCE_BYTES", 4 * 5 * 4)  # one feed's outputs
    split = split_data(Dataset(feeds, reference), CheckConfig())
    report = check_model(reference, candidate, split, compressed=1)
    assert report["outputs"] == expected["outputs"] and report["met"] == expected["met"]
    assert report["data"]["check_feeds"] == 4
    # over the bound, the original runs twice (first, then again beside the candidate) and nothing is kept
    assert sessions == ([reference, reference, candidate] if path == "over the bound" else [reference, candidate])
    if path == "over the bound":
        assert split.reference_outputs is None
    else:
        assert len(split.reference_outputs) == 4
        np.testing.assert_array_equal(split.reference_outputs[0][0], create_session(reference).run(["p"], feeds[4])[0])
        sessions.clear()
        again = check_model(reference, candidate, split, compressed=1)
        assert sessions == [candidate] and again["outputs"] == expected["outputs"]  # the kept outputs serve


def test_check_and_compare_predict_the_same_classes():
    r = np.random.default_rng(2)
    for shape in [(5, 7), (5, 3, 7), (5, 2, 3, 7)]:
        scores = r.standard_normal(shape).astype(np.float32)
        flat = scores.reshape(5, -1, 7)
        np.testing.assert_array_equal(predicted_class(scores), flat[:, 0].argmax(-1))
    np.testing.assert_array_equal(predicted_class(np.array([[3.0], [1.0]])), [3, 1])  # a label per sample
    np.testing.assert_array_equal(predicted_class(np.array([2, 0, 1])), [2, 0, 1])
    reference, candidate, feeds = _pair(1)
    labels = np.concatenate([create_session(reference).run(["p"], f)[0].argmax(-1) for f in feeds[:8]])
    data = Dataset(feeds[:8], reference)
    compared = fidelity.compare_models(reference, candidate, data, labels=labels)
    split = split_data(None, CheckConfig(), evaluation=data, labels=labels)
    acc = check_model(reference, candidate, split, compressed=1)["accuracy"]
    assert acc["original"] == compared.accuracy["reference"] == 1.0
    assert acc["written"] == compared.accuracy["candidate"] < 1.0

"""Model comparison on tensors with nothing in them (paddle2onnx helper tensors, empty outputs)."""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.errors import OnnxcompError
from onnxcomp.measure.fidelity import compare_models


def _model(w: np.ndarray, *, empty_output: bool = False):
    """m = x * w; e = m[:, 2:2] (always empty); y = concat(m, e): ``e`` is an empty intermediate."""
    nodes = [
        oh.make_node("Mul", ["x", "w"], ["m"], name="mul"),
        oh.make_node("Slice", ["m", "s", "s", "ax"], ["e"], name="slice"),
        oh.make_node("Concat", ["m", "e"], ["y"], name="concat", axis=1),
    ]
    outputs = [("y", [1, 4])] + ([("e", [1, 0])] if empty_output else [])
    return io.load_model(make_proto(
        nodes, [("x", [1, 4])], outputs,
        [("w", w), ("s", np.array([2], np.int64)), ("ax", np.array([1], np.int64))],
    ))


def test_empty_intermediates_are_skipped_with_a_reason(rng):
    w = rng.standard_normal(4).astype(np.float32)
    ref, cand = _model(w), _model(w * np.float32(1.01))
    feeds = [{"x": rng.standard_normal((1, 4)).astype(np.float32)} for _ in range(3)]
    result = compare_models(ref, cand, feeds, per_layer=True)
    assert [f.name for f in result.layers] == ["m"]
    assert result.layers[0].sqnr_db == pytest.approx(40.0, abs=0.1)  # 1% error everywhere: 40 dB
    assert result.layers_skipped == {"e": "empty on every feed (shape [1, 0])"}
    assert result.to_dict()["layers_skipped"] == {"e": "empty on every feed (shape [1, 0])"}
    assert result.outputs[0].sqnr_db == pytest.approx(40.0, abs=0.1)


def test_an_output_empty_on_every_feed_is_a_clear_error(rng):
    w = rng.standard_normal(4).astype(np.float32)
    feeds = [{"x": rng.standard_normal((1, 4)).astype(np.float32)}]
    with pytest.raises(OnnxcompError, match=r"output 'e' is empty \(shape \[1, 0\]\) on every feed"):
        compare_models(_model(w, empty_output=True), _model(w, empty_output=True), feeds)


def test_compare_cli_says_how_many_tensors_were_skipped(rng, tmp_path, capsys):
    from onnxcomp.cli import main

    w = rng.standard_normal(4).astype(np.float32)
    ref, cand, data = tmp_path / "ref.onnx", tmp_path / "cand.onnx", tmp_path / "x.npz"
    io.save_model(_model(w), ref)
    io.save_model(_model(w * np.float32(1.01)), cand)
    np.savez(data, x=rng.standard_normal((3, 1, 4)).astype(np.float32))
    assert main(["compare", str(ref), str(cand), "--data", str(data), "--per-layer"]) == 0
    assert "1 shared tensor(s) not compared (empty or resized; --json lists why)" in capsys.readouterr().out
    assert main(["compare", str(ref), str(cand), "--data", str(data), "--per-layer", "--json"]) == 0
    assert '"e": "empty on every feed (shape [1, 0])"' in capsys.readouterr().out

"""An ``exclude`` entry or ``op_types`` entry that matches nothing in the model is said in the notes
(onnxcomp.stage.note_unmatched_selection): a typo like ``--exclude fc1x`` used to exclude nothing in
silence, and the user shipped a model with the layer they meant to keep float in int8."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
from conftest import make_proto

from onnxcomp import io
from onnxcomp.cli import main
from onnxcomp.cluster.api import cluster
from onnxcomp.cluster.passes import ClusterConfig
from onnxcomp.compress import compress
from onnxcomp.prune.api import prune
from onnxcomp.prune.config import PruneConfig
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.selection import unmatched_entries


def _mlp(rng):
    return make_proto(
        [oh.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
         oh.make_node("Relu", ["h"], ["hr"], name="relu"),
         oh.make_node("Gemm", ["hr", "w2", "b2"], ["y"], transB=1, name="fc2")],
        [("x", ["N", 32])], [("y", ["N", 10])],
        [("w1", rng.standard_normal((64, 32)).astype(np.float32)), ("b1", np.zeros(64, np.float32)),
         ("w2", rng.standard_normal((10, 64)).astype(np.float32)), ("b2", np.zeros(10, np.float32))],
    )


def _feeds(rng, n=16):
    return [{"x": rng.standard_normal((4, 32)).astype(np.float32)} for _ in range(n)]


def _int8_gemms(model):
    """Names of the Gemms that read a DequantizeLinear output (Q/DQ form: they run in int8)."""
    return sorted(n.name for n in model.graph if n.op_type == "Gemm"
                  and any(v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"
                          for v in n.inputs))


def _unmatched_notes(report):
    return [n for n in report["notes"] if "excludes nothing" in n or "selects nothing" in n]


def test_unmatched_entries_by_name_and_by_pattern():
    names = {"fc1", "fc2", "Gemm", "w1"}
    assert unmatched_entries(("fc1", "fc1x", "re:^fc[0-9]$", "re:conv", "Gemm", "w1"), names) == ["fc1x", "re:conv"]
    assert unmatched_entries((), names) == []


def test_quantize_names_an_exclude_that_matches_nothing_and_still_excludes_what_matches(rng):
    proto = _mlp(rng)
    model, report = quantize(proto, _feeds(rng), QuantizeConfig(exclude=("fc1x", "fc2")), verify=False)
    notes = _unmatched_notes(report)
    assert notes == ["exclude 'fc1x' matches no node name, op type or tensor name of this model: it excludes nothing"]
    assert _int8_gemms(model) == ["fc1"]  # fc2 did match: it stays float
    # names of nodes, op types and tensors all count as matches: no note
    _, quiet = quantize(proto, _feeds(rng), QuantizeConfig(exclude=("fc1", "Relu", "re:^fc")), verify=False)
    assert _unmatched_notes(quiet) == []


def test_an_op_type_the_model_lacks_is_named(rng):
    _, report = quantize(_mlp(rng), _feeds(rng), QuantizeConfig(op_types=("Gemm", "Conv")), verify=False)
    assert _unmatched_notes(report) == ["op type 'Conv' is not in this model: it selects nothing"]


def test_prune_cluster_and_compress_say_it_too(rng):
    proto = _mlp(rng)
    _, report = prune(proto, PruneConfig(ratio=0.25, exclude=("fc9",)))
    assert _unmatched_notes(report) == [
        "exclude 'fc9' matches no node name, op type or tensor name of this model: it excludes nothing"]
    _, report = cluster(proto, ClusterConfig(bits=4, exclude=("w1", "re:^nothing")))  # w1: a tensor name
    assert _unmatched_notes(report) == [
        "exclude 're:^nothing' matches no node name, op type or tensor name of this model: it excludes nothing"]
    _, report = compress(proto, {"name": "t", "quantize": {"exclude": ["fc3"]}}, _feeds(rng))
    assert [n for n in _unmatched_notes(report)] == [
        "quantize: exclude 'fc3' matches no node name, op type or tensor name of this model: it excludes nothing"]


def test_the_cli_prints_the_note(rng, tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(_mlp(rng), path)
    np.savez(tmp_path / "c.npz", x=np.concatenate([f["x"] for f in _feeds(rng)]))
    code = main(["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calibration", str(tmp_path / "c.npz"),
                 "--exclude", "fc1x", "--no-latency"])
    out = capsys.readouterr().out
    assert code == 0
    assert "exclude 'fc1x' matches no node name" in " ".join(out.split())
    assert io.load_model(tmp_path / "q.onnx") is not None


def test_a_single_string_set_on_a_list_setting_is_its_one_entry(rng, tmp_path, capsys):
    """``--set quantize.exclude=fc1`` means ``exclude = ["fc1"]`` (it was refused as "expects a list
    of str"); other settings and real lists are read as before."""
    from onnxcomp.recipe import load_recipe, parse_override

    recipe = load_recipe("int8")
    overridden = recipe.with_overrides(dict(parse_override(s) for s in (
        "quantize.exclude=fc1", "quantize.op_types=['Gemm']", "quantize.calibration=percentile")))
    cfg = overridden.stages["quantize"]
    assert cfg.exclude == ("fc1",) and cfg.op_types == ("Gemm",) and cfg.calibration == "percentile"
    assert recipe.with_overrides(dict([parse_override("quantize.exclude=re:^fc")])).stages["quantize"].exclude == ("re:^fc",)
    path = tmp_path / "m.onnx"
    onnx.save(_mlp(rng), path)
    np.savez(tmp_path / "c.npz", x=np.concatenate([f["x"] for f in _feeds(rng)]))
    code = main(["compress", str(path), "-o", str(tmp_path / "q.onnx"), "--recipe", "int8",
                 "--calibration", str(tmp_path / "c.npz"), "--set", "quantize.exclude=fc1"])
    capsys.readouterr()
    assert code == 0
    assert _int8_gemms(io.load_model(tmp_path / "q.onnx")) == ["fc2"]  # fc1 stayed float

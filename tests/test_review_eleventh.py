"""Review, eleventh round: what a demanding new user hit running the README's commands on small
models built in code (each defect reduced to a seeded model, checked before and after the fix)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from conftest import file_digest, make_proto

from onnxcomp import io
from onnxcomp.cli import main
from onnxcomp.data import Dataset
from onnxcomp.errors import DataError


def _cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _mlp(rng, path=None, batch="N"):
    proto = make_proto(
        [oh.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
         oh.make_node("Relu", ["h"], ["hr"], name="relu"),
         oh.make_node("Gemm", ["hr", "w2", "b2"], ["y"], transB=1, name="fc2")],
        [("x", [batch, 32])], [("y", [batch, 10])],
        [("w1", rng.standard_normal((64, 32)).astype(np.float32)), ("b1", np.zeros(64, np.float32)),
         ("w2", rng.standard_normal((10, 64)).astype(np.float32)), ("b2", np.zeros(10, np.float32))],
    )
    if path is not None:
        onnx.save(proto, path)
    return proto


# ---------------------------------------------------------------------------------------------
# 1. A batch dimension fixed at 0 (`--fix-shape x=0x32`, which allows 0 for empty caches, or the
#    model's own declaration) made reading the data divide by zero: an internal error.


def test_a_batch_dimension_fixed_at_zero_is_bad_input_not_an_internal_error(rng, tmp_path, capsys):
    model, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    _mlp(rng, model)
    np.savez(calib, x=rng.standard_normal((20, 32)).astype(np.float32))
    before = file_digest(model)
    code, out, err = _cli(capsys, "quantize", model, "-o", tmp_path / "q.onnx", "--calibration", calib,
                          "--fix-shape", "x=0x32")
    assert code == 1 and "internal error" not in err
    assert err.strip().splitlines() == [
        f"onnxcomp: error: {calib}: input 'x' has its batch dimension (axis 0) fixed at 0 by --fix-shape x=0x32 "
        "[0,32]: a feed of it holds no sample; give axis 0 at least 1"]
    assert not (tmp_path / "q.onnx").exists() and file_digest(model) == before
    # the model's own declaration, through the Python API
    with pytest.raises(DataError, match=r"input 'x' has its batch dimension \(axis 0\) fixed at 0 by the model"):
        Dataset(calib, io.load_model(_mlp(rng, batch=0)))


# ---------------------------------------------------------------------------------------------
# 2. A model with a model-local function: the opset upgrade weight-only mode needs (opset 21)
#    went through onnx.version_converter, which drops the functions and leaves their calls, so
#    `quantize --mode weight-only` ended with "onnxruntime cannot load the model: local:MyLin(-1)
#    is not a registered function/op". The functions are now inlined before the conversion.


def _function_model(rng):
    body = [oh.make_node("MatMul", ["a", "b"], ["t"]), oh.make_node("Relu", ["t"], ["c"])]
    fn = oh.make_function("local", "MyLin", ["a", "b"], ["c"], body, [oh.make_opsetid("", 17)])
    proto = make_proto([oh.make_node("MyLin", ["x", "w"], ["y"], domain="local", name="lin")],
                       [("x", ["N", 64])], [("y", ["N", 32])],
                       [("w", rng.standard_normal((64, 32)).astype(np.float32))])
    proto.opset_import.append(oh.make_opsetid("local", 1))
    proto.functions.append(fn)
    onnx.checker.check_model(proto)
    return proto


def test_an_opset_upgrade_keeps_what_a_local_function_computes(rng):
    from onnxcomp.runtime import run_model

    proto = _function_model(rng)
    feeds = [{"x": rng.standard_normal((3, 64)).astype(np.float32)}]
    upgraded = io.upgrade_opset(io.load_model(proto), 21)
    assert io.onnx_opset(upgraded) == 21 and not upgraded.functions
    assert [n.op_type for n in upgraded.graph] == ["MatMul", "Relu"]
    np.testing.assert_array_equal(run_model(upgraded, feeds)[0][0], run_model(io.load_model(proto), feeds)[0][0])


def test_weight_only_quantizes_inside_a_local_function(rng, tmp_path, capsys):
    model = tmp_path / "f.onnx"
    onnx.save(_function_model(rng), model)
    code, out, err = _cli(capsys, "quantize", model, "-o", tmp_path / "q.onnx", "--mode", "weight-only",
                          "--bits", "8", "--json")
    assert code == 0, err
    import json

    report = json.loads(out)
    assert report["onnxruntime"]["weight_only_by_op"] == {"MatMulNBits": 1}
    assert report["check"]["checked"] and report["check"]["outputs"][0]["cosine"] > 0.999


# ---------------------------------------------------------------------------------------------
# 3. A model that passes onnx.checker but that onnxruntime refuses (two nodes of one name, until
#    the twelfth session renamed them on load; an op of a domain it does not know): every refusal
#    said "onnxruntime cannot load the model" whichever model it was (the check called the
#    original "the written model"; compare did not say which of its two), and `cluster` wrote its
#    output and only then failed (exit 1) on the input's session-creation time.


def _unknown_op(rng, path):
    proto = make_proto(
        [oh.make_node("MatMul", ["x", "w"], ["h"], name="a"), oh.make_node("Foo", ["h"], ["r"], name="foo", domain="custom.x"),
         oh.make_node("MatMul", ["r", "w2"], ["y"], name="b")],
        [("x", ["N", 32])], [("y", ["N", 8])],
        [("w", rng.standard_normal((32, 16)).astype(np.float32)), ("w2", rng.standard_normal((16, 8)).astype(np.float32))],
    )
    proto.opset_import.append(oh.make_opsetid("custom.x", 1))
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
    return proto


def test_cluster_refuses_a_model_onnxruntime_cannot_load_before_writing(rng, tmp_path, capsys):
    model, out = tmp_path / "foo.onnx", tmp_path / "c.onnx"
    _unknown_op(rng, model)
    code, _, err = _cli(capsys, "cluster", model, "-o", out)
    assert code == 1 and not out.exists()
    assert err.startswith(f"onnxcomp: error: onnxruntime cannot load the model {model}: ")
    assert "custom.x:Foo(-1) is not a registered function/op" in err


def test_a_refused_original_is_called_the_original_in_the_check(rng, tmp_path):
    from onnxcomp.check import CheckConfig, check_model, split_data

    reference = io.load_model(_unknown_op(rng, tmp_path / "foo.onnx"))
    proto = onnx.load(tmp_path / "foo.onnx")
    proto.graph.node[1].op_type, proto.graph.node[1].domain = "Relu", ""
    data = Dataset([{"x": rng.standard_normal((2, 32)).astype(np.float32)}], reference)
    split = split_data(data, CheckConfig(), evaluation=data, model=reference)
    problems = check_model(reference, io.load_model(proto), split, compressed=1)["problems"]
    assert any("onnxruntime cannot load the original model: " in p for p in problems), problems
    assert not any("written model:" in p for p in problems)


@pytest.mark.parametrize("refused_first", [True, False])
def test_compare_says_which_model_onnxruntime_refuses(rng, tmp_path, capsys, refused_first):
    refused, good, data = tmp_path / "foo.onnx", tmp_path / "good.onnx", tmp_path / "d.npz"
    proto = _unknown_op(rng, refused)
    proto.graph.node[1].op_type, proto.graph.node[1].domain = "Relu", ""
    onnx.save(proto, good)
    np.savez(data, x=rng.standard_normal((4, 32)).astype(np.float32))
    pair = (refused, good) if refused_first else (good, refused)
    code, _, err = _cli(capsys, "compare", *pair, "--data", data)
    role = "reference" if refused_first else "candidate"
    assert code == 1 and err.startswith(f"onnxcomp: error: onnxruntime cannot load the {role} model: ")


# ---------------------------------------------------------------------------------------------
# 4. An IR 3 model (opset 7, every initializer also a graph input, as old exporters and the ONNX
#    model zoo wrote them): the upgrade to opset 13 kept IR 3, so each scale the Q/DQ pass added
#    failed onnx.checker ("x_scale in initializer but not in graph input") and static quantize
#    (and every recipe with a quantize stage) stopped with "QDQPass produced an invalid model".


def _ir3_mlp(rng, path):
    w1, w2 = rng.standard_normal((64, 32)).astype(np.float32), rng.standard_normal((10, 64)).astype(np.float32)
    weights = [("w1", w1), ("b1", np.zeros(64, np.float32)), ("w2", w2), ("b2", np.zeros(10, np.float32))]
    proto = make_proto(
        [oh.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), oh.make_node("Relu", ["h"], ["r"]),
         oh.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)],
        [("x", [1, 32])] + [(n, list(a.shape)) for n, a in weights], [("y", [1, 10])], weights, opset=7)
    proto.ir_version = 3
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def test_static_quantize_of_an_ir3_model_raises_its_ir_version_with_the_opset(rng, tmp_path, capsys):
    from onnxcomp.runtime import run_model

    model, calib, out = tmp_path / "ir3.onnx", tmp_path / "c.npz", tmp_path / "q.onnx"
    _ir3_mlp(rng, model)
    np.savez(calib, x=rng.standard_normal((20, 32)).astype(np.float32))
    code, text, err = _cli(capsys, "quantize", model, "-o", out, "--calibration", calib, "--json")
    assert code == 0, err
    import json

    report = json.loads(text)
    assert report["onnxruntime"]["int8_by_op"] == {"QGemm": 2} and report["check"]["met"]
    written = onnx.load(out)
    assert written.ir_version >= 7
    onnx.checker.check_model(written)
    feeds = [{"x": rng.standard_normal((1, 32)).astype(np.float32)}]
    ref, got = run_model(io.load_model(model), feeds)[0][0], run_model(io.load_model(out), feeds)[0][0]
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.999


# ---------------------------------------------------------------------------------------------
# 5. The Python API took a config of the wrong type silently or failed deep inside:
#    QuantizeConfig(exclude="fc1") excluded nothing (the string was read letter by letter),
#    per_channel="no" was true, and quantize/prune/cluster(..., {"ratio": 0.5}) or compress(...,
#    recipe=3) ended in an AttributeError or TypeError.


@pytest.mark.parametrize("kwargs, message", [
    ({"exclude": "fc1"}, "quantize: exclude expects a list of str, got str 'fc1'"),
    ({"per_channel": "no"}, "quantize: per_channel expects bool, got str 'no'"),
    ({"op_types": ("MatMul", 1)}, "quantize: op_types expects a list of str, got tuple ('MatMul', 1)"),
    ({"smoothquant": "yes"}, "quantize: smoothquant expects bool or None, got str 'yes'"),
])
def test_a_config_of_the_wrong_type_is_refused_naming_the_field(kwargs, message):
    from onnxcomp.errors import ConfigError
    from onnxcomp.quant.config import QuantizeConfig

    with pytest.raises(ConfigError) as info:
        QuantizeConfig(**kwargs)
    assert str(info.value) == message


def test_a_config_stores_lists_as_tuples_and_numpy_numbers_as_python_ones(rng, tmp_path):
    from onnxcomp.prune.config import PruneConfig
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    config = QuantizeConfig(exclude=["fc1"], max_samples=np.int64(8), calibration="percentile",
                            percentile=np.float32(99.5))
    assert config.exclude == ("fc1",) and type(config.max_samples) is int and type(config.percentile) is float
    assert hash(config) == hash(QuantizeConfig(exclude=("fc1",), max_samples=8, calibration="percentile",
                                               percentile=99.5))
    assert type(PruneConfig(ratio=1 / 2).ratio) is float and PruneConfig(ratio=np.float64(0.5)).ratio == 0.5
    # the excluded node stays float, as with a tuple
    proto = _mlp(rng)
    calib = [{"x": rng.standard_normal((1, 32)).astype(np.float32)} for _ in range(12)]
    _, report = quantize(proto, calib, config)
    assert report["onnxruntime"]["int8_by_op"] == {"QGemm": 1} and report["onnxruntime"]["float_by_op"] == {"Gemm": 1}


def test_the_python_api_refuses_a_config_or_recipe_of_the_wrong_type(rng):
    from onnxcomp.cluster.api import cluster
    from onnxcomp.compress import compress
    from onnxcomp.errors import ConfigError
    from onnxcomp.prune.api import prune
    from onnxcomp.quant.api import quantize

    proto = _mlp(rng)
    calib = [{"x": rng.standard_normal((1, 32)).astype(np.float32)} for _ in range(4)]
    with pytest.raises(ConfigError, match=r"^config must be a QuantizeConfig or StaticConfig or DynamicConfig or "
                                          r"WeightOnlyConfig, got dict \{'calibration': 'mse'\}; build one with "
                                          r"QuantizeConfig.from_dict\(\.\.\.\)$"):
        quantize(proto, calib, {"calibration": "mse"})
    with pytest.raises(ConfigError, match=r"^config must be a PruneConfig, got dict"):
        prune(proto, {"ratio": 0.5})
    with pytest.raises(ConfigError, match=r"^config must be a ClusterConfig, got str '4'$"):
        cluster(proto, "4")
    with pytest.raises(ConfigError, match=r"^recipe must be a Recipe, a shipped recipe's name, a TOML path or a "
                                          r"mapping, got int 3$"):
        compress(proto, 3, calib)


# ---------------------------------------------------------------------------------------------
# 6. `sensitivity` of a model static int8 leaves wholly float printed an empty table titled "all
#    int8 inf dB": a lossless int8 model, to a reader. It now says there is nothing to rank.


def test_sensitivity_says_when_there_is_nothing_to_rank(rng, tmp_path, capsys):
    import json

    model, calib = tmp_path / "relu.onnx", tmp_path / "c.npz"
    onnx.save(make_proto([oh.make_node("Relu", ["x"], ["y"])], [("x", ["N", 8])], [("y", ["N", 8])]), model)
    np.savez(calib, x=rng.standard_normal((12, 8)).astype(np.float32))
    code, out, err = _cli(capsys, "sensitivity", model, "--calibration", calib, "--workers", "1")
    assert code == 0 and err == ""
    assert " ".join(out.split()) == ("sensitivity of relu.onnx: nothing to rank: static int8 quantizes no node of "
                                     "this model (all int8 is the float model)")
    code, out, _ = _cli(capsys, "sensitivity", model, "--calibration", calib, "--workers", "1", "--json")
    report = json.loads(out)
    assert code == 0 and report["nodes"] == [] and report["notes"][-1].startswith("nothing to rank: ")


# ---------------------------------------------------------------------------------------------
# 7. Labels that can never equal a prediction were taken silently: a label of -1 or one at or
#    above the output's number of classes (labels counted from 1) read as accuracy lost on both
#    models (0% and 0%: "no drop", the budget met); labels of shape [N, 2] were flattened into
#    "80 labels for 40 samples".


@pytest.mark.parametrize("labels, message", [
    (np.zeros((12, 2), np.int64), "labels must hold one class per sample (shape [N]), got shape [12, 2]"),
    (np.r_[np.zeros(5, np.int64), -1, np.zeros(6, np.int64)], "label 5 is -1; labels are class indices, 0 or more"),
])
def test_labels_that_are_not_one_class_index_per_sample_are_refused(tmp_path, labels, message):
    from onnxcomp.data import load_labels

    path = tmp_path / "labels.npy"
    np.save(path, labels)
    with pytest.raises(DataError) as info:
        load_labels(path)
    assert str(info.value) == f"{path}: {message}"
    np.save(path, np.arange(12).reshape(12, 1))
    np.testing.assert_array_equal(load_labels(path), np.arange(12))  # [N, 1] is one class a sample


def test_labels_beyond_the_declared_classes_are_refused_before_any_work(rng, tmp_path, capsys):
    model, data, labels = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "l.npy"
    _mlp(rng, model)
    np.savez(data, x=rng.standard_normal((12, 32)).astype(np.float32))
    np.save(labels, np.array([1, 2, 3, 13, 5, 6, 7, 8, 9, 0, 1, 2]))  # counted from 1, and one beyond
    for argv in (["quantize", model, "-o", tmp_path / "q.onnx", "--calibration", data],
                 ["cluster", model, "-o", tmp_path / "q.onnx"], ["prune", model, "-o", tmp_path / "q.onnx"]):
        code, out, err = _cli(capsys, *argv, "--eval" if argv[0] != "cluster" else "--data", data, "--labels", labels)
        assert code == 1 and not (tmp_path / "q.onnx").exists()
        assert err == ("onnxcomp: error: --labels: label 3 is 13, but output 'y' scores 10 classes (0 to 9); "
                       "labels count classes from 0\n")


def test_compare_refuses_labels_beyond_the_classes_it_sees(rng, tmp_path, capsys):
    model, data, labels = tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path / "l.npy"
    _mlp(rng, model, batch="N")
    proto = onnx.load(model)
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "C"  # classes not declared
    onnx.save(proto, model)
    np.savez(data, x=rng.standard_normal((6, 32)).astype(np.float32))
    np.save(labels, np.array([0, 1, 2, 3, 10, 5]))
    code, _, err = _cli(capsys, "compare", model, model, "--data", data, "--labels", labels)
    assert code == 1
    assert err == ("onnxcomp: error: --labels: label 4 is 10, but output 'y' scores 10 classes (0 to 9); "
                   "labels count classes from 0\n")
    np.save(labels, np.array([0, 1, 2, 3, 9, 5]))
    assert _cli(capsys, "compare", model, model, "--data", data, "--labels", labels)[0] == 0


# ---------------------------------------------------------------------------------------------
# 8. `--fix-input` converted an integer with numpy's wrap-around: 2 for a BOOL input became true,
#    300 for a UINT8 input 44, -1 255; only a float with a fraction was refused.


def _if_on(rng, cond_type):
    then = oh.make_graph([oh.make_node("Add", ["x", "one"], ["t"])], "then", [], [oh.make_tensor_value_info("t", 1, ["N", 4])],
                         [onnx.numpy_helper.from_array(np.ones(4, np.float32), "one")])
    other = oh.make_graph([oh.make_node("Sub", ["x", "one2"], ["e"])], "else", [], [oh.make_tensor_value_info("e", 1, ["N", 4])],
                          [onnx.numpy_helper.from_array(np.ones(4, np.float32), "one2")])
    nodes = [oh.make_node("Cast", ["c"], ["cb"], to=onnx.TensorProto.BOOL),
             oh.make_node("If", ["cb"], ["y"], then_branch=then, else_branch=other)]
    return make_proto(nodes, [("x", ["N", 4]), ("c", [], cond_type)], [("y", ["N", 4])])


@pytest.mark.parametrize("cond_type, value, ok", [
    (onnx.TensorProto.BOOL, 2, False), (onnx.TensorProto.BOOL, 1, True), (onnx.TensorProto.BOOL, True, True),
    (onnx.TensorProto.UINT8, 300, False), (onnx.TensorProto.UINT8, -1, False), (onnx.TensorProto.UINT8, 255, True),
    (onnx.TensorProto.INT8, -1, True), (onnx.TensorProto.INT8, 1.5, False),
])
def test_a_fixed_input_value_must_be_exact_in_the_inputs_type(rng, cond_type, value, ok):
    from onnxcomp.errors import ConfigError
    from onnxcomp.passes.specialize import SpecializeConfig, SpecializePass
    from onnxcomp.runtime import run_model

    model = io.load_model(_if_on(rng, cond_type))
    specialize = SpecializePass(SpecializeConfig(values={"c": value}))
    if not ok:
        with pytest.raises(ConfigError, match=rf"^input 'c' is {onnx.TensorProto.DataType.Name(cond_type)}: "
                                              rf"{value!r} is not exactly representable$"):
            specialize(model)
        return
    specialize(model)
    assert [n.op_type for n in model.graph] in (["Add"], ["Sub"])
    x = rng.standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(run_model(model, [{"x": x}])[0][0], x + 1 if value else x - 1)


# ---------------------------------------------------------------------------------------------
# 9. Data onnxruntime refuses to run (a token id beyond the embedding table) ended in
#    "onnxruntime cannot run the model: ... Gather ..." naming neither the file nor the sample.


def _embedding(rng, path):
    proto = make_proto([oh.make_node("Gather", ["table", "ids"], ["e"]), oh.make_node("MatMul", ["e", "w"], ["y"])],
                       [("ids", ["N", 6], onnx.TensorProto.INT64)], [("y", ["N", 6, 8])],
                       [("table", rng.standard_normal((50, 16)).astype(np.float32)),
                        ("w", rng.standard_normal((16, 8)).astype(np.float32))])
    onnx.save(proto, path)


def test_a_feed_onnxruntime_refuses_is_named(rng, tmp_path, capsys):
    model, data = tmp_path / "m.onnx", tmp_path / "ids.npz"
    _embedding(rng, model)
    ids = rng.integers(0, 50, (20, 6))
    ids[7, 2] = 75
    np.savez(data, ids=ids)
    code, _, err = _cli(capsys, "quantize", model, "-o", tmp_path / "q.onnx", "--calibration", data)
    assert code == 1 and not (tmp_path / "q.onnx").exists()
    assert err.startswith(f"onnxcomp: error: {data} (fitting part) sample 7: onnxruntime cannot run the model on "
                          "this feed: ") and "idx=75" in err
    code, _, err = _cli(capsys, "compare", model, model, "--data", data)
    assert code == 1 and err.startswith(f"onnxcomp: error: {data} sample 7: onnxruntime cannot run the model on ")


# ---------------------------------------------------------------------------------------------
# 10. Dataset(batch_size=2.5) or batch_size=True failed with numpy's TypeError, batch_size="4" with
#     "'<' not supported", and limit=2.5 read three feeds.


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 2.5}, "batch size must be an integer, got float 2.5"),
    ({"batch_size": True}, "batch size must be an integer, got bool True"),
    ({"batch_size": "4"}, "batch size must be an integer, got str '4'"),
    ({"limit": 2.5}, "limit must be an integer, got float 2.5"),
])
def test_dataset_counts_must_be_integers(rng, tmp_path, kwargs, message):
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal((12, 32)).astype(np.float32))
    model = io.load_model(_mlp(rng))
    with pytest.raises(DataError) as info:
        Dataset(data, model, **kwargs)
    assert str(info.value) == message
    feeds = list(Dataset(data, model, batch_size=np.int64(4), limit=np.int32(2)))
    assert [f["x"].shape for f in feeds] == [(4, 32), (4, 32)]


# ---------------------------------------------------------------------------------------------
# 11. A recipe saved by a Windows editor (UTF-8 with a byte-order mark) was "not valid TOML:
#     Invalid statement (at line 1, column 1)".


def test_a_recipe_with_a_byte_order_mark_is_read(tmp_path):
    from onnxcomp.recipe import load_recipe

    path = tmp_path / "r.toml"
    path.write_bytes(b"\xef\xbb\xbfname = \"bom\"\n[quantize]\ncalibration = \"mse\"\n")
    recipe = load_recipe(path)
    assert recipe.name == "bom" and recipe.stages["quantize"].calibration == "mse"


# ---------------------------------------------------------------------------------------------
# 12. A model with a sparse initializer: onnx_ir drops it, so every command printed onnx_ir's
#     warning ("Input 'w' ... cannot be found in any scope") and then "shapes or types do not
#     agree: Input tensors of wrong rank (0)".


def test_a_sparse_initializer_is_refused_by_name(tmp_path, capsys):
    import onnx.numpy_helper as onh

    values = onh.from_array(np.array([1.0, 2.0, 3.0], np.float32), "w")
    sparse = oh.make_sparse_tensor(values, onh.from_array(np.array([0, 5, 17], np.int64), "w_idx"), [32, 16])
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 32])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16])], sparse_initializer=[sparse])
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    path = tmp_path / "sparse.onnx"
    onnx.save(proto, path)
    code, _, err = _cli(capsys, "inspect", path)
    assert code == 1 and err == (f"onnxcomp: error: {path}: holds sparse initializers ('w'), which onnxcomp does not "
                                 "read; store them as dense initializers\n")


# ---------------------------------------------------------------------------------------------
# 13. `cluster --bits 4 --clusters 8` ran with 8 clusters: argparse lets an option whose value is
#     its default pass beside another option of its exclusive group (`--bits 3 --clusters 8` was
#     refused).


@pytest.mark.parametrize("bits", ["3", "4"])
@pytest.mark.parametrize("other", [["--clusters", "8"], ["--bits-per-weight", "3", "--format", "sparse"]])
def test_cluster_bits_excludes_the_other_sizes_whatever_its_value(rng, tmp_path, capsys, bits, other):
    model = tmp_path / "m.onnx"
    _mlp(rng, model)
    code, _, err = _cli(capsys, "cluster", model, "-o", tmp_path / "c.onnx", "--bits", bits, *other)
    assert code == 1 and f"onnxcomp: error: argument {other[0]}: not allowed with argument --bits" in err
    assert not (tmp_path / "c.onnx").exists()


def test_cluster_without_bits_uses_four(rng, tmp_path, capsys):
    import json

    model = tmp_path / "m.onnx"
    _mlp(rng, model)
    code, out, _ = _cli(capsys, "cluster", model, "-o", tmp_path / "c.onnx", "--min-elements", "16", "--json")
    report = json.loads(out)
    assert code == 0 and report["config"]["bits"] == 4 and report["config"]["clusters"] is None


# ---------------------------------------------------------------------------------------------
# 14. `bench --data F --shape x=2x32` and `bench --batch-size 4` without --data ran and ignored
#     the option (the README gives `--data F | --shape ...`).


@pytest.mark.parametrize("extra, message", [
    (["--data", "DATA", "--shape", "x=2x32"], "argument --shape: not allowed with argument --data"),
    (["--batch-size", "4"], "--batch-size sets the samples of each --data feed; without --data, size the generated "
                            "inputs with --shape NAME=D0xD1x..."),
])
def test_bench_refuses_an_option_it_would_ignore(rng, tmp_path, capsys, extra, message):
    model, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    _mlp(rng, model)
    np.savez(data, x=rng.standard_normal((4, 32)).astype(np.float32))
    code, out, err = _cli(capsys, "bench", model, *[data if a == "DATA" else a for a in extra])
    assert code == 1 and out == "" and err.startswith(f"onnxcomp: error: {message}")


# ---------------------------------------------------------------------------------------------
# 15. `prune --target-params 0.9 --ratio 0.5` ran to the target and ignored --ratio.


def test_prune_refuses_a_ratio_beside_a_target(rng, tmp_path, capsys):
    import json

    model, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    _mlp(rng, model)
    np.savez(calib, x=rng.standard_normal((12, 32)).astype(np.float32))
    code, _, err = _cli(capsys, "prune", model, "-o", tmp_path / "p.onnx", "--calibration", calib,
                        "--target-params", "0.9", "--ratio", "0.5")
    assert code == 1 and not (tmp_path / "p.onnx").exists()
    assert err == ("onnxcomp: error: --ratio and --target-latency/--target-params/--target-macs exclude each other: "
                   "a target chooses each group's ratio; drop one\n")
    code, out, _ = _cli(capsys, "prune", model, "-o", tmp_path / "p.onnx", "--json")  # the default ratio stays
    assert code == 0 and json.loads(out)["config"]["ratio"] == 0.3


# ---------------------------------------------------------------------------------------------
# 16. Static or dynamic quantize of a model quantized before said only "its weight is not a
#     constant" of every node (cluster says the model is already quantized).


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_quantize_says_a_weight_is_already_quantized(rng, mode):
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.config import QuantizeConfig

    calib = [{"x": rng.standard_normal((1, 32)).astype(np.float32)} for _ in range(12)]
    once, _ = quantize(_mlp(rng), calib)
    _, report = quantize(once, calib, QuantizeConfig(mode=mode), verify=False)
    reasons = set(report["skipped"].values())
    assert reasons == {"its weight is already quantized (a DequantizeLinear's output); quantize the float original"}
    assert len(report["skipped"]) == 2

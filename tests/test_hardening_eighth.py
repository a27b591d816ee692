"""Hardening, eighth round: a refusal found on a later check feed, ``inspect`` on bit-packed
deep-compression files, ``cluster --check-fraction``, the calibration line on every quantize path,
the wording of a size fixed by ``--fix-shape``, a MatMul + bias onnxruntime would not run in int8.

Every model is built here in code, seeded.
"""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import onnx_ir as ir
import pytest
from conftest import file_digest, make_proto

from onnxcomp import io

# ---------------------------------------------------------------------------------------------
# 1. a refusal the check finds only on a later feed leaves a previous output untouched


def _conv_model(path, shape=("N", 3, 16, 16)):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             oh.make_node("Relu", ["c"], ["y"], name="relu")]
    out = [shape[0], 4, *shape[2:]]
    io.save_model(io.load_model(make_proto(nodes, [("x", list(shape))], [("y", out)], [("w", w)])), path)
    return path


def _fails_on_large_inputs(monkeypatch):
    """``quantize`` (the API the CLI calls) returns a model whose output adds ``table[int(max(x))]``
    (zeros, 100 entries): onnxruntime loads it and runs it on ordinary feeds, and fails on a feed
    whose largest value is 100 or more (a Gather index out of range), as an onnxcomp bug that
    shows only on some data would."""
    import onnx_ir as ir

    import onnxcomp.quant.api as api

    real = api.quantize

    def quantize(*args, **kwargs):
        model, report = real(*args, **kwargs)
        graph = model.graph
        x, y = graph.inputs[0], graph.outputs[0]
        table = ir.Value(name="table", const_value=ir.tensor(np.zeros(100, np.float32)))
        graph.register_initializer(table)
        peak = ir.Node("", "ReduceMax", [x], attributes=[ir.AttrInt64("keepdims", 0)], name="peak")
        index = ir.Node("", "Cast", [peak.outputs[0]], attributes=[ir.AttrInt64("to", ir.DataType.INT64)],
                        name="index")
        gather = ir.Node("", "Gather", [table, index.outputs[0]], name="lookup")
        y.name = "y_inner"
        add = ir.Node("", "Add", [y, gather.outputs[0]], name="plus_lookup")
        add.outputs[0].name = "y"
        add.outputs[0].dtype, add.outputs[0].shape = y.dtype, y.shape
        for node in (peak, index, gather, add):
            graph.append(node)
        graph.outputs[0] = add.outputs[0]
        return model, report

    monkeypatch.setattr(api, "quantize", quantize)


@pytest.mark.parametrize("mode", [["--mode", "dynamic"], []])
@pytest.mark.parametrize("previous", [True, False])
def test_a_refusal_on_a_later_check_feed_leaves_the_previous_output_untouched(tmp_path, monkeypatch, capsys,
                                                                              previous, mode):
    from onnxcomp.cli import main

    _fails_on_large_inputs(monkeypatch)
    model = _conv_model(tmp_path / "m.onnx")
    x = np.random.default_rng(4).standard_normal((20, 3, 16, 16)).astype(np.float32)
    x[14, 0, 0, 0] = 150.0  # feed 14: the 3rd held-out feed (every 5th: 4, 9, 14, 19)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=x)
    out = tmp_path / "out.onnx"
    if previous:
        out.write_bytes(b"the previous output")
    code = main(["quantize", str(model), "-o", str(out), "--calibration", str(calib), "--no-fallback", *mode])
    err = capsys.readouterr().err
    rejected = tmp_path / "out.rejected.onnx"
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("onnxcomp: error: onnxruntime cannot run the written model: "), err
    assert "lookup" in err or "indices" in err, err  # onnxruntime's own reason
    assert f"nothing was written to {out}; it is kept as {rejected}" in err, err
    assert (out.read_bytes() == b"the previous output") if previous else not out.exists()
    assert rejected.exists() and not list(tmp_path.glob(".onnxcomp-*"))
    assert not list(tmp_path.glob("out.onnx*.data"))
    import onnx  # the file kept is the refused model

    assert [n.name for n in onnx.load(rejected).graph.node][-1] == "plus_lookup"


def test_the_check_takes_the_outputs_the_verification_ran_and_replaces_the_previous_output(tmp_path, capsys):
    import json

    import onnxcomp.check as check
    from onnxcomp.cli import main

    model = _conv_model(tmp_path / "m.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(4).standard_normal((20, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "out.onnx"
    out.write_bytes(b"the previous output")
    opened = []
    real = check._session
    check._session = lambda m, *what: (opened.append(m), real(m, *what))[1]
    try:
        code = main(["quantize", str(model), "-o", str(out), "--calibration", str(calib), "--json"])
    finally:
        check._session = real
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["check"]["met"] and report["check"]["data"]["check_feeds"] == 4
    assert out.read_bytes()[:4] != b"the " and not (tmp_path / "out.rejected.onnx").exists()
    assert str(out) not in map(str, opened)  # the written file ran once, before it was put in place
    assert report["check"]["outputs"][0]["cosine"] > 0.99


# ---------------------------------------------------------------------------------------------
# 2. inspect counts and describes bit-packed deep-compression storage


def _mlp_model(path, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [oh.make_node("Conv", ["img", "wc", "bc"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
             oh.make_node("Relu", ["c"], ["r"]),
             oh.make_node("Flatten", ["r"], ["fl"]),
             oh.make_node("MatMul", ["fl", "w1"], ["h"], name="fc1"),
             oh.make_node("Add", ["h", "b1"], ["hb"]),
             oh.make_node("Relu", ["hb"], ["hr"]),
             oh.make_node("Gemm", ["hr", "w2", "b2"], ["y"], transB=1, name="fc2")]
    inits = [("wc", f(16, 4, 3, 3)), ("bc", f(16)), ("w1", 0.1 * f(576, 48)), ("b1", 0.1 * f(48)),
             ("w2", f(10, 48)), ("b2", f(10))]
    proto = make_proto(nodes, [("img", ["N", 4, 6, 6])], [("y", ["N", 10])], inits, opset=18)
    io.save_model(io.load_model(proto), path)
    calib = path.with_name("calib.npz")
    np.savez(calib, img=rng.standard_normal((40, 4, 6, 6)).astype(np.float32))
    return path, calib


def test_inspect_counts_and_describes_bit_packed_deep_compression_storage(tmp_path, capsys):
    import json

    import onnx
    import onnx.numpy_helper as onh

    from onnxcomp.cli import main
    from onnxcomp.graph import with_outputs
    from onnxcomp.runtime import run_model

    model, calib = _mlp_model(tmp_path / "m.onnx")
    out = tmp_path / "deep.onnx"
    code = main(["compress", str(model), "-o", str(out), "--recipe", "deep-compression", "--calibration", str(calib),
                 "--set", "measure.latency=false", "--no-check", "--quiet"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    # what the file stores, read here with onnx directly: the one bit stream, the int8 codebook
    # table (a column per tensor) and its scales, the decoded weights read by Conv/MatMul/Gemm
    proto = onnx.load(out)
    inits = {t.name: onh.to_array(t) for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    stream = [inits[n.input[0]] for n in proto.graph.node if n.op_type == "BitShift"]
    assert len(stream) == 1 and stream[0].dtype == np.uint8
    table = [a for a in inits.values() if a.dtype == np.int8]
    assert len(table) == 1 and table[0].ndim == 2 and table[0].shape[1] == 3  # K entries x 3 tensors
    scales = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "Mul" and n.input[1] in inits
              and producers.get(n.input[0]) is not None and producers[n.input[0]].op_type == "Cast"]
    assert len(scales) == 1 and scales[0].size == 3
    readers = {"Conv": 1, "MatMul": 1, "Gemm": 1}
    decoded = [n.input[readers[n.op_type]] for n in proto.graph.node
               if n.op_type in readers and n.input[readers[n.op_type]] not in inits]
    assert len(decoded) == 3
    values = run_model(with_outputs(io.load_model(out), decoded), [{"img": np.zeros((1, 4, 6, 6), np.float32)}])[0][1:]
    assert sum(v.size for v in values) == 16 * 4 * 9 + 576 * 48 + 10 * 48
    nonzero = sum(int(np.count_nonzero(v)) for v in values)
    assert 0 < nonzero < 0.5 * sum(v.size for v in values)  # sparse

    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["weights"]["weight_elements"] == 16 * 4 * 9 + 576 * 48 + 10 * 48 + 16 + 48 + 10
    assert info["weights"]["quant_params"] == table[0].size + 3  # was 0: codebook entries and their scales
    packed = info["packed"]
    assert packed == {"tensors": 3, "weights": 16 * 4 * 9 + 576 * 48 + 10 * 48, "bytes": stream[0].size,
                      "bits": 8 * stream[0].size, "bits_per_weight": pytest.approx(8 * stream[0].size / 28704),
                      "codebook_entries": table[0].size, "sparse_values": nonzero}
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"quantization parameters (scales, zero points, codebooks): {table[0].size + 3}" in text, text
    assert (f"bit-packed: 3 tensors, 28,704 weights in {stream[0].size:,} bytes ({8 * stream[0].size:,} bits, "
            f"{8 * stream[0].size / 28704:.2f} per weight); {table[0].size} codebook entries; {nonzero:,} sparse "
            f"values (nonzero weights, {100 * nonzero / 28704:.1f}%)") in text, text
    # the float original has none of it
    assert main(["inspect", str(model), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["packed"] is None and plain["weights"]["quant_params"] == 0


# ---------------------------------------------------------------------------------------------
# 3. --check-fraction: followed where calibration feeds are held out, refused where none are


def test_cluster_refuses_check_fraction_it_cannot_apply(tmp_path, capsys):
    """``cluster`` fits nothing on data (no --calibration): every --data feed is check data and the
    fraction of held-out calibration feeds has nothing to apply to. It was accepted and ignored."""
    import json

    from onnxcomp.cli import main

    model, _ = _mlp_model(tmp_path / "m.onnx")
    data = tmp_path / "d.npz"
    np.savez(data, img=np.random.default_rng(5).standard_normal((20, 4, 6, 6)).astype(np.float32))
    out = tmp_path / "c.onnx"
    code = main(["cluster", str(model), "-o", str(out), "--data", str(data), "--check-fraction", "0.5"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("onnxcomp: error: --check-fraction: cluster fits nothing on data, so nothing is held out"), err
    assert "drop --check-fraction" in err and not out.exists()
    # without it: every feed of --data is checked (batch 1: 20 feeds, 20 samples), nothing held out
    assert main(["cluster", str(model), "-o", str(out), "--data", str(data), "--json"]) == 0
    check = json.loads(capsys.readouterr().out)["check"]["data"]
    assert (check["check_feeds"], check["check_samples"], check["held_out"]) == (20, 20, True)
    assert check["fit_feeds"] is None


@pytest.mark.parametrize("command", ["quantize", "prune"])
def test_check_fraction_with_eval_is_refused_not_ignored(tmp_path, capsys, command):
    """With --eval the check runs on that data and every calibration feed is fitted on: a
    --check-fraction given beside it has nothing to apply to. It was accepted and ignored."""
    import json

    from onnxcomp.cli import main

    model = _conv_model(tmp_path / "m.onnx")
    calib, ev = tmp_path / "c.npz", tmp_path / "e.npz"
    np.savez(calib, x=np.random.default_rng(4).standard_normal((20, 3, 16, 16)).astype(np.float32))
    np.savez(ev, x=np.random.default_rng(5).standard_normal((6, 3, 16, 16)).astype(np.float32))
    out = tmp_path / "out.onnx"
    extra = ["--ratio", "0.25"] if command == "prune" else ["--no-latency"]
    argv = [command, str(model), "-o", str(out), "--calibration", str(calib), "--eval", str(ev), *extra]
    assert main([*argv, "--check-fraction", "0.5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("onnxcomp: error: --check-fraction: the check runs on the --eval data") and err.count("\n") == 1
    assert not out.exists()
    if command == "quantize":  # (this model has no channel group prune could cut)
        assert main([*argv, "--json"]) == 0  # without it: the check runs on the 6 --eval feeds
        assert json.loads(capsys.readouterr().out)["check"]["data"]["check_feeds"] == 6


@pytest.mark.parametrize(("fraction", "checked"), [("0.5", 10), ("0.25", 5), (None, 4)])
def test_the_check_fraction_sets_how_many_calibration_feeds_are_held_out(tmp_path, capsys, fraction, checked):
    import json

    from onnxcomp.cli import main

    model, _ = _mlp_model(tmp_path / "m.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, img=np.random.default_rng(5).standard_normal((20, 4, 6, 6)).astype(np.float32))
    out = tmp_path / "p.onnx"
    extra = [] if fraction is None else ["--check-fraction", fraction]
    assert main(["prune", str(model), "-o", str(out), "--calibration", str(calib), "--ratio", "0.25", "--json",
                 *extra]) == 0
    data = json.loads(capsys.readouterr().out)["check"]["data"]
    assert (data["check_feeds"], data["check_samples"], data["fit_feeds"]) == (checked, checked, 20 - checked)


# ---------------------------------------------------------------------------------------------
# 4. the calibration line of a static quantize: on every path, once


@pytest.mark.parametrize("path", [[], ["--method", "auto"], ["--method", "per-tensor"], ["--latency-aware"],
                                  ["--method", "auto", "--latency-aware"], ["--fidelity-target", "30"]])
def test_static_quantize_prints_its_calibration_line_once_on_every_path(tmp_path, capsys, monkeypatch, path):
    from onnxcomp.cli import main

    monkeypatch.setenv("COLUMNS", "250")
    model, _ = _mlp_model(tmp_path / "m.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, img=np.random.default_rng(5).standard_normal((30, 4, 6, 6)).astype(np.float32))
    code = main(["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calibration", str(calib), "--no-latency",
                 *path])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.startswith("calibration:")]
    method = path[1] if path[:1] == ["--method"] else "minmax"
    # 30 feeds: every 5th (6) held out, 24 fitted
    assert len(lines) == 1 and lines[0].startswith(f"calibration: {method} on 24 feed(s), 6 more held out for the "
                                                   "check"), out
    verdict = [line for line in out.splitlines() if line.lower().startswith(("check passed on", "check failed on"))]
    assert len(verdict) == 1 and f"on calibration data {calib}, 6 feed(s)" in verdict[0], out  # the same 6


def test_the_calibration_line_says_where_the_check_feeds_come_from(tmp_path, capsys, monkeypatch):
    from onnxcomp.cli import main

    monkeypatch.setenv("COLUMNS", "250")
    model, _ = _mlp_model(tmp_path / "m.onnx")
    calib, evaluation = tmp_path / "c.npz", tmp_path / "e.npz"
    rng = np.random.default_rng(6)
    np.savez(calib, img=rng.standard_normal((6, 4, 6, 6)).astype(np.float32))
    np.savez(evaluation, img=rng.standard_normal((12, 4, 6, 6)).astype(np.float32))
    q = str(tmp_path / "q.onnx")
    assert main(["quantize", str(model), "-o", q, "--calibration", str(calib), "--no-latency", "--latency-aware"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("calibration:")]
    assert lines == ["calibration: minmax on 6 feed(s); the check runs on the same 6 feed(s) (too few to hold any "
                     "out)"], lines
    assert main(["quantize", str(model), "-o", q, "--calibration", str(calib), "--no-latency",
                 "--eval", str(evaluation)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("calibration:")]
    assert len(lines) == 1 and lines[0].startswith(
        f"calibration: minmax on 6 feed(s); the check runs on 12 feed(s) of the evaluation data {evaluation}; "), lines


# ---------------------------------------------------------------------------------------------
# 5. a size the data contradicts names where it was fixed: the model, or --fix-shape


@pytest.mark.parametrize("mode", [[], ["--mode", "dynamic"]])
def test_a_size_fixed_by_fix_shape_is_said_to_be_the_options(tmp_path, capsys, mode):
    from onnxcomp.cli import main

    model = _conv_model(tmp_path / "m.onnx", ("N", 3, "H", "W"))
    calib = tmp_path / "c28.npz"
    np.savez(calib, x=np.random.default_rng(3).standard_normal((12, 3, 28, 28)).astype(np.float32))
    out = tmp_path / "out.onnx"
    code = main(["quantize", str(model), "-o", str(out), "--calibration", str(calib), "--fix-shape", "x=1x3x32x32",
                 *mode])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"onnxcomp: error: {calib} sample 0: input 'x' has size 28 on axis 2 (shape [1, 3, 28, 28]), "
                          "--fix-shape x=1x3x32x32 fixes it at 32 [1,3,32,32]"), err
    assert "the model fixes" not in err and not out.exists()


def test_a_size_the_model_declares_is_still_the_models(tmp_path, capsys):
    from onnxcomp.cli import main

    # H is the model's (32), W the option's (32 too): the data contradicts H first, then only W
    model = _conv_model(tmp_path / "m.onnx", ("N", 3, 32, "W"))
    calib = tmp_path / "c.npz"
    out = tmp_path / "out.onnx"
    for shape, who in (((12, 3, 28, 32), "the model fixes it at 32 [1,3,32,32]"),
                       ((12, 3, 32, 28), "--fix-shape x=1x3x32x32 fixes it at 32 [1,3,32,32]")):
        np.savez(calib, x=np.random.default_rng(3).standard_normal(shape).astype(np.float32))
        code = main(["quantize", str(model), "-o", str(out), "--calibration", str(calib), "--fix-shape",
                     "x=1x3x32x32"])
        err = capsys.readouterr().err
        axis = 2 if shape[2] == 28 else 3
        assert code == 1 and f"input 'x' has size 28 on axis {axis} (shape [1, {', '.join(map(str, shape[1:]))}]), {who}" \
            in err, err
    # no --fix-shape: the model's own size, as before
    model = _conv_model(tmp_path / "m.onnx", ("N", 3, 32, 32))
    assert main(["quantize", str(model), "-o", str(out), "--calibration", str(calib)]) == 1
    assert "input 'x' has size 28 on axis 3 (shape [1, 3, 32, 28]), the model fixes it at 32 [N,3,32,32]" in \
        capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 6. a MatMul with a float bias Add whose output stays float: onnxruntime's MatMulAddFusion makes
#    it a Gemm, which runs int8 (QGemm) only with an int32 bias behind a DequantizeLinear


def _head_model(x_shape, seed=0):
    """``x @ w1 + b1 -> Relu -> @ w2 + b2 -> Softmax``: the second MatMul's output stays float
    (it feeds Softmax), its bias Add is a constant ``[10]``."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [oh.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             oh.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
             oh.make_node("Relu", ["hb"], ["hr"], name="relu"),
             oh.make_node("MatMul", ["hr", "w2"], ["o"], name="fc2"),
             oh.make_node("Add", ["o", "b2"], ["ob"], name="fc2_bias"),
             oh.make_node("Softmax", ["ob"], ["y"], axis=-1, name="softmax")]
    inits = [("w1", 0.2 * f(64, 128)), ("b1", 0.1 * f(128)), ("w2", 0.2 * f(128, 10)), ("b2", 0.5 * f(10))]
    proto = make_proto(nodes, [("x", list(x_shape))], [("y", [*x_shape[:-1], 10])], inits, opset=17)
    return io.load_model(proto)


def _head_feeds(x_shape, n, seed=1):
    rng = np.random.default_rng(seed)
    shape = [2 if isinstance(d, str) else d for d in x_shape]
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("x_shape", [("N", 64), (2, 7, 64)])
def test_a_matmul_whose_bias_add_onnxruntime_fuses_runs_int8(x_shape):
    from onnxcomp.data import Dataset
    from onnxcomp.measure.metrics import sqnr_db
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.verify import fusion_report
    from onnxcomp.runtime import run_model

    model = _head_model(x_shape)
    feeds = _head_feeds(x_shape, 24)
    quantized, report = quantize(model, Dataset(feeds, model))
    fused = fusion_report(quantized)
    # both MatMul + bias pairs become QGemm (fc2's was a float Gemm reading dequantized int8)
    assert fused["int8_by_op"] == {"QGemm": 2} and fused["float_compute"] == 0, fused
    assert report["int8_nodes"] == 2 and report["quantized_biases"] == report["matmul_bias_adds_int32"] == 2
    # the bias is int32 on input scale x weight scale, behind a DequantizeLinear read by the Add
    add = next(n for n in quantized.graph if n.name == "fc2_bias")
    bias_dq = add.inputs[1].producer()
    assert bias_dq is not None and bias_dq.op_type == "DequantizeLinear"
    assert bias_dq.inputs[0].const_value.dtype == ir.DataType.INT32
    # numerically: the int8 kernels (all optimizations) agree with the Q/DQ graph run as written,
    # and the model stays close to the float one
    checks = _head_feeds(x_shape, 6, seed=7)
    ref = np.concatenate([o[0] for o in run_model(model, checks)])
    for level in ("disable", "all"):
        out = np.concatenate([o[0] for o in run_model(quantized, checks, optimization=level)])
        assert sqnr_db(ref, out) > 25.0, level
        if level == "all":
            np.testing.assert_allclose(out, written, atol=1e-5)
        written = out


def test_a_matmul_onnxruntime_does_not_fuse_keeps_its_float_bias():
    """Rank 3 with a free batch: no MatMulAddFusion, the MatMul runs MatMulIntegerToFloat and its
    bias Add stays a float Add (an int32 bias would only add a DequantizeLinear at run time)."""
    from onnxcomp.data import Dataset
    from onnxcomp.quant.api import quantize
    from onnxcomp.quant.verify import fusion_report

    x_shape = ("N", 7, 64)
    model = _head_model(x_shape)
    quantized, report = quantize(model, Dataset(_head_feeds(x_shape, 24), model))
    fused = fusion_report(quantized)
    assert fused["int8_by_op"].get("MatMulIntegerToFloat", 0) + fused["int8_by_op"].get("QLinearMatMul", 0) == 2, fused
    assert fused["float_compute"] == 0 and report["quantized_biases"] == report["matmul_bias_adds_int32"] == 0
    assert next(n for n in quantized.graph if n.name == "fc2_bias").inputs[1].name == "b2"


@pytest.mark.parametrize("previous", [True, False])
def test_a_refusal_on_generated_check_feeds_leaves_the_previous_output_untouched(tmp_path, monkeypatch, capsys,
                                                                                  previous):
    """``cluster`` without --data checks on generated feeds: a written model that loads but does not
    run on them (a Reshape to 7 values, as an onnxcomp bug could write) is refused before the
    rename too; the original runs on them."""
    import onnx_ir as ir

    import onnxcomp.cluster.api as api
    from onnxcomp.cli import main

    real = api.cluster

    def cluster(*args, **kwargs):
        model, report = real(*args, **kwargs)
        graph = model.graph
        y = graph.outputs[0]
        shape = ir.Value(name="bad_shape", const_value=ir.tensor(np.array([7], np.int64)))
        graph.register_initializer(shape)
        y.name = "y_inner"
        reshape = ir.Node("", "Reshape", [y, shape], name="bad_reshape")
        reshape.outputs[0].name = "y"
        reshape.outputs[0].dtype = y.dtype
        graph.append(reshape)
        graph.outputs[0] = reshape.outputs[0]
        return model, report

    monkeypatch.setattr(api, "cluster", cluster)
    model = _conv_model(tmp_path / "m.onnx", (1, 3, 16, 16))
    out = tmp_path / "out.onnx"
    if previous:
        out.write_bytes(b"the previous output")
    code = main(["cluster", str(model), "-o", str(out), "--min-elements", "16"])
    err = capsys.readouterr().err
    rejected = tmp_path / "out.rejected.onnx"
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("onnxcomp: error: onnxruntime cannot run the written model: "), err
    assert f"nothing was written to {out}; it is kept as {rejected}" in err, err
    assert (out.read_bytes() == b"the previous output") if previous else not out.exists()
    assert rejected.exists()


@pytest.mark.parametrize(("mode", "head"), [
    (["--mode", "dynamic"], "calibration: nothing fitted in dynamic mode (24 feed(s) unused)"),
    (["--mode", "weight-only", "--bits", "8", "--rounding", "nearest"],
     "calibration: nothing fitted in weight-only mode (24 feed(s) unused)"),
    (["--mode", "weight-only", "--bits", "4", "--rounding", "gptq", "--block-size", "32"],
     "calibration: GPTQ rounding on 24 feed(s)"),
])
def test_other_modes_print_the_calibration_line_once_too(tmp_path, capsys, monkeypatch, mode, head):
    from onnxcomp.cli import main

    monkeypatch.setenv("COLUMNS", "250")
    model = _head_model(("N", 64))
    path = tmp_path / "m.onnx"
    io.save_model(model, path)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(5).standard_normal((30, 64)).astype(np.float32))
    code = main(["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calibration", str(calib), "--no-latency",
                 *mode])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.startswith("calibration:")]
    assert lines == [f"{head}, 6 more held out for the check"], out
    # without calibration data (dynamic mode needs none) there is no such line
    assert main(["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--no-latency", "--mode", "dynamic"]) == 0
    assert "calibration:" not in capsys.readouterr().out

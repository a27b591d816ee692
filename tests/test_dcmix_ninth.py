"""Mixed codebook widths per tensor under a size budget (``ClusterConfig.bits_per_weight``, issue 19).

Small seeded models built in code; the written files are run by onnxruntime and scored against the
float model on feeds the calibration did not see.
"""

from __future__ import annotations

import numpy as np
import onnx.helper as oh
import onnxruntime as ort
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.cli import main
from onnxcomp.cluster.passes import ClusterConfig, allocate_widths
from onnxcomp.compress import compress
from onnxcomp.errors import ConfigError
from onnxcomp.sparsity.storage import build_label_decoder, decode_labels, encode_dense_groups

K, H = 64, 96


def _branches(rng, quiet=0.01):
    """x[N,64] -> three MatMuls of equal shape and spread: y = x@wa + quiet * (x@wb) + x@wc.

    ``wa`` and ``wc`` reach the output at full strength, ``wb`` attenuated by ``quiet``: the same
    relative weight error costs ``1/quiet^2`` times less output error in ``wb``."""
    w = {n: (rng.standard_normal((K, H)) / np.sqrt(K)).astype(np.float32) for n in ("wa", "wb", "wc")}
    nodes = [
        oh.make_node("MatMul", ["x", "wa"], ["ya"], name="fa"),
        oh.make_node("MatMul", ["x", "wb"], ["yb"], name="fb"),
        oh.make_node("MatMul", ["x", "wc"], ["yc"], name="fc"),
        oh.make_node("Mul", ["yb", "quiet"], ["ybq"], name="attenuate"),
        oh.make_node("Add", ["ya", "ybq"], ["s"], name="add1"),
        oh.make_node("Add", ["s", "yc"], ["y"], name="add2"),
    ]
    inits = [*w.items(), ("quiet", np.array(quiet, np.float32))]
    return make_proto(nodes, [("x", ["N", K])], [("y", ["N", H])], inits, opset=18)


def _feeds(rng, n, rows=32):
    mix = np.random.default_rng(7).standard_normal((K, K)) * np.geomspace(2.0, 0.1, K)[:, None]
    return [{"x": (rng.standard_normal((rows, K)) @ mix).astype(np.float32)} for _ in range(n)]


def _recipe(**cluster):
    base = {"format": "sparse", "min_elements": 128, "codebook_int8": True, "compensate": True,
            "max_samples": 16, "bits_per_weight": 3.0, "channel_scales": "never"}
    return {"name": "test-mixed-widths", "cleanup": {}, "cluster": {**base, **cluster}}


def _cluster_stats(report):
    return next(r["stats"] for r in report["stages"] if r["stage"] == "cluster")


def _run(path_or_model, feeds, optimization=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = optimization
    src = path_or_model if isinstance(path_or_model, (str, bytes)) else io.model_to_bytes(path_or_model)
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, f)[0] for f in feeds])


def _sqnr(ref, got):
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)))


def test_allocate_widths_fits_the_budget_and_buys_the_largest_error_drop_per_byte():
    # tensor -> width -> (error, bytes); "a" drops its error steeply with bits, "b" barely
    options = {"a": {2: (10.0, 100), 3: (2.0, 150), 4: (0.5, 200)},
               "b": {2: (1.0, 100), 3: (0.8, 150), 4: (0.7, 200)}}
    widths = allocate_widths(options, 320)
    assert widths == {"a": 4, "b": 2}  # a: 2 -> 3 -> 4 first (8.0 and 1.5 per 50 bytes), then b does not fit
    assert allocate_widths(options, 350) == {"a": 4, "b": 3}
    assert allocate_widths(options, 260) == {"a": 3, "b": 2}
    assert sum(options[n][b][1] for n, b in widths.items()) <= 320
    assert allocate_widths(options, 1000) == {"a": 4, "b": 4}
    # nothing fits: the smallest options are kept (the pass reports over_budget)
    assert allocate_widths(options, 10) == {"a": 2, "b": 2}
    # an option that errs more for more bytes is never taken
    assert allocate_widths({"c": {2: (1.0, 10), 3: (1.5, 20)}}, 100) == {"c": 2}


def test_budget_is_met_in_bytes_and_the_file_shrinks_with_it(rng, tmp_path):
    model = _branches(rng)
    calib = _feeds(rng, 4)
    sizes = {}
    for bpw in (2.5, 3.0, 4.0):
        built, report = compress(model, _recipe(bits_per_weight=bpw), calib)
        stats = _cluster_stats(report)
        alloc = stats["allocation"]
        assert alloc["elements"] == 3 * K * H
        assert alloc["budget_bytes"] == int(bpw * 3 * K * H / 8)
        assert alloc["estimated_bytes"] <= alloc["budget_bytes"] and not alloc["over_budget"]
        # what is stored: the label stream plus one int8 table [widest K, tensors] and a scale per tensor
        widest = 1 << max(t["bits"] for t in stats["tensors"].values())
        labels = sum(-(-t["elements"] * t["bits"] // 8) for t in stats["tensors"].values())
        assert labels <= alloc["budget_bytes"]
        assert stats["totals"]["bytes_after"] <= labels + 3 * widest + 3 * 4 + 8  # + byte alignment per group
        path = tmp_path / f"m{bpw}.onnx"
        io.save_model(built, path)
        sizes[bpw] = path.stat().st_size
    assert sizes[2.5] < sizes[3.0] < sizes[4.0]
    assert sizes[3.0] < 3.0 * 3 * K * H / 8 + 4000  # labels at 3 bits plus a few KB of graph and codebooks


def test_the_tensor_that_reaches_the_output_gets_the_bits(rng):
    model = _branches(rng, quiet=0.01)
    calib = _feeds(rng, 4)
    _, report = compress(model, _recipe(bits_per_weight=3.0), calib)
    stats = _cluster_stats(report)
    bits = {n: t["bits"] for n, t in stats["tensors"].items()}
    assert bits["wb"] < bits["wa"] and bits["wb"] < bits["wc"], bits
    assert bits["wb"] == 2  # attenuated 100x: its error is nearly free
    cand = stats["tensors"]["wb"]["candidates"]
    assert cand[3]["output_error"] < 1e-3 * stats["tensors"]["wa"]["candidates"][3]["output_error"]
    assert stats["allocation"]["sensitivity"].startswith("model output error")
    # the layer's own error does not see the attenuation: wb's layer error is as large as the others'
    _, flat = compress(model, _recipe(bits_per_weight=3.0, sensitivity="layer"), calib)
    layer = _cluster_stats(flat)["tensors"]
    assert _cluster_stats(flat)["allocation"]["sensitivity"].startswith("layer output error")
    assert layer["wb"]["candidates"][3]["error"] > 0.3 * layer["wa"]["candidates"][3]["error"]


def test_written_file_runs_in_onnxruntime_with_the_decoded_widths(rng, tmp_path):
    model = _branches(rng, quiet=0.3)
    calib, held = _feeds(rng, 4), _feeds(rng, 3)
    built, report = compress(model, _recipe(bits_per_weight=3.0), calib)
    stats = _cluster_stats(report)
    assert len(set(t["bits"] for t in stats["tensors"].values())) > 1  # mixed widths were stored
    path = str(tmp_path / "mixed.onnx")
    io.save_model(built, path)
    ref = _run(model.SerializeToString(), held)
    on = _run(path, held)
    off = _run(path, held, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_allclose(on, off, rtol=1e-5, atol=1e-5)  # decoding folded or run: the same weights
    assert _sqnr(ref, on) > 16.0, _sqnr(ref, on)
    # each decoded weight has at most 2**bits values (per-tensor codebooks, no channel scales)
    proto = io.load_model(path)
    from onnxcomp.graph import exposed
    from onnxcomp.runtime import create_session

    names = list(stats["tensors"])
    with exposed(proto, names) as m:
        sess = create_session(m)
        out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, held[0])))
    for name in names:
        assert np.unique(out[name]).size <= 1 << stats["tensors"][name]["bits"], name


def test_more_bits_per_weight_is_more_accurate(rng):
    model = _branches(rng, quiet=0.3)
    calib, held = _feeds(rng, 4), _feeds(rng, 3)
    ref = _run(model.SerializeToString(), held)
    got = {bpw: _sqnr(ref, _run(compress(model, _recipe(bits_per_weight=bpw), calib)[0], held))
           for bpw in (2.0, 3.0, 4.5)}
    assert got[2.0] < got[3.0] < got[4.5], got
    assert got[4.5] > 22.0, got


def test_float16_scales_and_codebook_refit(rng, tmp_path):
    model = _branches(rng, quiet=0.3)
    calib, held = _feeds(rng, 4), _feeds(rng, 3)
    ref = _run(model.SerializeToString(), held)
    plain, _ = compress(model, _recipe(bits_per_weight=None, bits=3, channel_scales="always"), calib)
    half, rep = compress(model, _recipe(bits_per_weight=None, bits=3, channel_scales="always", float16_scales=True),
                         calib)
    refit, _ = compress(model, _recipe(bits_per_weight=None, bits=3, channel_scales="always", float16_scales=True,
                                       refit_codebook=True), calib)
    halves = [v for v in half.graph.initializers.values() if v.dtype.name == "FLOAT16"]
    assert sum(v.const_value.size for v in halves) == 3 * H  # one float16 scale per output channel
    assert len(io.model_to_bytes(half)) < len(io.model_to_bytes(plain)) - 3 * H
    s_plain, s_half, s_refit = (_sqnr(ref, _run(m, held)) for m in (plain, half, refit))
    assert s_plain > 14.0 and abs(s_half - s_plain) < 0.5, (s_plain, s_half)
    assert s_refit > s_half - 0.2, (s_refit, s_half)


def test_dense_width_groups_decode_in_numpy_and_onnxruntime(rng):
    groups = [rng.integers(0, 1 << b, size=n) for b, n in ((2, 37), (3, 50), (5, 11))]
    enc = encode_dense_groups(groups, [2, 3, 5])
    assert enc.nbytes == sum(-(-n * b // 8) for b, n in ((2, 37), (3, 50), (5, 11)))
    np.testing.assert_array_equal(decode_labels(enc), np.concatenate(groups))
    import onnx_ir as ir

    graph = ir.Graph([], [], nodes=[], opset_imports={"": 18}, name="g")
    consts: dict[str, ir.Value] = {}

    def const(suffix, array):
        value = ir.Value(name=suffix, const_value=ir.tensor(np.asarray(array), name=suffix))
        graph.register_initializer(value)
        consts[suffix] = value
        return value

    def add(op, inputs, **attrs):
        node = ir.node(op, inputs, attributes=attrs)
        node.outputs[0].name = f"v{len(graph)}"
        graph.append(node)
        return node.outputs[0]

    out = build_label_decoder(add, const, enc, shape=False)
    graph.outputs.append(out)
    model = ir.Model(graph, ir_version=8)
    from onnxcomp.runtime import create_session

    got = create_session(model).run(None, {})[0]
    np.testing.assert_array_equal(got, np.concatenate(groups))
    with pytest.raises(ValueError):
        encode_dense_groups([np.array([4])], [2])


@pytest.mark.parametrize("fields, words", [
    ({"bits_per_weight": 3.0, "format": "float"}, "format='sparse'"),
    ({"bits_per_weight": 3.0, "format": "sparse", "per_channel": True}, "per_channel"),
    ({"bits_per_weight": 3.0, "format": "sparse", "clusters": 8}, "set one of them"),
    ({"bits_per_weight": 1.5, "format": "sparse", "bits_choices": (2, 3)}, "below the smallest"),
    ({"bits_per_weight": 0.5, "format": "sparse"}, "bits_per_weight must be"),
    ({"bits_per_weight": 3.0, "format": "sparse", "bits_choices": (2, 9)}, "bits_choices must be"),
    ({"bits_per_weight": 3.0, "format": "sparse", "bits_choices": ()}, "at least one width"),
    ({"sensitivity_samples": 0}, "sensitivity_samples must be"),
])
def test_bad_settings_are_refused_with_the_field_named(fields, words):
    with pytest.raises(ConfigError, match="cluster: ") as err:
        ClusterConfig(**fields)
    assert words in str(err.value)


def test_bad_recipe_value_and_cli_errors(rng, tmp_path, capsys):
    model = _branches(rng)
    with pytest.raises(ConfigError, match="sensitivity"):
        compress(model, _recipe(sensitivity="everything"), _feeds(rng, 1))
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    out = tmp_path / "out.onnx"
    assert main(["cluster", str(src), "-o", str(out), "--bits-per-weight", "3"]) == 1
    assert "onnxcomp: error:" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as exc:
        main(["cluster", str(src), "-o", str(out), "--bits-per-weight", "3", "--bits-choices", "2,x"])
    assert exc.value.code == 1 and "2,x" in capsys.readouterr().err and not out.exists()
    assert main(["cluster", str(src), "-o", str(out), "--bits-per-weight", "3", "--format", "sparse",
                 "--min-elements", "128", "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["allocation"]["estimated_bytes"] <= report["allocation"]["budget_bytes"]
    assert report["allocation"]["sensitivity"] == "weight error"
    assert all(t["bits"] in (2, 3, 4, 5, 6) for t in report["tensors"].values())


def test_exchange_rounds_keep_the_budget_and_do_not_raise_the_joint_error(rng):
    model = _branches(rng, quiet=0.05)
    calib = _feeds(rng, 4)
    _, report = compress(model, _recipe(bits_per_weight=3.0, sensitivity_rounds=2, bits_choices=(2, 3, 4)), calib)
    alloc = _cluster_stats(report)["allocation"]
    assert alloc["estimated_bytes"] <= alloc["budget_bytes"]
    rounds = alloc["rounds"]
    assert 1 <= len(rounds) <= 2 and all(r["output_error"] > 0 for r in rounds)
    if len(rounds) == 2:  # the first round moved widths: the second measured the result
        assert rounds[0]["moves"] and rounds[1]["output_error"] <= rounds[0]["output_error"] * 1.0001
    with pytest.raises(ConfigError, match="sensitivity_rounds"):
        ClusterConfig(sensitivity_rounds=-1)


def test_exchange_round_buys_an_upgrade_with_the_cheapest_downgrade():
    from types import SimpleNamespace

    from onnxcomp.cluster.passes import _swap_round

    errors = {"a": {2: 10.0, 3: 1.0, 4: 0.5}, "b": {2: 0.2, 3: 0.1, 4: 0.05}, "c": {2: 3.0, 3: 2.0, 4: 1.9}}

    class Probe:  # the joint output error of the widths the arrays stand for
        names = set(errors)

        def __call__(self, weights):
            return sum(errors[n][int(w[0])] for n, w in weights.items())

    options = {n: {b: SimpleNamespace(snapped=np.array([b])) for b in (2, 3, 4)} for n in errors}
    sizes = {n: {b: 100 * b for b in (2, 3, 4)} for n in errors}
    widths, moved = _swap_round(Probe(), options, sizes, {"a": 2, "b": 3, "c": 3}, budget=800)
    assert widths == {"a": 3, "b": 2, "c": 3}, moved  # a up, paid for by b, the cheapest loss per byte
    assert sum(sizes[n][b] for n, b in widths.items()) <= 800
    assert moved["output_error"] == pytest.approx(10.0 + 0.1 + 2.0)
    # nothing is worth its price: no move
    same, moved = _swap_round(Probe(), options, sizes, {"a": 4, "b": 4, "c": 4}, budget=1200)
    assert same == {"a": 4, "b": 4, "c": 4} and moved["moves"] == []

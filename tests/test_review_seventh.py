"""Seventh-session review: a newcomer's run of the commands on real models outside the suite,
each defect found reduced to a small seeded model built here; each test failed before its fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from conftest import make_proto

from onnxcomp import io
from onnxcomp.data import Dataset
from onnxcomp.measure.fidelity import compare_models


def _cli(argv, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxcomp", *map(str, argv)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def _sqnr_db(refs: list[np.ndarray], cands: list[np.ndarray]) -> float:
    signal = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in refs)
    noise = sum(float(np.sum((r.astype(np.float64) - c) ** 2)) for r, c in zip(refs, cands))
    return 10 * np.log10(signal / noise)


def _width_model(rng, scale: float = 0.0) -> onnx.ModelProto:
    """x[1, 1, 8, W] -> Conv(4, 3x3, pad 1) -> Relu -> ReduceMean(axis 2) -> y[1, 4, W]; ``scale``
    perturbs the weights (a candidate)."""
    w = np.random.default_rng(7).standard_normal((4, 1, 3, 3)).astype(np.float32)
    w = w + scale * rng.standard_normal(w.shape).astype(np.float32)
    return make_proto(
        [oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), oh.make_node("Relu", ["c"], ["r"]),
         oh.make_node("ReduceMean", ["r"], ["y"], axes=[2], keepdims=0)],
        [("x", [1, 1, 8, "W"])], [("y", [1, 4, "W"])], [("w", w)], opset=17)


def test_compare_per_layer_on_feeds_of_several_widths(tmp_path, rng):
    """A folder of feeds of several widths (README: for inputs whose shapes vary; a captcha OCR's
    images) made `compare --per-layer` and compress's measure stage fail with an internal error
    ('changed shape between batches'). Now every feed counts; an axis that varies is None (shown
    '?') and a channel axis that varies gives no per-channel error."""
    folder = tmp_path / "feeds"
    folder.mkdir()
    widths = (3, 6, 5)
    for i, width in enumerate(widths):
        np.savez(folder / f"{i:03d}.npz", x=rng.standard_normal((1, 1, 8, width)).astype(np.float32))
    reference, candidate = _width_model(rng), _width_model(rng, 0.05)
    ref, cand = io.load_model(reference), io.load_model(candidate)
    result = compare_models(ref, cand, Dataset(folder, ref), per_layer=True)

    from onnxcomp.runtime import run_model
    feeds = list(Dataset(folder, ref))
    ref_y = [o[0] for o in run_model(ref, feeds)]
    cand_y = [o[0] for o in run_model(cand, feeds)]
    (out,) = result.outputs
    assert out.shape == (3, 4, None)
    assert out.channel_axis is None and out.worst_channel is None  # axis 2 was picked for width 3, then varied
    assert abs(out.sqnr_db - _sqnr_db(ref_y, cand_y)) < 1e-6
    layers = {f.name: f for f in result.layers}
    assert layers["c"].shape == (3, 4, 8, None) and layers["r"].shape == (3, 4, 8, None)
    assert layers["c"].channel_axis == 1 and len(layers["c"].channels) == 4  # channels stay 4 at every width

    onnx.save(reference, tmp_path / "ref.onnx")
    onnx.save(candidate, tmp_path / "cand.onnx")
    proc = _cli(["compare", "ref.onnx", "cand.onnx", "--data", folder, "--per-layer"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "3x4x?" in proc.stdout and "internal error" not in proc.stderr


def _relu_matmul(rng) -> onnx.ModelProto:
    w = rng.standard_normal((6, 3)).astype(np.float32)
    return make_proto([oh.make_node("MatMul", ["x", "w"], ["m"]), oh.make_node("Relu", ["m"], ["y"])],
                      [("x", [1, 6])], [("y", [1, 3])], [("w", w)])


def test_split_counts_with_max_samples(tmp_path, rng):
    """With --max-samples 12 of 40 feeds, calibration read 12 fitting feeds but the check's report
    said fit_feeds 10 (the held-out rule was counted on the 12 only), and with --max-samples 5 the
    check ran on the fitting data ('only 5 calibration feed(s)') although 35 others were there."""
    from onnxcomp.check import CheckConfig, split_data

    proto = _relu_matmul(rng)
    model = io.load_model(proto)
    data = tmp_path / "cal.npz"
    np.savez(data, x=rng.standard_normal((40, 1, 6)).astype(np.float32))
    for limit, fit, check in ((12, 12, 8), (5, 5, 5), (None, 32, 8)):
        split = split_data(Dataset(data, model, limit=limit), CheckConfig())
        assert split.held_out
        assert (split.fit_feeds, split.check_feeds) == (fit, check) == (len(list(split.fit)), len(list(split.check)))
    small = tmp_path / "small.npz"
    np.savez(small, x=rng.standard_normal((8, 1, 6)).astype(np.float32))
    split = split_data(Dataset(small, model, limit=4), CheckConfig())
    assert not split.held_out and split.fit_feeds == split.check_feeds == 4 and "only 8 calibration" in split.rule

    onnx.save(proto, tmp_path / "m.onnx")
    proc = _cli(["quantize", "m.onnx", "-o", "q.onnx", "--calibration", data, "--max-samples", "12", "--json",
                 "--no-latency", "--no-fallback"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    import json
    report = json.loads(proc.stdout)
    assert report["calibration"]["feeds"] == report["check"]["data"]["fit_feeds"] == 12
    assert report["check"]["data"]["check_feeds"] == 8


def test_bench_says_how_it_generated_the_inputs_a_model_refuses(tmp_path):
    """`bench` without --data sets free dimensions to 1; a model that cannot run at size 1 (a
    YOLOv8 export with dynamic height/width) failed with onnxruntime's message alone ('failed to
    run spec ...'), the note on the generated sizes being printed only after a successful run."""
    proto = make_proto([oh.make_node("Reshape", ["x", "s"], ["y"])], [("x", [1, "L"])], [("y", [1, 2, "H"])],
                       [("s", np.array([1, 2, -1], np.int64))])
    onnx.save(proto, tmp_path / "m.onnx")
    proc = _cli(["bench", "m.onnx", "--runs", "1", "--warmup-runs", "0", "--warmup-seconds", "0"], tmp_path)
    assert proc.returncode == 1
    error = [line for line in proc.stderr.splitlines() if line.startswith("onnxcomp: error:")]
    assert len(error) == 1 and "'m.onnx'" in error[0] and "spec" not in error[0], proc.stderr
    assert "L=1 (axis 1)" in error[0] and "--shape x=" in error[0], error[0]
    proc = _cli(["bench", "m.onnx", "--runs", "1", "--warmup-runs", "0", "--warmup-seconds", "0", "--shape", "x=1x4"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr


def _strict_json(text: str):
    """json.loads that refuses the non-standard constants Python writes (Infinity, NaN)."""
    import json

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _conv_relu_conv(rng, zero_channel: int | None = None) -> onnx.ModelProto:
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    if zero_channel is not None:
        w1[zero_channel] = 0.0
    w2 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
    return make_proto([oh.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]), oh.make_node("Relu", ["c"], ["r"]),
                       oh.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])],
                      [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])], [("w1", w1), ("w2", w2)])


def _conv_case(tmp_path: Path, rng) -> None:
    """m.onnx (:func:`_conv_relu_conv`) and cal.npz (20 samples) in ``tmp_path``."""
    onnx.save(_conv_relu_conv(rng), tmp_path / "m.onnx")
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((20, 1, 3, 8, 8)).astype(np.float32))


def test_json_output_is_strict_json_when_a_figure_is_infinite(tmp_path, rng):
    """An exact output (a prune that removed nothing, a compare of a model with itself) has an
    infinite SQNR; --json wrote it as Python's `Infinity`, which JSON parsers other than Python's
    (JavaScript's JSON.parse, Go, Rust) refuse."""
    _conv_case(tmp_path, rng)
    proc = _cli(["prune", "m.onnx", "-o", "p.onnx", "--criterion", "zeros", "--calibration", "cal.npz", "--json"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = _strict_json(proc.stdout)
    (out,) = report["check"]["outputs"]
    assert out["sqnr_db"] == "inf" and float(out["sqnr_db"]) == np.inf and out["cosine"] == 1.0
    proc = _cli(["compare", "m.onnx", "p.onnx", "--data", "cal.npz", "--json", "--per-layer"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = _strict_json(proc.stdout)
    assert [o["sqnr_db"] for o in report["outputs"]] == ["inf"]
    assert {layer["sqnr_db"] for layer in report["layers"]} == {"inf"}


def test_prune_zeros_says_why_nothing_was_removed(tmp_path, rng):
    """`prune --criterion zeros` on a model without all-zero channels said 'nothing was compressed
    (0 channels removed): frozen: graph input 'x'' (the reason of a group that could not be cut,
    not why nothing was) under a title 'zeros, ratio 0.3' (zeros ignores the ratio)."""
    _conv_case(tmp_path, rng)
    proc = _cli(["prune", "m.onnx", "-o", "p.onnx", "--criterion", "zeros", "--calibration", "cal.npz", "--json"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = _strict_json(proc.stdout)
    assert report["channels_removed"] == 0 and not report["check"]["met"]
    (problem,) = report["check"]["problems"]
    assert "no all-zero channel in the 1 prunable group(s)" in problem, problem
    proc = _cli(["prune", "m.onnx", "-o", "p.onnx", "--criterion", "zeros", "--calibration", "cal.npz", "--strict"],
                tmp_path)
    assert proc.returncode == 3
    assert "zeros, all-zero channels" in proc.stdout and "ratio 0.3" not in proc.stdout
    onnx.save(_conv_relu_conv(rng, zero_channel=5), tmp_path / "z.onnx")  # one zero channel: removed, exact
    proc = _cli(["prune", "z.onnx", "-o", "p.onnx", "--criterion", "zeros", "--calibration", "cal.npz", "--json"],
                tmp_path)
    report = _strict_json(proc.stdout)
    assert report["channels_removed"] == 1 and report["check"]["met"] and not report["check"]["problems"]


def test_cluster_and_prune_of_an_already_quantized_model_say_so(tmp_path, rng):
    """ddddocr's common_old.onnx (ConvInteger, MatMulInteger, DynamicQuantizeLSTM; 13.5 M
    parameters): `cluster` said 'no weight tensor with at least 256 elements' and `prune` 'no
    prunable channel groups found' with no word of the integer weights they leave alone."""
    w = rng.integers(-127, 128, (64, 64)).astype(np.int8)
    proto = make_proto(
        [oh.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
         oh.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["acc"]),
         oh.make_node("Cast", ["acc"], ["accf"], to=1),
         oh.make_node("Mul", ["xs", "ws"], ["s"]),
         oh.make_node("Mul", ["accf", "s"], ["y"])],
        [("x", [1, 64])], [("y", [1, 64])], [("w", w), ("wz", np.int8(0)), ("ws", np.float32(0.01))])
    onnx.save(proto, tmp_path / "q8.onnx")
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((12, 1, 64)).astype(np.float32))
    proc = _cli(["cluster", "q8.onnx", "-o", "c.onnx", "--data", "data.npz", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (problem,) = _strict_json(proc.stdout)["check"]["problems"]
    assert "already quantized (MatMulInteger x1)" in problem and "256 elements" not in problem, problem
    # as cluster (since the twelfth session): written unchanged, the check says why
    proc = _cli(["prune", "q8.onnx", "-o", "p.onnx", "--calibration", "data.npz", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    (problem,) = _strict_json(proc.stdout)["check"]["problems"]
    assert problem == ("nothing was compressed (0 channels removed): the model is already quantized "
                       "(MatMulInteger x1): prune its float original")


def test_failed_shape_inference_prints_no_traceback(tmp_path, rng):
    """`quantize --mode weight-only` of the captcha OCR (opset 12, upgraded to 21) printed onnx_ir's
    'Shape inference failed: %s' warning with a full traceback on stderr (exit 0): the exporter's
    declared rank of a Reshape output disagrees with what inference finds after the upgrade."""
    proto = make_proto([oh.make_node("MatMul", ["x", "w"], ["m"]), oh.make_node("Reshape", ["m", "s"], ["y"])],
                       [("x", [1, 8])], [("y", [1, 8])],
                       [("w", rng.standard_normal((8, 8)).astype(np.float32)), ("s", np.array([1, 2, 4], np.int64))])
    onnx.save(proto, tmp_path / "m.onnx")  # io.load_model refuses it (its declared shape is wrong): read it raw
    script = ("import onnx, onnx_ir as ir; from onnxcomp.graph import infer_types; "
              "m = ir.serde.deserialize_model(onnx.load('m.onnx')); infer_types(m); print(m.graph.outputs[0].shape)")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Shape inference failed" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "[1,8]"  # left as declared


def test_blame_leaves_out_tensors_computed_exactly(tmp_path, rng):
    """A failed check of the captcha OCR's weight-only model said 'first damage at '381'
    (32.6 dB), '390' (inf dB), '139' (inf dB)': tensors the output does not differ on at all
    were named as damage."""
    from onnxcomp.check import blame

    w1, w2, w3 = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(3))

    def chain(last):
        return make_proto([oh.make_node("MatMul", ["x", "w1"], ["m1"]), oh.make_node("Relu", ["m1"], ["r1"]),
                           oh.make_node("MatMul", ["r1", "w2"], ["m2"]), oh.make_node("Relu", ["m2"], ["r2"]),
                           oh.make_node("MatMul", ["r2", "w3"], ["y"])],
                          [("x", [1, 8])], [("y", [1, 8])], [("w1", w1), ("w2", last), ("w3", w3)])

    reference = io.load_model(chain(w2))
    candidate = io.load_model(chain(w2 + 0.1 * rng.standard_normal(w2.shape).astype(np.float32)))
    feeds = [{"x": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(4)]
    named = blame(reference, candidate, feeds, top=5, feeds=4)
    assert [b["tensor"] for b in named] == ["m2", "r2"] or [b["tensor"] for b in named] == ["r2", "m2"], named
    assert all(np.isfinite(b["sqnr_db"]) for b in named)
    assert blame(reference, reference, feeds, top=5, feeds=4) == []


def test_compare_counts_samples_on_the_data_not_on_time_steps(tmp_path, rng):
    """`compare` of the captcha OCR on 4 images said '78 samples': it counted axis 0 of the first
    output, which for a CTC recognizer's [T, N, C] is time. Samples are axis 0 of the data."""
    def model(scale):
        return make_proto([oh.make_node("Mul", ["x", "k"], ["m"]), oh.make_node("Transpose", ["m"], ["y"], perm=[2, 0, 1])],
                          [("x", [1, 4, "W"])], [("y", ["W", 1, 4])], [("k", np.float32(scale))])

    folder = tmp_path / "feeds"
    folder.mkdir()
    for i, width in enumerate((5, 7, 6)):
        np.savez(folder / f"{i}.npz", x=rng.standard_normal((1, 4, width)).astype(np.float32))
    reference, candidate = io.load_model(model(1.0)), io.load_model(model(1.01))
    result = compare_models(reference, candidate, Dataset(folder, reference))
    assert (result.feeds, result.samples) == (3, 3)
    assert abs(result.outputs[0].sqnr_db - 20 * np.log10(1 / 0.01)) < 1e-3  # 40 dB: a 1% gain error
    batched = tmp_path / "b.npz"
    dynamic = make_proto([oh.make_node("Relu", ["x"], ["y"])], [("x", ["N", 4])], [("y", ["N", 4])])
    np.savez(batched, x=rng.standard_normal((10, 4)).astype(np.float32))
    ref = io.load_model(dynamic)
    result = compare_models(ref, ref, Dataset(batched, ref, batch_size=4))
    assert (result.feeds, result.samples) == (3, 10)


def test_an_unknown_option_points_to_its_command_help(capsys):
    """`onnxcomp quantize m.onnx -o q.onnx --reconstruct` (an option of prune) said "see 'onnxcomp
    --help'", whose text lists the commands, not quantize's options."""
    from onnxcomp.cli import main

    for argv, command in ((["quantize", "m.onnx", "-o", "q.onnx", "--reconstruct"], "quantize"),
                          (["inspect", "m.onnx", "extra"], "inspect"), (["bench", "m.onnx", "--nope", "1"], "bench")):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith("onnxcomp: error: unrecognized arguments: ") and err.count("\n") == 1, err
        assert f"(see 'onnxcomp {command} --help')" in err, err


def test_compress_takes_max_samples(tmp_path, rng):
    """README's Data section promises `--max-samples 4` on a huge file; quantize and prune take it,
    compress (the main command) refused it as an unrecognized argument."""
    import json

    _conv_case(tmp_path, rng)
    proc = _cli(["compress", "m.onnx", "-o", "c.onnx", "--calibration", "cal.npz", "--max-samples", "6", "--json"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    (quantize,) = [s for s in report["stages"] if s["stage"] == "quantize"]
    assert quantize["stats"]["calibration"]["feeds"] == report["check"]["data"]["fit_feeds"] == 6
    assert report["check"]["data"]["check_feeds"] == 4 and report["check"]["data"]["held_out"]
    assert report["measure"]["fidelity"]["feeds"] == 6
    assert report["check"]["outputs"][0]["cosine"] > 0.99


def test_verdict_names_the_blamed_tensors_for_what_they_are():
    """The failed verdict said 'first damage at ...' over the tensors of lowest SQNR, which are
    the last ones before the output (a pruned orientation classifier: 'first damage at
    p2o.pd_op.matmul.0.0', its final layer, as the convolutions it cut cannot be compared)."""
    from onnxcomp.check import verdict_line

    check = {"checked": True, "met": False, "data": {"source": "evaluation data e.npz", "check_feeds": 8},
             "problems": ["output 'y': top-1 agreement 0.5000, budget top-1 agreement >= 0.99"],
             "blame": [{"tensor": "logits", "sqnr_db": -1.7}, {"tensor": "pool", "sqnr_db": 3.0}], "outputs": []}
    line = verdict_line(check)
    assert "first damage" not in line
    assert line.endswith("; most damaged tensors 'logits' (-1.7 dB), 'pool' (3.0 dB)"), line


def test_compare_with_limit_uses_the_labels_of_the_samples_it_reads(tmp_path, rng):
    """`compare A B --data d.npz --labels l.npy --limit 4` with a label for every sample of d.npz
    failed after running both models ('40 labels for 4 predictions'); a wrong label count was only
    found after the whole run."""
    import json

    w = rng.standard_normal((6, 3)).astype(np.float32)
    proto = make_proto([oh.make_node("MatMul", ["x", "w"], ["y"])], [("x", ["N", 6])], [("y", ["N", 3])], [("w", w)])
    onnx.save(proto, tmp_path / "m.onnx")
    x = rng.standard_normal((10, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    labels = (x @ w).argmax(1)
    labels[:2] = (labels[:2] + 1) % 3  # the first two samples mislabelled: accuracy tells which were read
    np.save(tmp_path / "l.npy", labels)
    for extra, expected in ((["--limit", "4"], 0.5), (["--limit", "2", "--batch-size", "3"], 4 / 6), ([], 0.8)):
        proc = _cli(["compare", "m.onnx", "m.onnx", "--data", "d.npz", "--labels", "l.npy", "--json", *extra], tmp_path)
        assert proc.returncode == 0, proc.stderr
        accuracy = json.loads(proc.stdout)["accuracy"]
        assert accuracy["reference"] == accuracy["candidate"] == pytest.approx(expected), (extra, accuracy)
    np.save(tmp_path / "short.npy", labels[:7])
    proc = _cli(["compare", "m.onnx", "m.onnx", "--data", "d.npz", "--labels", "short.npy"], tmp_path)
    assert proc.returncode == 1 and "--labels: 7 label(s) for the 10 sample(s)" in proc.stderr, proc.stderr


def test_latency_aware_alone_claims_no_budget(tmp_path, rng, capsys, monkeypatch):
    """`quantize --latency-aware` without --fidelity-target or --max-drop printed 'fidelity budget
    met: output SQNR 62.60 dB' on the orientation classifier: there was no budget to meet.
    Latency stubbed (every variant as fast as float: int8 kept)."""
    import onnxcomp.measure.bench as bench
    from onnxcomp.cli import main

    def stub_bench(variants, feeds, **kw):
        rows = [{"name": variants[0][0], "ratio_to_first": None, "ratio_ci95": None}]
        return rows + [{"name": n, "ratio_to_first": 1.0, "ratio_ci95": [0.95, 1.05]} for n, _ in variants[1:]]

    monkeypatch.setattr(bench, "bench_models", stub_bench)
    _conv_case(tmp_path, rng)
    argv = ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--calibration",
            str(tmp_path / "cal.npz"), "--no-latency", "--force"]
    assert main([*argv, "--latency-aware"]) == 0
    out = capsys.readouterr().out
    assert "fidelity budget met" not in out and "no fidelity budget (--latency-aware alone): output SQNR" in out, out
    assert main([*argv, "--fidelity-target", "20"]) == 0
    assert "fidelity budget met: output SQNR" in capsys.readouterr().out


def test_prune_max_samples_is_what_the_check_reports(tmp_path, rng):
    """`prune --reconstruct --max-samples 5` refit on 5 feeds while its check's report said
    fit_feeds 16 (every feed not held out), unlike quantize, whose data the option limits."""
    import json

    _conv_case(tmp_path, rng)
    proc = _cli(["prune", "m.onnx", "-o", "p.onnx", "--calibration", "cal.npz", "--reconstruct", "--max-samples", "5",
                 "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)["check"]["data"]
    assert (data["fit_feeds"], data["check_feeds"], data["held_out"]) == (5, 4, True)


def test_weight_elements_of_a_sparse_model_read_from_its_file(tmp_path, rng):
    """The deep-compression recipe on the orientation classifier reported 'weight elements
    1,687,589 -> 13,242,174' (7.8x more): read back from the file (no intermediate shapes), each
    decoded weight of the sparse format counted the whole shared label stream. A Reshape to a
    constant shape and a Split of the shared stream now give each weight's own size."""
    from onnxcomp.cluster.passes import ClusterConfig, ClusterPass
    from onnxcomp.summary import weight_counts

    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [oh.make_node("Conv", ["x", "w0", "b0"], ["h0"], pads=[1, 1, 1, 1]), oh.make_node("Relu", ["h0"], ["r0"]),
             oh.make_node("Conv", ["r0", "w1", "b1"], ["h1"], pads=[1, 1, 1, 1]), oh.make_node("Relu", ["h1"], ["r1"]),
             oh.make_node("Conv", ["r1", "w2", "b2"], ["y"])]
    weights = [("w0", f(16, 3, 3, 3)), ("b0", f(16)), ("w1", f(24, 16, 3, 3)), ("b1", f(24)),
               ("w2", f(8, 24, 1, 1)), ("b2", f(8))]
    proto = make_proto(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 8, 8, 8])], weights, opset=18)
    expected = sum(a.size for _, a in weights)
    model = io.load_model(proto)
    assert weight_counts(model)["weight_elements"] == expected
    ClusterPass(ClusterConfig(format="sparse", bits=3, min_elements=100))(model)
    io.save_model(model, tmp_path / "sparse.onnx")
    assert weight_counts(io.load_model(tmp_path / "sparse.onnx"))["weight_elements"] == expected


def test_a_failed_onnxruntime_run_prints_one_error_line(tmp_path):
    """Before onnxcomp's error line, onnxruntime logged its own ('[E:onnxruntime:, sequential_
    executor.cc ...] Non-zero status code ...', in red with a timestamp): two error reports of
    one failure, the first not in onnxcomp's format."""
    proto = make_proto([oh.make_node("Reshape", ["x", "s"], ["y"])], [("x", [1, "L"])], [("y", [1, 2, "H"])],
                       [("s", np.array([1, 2, -1], np.int64))])
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "odd.npz", x=np.ones((2, 1, 3), np.float32))  # 3 values cannot make [1, 2, -1]
    for argv in (["bench", "m.onnx", "--runs", "1", "--warmup-runs", "0", "--warmup-seconds", "0"],
                 ["bench", "m.onnx", "--data", "odd.npz", "--runs", "1", "--warmup-runs", "0", "--warmup-seconds", "0"],
                 ["compare", "m.onnx", "m.onnx", "--data", "odd.npz"]):
        proc = _cli(argv, tmp_path)
        assert proc.returncode == 1, (argv, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("onnxcomp: error:"), (argv, proc.stderr)

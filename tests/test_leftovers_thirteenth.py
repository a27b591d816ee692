"""Leftovers of the twelfth review (thirteenth session): each defect reduced to a seeded model built
in code, checked before and after the fix.

1. ``compress --set quantize.exclude=a,b`` (any list setting given through ``--set``) was one
   entry ``"a,b"``: nothing excluded, silently. A list setting now reads comma-separated entries.
2. A NaN/Inf in a check feed (the held-out part of the calibration data, the evaluation data,
   cluster's data) was found by the check, after the output was written. Every feed of a data
   file or folder is now validated before any work (``split_data``, which every writing command
   calls): the error names the file, the sample and the input; nothing is written.
3. A feed of 0 rows in a data folder (batch size 0) was read as a feed: nothing to calibrate on or
   compare, silently. It is refused naming the file and the input.
4. quantize said "int8 is not measurably faster ... within noise" where bench, on the same files,
   measured 1.35x slower with an interval above 1 (MTCNN P-Net, twelfth sweep). Same code, feeds
   and shapes: at 2 threads a run of 0.05 ms takes 0.04 or 0.07 ms depending on the session, for
   the life of the session, so one pair of sessions gives a tight interval around a ratio the next
   pair contradicts (A/A: 1.63 [1.51, 1.80] once in six; less at 1 thread). quantize now times
   runs under 1 ms in three pairs of fresh sessions and pools them, the interval resampling the
   pairs too, and says so.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from conftest import file_digest, make_proto
from test_design_twelfth import COMMANDS, _argv
from test_review_eleventh import _cli, _mlp
from test_selection_notes import _int8_gemms

from onnxcomp import io
from onnxcomp.data import Dataset
from onnxcomp.errors import ConfigError, DataError
from onnxcomp.recipe import load_recipe, parse_override, parse_overrides


def _three_gemms(rng, path):
    nodes, weights, width = [], [], 32
    for i in (1, 2, 3):
        nodes += [oh.make_node("Gemm", [f"h{i - 1}", f"w{i}", f"b{i}"], [f"g{i}"], transB=1, name=f"fc{i}"),
                  oh.make_node("Relu", [f"g{i}"], [f"h{i}"], name=f"relu{i}")]
        weights += [(f"w{i}", rng.standard_normal((width, width)).astype(np.float32) / 4),
                    (f"b{i}", np.zeros(width, np.float32))]
    onnx.save(make_proto(nodes, [("h0", ["N", width])], [("h3", ["N", width])], weights), path)


# ---------------------------------------------------------------------------------------------
# 1. --set on a list setting: comma-separated entries


@pytest.mark.parametrize("sets, int8", [
    (["quantize.exclude=fc1,fc3"], ["fc2"]),
    (["quantize.exclude=fc1, re:^fc[3-9]$"], ["fc2"]),
    (["quantize.exclude=re:^fc{1,2}[13]$"], ["fc2"]),          # a comma inside braces does not separate
    (["quantize.exclude=fc1", "quantize.exclude=fc3"], ["fc2"]),  # repeated: the entries add up, as --exclude
    (['quantize.exclude=["fc1", "fc3"]'], ["fc2"]),             # a TOML array, as before
    (["quantize.exclude=fc1,fc3", "quantize.exclude="], ["fc2"]),  # adds nothing
])
def test_set_reads_a_list_setting_as_comma_separated_entries(rng, tmp_path, capsys, sets, int8):
    model, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "q.onnx"
    _three_gemms(rng, model)
    np.savez(calib, h0=rng.standard_normal((40, 32)).astype(np.float32))
    code, stdout, err = _cli(capsys, "compress", model, "-o", out, "--calibration", calib, "--set",
                             "measure.latency=false", *[x for s in sets for x in ("--set", s)], "--json")
    assert code == 0, err
    assert _int8_gemms(io.load_model(out)) == int8
    assert not [n for n in json.loads(stdout)["notes"] if "excludes nothing" in n]


def test_parse_override_list_settings():
    assert parse_override("quantize.exclude=a,b") == ("quantize.exclude", ["a", "b"])
    assert parse_override("quantize.exclude='a,b'") == ("quantize.exclude", ["a,b"])  # a TOML string: one entry
    assert parse_override("quantize.exclude=re:[,;]x,y") == ("quantize.exclude", ["re:[,;]x", "y"])
    assert parse_override("quantize.exclude=123") == ("quantize.exclude", ["123"])  # a name, not a number
    assert parse_override("quantize.exclude=") == ("quantize.exclude", [])
    assert parse_override("quantize.op_types=Conv,MatMul") == ("quantize.op_types", ["Conv", "MatMul"])
    assert parse_override("cluster.bits_choices=2,3, 4") == ("cluster.bits_choices", [2, 3, 4])
    assert parse_override("cluster.bits_choices=3") == ("cluster.bits_choices", [3])
    assert parse_override("quantize.calibration=a,b") == ("quantize.calibration", "a,b")  # no list: as written
    recipe = load_recipe("cluster-4bit").with_overrides(parse_overrides(["cluster.bits_choices=2,3,4"]))
    assert recipe.stages["cluster"].bits_choices == (2, 3, 4)
    assert parse_overrides(["quantize.calibration=mse", "quantize.calibration=minmax"]) == {
        "quantize.calibration": "minmax"}
    with pytest.raises(ConfigError, match=r"entry 2 of the comma-separated list is empty"):
        parse_override("quantize.exclude=a,,b")


def test_set_with_an_empty_list_entry_is_a_bad_option(rng, tmp_path, capsys):
    model, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "q.onnx"
    _three_gemms(rng, model)
    np.savez(calib, h0=rng.standard_normal((40, 32)).astype(np.float32))
    before = file_digest(model)
    code, stdout, err = _cli(capsys, "compress", model, "-o", out, "--calibration", calib,
                             "--set", "quantize.exclude=fc1,")
    assert code == 1 and not out.exists() and file_digest(model) == before
    assert err.startswith("onnxcomp: error: --set 'quantize.exclude=fc1,': entry 2 of the comma-separated list "
                          "is empty") and len(err.splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# 2. NaN/Inf in a check feed: refused before any work, by every writing command


def _refused(capsys, argv, out, inputs, message):
    before = {p: file_digest(p) for p in inputs}
    code, stdout, err = _cli(capsys, *argv)
    assert code == 1 and stdout == ""
    assert err == f"onnxcomp: error: {message}\n"
    assert not list(out.parent.glob(f"{out.name}*"))  # no output, no .rejected.onnx, no temporary file
    assert {p: file_digest(p) for p in inputs} == before


@pytest.mark.parametrize("name", sorted(COMMANDS))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_held_out_feed_is_refused_before_any_work(rng, tmp_path, capsys, name, bad):
    model, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "o.onnx"
    _mlp(rng, model)
    x = rng.standard_normal((40, 32)).astype(np.float32)
    x[9, 3] = bad  # sample 9: held out (index mod 5 = 4), never read by the fitting
    np.savez(calib, x=x)
    argv = _argv(name, model, out, calib) + ([] if "CALIB" in COMMANDS[name] else ["--calibration", calib])
    part = "" if name == "cluster" else " (held out)"  # cluster's --data is all check data
    _refused(capsys, argv, out, [model, calib], f"{calib}{part} sample 9: input 'x' holds 1 NaN/Inf value(s)")


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - {"cluster"}))
def test_a_non_finite_evaluation_feed_is_refused_before_any_work(rng, tmp_path, capsys, name):
    model, calib, evaluation, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "e.npz", tmp_path / "o.onnx"
    _mlp(rng, model)
    np.savez(calib, x=rng.standard_normal((40, 32)).astype(np.float32))
    x = rng.standard_normal((12, 32)).astype(np.float32)
    x[7, 0] = -np.inf
    np.savez(evaluation, x=x)
    argv = _argv(name, model, out, calib) + ["--eval", evaluation]
    _refused(capsys, argv, out, [model, calib, evaluation],
             f"{evaluation} sample 7: input 'x' holds 1 NaN/Inf value(s)")


def test_a_non_finite_feed_of_a_folder_is_refused_before_any_work(rng, tmp_path, capsys):
    model, folder, out = tmp_path / "m.onnx", tmp_path / "feeds", tmp_path / "o.onnx"
    _mlp(rng, model)
    folder.mkdir()
    for i in range(12):
        x = rng.standard_normal((2, 32)).astype(np.float32)
        if i == 11:
            x[1, 31] = np.nan
        np.savez(folder / f"s{i:02d}.npz", x=x)
    _refused(capsys, ["cluster", model, "-o", out, "--min-elements", "16", "--data", folder], out, [model],
             f"{folder / 's11.npz'}: input 'x' holds 1 NaN/Inf value(s)")


def test_max_samples_caps_what_is_validated(rng, tmp_path, capsys):
    """Only the feeds a run reads are validated: a NaN beyond --max-samples of both parts is no error."""
    model, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "o.onnx"
    _mlp(rng, model)
    x = rng.standard_normal((40, 32)).astype(np.float32)
    x[39, 0] = np.nan  # held out, but the 8th check feed: beyond --max-samples 4
    np.savez(calib, x=x)
    code, _, err = _cli(capsys, "quantize", model, "-o", out, "--calibration", calib, "--max-samples", "4",
                        "--no-latency")
    assert code == 0, err
    assert out.is_file()


# ---------------------------------------------------------------------------------------------
# 3. A feed of 0 rows


def test_a_zero_row_feed_of_a_folder_is_refused(rng, tmp_path, capsys):
    model, folder, out = tmp_path / "m.onnx", tmp_path / "feeds", tmp_path / "o.onnx"
    _mlp(rng, model)
    folder.mkdir()
    for i in range(12):
        np.savez(folder / f"s{i:02d}.npz", x=rng.standard_normal((0 if i == 3 else 2, 32)).astype(np.float32))
    message = (f"{folder / 's03.npz'}: input 'x' has 0 rows (shape [0, 32]): a feed of batch size 0 holds no "
               "sample, so there is nothing to calibrate on or compare; drop it from the data or give it a sample")
    _refused(capsys, ["quantize", model, "-o", out, "--calibration", folder], out, [model], message)
    _refused(capsys, ["cluster", model, "-o", out, "--data", folder], out, [model], message)
    with pytest.raises(DataError, match="<list> feed 1: input 'x' has 0 rows"):
        list(Dataset([{"x": np.ones((1, 32), np.float32)}, {"x": np.ones((0, 32), np.float32)}], io.load_model(model)))


@pytest.mark.parametrize("suffix", ["npz", "npy"])
def test_a_zero_row_file_names_its_array(rng, tmp_path, capsys, suffix):
    model, data, out = tmp_path / "m.onnx", tmp_path / f"c.{suffix}", tmp_path / "o.onnx"
    _mlp(rng, model)
    empty = np.zeros((0, 32), np.float32)
    np.savez(data, x=empty) if suffix == "npz" else np.save(data, empty)
    _refused(capsys, ["quantize", model, "-o", out, "--calibration", data], out, [model],
             f"{data}: empty data set: array 'x' holds 0 samples (shape [0, 32], axis 0 indexes samples); "
             "give at least one")


def test_an_axis_0_the_model_fixes_at_0_is_no_empty_feed(rng):
    """An input whose axis 0 the model fixes at 0 (an empty cache: --fix-shape allows it) matches
    data of 0 rows; only a free axis 0 of 0 rows is a feed without a sample."""
    proto = make_proto([oh.make_node("Concat", ["cache", "x"], ["y"], axis=0)],
                       [("cache", [0, 4]), ("x", ["N", 4])], [("y", ["M", 4])])
    feeds = [{"cache": np.zeros((0, 4), np.float32), "x": np.ones((2, 4), np.float32)}]
    assert [f["cache"].shape for f in Dataset(feeds, io.load_model(proto.SerializeToString()))] == [(0, 4)]
    feeds[0]["x"] = np.ones((0, 4), np.float32)
    with pytest.raises(DataError, match=r"<list> feed 0: input 'x' has 0 rows \(shape \[0, 4\]\)"):
        list(Dataset(feeds, io.load_model(proto.SerializeToString())))


# ---------------------------------------------------------------------------------------------
# 4. quantize's int8-vs-float latency of a short run: pooled over session pairs


def _session_modes(means, calls):
    """A fake bench._bench_once: measurement k (its seed) times float and int8 around ``means[k]`` (ms)."""

    def fake(models, feeds, *, threads=None, seed=0, **kw):
        from onnxcomp.measure.stats import ratio_ci

        calls.append((threads, seed))
        noise = np.random.default_rng(seed)
        times = [np.abs(noise.normal(mu, mu / 50, 30)) for mu in means[seed]]
        ratio, lo, hi = ratio_ci(times[0], times[1])
        return [{"name": name, "median_ms": float(np.median(t)), "times_ms": t.tolist(), "runs": 30,
                 "ratio_to_first": None if i == 0 else ratio, "ratio_ci95": None if i == 0 else [lo, hi]}
                for i, ((name, _), t) in enumerate(zip(models, times))]

    return fake


# the P-Net modes measured: a session runs 0.04 or 0.07 ms at 2 threads; the first pair drew
# float fast and int8 slow (1.65, tight), the next two the same mode for both
PNET_MODES = {0: (0.041, 0.067), 1: (0.070, 0.066), 2: (0.068, 0.071)}


def test_a_short_run_is_timed_on_three_session_pairs(rng, monkeypatch):
    from onnxcomp.measure import bench

    calls = []
    monkeypatch.setattr(bench, "_bench_once", _session_modes(PNET_MODES, calls))
    monkeypatch.setattr(bench, "op_type_times", lambda model, feeds, *, threads, runs=10: {})
    model = io.load_model(_mlp(rng).SerializeToString())
    feeds = [{"x": np.ones((1, 32), np.float32)}]
    report = bench.int8_latency_report(model, model, feeds, threads=2)
    assert calls == [(2, 0), (2, 1), (2, 2)]
    assert [round(r, 2) for r in report["session_ratios"]] == [1.65, 0.94, 1.05]
    lo, hi = report["ratio_ci95"]
    assert lo < 1.0 < hi and not report["significant"] and report["session_spread"]
    assert report["summary"].startswith(f"int8 is not measurably faster than float at 2 thread(s): latency ratio "
                                        f"{report['ratio']:.2f} [{lo:.2f}, {hi:.2f}], within noise")
    assert report["summary"].endswith(
        "; pooled over 3 pairs of fresh sessions (ratios 1.65, 0.94, 1.05): a float run of 0.068 ms at 2 thread(s) "
        "varies from one session to the next more than one pair's interval shows; --threads 1 times the kernels alone")
    # pairs that agree: pooled, said so, no claim of a spread
    calls.clear()
    monkeypatch.setattr(bench, "_bench_once", _session_modes({k: (0.05, 0.065) for k in range(3)}, calls))
    agree = bench.int8_latency_report(model, model, feeds, threads=2)
    assert len(calls) == 3 and agree["significant"] and not agree["session_spread"]
    assert "SLOWER" in agree["summary"] and agree["summary"].endswith("(ratios 1.31, 1.30, 1.31)")
    # one thread: pooled too, without the advice to time at one thread
    calls.clear()
    monkeypatch.setattr(bench, "_bench_once", _session_modes(PNET_MODES, calls))
    one = bench.int8_latency_report(model, model, feeds, threads=1)
    assert calls == [(1, 0), (1, 1), (1, 2)] and one["summary"].endswith(
        "varies from one session to the next more than one pair's interval shows")
    # runs of milliseconds: one pair, as before
    calls.clear()
    monkeypatch.setattr(bench, "_bench_once", _session_modes({0: (5.0, 6.5)}, calls))
    single = bench.int8_latency_report(model, model, feeds, threads=2)
    assert calls == [(2, 0)] and "session_ratios" not in single and "pooled" not in single["summary"]


def test_bench_pools_a_short_run_for_every_model_against_the_first(rng, monkeypatch):
    """``onnxcomp bench`` and the [measure] stage pool a short run too: each later model's ratio
    to the first over the sets, with each set's ratio; runs of milliseconds stay one set."""
    from onnxcomp.measure import bench
    from onnxcomp.measure.cli import _session_notes

    modes = {0: (0.041, 0.067, 0.050), 1: (0.070, 0.066, 0.069), 2: (0.068, 0.071, 0.070)}
    calls = []
    monkeypatch.setattr(bench, "_bench_once", _session_modes(modes, calls))
    model = io.load_model(_mlp(rng).SerializeToString())
    rows = bench.bench_models([("a", model), ("b", model), ("c", model)], [{"x": np.ones((1, 32), np.float32)}],
                              threads=2)
    assert calls == [(2, 0), (2, 1), (2, 2)]
    assert [r["runs"] for r in rows] == [90, 90, 90] and rows[0]["session_sets"] == 3
    for i in (1, 2):
        ratios = rows[i]["session_ratios"]
        assert len(ratios) == 3 and len(rows[i]["session_ci95s"]) == 3
        lo, hi = rows[i]["ratio_ci95"]
        assert lo <= rows[i]["ratio_to_first"] <= hi
        assert rows[i]["ratio_to_first"] == pytest.approx(rows[i]["median_ms"] / rows[0]["median_ms"])
    notes = _session_notes(rows)
    assert notes[0].startswith(f"the first model runs {rows[0]['median_ms']:.3f} ms: measured in 3 sets")
    assert notes[1].startswith("b: ratio per set ") and len(notes) == 3
    # a run of milliseconds: one set, no pooling, no note
    calls.clear()
    monkeypatch.setattr(bench, "_bench_once", _session_modes({0: (5.0, 6.5)}, calls))
    single = bench.bench_models([("a", model), ("b", model)], [{"x": np.ones((1, 32), np.float32)}], threads=2)
    assert calls == [(2, 0)] and "session_ratios" not in single[1] and _session_notes(single) == []


def test_sessions_ratio_ci_holds_the_spread_between_measurements():
    from onnxcomp.measure.stats import ratio_ci, sessions_ratio_ci

    noise = np.random.default_rng(0)
    a, b = noise.gamma(5, 1, 30), noise.gamma(5, 1, 30) * 1.3
    assert sessions_ratio_ci([(a, b)])[0] == ratio_ci(a, b)[0]
    fast, slow = (noise.normal(1.0, 0.01, 30), noise.normal(1.6, 0.01, 30)), (noise.normal(1.0, 0.01, 30),) * 2
    one = ratio_ci(*fast)
    assert one[1] > 1.5  # one measurement: a tight interval around 1.6
    ratio, lo, hi = sessions_ratio_ci([fast, slow, slow])
    assert lo < 1.01 and hi > 1.5  # pooled: the second and third say 1.0
    short = (noise.normal(1.0, 0.01, 12), noise.normal(1.0, 0.01, 12))  # cut short by a time budget
    assert 0.9 < sessions_ratio_ci([slow, short])[1] <= sessions_ratio_ci([slow, short])[2] < 1.1
    with pytest.raises(ValueError, match="pairs its rounds"):
        sessions_ratio_ci([(a, b[:5])])

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

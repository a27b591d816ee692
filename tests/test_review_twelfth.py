"""Review, twelfth round: a demanding new user on `compress` recipes and `--set`, the Python API's
arguments (labels, latency feeds, progress), and data folders (each defect reduced to a seeded
model built in code, checked before and after the fix)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper  # noqa: F401
import pytest
from conftest import file_digest, make_proto
from test_review_eleventh import _cli, _mlp

import onnxcomp.compress as compress_module
import onnxcomp.quant.api as quant_api
from onnxcomp import io
from onnxcomp.compress import compress
from onnxcomp.data import Dataset
from onnxcomp.errors import ConfigError, DataError, ModelSaveError
from onnxcomp.quant.api import quantize
from onnxcomp.quant.config import QuantizeConfig
from onnxcomp.recipe import load_recipe
from onnxcomp.testing import assert_equivalent


# ---------------------------------------------------------------------------------------------
# 1. `--set name.x=1` (or description.x) took the recipe's top-level string for a stage table and
#    failed on item assignment: an internal error instead of a bad option.


@pytest.mark.parametrize("override", ["name.x=1", "description.text=\"y\""])
def test_set_on_a_top_level_string_is_a_bad_option_not_an_internal_error(rng, tmp_path, capsys, override):
    model, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "q.onnx"
    _mlp(rng, model)
    np.savez(calib, x=rng.standard_normal((20, 32)).astype(np.float32))
    before = file_digest(model)
    code, stdout, err = _cli(capsys, "compress", model, "-o", out, "--calibration", calib, "--set", override,
                             "--json")
    stage = override.partition(".")[0]
    assert code == 1 and stdout == ""
    assert err.strip().splitlines() == [
        f"onnxcomp: error: override {override.partition('=')[0]!r}: unknown stage {stage!r}; stages are cleanup, "
        "prune, sparsity, cluster, quantize, verify, measure"]
    assert not out.exists() and file_digest(model) == before


# ---------------------------------------------------------------------------------------------
# 2. The Python API took `labels` as it came: a list (what a user has) failed deep in the measure
#    stage on `.size`, float labels (0.5, 1.5) were compared as they were, labels [N, 2]
#    failed on a broadcast, and too few labels for the evaluation data (quantize's fallback)
#    failed on a broadcast too. Now a list or a labels file's path reads as the CLI's --labels
#    does, and what is not one integer class per sample is refused naming it, before any work.


def _labelled(rng, tmp_path):
    model, calib, evaluation = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "e.npz"
    proto = _mlp(rng, model)
    np.savez(calib, x=rng.standard_normal((20, 32)).astype(np.float32))
    x = rng.standard_normal((12, 32)).astype(np.float32)
    np.savez(evaluation, x=x)
    w1, b1, w2, b2 = (onnx.numpy_helper.to_array(t) for t in proto.graph.initializer)
    labels = (np.maximum(x @ w1.T + b1, 0) @ w2.T + b2).argmax(1)  # the float model's own predictions
    return model, calib, evaluation, labels


_MEASURE_ONLY = {"cleanup": {}, "measure": {"latency": False}}


def test_compress_api_reads_labels_as_a_list_or_a_path(rng, tmp_path):
    model, calib, evaluation, labels = _labelled(rng, tmp_path)
    np.save(tmp_path / "labels.npy", labels)
    for given in (list(labels), labels[:, None], tmp_path / "labels.npy", str(tmp_path / "labels.npy")):
        _, report = compress(model, _MEASURE_ONLY, calib, eval_data=evaluation, labels=given)
        assert report["measure"]["fidelity"]["accuracy"] == {"reference": 1.0, "candidate": 1.0}


@pytest.mark.parametrize("bad, message", [
    ("float", "labels: labels must be integers, got dtype float64"),
    ("pairs", r"labels: labels must hold one class per sample \(shape \[N\]\), got shape \[12, 2\]"),
    ("negative", "labels: label 3 is -1; labels are class indices, 0 or more"),
    ("short", r"--labels: 5 label\(s\) for the 12 sample\(s\) of the evaluation data .*e\.npz"),
    ("ragged", "labels: cannot read list as integer class labels"),
])
def test_compress_api_refuses_labels_that_are_not_one_class_a_sample(rng, tmp_path, monkeypatch, bad, message):
    model, calib, evaluation, labels = _labelled(rng, tmp_path)
    given = {"float": labels + 0.5, "pairs": np.stack([labels, labels], 1),
             "negative": np.where(np.arange(12) == 3, -1, labels), "short": labels[:5],
             "ragged": [[1], [2, 3]]}[bad]
    ran = []
    monkeypatch.setattr(compress_module, "run_stages", lambda *a: ran.append(1))
    with pytest.raises(DataError, match=message):
        compress(model, _MEASURE_ONLY, calib, eval_data=evaluation, labels=given)
    assert not ran  # refused before any stage ran


def test_labels_without_evaluation_data_are_refused_before_any_work(rng, tmp_path, monkeypatch):
    model, calib, _, labels = _labelled(rng, tmp_path)
    monkeypatch.setattr(compress_module, "working_copy", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ConfigError, match=r"labels need eval_data \(they label the evaluation samples\)"):
        compress(model, _MEASURE_ONLY, calib, labels=labels)
    monkeypatch.setattr(quant_api, "working_copy", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ConfigError, match=r"labels need eval_data"):
        quantize(model, calib, QuantizeConfig(max_drop=1.0), labels=labels)


def test_quantize_fallback_refuses_too_few_labels_naming_the_counts(rng, tmp_path):
    model, calib, evaluation, labels = _labelled(rng, tmp_path)
    with pytest.raises(DataError, match=r"labels: 5 label\(s\) for the 12 evaluation sample\(s\) read from .*e\.npz"):
        quantize(model, calib, QuantizeConfig(max_drop=1.0), eval_data=evaluation, labels=labels[:5])
    with pytest.raises(DataError, match="labels: labels must be integers, got dtype float64"):
        quantize(model, calib, QuantizeConfig(max_drop=1.0), eval_data=evaluation, labels=labels + 0.5)
    _, report = quantize(model, calib, QuantizeConfig(max_drop=1.0), eval_data=evaluation, labels=list(labels))
    assert report["fallback"]["float"]["accuracy"] == 1.0 and report["fallback"]["eval_samples"] == 12


# ---------------------------------------------------------------------------------------------
# 3. compress() from Python with a recipe whose measure stage times latency and no data (the
#    shipped cluster-4bit: clustering needs none) did all the work and then failed in the measure
#    stage ("latency needs inputs ... --shape"), where the CLI generates seeded inputs; latency
#    feeds given by the caller were not checked (a wrong input name was a ValueError of the
#    latency code, an int a TypeError, both after the work), nor was `progress`.


def test_compress_api_without_data_times_latency_on_generated_inputs_as_the_cli_does(rng, tmp_path):
    model = tmp_path / "m.onnx"
    _mlp(rng, model)
    recipe = {"cleanup": {}, "measure": {"runs": 3, "warmup_runs": 1, "warmup_seconds": 0.0}}
    _, report = compress(model, recipe)
    assert [r["name"] for r in report["measure"]["latency"]] == ["before", "after"]
    assert report["free_dims"] == [{"input": "x", "axis": 0, "dim": "N", "value": 1}]
    assert report["notes"][0] == "latency inputs: input 'x': free dimension(s) N=1 (axis 0); --shape x=D0xD1x... overrides"
    _, report = compress(model, recipe, shapes={"x": (4, 32)})
    row = report["measure"]["latency"][0]
    assert "free_dims" not in report and row["throughput_per_s"] == pytest.approx(4e3 / row["mean_ms"])  # batch 4


@pytest.mark.parametrize("feeds, message", [
    ("wrong name", r"feeds_for_latency: <list> feed 0: missing model input\(s\) 'x'; the data has 'nope'"),
    ("int", "feeds_for_latency: data: cannot read int"),
    ("empty", r"feeds_for_latency: <list>: empty data set \(no feeds\)"),
    ("nan", r"feeds_for_latency: <list> feed 0: input 'x' holds 1 NaN/Inf value\(s\)"),
])
def test_compress_api_checks_latency_feeds_before_any_work(rng, tmp_path, monkeypatch, feeds, message):
    model = tmp_path / "m.onnx"
    _mlp(rng, model)
    x = np.ones((1, 32), np.float32)
    given = {"wrong name": [{"nope": x}], "int": 5, "empty": [],
             "nan": [{"x": np.where(np.arange(32) == 7, np.nan, x).astype(np.float32)}]}[feeds]
    monkeypatch.setattr(compress_module, "working_copy", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(DataError, match=message):
        compress(model, {"cleanup": {}, "measure": {}}, feeds_for_latency=given)
    with pytest.raises(ConfigError, match=r"progress must be a callable progress\(stage, done, total\), got int"):
        compress(model, {"cleanup": {}, "measure": {}}, progress=5)


# ---------------------------------------------------------------------------------------------
# 4. Two messages that sent the user looking: a data folder of .npy files said only that it held
#    no .npz files (as if it were empty), and `--recipe FOLDER` said "no such file".


def test_a_folder_of_npy_files_is_refused_saying_how_data_folders_are_read(rng, tmp_path, capsys):
    model, folder, out = tmp_path / "m.onnx", tmp_path / "feeds", tmp_path / "q.onnx"
    _mlp(rng, model)
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"{i}.npy", rng.standard_normal((1, 32)).astype(np.float32))
    before = file_digest(model)
    code, stdout, err = _cli(capsys, "quantize", model, "-o", out, "--calibration", folder, "--json")
    assert code == 1 and stdout == ""
    assert err.strip().splitlines() == [
        f"onnxcomp: error: {folder}: folder holds no .npz files (empty data set); its 3 .npy file(s) are not read: "
        "a data folder holds one .npz file per feed, its arrays named after the model's inputs "
        "(np.savez(f, NAME=array)), or give one .npy file whose axis 0 indexes samples"]
    assert not out.exists() and file_digest(model) == before
    (folder / "0.npy").unlink(), (folder / "1.npy").unlink(), (folder / "2.npy").unlink()
    with pytest.raises(DataError, match=r"feeds: folder holds no \.npz files \(empty data set\)$"):
        Dataset(folder, io.load_model(model))


def test_a_recipe_folder_is_named_as_a_folder(rng, tmp_path, capsys, monkeypatch):
    model, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    _mlp(rng, model)
    (tmp_path / "recipes").mkdir()
    code, stdout, err = _cli(capsys, "compress", model, "-o", out, "--recipe", tmp_path / "recipes")
    assert code == 1 and stdout == "" and not out.exists()
    assert err.startswith(f"onnxcomp: error: recipe '{tmp_path / 'recipes'}' is a folder; give a recipe's TOML file "
                          "or a shipped recipe's name (cluster-4bit, ")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "int8").mkdir()  # a folder named as a shipped recipe does not hide it
    assert load_recipe("int8").name == "int8"


# ---------------------------------------------------------------------------------------------
# 5. A model given in memory as an onnx_ir.Model with external data (ir.load): its quantized copy
#    reads none of the float weights any more, so io.save_model had nothing telling it where they
#    came from, and wrote the result over the input's external-data file (or over the input model
#    and then removed its data as a stale `<name>.data`): the input was destroyed. Copies now keep
#    the external-data files of a model given in memory, and saving over them is refused.


@pytest.mark.parametrize("location", ["m.onnx.data", "weights/w.bin"])
def test_a_copy_of_an_in_memory_model_is_not_saved_over_the_input_external_data(rng, tmp_path, location):
    import onnx_ir as ir

    model = tmp_path / "m.onnx"
    (tmp_path / "weights").mkdir()
    onnx.save(_mlp(rng), model, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)
    data = tmp_path / location
    calib = tmp_path / "c.npz"
    np.savez(calib, x=rng.standard_normal((20, 32)).astype(np.float32))
    digests = {p: file_digest(p) for p in (model, data)}
    files = sorted(tmp_path.rglob("*"))
    quantized, _ = quantize(ir.load(model), calib)
    assert not io.external_data_files(quantized)  # it reads nothing of the input any more
    # the input's data; and the input model where its data is the <name>.data that save would remove
    # (an onnx_ir.Model does not record the file it came from: the model file alone is not known)
    for target in (data, model) if location == "m.onnx.data" else (data,):
        with pytest.raises(ModelSaveError, match=f"is the same file as external data of the input model {data}; "
                                                 "refusing to overwrite the input file"):
            io.save_model(quantized, target)
    assert {p: file_digest(p) for p in (model, data)} == digests and sorted(tmp_path.rglob("*")) == files
    out = io.save_model(quantized, tmp_path / "q.onnx")  # elsewhere: written, with external data as its input
    assert (tmp_path / "q.onnx.data").is_file() and io.load_model(out) is not None
    assert {p: file_digest(p) for p in (model, data)} == digests


# ---------------------------------------------------------------------------------------------
# 6. An index out of an embedding table's range in a held-out check feed (every 5th calibration
#    sample): the written model was refused for failing on it, called "a bug in onnxcomp: please
#    report it" and kept as OUT.rejected.onnx, though the input model fails on that feed too. It
#    is bad data, named as such (as a fitting feed's is), and nothing is written.


def _table_model(rng, path):
    onnx.save(make_proto(
        [oh.make_node("Gather", ["emb", "ids"], ["e"], name="lookup"),
         oh.make_node("MatMul", ["e", "w"], ["h"], name="proj"),
         oh.make_node("ReduceMean", ["h"], ["y"], axes=[1], keepdims=0, name="pool")],
        [("ids", ["N", 8], onnx.TensorProto.INT64)], [("y", ["N", 32])],
        [("emb", rng.standard_normal((50, 64)).astype(np.float32)),
         ("w", rng.standard_normal((64, 32)).astype(np.float32))]), path)


@pytest.mark.parametrize("command", [("quantize", "--calibration"), ("cluster", "--data")])
def test_check_data_the_input_model_cannot_run_is_bad_data_not_a_refused_output(rng, tmp_path, capsys, command):
    model, calib, out = tmp_path / "m.onnx", tmp_path / "ids.npz", tmp_path / "q.onnx"
    _table_model(rng, model)
    ids = rng.integers(0, 50, (20, 8))
    ids[4, 3] = 99  # sample 4: held out of quantize's calibration for the check
    np.savez(calib, ids=ids)
    before = file_digest(model)
    code, stdout, err = _cli(capsys, command[0], model, "-o", out, command[1], calib, "--json")
    assert code == 1 and stdout == ""
    where = f"{calib} (held out) sample 4" if command[0] == "quantize" else f"{calib} sample 4"
    assert err.strip().splitlines() == [
        f"onnxcomp: error: {where}: onnxruntime cannot run the model on this feed: [ONNXRuntimeError] : 2 : "
        "INVALID_ARGUMENT : Non-zero status code returned while running Gather node. Name:'lookup' Status Message: "
        "indices element out of data bounds, idx=99 must be within the inclusive range [-50,49] (the input model "
        "fails on it too); nothing written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.npz", "m.onnx"] and file_digest(model) == before


# ---------------------------------------------------------------------------------------------
# 7. `onnxcomp bench m.onnx m.onnx` (an A/A run, which shows the noise) was an internal error
#    ("specs has duplicate names"); models in two folders under one file name were told apart
#    nowhere in the table. A path given again is now `PATH #2`, and the table shows paths where
#    file names repeat.


def test_bench_takes_one_model_twice_and_tells_same_file_names_apart(rng, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        _mlp(rng, tmp_path / folder / "m.onnx")
    quick = ("--runs", "3", "--warmup-runs", "1", "--warmup-seconds", "0", "--feeds", "1")
    code, stdout, err = _cli(capsys, "bench", "a/m.onnx", "a/m.onnx", "b/m.onnx", *quick, "--json")
    assert code == 0 and err == ""
    rows = json.loads(stdout)["models"]
    assert [r["name"] for r in rows] == ["a/m.onnx", "a/m.onnx #2", "b/m.onnx"]
    assert rows[1]["ratio_to_first"] is not None
    code, stdout, err = _cli(capsys, "bench", "a/m.onnx", "b/m.onnx", *quick)
    assert code == 0 and "│ a/m.onnx " in stdout and "│ b/m.onnx " in stdout


# ---------------------------------------------------------------------------------------------
# 8. The README's Python API on what a user holds: io.save_model / io.clone_model of an
#    onnx.ModelProto failed on `.meta` (AttributeError), and Dataset(data, "m.onnx") or
#    testing.assert_equivalent("a.onnx", "b.onnx", ...) on `.graph`. A ModelProto (and for
#    Dataset / assert_equivalent a path) is now read as io.load_model reads it; anything else is a
#    TypeError saying what is taken.


def test_api_helpers_take_a_model_proto_or_a_path(rng, tmp_path):
    model = tmp_path / "m.onnx"
    proto = _mlp(rng, model)
    before = proto.SerializeToString()
    out = io.save_model(proto, tmp_path / "copy.onnx")
    assert onnx.load(out).graph.node[0].name == "fc1" and proto.SerializeToString() == before
    assert [n.name for n in io.clone_model(proto).graph] == ["fc1", "relu", "fc2"]
    feeds = list(Dataset([{"x": np.ones((2, 32), np.float32)}], str(model)))
    assert_equivalent(str(model), proto, feeds)
    with pytest.raises(AssertionError):  # it still compares: another model's outputs differ
        assert_equivalent(model, _mlp(rng), feeds)
    with pytest.raises(TypeError, match=r"save_model takes an onnx_ir.Model or onnx.ModelProto, got str \(load the "
                                        r"model first: io.load_model\(path\)\)"):
        io.save_model(str(model), tmp_path / "again.onnx")
    with pytest.raises(TypeError, match="cannot load a model from int"):
        Dataset([{"x": np.ones((2, 32), np.float32)}], 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx", "m.onnx"]


# ---------------------------------------------------------------------------------------------
# 9. `-o newdir/` (a folder that does not exist yet, named with its slash) wrote a model FILE
#    named `newdir`: Path drops the trailing slash. It is now refused as a folder, for --report too.


@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_an_output_path_ending_in_a_slash_is_refused_as_a_folder(rng, tmp_path, capsys, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    _mlp(rng, tmp_path / "m.onnx")
    before = file_digest(tmp_path / "m.onnx")
    argv = ["-o", "newdir/"] if flag == "-o" else ["-o", "c.onnx", "--report", "newdir/"]
    code, stdout, err = _cli(capsys, "compress", "m.onnx", *argv, "--recipe", "cluster-4bit", "--json")
    assert code == 1 and stdout == ""
    assert err.strip().splitlines() == [
        f"onnxcomp: error: {flag} newdir/: names a folder (it ends in a slash), which does not exist; "
        "give a file name for the output"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"] and file_digest(tmp_path / "m.onnx") == before


# ---------------------------------------------------------------------------------------------
# 10. `quantize --percentile 99.9` (or `--set quantize.percentile=99.9`, a recipe's `bins`) with
#     the default min/max ranges was ignored in silence: the user believed the percentile applied.
#     A percentile or bin count that the range method does not read is now refused.


def test_a_percentile_the_range_method_does_not_read_is_refused(rng, tmp_path, capsys):
    model, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "q.onnx"
    _mlp(rng, model)
    np.savez(calib, x=rng.standard_normal((20, 32)).astype(np.float32))
    code, stdout, err = _cli(capsys, "quantize", model, "-o", out, "--calibration", calib, "--percentile", "99.9")
    assert code == 1 and stdout == "" and not out.exists()
    assert err.strip().splitlines() == [
        "onnxcomp: error: quantize: percentile applies to calibration 'percentile', 'auto', 'per-tensor', not "
        "'minmax' (set calibration, --method on the command line, or drop it)"]
    code, _, err = _cli(capsys, "compress", model, "-o", out, "--calibration", calib, "--set", "quantize.bins=512")
    assert code == 1 and not out.exists() and err.strip().splitlines() == [
        "onnxcomp: error: recipe 'int8' with overrides: stage 'quantize': bins applies to calibration "
        "'percentile', 'entropy', 'mse', 'auto', 'per-tensor', not 'minmax' (set calibration, --method on the "
        "command line, or drop it)"]
    for method in ("percentile", "auto", "per-tensor"):
        assert QuantizeConfig(calibration=method, percentile=99.9).percentile == 99.9
    assert QuantizeConfig(calibration="entropy", bins=512).bins == 512
    with pytest.raises(ConfigError, match="percentile applies to calibration 'percentile', 'auto', 'per-tensor', not "
                                          "'mse'"):
        QuantizeConfig(calibration="mse", percentile=99.0)
    code, _, err = _cli(capsys, "quantize", model, "-o", out, "--calibration", calib, "--percentile", "99.9",
                        "--method", "percentile", "--quiet")
    assert code == 0 and err == "" and out.is_file()


# ---------------------------------------------------------------------------------------------
# 11. `compress --shape x=8x32 --calibration c.npz`: --shape sizes generated latency inputs only,
#     and with data it was ignored in silence (bench refuses --shape beside --data). Refused now.


def test_compress_refuses_shape_beside_data(rng, tmp_path, capsys):
    model, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "q.onnx"
    _mlp(rng, model)
    np.savez(calib, x=rng.standard_normal((20, 32)).astype(np.float32))
    for data in (["--calibration", calib], ["--eval", calib]):
        code, stdout, err = _cli(capsys, "compress", model, "-o", out, "--recipe", "cluster-4bit", *data,
                                 "--shape", "x=8x32", "--json")
        assert code == 1 and stdout == "" and not out.exists()
        assert err.strip().splitlines() == [
            "onnxcomp: error: --shape sizes generated latency inputs, made only when no --calibration or --eval "
            "data is given (latency is then measured on that data): drop it"]


# ---------------------------------------------------------------------------------------------
# 12. A model whose external-data file is missing was refused with onnx.checker's words ("Data of
#     TensorProto ( tensor name: w1) should be stored in weights/w.bin, but it is not regular
#     file."): onnxcomp's own plainer message was never reached. It is now said first.


def test_a_missing_external_data_file_is_named_plainly(rng, tmp_path, capsys):
    model, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    (tmp_path / "weights").mkdir()
    onnx.save(_mlp(rng), model, save_as_external_data=True, all_tensors_to_one_file=True, location="weights/w.bin",
              size_threshold=0)
    (tmp_path / "weights" / "w.bin").unlink()
    before = file_digest(model)
    code, stdout, err = _cli(capsys, "cluster", model, "-o", out, "--json")
    assert code == 1 and stdout == ""
    assert err.strip().splitlines() == [
        f"onnxcomp: error: {model}: tensor 'w1' refers to external data file {tmp_path / 'weights' / 'w.bin'}, "
        "which does not exist"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "weights"] and file_digest(model) == before


# ---------------------------------------------------------------------------------------------
# 13. An onnx_ir.Model with external data (ir.load) at an opset older than the pass needs: the
#     opset upgrade rebuilt it from a proto whose locations are relative, with no folder to read
#     them from (a model given in memory records no file), and quantize failed with a bare
#     FileNotFoundError for the data file. The upgraded copy now reads them from the tensors' own
#     folder.


def test_an_in_memory_model_with_external_data_is_upgraded_with_its_data(rng, tmp_path, monkeypatch):
    import onnx_ir as ir

    from onnxcomp.runtime import run_model

    folder = tmp_path / "model"
    (folder / "weights").mkdir(parents=True)
    proto = _mlp(rng)
    proto.opset_import[0].version = 11
    onnx.save(proto, folder / "old.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights/old.data", size_threshold=0)
    digests = {p: file_digest(p) for p in (folder / "old.onnx", folder / "weights" / "old.data")}
    x = rng.standard_normal((20, 32)).astype(np.float32)
    monkeypatch.chdir(tmp_path)  # not the model's folder: the relative location must not resolve here
    loaded = ir.load(folder / "old.onnx")
    quantized, report = quantize(loaded, [{"x": x}])
    assert report["notes"][0] == "upgraded the model from opset 11 to 13 (onnx.version_converter)"
    assert report["int8_nodes"] == 2
    ref, got = (run_model(m, [{"x": x}])[0][0] for m in (io.load_model(folder / "old.onnx"), quantized))
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.999
    assert {p: file_digest(p) for p in digests} == digests


# ---------------------------------------------------------------------------------------------
# 14. More of the Python API on what a user holds: a CalibrationDataReader whose get_next()
#     returns something else than a dict (or a data function returning a dict, not an iterator of
#     them) failed with an AttributeError/TypeError deep in the reading; compare_models and
#     bench_models took only onnx_ir models (a path failed on `.graph`) and compare_models only a
#     Dataset and an array of labels.


def test_data_readers_and_functions_that_return_no_feeds_are_named(rng, tmp_path):
    model = io.load_model(_mlp(rng))

    class Reader:
        def get_next(self):
            return 5

    feed = {"x": np.ones((1, 32), np.float32)}
    with pytest.raises(DataError, match=r"<Reader> feed 0: get_next\(\) returned int, not a dict of arrays \(or "
                                        r"None at the end\)"):
        list(Dataset(Reader(), model))
    with pytest.raises(DataError, match=r"<<lambda>>: the data function returned dict, not an iterator of "
                                        r"\{name: array\} dicts"):
        list(Dataset(lambda: feed, model))
    assert len(list(Dataset(lambda: [feed, feed], model))) == 2


def test_compare_and_bench_take_paths_and_plain_data(rng, tmp_path):
    from onnxcomp.measure.bench import bench_models
    from onnxcomp.measure.fidelity import compare_models

    model, calib, evaluation, labels = _labelled(rng, tmp_path)
    quantized, _ = quantize(model, calib)
    io.save_model(quantized, tmp_path / "q.onnx")
    result = compare_models(str(model), tmp_path / "q.onnx", evaluation, labels=list(labels)).to_dict()
    assert result["accuracy"]["reference"] == 1.0 and result["outputs"][0]["cosine"] > 0.99
    feeds = [{"x": np.ones((1, 32), np.float32)}]
    assert compare_models(model, model, feeds).to_dict()["outputs"][0]["sqnr_db"] == float("inf")
    rows = bench_models([("float", model), ("int8", tmp_path / "q.onnx")], feeds, runs=3, warmup_runs=1,
                        warmup_seconds=0.0)
    assert [r["name"] for r in rows] == ["float", "int8"] and rows[1]["ratio_to_first"] is not None


# ---------------------------------------------------------------------------------------------
# 15. `bench --data` with a feed the model cannot run (an index out of its table) named the
#     model and onnxruntime's words, not which feed of the data: now it names the feed and file.


def test_bench_names_the_feed_of_the_data_a_model_cannot_run(rng, tmp_path, capsys):
    model, data = tmp_path / "m.onnx", tmp_path / "ids.npz"
    _table_model(rng, model)
    ids = rng.integers(0, 50, (6, 8))
    ids[2, 5] = 99
    np.savez(data, ids=ids)
    code, stdout, err = _cli(capsys, "bench", model, "--data", data, "--runs", "3", "--warmup-runs", "1", "--json")
    assert code == 1 and stdout == ""
    assert err.startswith(f"onnxcomp: error: onnxruntime failed to run '{model}': [ONNXRuntimeError]")
    assert err.rstrip().endswith(f"idx=99 must be within the inclusive range [-50,49] (on feed 2 of the 6 read from {data})")


# ---------------------------------------------------------------------------------------------
# 16. `compress --recipe int8-accurate --set quantize.mode=dynamic` said "calibration applies to
#     static mode, not dynamic mode (drop it or change the mode)": a shipped recipe's setting
#     cannot be dropped with --set. The message now gives the --set that puts its default back.


def test_a_setting_of_another_mode_says_how_to_put_its_default_back(rng, tmp_path, capsys):
    model, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    _mlp(rng, model)
    code, _, err = _cli(capsys, "compress", model, "-o", out, "--recipe", "int8-accurate",
                        "--set", "quantize.mode=dynamic")
    assert code == 1 and not out.exists() and err.strip().splitlines() == [
        "onnxcomp: error: recipe 'int8-accurate' with overrides: stage 'quantize': calibration applies to static "
        "mode, not dynamic mode (drop it or change the mode; over a recipe that sets it, --set "
        "quantize.calibration=\"minmax\" puts back its default)"]
    args = ["--set", "quantize.mode=dynamic", "--set", "quantize.calibration=minmax", "--set", "quantize.equalize=false",
            "--set", "quantize.bias_correction=false", "--set", "measure.latency=false", "--quiet"]
    code, _, err = _cli(capsys, "compress", model, "-o", out, "--recipe", "int8-accurate", *args)
    assert code == 0 and err == "" and out.is_file()
    with pytest.raises(ConfigError, match=r"fidelity_target applies to static mode, not dynamic mode \(drop it or "
                                          r"change the mode\)$"):
        QuantizeConfig(mode="dynamic", fidelity_target=30.0)

"""Outputs never destroy inputs or each other; saves are atomic; argparse errors exit 1.

Every command that writes checks all its destinations before any work: an output that is an input
(model, its external data, calibration, eval, labels, recipe) or another output, by path, symlink or
hard link, is refused with one ``onnxcomp: error:`` line naming both files; the inputs stay
byte-identical and nothing is left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import file_digest

from onnxcomp import io
from onnxcomp.cli import main
from onnxcomp.errors import ModelSaveError
from onnxcomp.testing import run_model

# --------------------------------------------------------------------------------------------
# helpers

INPUT_KINDS = ("model", "external", "calibration", "eval", "labels", "recipe")
LINKS = ("same", "symlink", "hardlink", "folder-symlink")


def _snapshot(*folders: Path) -> dict[str, str]:
    """Every entry (links included, not followed) of the folders -> digest of what it holds."""
    snap = {}
    for folder in folders:
        for p in sorted(folder.iterdir()):
            key = str(p)
            snap[key] = ("link->" + os.readlink(p)) if p.is_symlink() else file_digest(p) if p.is_file() else "dir"
    return snap


def _one_error_line(err: str, *fragments: str) -> None:
    assert err.startswith("onnxcomp: error: "), err
    assert err.count("\n") == 1, f"one line expected: {err!r}"
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def _outputs(model, feeds):
    return [o[0] for o in run_model(model, feeds)]


@pytest.fixture
def inputs(tmp_path, matmul_proto, rng):
    """Every input kind as a file in ws/. Names end with .data so that an -o OUT whose <OUT>.data
    sibling is the input can also be spelled by the same path."""
    ws = tmp_path / "ws"
    ws.mkdir()
    onnx.save(matmul_proto, ws / "model.data", save_as_external_data=True, location="external.data",
              size_threshold=0)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    with open(ws / "calibration.data", "wb") as f:
        np.savez(f, x=x)
    with open(ws / "eval.data", "wb") as f:
        np.savez(f, x=x[:4])
    with open(ws / "labels.data", "wb") as f:
        np.save(f, np.arange(4) % 8)
    (ws / "recipe.data").write_text('name = "t"\n[cleanup]\n')
    files = {kind: ws / f"{kind}.data" for kind in INPUT_KINDS}
    assert all(p.is_file() for p in files.values())
    return files


def _compress_argv(files, out: Path, report: Path) -> list[str]:
    return ["compress", str(files["model"]), "-o", str(out), "--recipe", str(files["recipe"]),
            "--calibration", str(files["calibration"]), "--eval", str(files["eval"]),
            "--labels", str(files["labels"]), "--report", str(report)]


def _alias(victim: Path, link: str, out_dir: Path, tmp_path: Path) -> Path:
    """A path that is ``victim`` by the given kind of link (ends with .data, like the victim)."""
    if link == "same":
        return victim
    alias = out_dir / "alias.data"
    if link == "symlink":
        alias.symlink_to(victim)
    elif link == "hardlink":
        os.link(victim, alias)
    else:  # the output's folder is a symlink to the input's folder
        linked = tmp_path / "linked"
        linked.symlink_to(victim.parent, target_is_directory=True)
        alias = linked / victim.name
    return alias


def _refused(capsys, argv, frozen: list[Path], *fragments: str) -> None:
    before = _snapshot(*frozen)
    assert main(argv) == 1
    _one_error_line(capsys.readouterr().err, *fragments)
    assert _snapshot(*frozen) == before, "inputs byte-identical, no output or temporary file left"


# --------------------------------------------------------------------------------------------
# collisions: every output flag x every input kind x every way of naming the same file


@pytest.mark.parametrize("link", LINKS)
@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("flag", ["-o", "-o's .data", "--report"])
def test_output_colliding_with_an_input_is_refused(inputs, tmp_path, capsys, flag, kind, link):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dest = _alias(inputs[kind], link, out_dir, tmp_path)
    out, report = out_dir / "o.onnx", out_dir / "r.html"
    if flag == "-o":
        out = dest
    elif flag == "--report":
        report = dest
    else:
        out = dest.with_name(dest.name[: -len(".data")])  # its <OUT>.data is the input
    named = f"--report {report}" if flag == "--report" else f"-o {out}"
    expected = (named, inputs[kind].name, "same file as")
    if kind == "external" and link == "hardlink":
        # onnx.checker itself refuses a model whose external data has a second hard link
        expected = (str(inputs["model"]), inputs[kind].name, "hard links")
    _refused(capsys, _compress_argv(inputs, out, report), [inputs["model"].parent, out_dir], *expected)


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink"])
@pytest.mark.parametrize("pair", ["report=-o", "report=-o's .data"])
def test_outputs_colliding_with_each_other_are_refused(inputs, tmp_path, capsys, pair, link):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "o.onnx"
    other = out if pair == "report=-o" else out_dir / "o.onnx.data"
    other.write_bytes(b"previous output")  # a hard link needs an existing file
    if link == "same":
        report = other
    elif link == "symlink":
        report = out_dir / "r.html"
        report.symlink_to(other)
    else:
        report = out_dir / "r.html"
        os.link(other, report)
    _refused(capsys, _compress_argv(inputs, out, report), [inputs["model"].parent, out_dir],
             str(report), str(other), "give each output its own path")


@pytest.mark.parametrize("command, victim", [(c, v) for c in ("quantize", "prune", "cluster", "compress")
                                             for v in ("model", "calibration") if (c, v) != ("cluster", "calibration")])
def test_every_writing_command_guards_its_output(inputs, command, victim):
    """Subprocess: the real exit status, one line on stderr, no traceback, inputs untouched."""
    argv = [sys.executable, "-m", "onnxcomp", command, str(inputs["model"]), "-o", str(inputs[victim])]
    if command != "cluster":
        argv += ["--calibration", str(inputs["calibration"])]
    before = _snapshot(inputs["model"].parent)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    _one_error_line(proc.stderr, f"-o {inputs[victim]}", "same file as")
    assert _snapshot(inputs["model"].parent) == before


def test_output_into_a_calibration_folder_is_refused_on_its_files(inputs, tmp_path, capsys):
    """A folder of .npz feeds is an input: each file in it is protected."""
    folder = tmp_path / "feeds"
    folder.mkdir()
    (folder / "0.npz").write_bytes(inputs["calibration"].read_bytes())
    _refused(capsys, ["quantize", str(inputs["model"]), "-o", str(folder / "0.npz"), "--calibration", str(folder)],
             [folder, inputs["model"].parent], f"-o {folder / '0.npz'}", f"--calibration {folder / '0.npz'}")


# --------------------------------------------------------------------------------------------
# read-only outputs and bad destinations


@pytest.fixture
def plain(tmp_path, matmul_proto, rng):
    """An inline model and calibration data that quantize and compress can really run on."""
    onnx.save(matmul_proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((8, 16)).astype(np.float32))
    return tmp_path / "m.onnx", tmp_path / "calib.npz"


@pytest.mark.parametrize("which", ["-o", "-o's .data", "--report"])
def test_read_only_output_needs_force(plain, tmp_path, capsys, which):
    model, calib = plain
    out, report = tmp_path / "out.onnx", tmp_path / "r.html"
    ro = {"-o": out, "-o's .data": tmp_path / "out.onnx.data", "--report": report}[which]
    ro.write_bytes(b"previous")
    ro.chmod(0o444)
    argv = ["compress", str(model), "-o", str(out), "--calibration", str(calib), "--report", str(report),
            "--recipe", "int8", "--set", "measure.latency=false"]
    before = _snapshot(tmp_path)
    assert main(argv) == 1
    _one_error_line(capsys.readouterr().err, str(ro), "read-only", "--force")
    assert _snapshot(tmp_path) == before
    assert main([*argv, "--force", "--quiet"]) == 0, capsys.readouterr().err
    if which == "-o's .data":
        assert not ro.exists(), "the stale read-only <out>.data is gone"
    else:
        assert ro.read_bytes() != b"previous"
    io.load_model(out)  # the new model is whole
    assert "<html" in report.read_text().lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "m.onnx", "out.onnx", "r.html"]


def test_read_only_model_output_for_each_command(plain, tmp_path, capsys):
    model, calib = plain
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")
    out.chmod(0o444)
    for argv in (["quantize", str(model), "-o", str(out), "--calibration", str(calib)],
                 ["prune", str(model), "-o", str(out)],
                 ["cluster", str(model), "-o", str(out), "--min-elements", "1"]):
        assert main(argv) == 1
        _one_error_line(capsys.readouterr().err, str(out), "read-only")
        assert out.read_bytes() == b"previous"
    assert main(["quantize", str(model), "-o", str(out), "--calibration", str(calib), "--force", "--quiet"]) == 0
    assert io.load_model(out).graph.node(0) is not None


def _unwritable_report_folder_as_a_user(model: Path, calib: Path) -> None:
    """A 0555 folder binds only a user without root's override: run the CLI as one (nobody)."""
    as_user: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and no setpriv to run the CLI as an ordinary user")
        as_user = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    base = Path(tempfile.mkdtemp(prefix="onnxcomp-test-"))  # pytest's tmp_path is private to root
    try:
        base.chmod(0o777)
        shutil.copy(model, base / "m.onnx")
        shutil.copy(calib, base / "calib.npz")
        locked = base / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        before = _snapshot(base, locked)
        proc = subprocess.run([*as_user, sys.executable, "-m", "onnxcomp", "compress", str(base / "m.onnx"),
                               "-o", str(base / "out.onnx"), "--calibration", str(base / "calib.npz"),
                               "--report", str(locked / "r.html")], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr
        # onnxruntime warns once on stderr that this user cannot persist its telemetry id
        err = "".join(line for line in proc.stderr.splitlines(True) if "W:onnxruntime" not in line)
        _one_error_line(err, f"--report {locked / 'r.html'}", "not writable")
        assert _snapshot(base, locked) == before, "no model written, no temporary file"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("case", ["directory", "missing folder", "under a regular file",
                                  "unwritable folder (procfs)", "unwritable folder (chmod)"])
def test_bad_report_destination_is_refused_before_any_work(plain, tmp_path, capsys, case):
    model, calib = plain
    if case == "directory":
        report, fragment = tmp_path, "is a directory"
    elif case == "missing folder":
        report, fragment = tmp_path / "no" / "r.html", "does not exist"
    elif case == "under a regular file":
        report, fragment = calib / "r.html", "is not a folder"
    elif case == "unwritable folder (procfs)":
        # /proc/self is read-only for every user, root included (chmod does not bind root)
        report, fragment = Path("/proc/self/r.html"), "not writable"
    else:
        return _unwritable_report_folder_as_a_user(model, calib)
    out = tmp_path / "out.onnx"
    before = _snapshot(tmp_path)
    assert main(["compress", str(model), "-o", str(out), "--calibration", str(calib), "--report", str(report)]) == 1
    _one_error_line(capsys.readouterr().err, "--report", fragment)
    assert _snapshot(tmp_path) == before, "no model written, no temporary file"


def test_failed_model_save_leaves_no_report(plain, tmp_path, capsys, monkeypatch):
    """The report is written only once the model is saved."""
    model, calib = plain
    (tmp_path / "r.html").write_text("previous report")

    def disk_full(*args, **kwargs):
        raise ModelSaveError(f"{tmp_path / 'out.onnx'}: cannot write: No space left on device")

    monkeypatch.setattr(io, "save_model", disk_full)
    before = _snapshot(tmp_path)
    assert main(["compress", str(model), "-o", str(tmp_path / "out.onnx"), "--calibration", str(calib),
                 "--report", str(tmp_path / "r.html"), "--set", "measure.latency=false"]) == 1
    _one_error_line(capsys.readouterr().err, "No space left")
    assert _snapshot(tmp_path) == before, "previous report kept, no temporary file, no model"


# --------------------------------------------------------------------------------------------
# external-data saves: atomic pair, no stale or empty .data


def _with_weights(proto, rng) -> tuple:
    model = io.load_model(proto)
    for name in ("w", "b"):
        old = model.graph.initializers[name].const_value
        model.graph.initializers[name].const_value = io.ir.tensor(
            rng.standard_normal(old.shape.numpy()).astype(np.float32), name=name)
    return model


def _data_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "out.onnx")


@pytest.mark.parametrize("fault", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_interrupted_external_save_keeps_the_old_pair(matmul_proto, tmp_path, rng, monkeypatch, fault):
    target = tmp_path / "out.onnx"
    old_model, new_model = _with_weights(matmul_proto, rng), _with_weights(matmul_proto, rng)
    io.save_model(old_model, target, external_data=True, size_threshold_bytes=0)
    assert _data_files(tmp_path) == ["out.onnx.data"]
    feeds = [{"x": rng.standard_normal((2, 16)).astype(np.float32)}]
    old_out = _outputs(io.load_model(target), feeds)
    assert not np.allclose(old_out[0], _outputs(new_model, feeds)[0]), "the two models differ"
    before = _snapshot(tmp_path)

    real_replace = os.replace
    moves = []

    def faulty_replace(src, dst):
        if Path(dst).parent == tmp_path:  # onnx_ir renames inside the temporary folder too
            moves.append(Path(dst).name)
        if Path(dst) == target:  # the data file is in place, the model not yet
            raise fault
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", faulty_replace)
    with pytest.raises(ModelSaveError if isinstance(fault, OSError) else KeyboardInterrupt):
        io.save_model(new_model, target, external_data=True, size_threshold_bytes=0)
    assert len(moves) == 2 and moves[0] != "out.onnx.data", "new data went to a name the old model does not read"
    assert _snapshot(tmp_path) == before, "old model and data untouched, the new data file removed"
    np.testing.assert_array_equal(_outputs(io.load_model(target), feeds)[0], old_out[0])


def test_killed_save_leaves_a_consistent_pair_and_the_next_save_cleans_up(matmul_proto, tmp_path, rng, monkeypatch):
    """A kill between the two renames runs no clean-up: the old pair must still be consistent."""
    target = tmp_path / "out.onnx"
    old_model, new_model = _with_weights(matmul_proto, rng), _with_weights(matmul_proto, rng)
    io.save_model(old_model, target, external_data=True, size_threshold_bytes=0)
    feeds = [{"x": rng.standard_normal((2, 16)).astype(np.float32)}]
    old_out = _outputs(io.load_model(target), feeds)[0]

    real_replace = os.replace

    def killed(src, dst):
        if Path(dst) == target:
            raise KeyboardInterrupt
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(io.os, "replace", killed)
        m.setattr(io.Path, "unlink", lambda self, missing_ok=False: None)  # no clean-up ran
        m.setattr(io.shutil, "rmtree", lambda *a, **k: None)
        with pytest.raises(KeyboardInterrupt):
            io.save_model(new_model, target, external_data=True, size_threshold_bytes=0)
    orphans = [n for n in _data_files(tmp_path) if n.endswith(".data") and n != "out.onnx.data"]
    assert len(orphans) == 1, _data_files(tmp_path)
    np.testing.assert_array_equal(_outputs(io.load_model(target), feeds)[0], old_out)
    for leftover in tmp_path.glob(".onnxcomp-*"):
        io.shutil.rmtree(leftover)
    io.save_model(new_model, target, external_data=True, size_threshold_bytes=0)
    np.testing.assert_array_equal(_outputs(io.load_model(target), feeds)[0], _outputs(new_model, feeds)[0])
    files = io.model_files(target)
    assert len(files) == 2 and _data_files(tmp_path) == [files[1].name], "old data and the orphan removed"


def test_resaves_leave_only_the_files_the_model_reads(matmul_proto, tmp_path, rng):
    target = tmp_path / "out.onnx"
    feeds = [{"x": rng.standard_normal((2, 16)).astype(np.float32)}]
    for external in (True, True, False, True, False):
        model = _with_weights(matmul_proto, rng)
        io.save_model(model, target, external_data=external, size_threshold_bytes=0)
        files = io.model_files(target)
        assert len(files) == (2 if external else 1)
        assert _data_files(tmp_path) == [f.name for f in files[1:]], "no stale .data, no temporary file"
        np.testing.assert_array_equal(_outputs(io.load_model(target), feeds)[0], _outputs(model, feeds)[0])
    assert not (tmp_path / "out.onnx.data").exists()


def test_no_empty_data_file_when_every_tensor_stays_inline(matmul_proto, tmp_path, rng):
    model = io.load_model(matmul_proto)
    out = io.save_model(model, tmp_path / "out.onnx", external_data=True, size_threshold_bytes=1 << 30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]
    assert io.model_files(out) == [out]
    feeds = [{"x": rng.standard_normal((2, 16)).astype(np.float32)}]
    np.testing.assert_array_equal(_outputs(io.load_model(out), feeds)[0], _outputs(model, feeds)[0])


def test_resave_never_removes_data_an_input_reads(matmul_proto, tmp_path, rng, capsys):
    """cp out.onnx in.onnx; then writing out.onnx from in.onnx would remove the data in.onnx reads."""
    target = tmp_path / "out.onnx"
    io.save_model(_with_weights(matmul_proto, rng), target, external_data=True, size_threshold_bytes=0)
    io.save_model(_with_weights(matmul_proto, rng), target, external_data=True, size_threshold_bytes=0)
    copy = tmp_path / "in.onnx"
    copy.write_bytes(target.read_bytes())
    shared = io.model_files(copy)[1]
    assert shared.name != "out.onnx.data" and shared.exists()
    source = io.load_model(copy)
    derived = io.clone_model(source)
    for name in ("w", "b"):  # every tensor rewritten: the result no longer reads the shared file
        old = derived.graph.initializers[name].const_value
        derived.graph.initializers[name].const_value = io.ir.tensor(old.numpy() * 2, name=name)
    before = _snapshot(tmp_path)
    with pytest.raises(ModelSaveError, match=shared.name):
        io.save_model(derived, target)
    assert main(["cluster", str(copy), "-o", str(target), "--min-elements", "1"]) == 1
    _one_error_line(capsys.readouterr().err, f"-o {target}", shared.name, "external data of the input model")
    assert _snapshot(tmp_path) == before
    feeds = [{"x": rng.standard_normal((2, 16)).astype(np.float32)}]
    np.testing.assert_array_equal(_outputs(io.load_model(copy), feeds)[0], _outputs(source, feeds)[0])


# --------------------------------------------------------------------------------------------
# argparse errors: status 1 and one onnxcomp: error: line, for every subcommand

BAD_USAGE = {
    "inspect": (["m.onnx", "--no-such-flag"], "--no-such-flag"),
    "compress": (["m.onnx", "--batch-size", "two"], "--batch-size"),
    "quantize": (["m.onnx", "-o", "q.onnx", "--method", "foo"], "--method"),
    "sensitivity": (["m.onnx", "--calibration", "c.npz", "--method", "foo"], "--method"),
    "prune": (["m.onnx", "-o", "p.onnx", "--criterion", "foo"], "--criterion"),
    "cluster": (["m.onnx", "-o", "c.onnx", "--bits", "3", "--clusters", "8"], "--clusters"),
    "bench": (["m.onnx", "--optimization", "foo"], "--optimization"),
    "compare": (["a.onnx", "b.onnx"], "--data"),
}


@pytest.mark.parametrize("command", sorted(BAD_USAGE))
def test_argparse_errors_exit_one(command, capsys):
    args, option = BAD_USAGE[command]
    with pytest.raises(SystemExit) as info:
        main([command, *args])
    assert info.value.code == 1
    captured = capsys.readouterr()
    _one_error_line(captured.err, option, "--help")
    assert captured.out == ""


@pytest.mark.parametrize("argv, option", [(["quantize", "m.onnx", "-o", "q.onnx", "--bits", "3"], "--bits"),
                                          (["nosuchcommand"], "nosuchcommand"),
                                          ([], "COMMAND")])
def test_argparse_errors_exit_one_in_a_subprocess(argv, option):
    proc = subprocess.run([sys.executable, "-m", "onnxcomp", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    _one_error_line(proc.stderr, option)


def test_file_bytes_counts_the_data_file_a_resave_wrote(matmul_proto, tmp_path, rng):
    from onnxcomp.cli import file_bytes

    target = tmp_path / "out.onnx"
    for _ in range(2):
        io.save_model(_with_weights(matmul_proto, rng), target, external_data=True, size_threshold_bytes=0)
        files = io.model_files(target)
        assert io.saved_data_files(target) == files[1:]
        assert file_bytes(target) == sum(f.stat().st_size for f in files) > target.stat().st_size

"""Pure-logic tests of the benchmark suite: metrics, the best-baseline choice and ratios, the build
cache (no downloads; builds are replaced by a stub)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import metrics as M

CHARSET = ["<blank>", "a", "b", "c", " "]


def one_hot(indices: list[list[int]], classes: int = len(CHARSET)) -> np.ndarray:
    idx = np.asarray(indices)
    out = np.full((*idx.shape, classes), 0.01, dtype=np.float32)
    np.put_along_axis(out, idx[..., None], 0.9, axis=-1)
    return out


# --------------------------------------------------------------------------- CTC


def test_ctc_merges_repeats_and_drops_blanks():
    scores = one_hot([[1, 1, 0, 1, 2, 2, 0, 0, 3], [0, 0, 0, 0, 0, 0, 0, 0, 0]])
    assert M.ctc_greedy_decode(scores, CHARSET) == ["aabc", ""]


def test_ctc_blank_separates_doubled_letters_and_space_is_a_class():
    idx = np.array([[2, 0, 2, 4, 4, 3]], dtype=np.int64)
    assert M.ctc_greedy_decode(idx, CHARSET) == ["bb c"]


def test_ctc_rejects_bad_rank():
    with pytest.raises(ValueError):
        M.ctc_greedy_decode(np.zeros((3,)), CHARSET)


# --------------------------------------------------------------------------- edit distance


@pytest.mark.parametrize(
    "a,b,d",
    [("", "", 0), ("abc", "", 3), ("", "ab", 2), ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("same", "same", 0)],
)
def test_edit_distance(a, b, d):
    assert M.edit_distance(a, b) == d
    assert M.edit_distance(b, a) == d


def test_char_and_line_accuracy():
    preds = ["hello", "wrld", "", "abc"]
    truths = ["hello", "world", "x", "abd"]
    # 1 - ED/max(len): 1, 1 - 1/5, 1 - 1/1, 1 - 1/3
    expected = (1 + 0.8 + 0 + 2 / 3) / 4
    assert M.char_accuracy(preds, truths) == pytest.approx(expected)
    assert M.line_accuracy(preds, truths) == 0.25
    assert M.char_accuracy([""], [""]) == 1.0
    # a prediction longer than the truth is normalized by its own length, never below 0
    assert M.char_accuracy(["abcdefgh"], ["a"]) == pytest.approx(1 - 7 / 8)
    with pytest.raises(ValueError):
        M.char_accuracy(["a"], ["a", "b"])


# --------------------------------------------------------------------------- boxes


def test_box_iou_values():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 5, 5]])
    np.testing.assert_allclose(M.box_iou(a, b), [[1.0, 50 / 150, 0.0, 25 / 100]])
    assert M.box_iou(np.zeros((0, 4)), b).shape == (0, 4)


def test_match_boxes_is_one_to_one_and_greedy_by_iou():
    gt = np.array([[0, 0, 10, 10], [20, 0, 30, 10]])
    pred = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 0, 29, 10], [50, 50, 60, 60]])
    tp, n_pred, n_gt = M.match_boxes(pred, gt, 0.5)
    assert (tp, n_pred, n_gt) == (2, 4, 2)  # the duplicate of box 0 does not count twice


def test_detection_scores_sums_over_images():
    gt1 = np.array([[0, 0, 10, 10]])
    gt2 = np.array([[0, 0, 10, 10], [20, 0, 30, 10]])
    pairs = [(np.array([[0, 0, 10, 10]]), gt1), (np.array([[0, 0, 10, 10], [40, 0, 50, 10]]), gt2)]
    s = M.detection_scores(pairs)
    assert (s["tp"], s["n_pred"], s["n_gt"]) == (2, 3, 3)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    empty = M.detection_scores([(np.zeros((0, 4)), np.zeros((0, 4)))])
    assert empty["f1"] == 1.0
    missed = M.detection_scores([(np.zeros((0, 4)), gt1)])
    assert missed["f1"] == 0.0


def test_prob_map_to_boxes_unclips_components():
    prob = np.zeros((40, 60), dtype=np.float32)
    prob[10:14, 5:25] = 0.9  # a 20x4 kernel
    prob[30:32, 40:42] = 0.9  # 4 pixels: kept with min_area=4
    prob[0, 59] = 0.9  # a single pixel: dropped
    prob[20:22, 50:58] = 0.35  # above thresh, but mean below box_thresh: dropped
    boxes = M.prob_map_to_boxes(prob, thresh=0.3, box_thresh=0.5, unclip_ratio=1.6, min_area=4)
    assert boxes.shape == (2, 4)
    d = 20 * 4 * 1.6 / (2 * 24)
    np.testing.assert_allclose(boxes[0], [5 - d, 10 - d, 25 + d, 14 + d])
    d2 = 2 * 2 * 1.6 / 8
    np.testing.assert_allclose(boxes[1], [40 - d2, 30 - d2, 42 + d2, 32 + d2])
    assert M.prob_map_to_boxes(np.zeros((8, 8))).shape == (0, 4)


def test_components_use_8_connectivity_and_merge_u_shapes():
    mask = np.array(
        [
            [1, 0, 0, 0, 1, 0, 1],
            [0, 1, 0, 0, 1, 0, 1],
            [0, 0, 0, 0, 1, 1, 1],
            [1, 1, 0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    comps = sorted(M._components(mask, mask.astype(np.float32)), key=lambda c: (c[2], c[4]))
    # (area, prob_sum, y0, y1, x0, x1): the diagonal pair, the U shape, the bottom-left run
    assert [(c[0], c[2], c[3], c[4], c[5]) for c in comps] == [(2, 0, 2, 0, 2), (7, 0, 3, 4, 7), (2, 3, 4, 0, 2)]
    assert comps[1][1] == 7.0


def test_prob_map_boxes_are_clipped_to_the_image():
    prob = np.zeros((10, 10), dtype=np.float32)
    prob[0:3, 0:10] = 1.0
    (box,) = M.prob_map_to_boxes(prob)
    assert box[0] == 0 and box[1] == 0 and box[2] == 10 and box[3] > 3


def test_pixel_iou_and_mask():
    a = M.boxes_to_mask(np.array([[0, 0, 4, 4]]), (8, 8))
    b = M.boxes_to_mask(np.array([[2, 0, 6, 4]]), (8, 8))
    assert a.sum() == 16
    assert M.pixel_iou(a, b) == pytest.approx(8 / 24)
    assert M.pixel_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0


# --------------------------------------------------------------------------- embeddings


def test_mean_pool_ignores_masked_tokens():
    hidden = np.array([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    mask = np.array([[1, 1, 0]])
    np.testing.assert_allclose(M.mean_pool(hidden, mask), [[2.0, 1.0]])


def test_row_cosine():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    np.testing.assert_allclose(M.row_cosine(a, b), [1.0, -1.0, 0.0], atol=1e-12)


def test_nearest_neighbours_excludes_self():
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    np.testing.assert_array_equal(M.nearest_neighbours(emb), [1, 0, 3, 2])


def test_nn_agreement():
    ref = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert M.nn_agreement(ref, ref * 3.0) == 1.0  # scale does not matter
    cand = ref.copy()
    cand[1] = [0.2, 0.8]  # row 1 now sits next to rows 2/3; rows 0 and 1 change neighbours
    agree = M.nn_agreement(ref, cand)
    assert agree == pytest.approx(np.mean(M.nearest_neighbours(ref) == M.nearest_neighbours(cand)))
    assert agree < 1.0
    with pytest.raises(ValueError):
        M.nn_agreement(ref, ref[:3])


# --------------------------------------------------------------------------- runner: best baseline, ratios


def _row(name, kind="ort-static", metric=None, median_ms=None, times=None, status="ok"):
    from benchmarks.run import Row

    row = Row("m", name, kind, status=status)
    if metric is not None:
        row.metrics = {"acc": metric}
    if times is not None:
        row.times = tuple(times)
        row.latency = {"median_ms": float(np.median(times)) * 1e3 if median_ms is None else median_ms}
    return row


def test_best_baseline_is_the_fastest_accurate_ort_row():
    from benchmarks.run import best_ort

    rows = [
        _row("fp32", kind="fp32", metric=0.90, times=[3.0]),
        _row("ort_fast_bad", metric=0.85, times=[1.0]),  # 5 points below fp32: not accurate
        _row("ort_slow_ok", metric=0.895, times=[2.0]),  # within 1 point
        _row("ort_ok", metric=0.891, times=[1.5]),  # within 1 point, faster: the best
        _row("oc_faster", kind="onnxcomp", metric=0.95, times=[0.5]),  # not a baseline
        _row("ort_failed", metric=0.99, times=[0.1], status="error"),
        _row("ort_untimed", metric=0.99),
    ]
    best, accurate = best_ort(rows, "acc", 0.90)
    assert (best.candidate, accurate) == ("ort_ok", True)


def test_best_baseline_without_an_accurate_one_is_the_most_accurate_flagged():
    from benchmarks.run import best_ort

    rows = [_row("ort_a", metric=0.70, times=[1.0]), _row("ort_b", metric=0.80, times=[2.0]),
            _row("ort_c", metric=0.80, times=[1.5])]
    best, accurate = best_ort(rows, "acc", 0.90)
    assert (best.candidate, accurate) == ("ort_c", False)  # most accurate, the faster one on a tie
    assert best_ort(rows, "acc", None) == (rows[2], False)  # no fp32 metric: the same rule
    assert best_ort([_row("oc", kind="onnxcomp", metric=0.9, times=[1.0])], "acc", 0.9) == (None, False)


def test_ratios_to_the_best_baseline():
    from benchmarks.run import ratios_to_best

    best = _row("ort_best", metric=0.9, times=[2.0, 2.2, 1.8, 2.0])
    half = _row("oc_half", kind="onnxcomp", times=[1.0, 1.1, 0.9, 1.0])  # every round exactly half
    untimed = _row("oc_failed", kind="onnxcomp")
    ratios_to_best([best, half, untimed], best)
    assert best.latency["ratio_best"] == 1.0 and best.latency["ratio_best_ci"] == [1.0, 1.0]
    assert half.latency["ratio_best"] == pytest.approx(0.5)
    assert half.latency["ratio_best_ci"] == pytest.approx([0.5, 0.5])  # paired rounds: no spread
    assert "ratio_best" not in untimed.latency


# --------------------------------------------------------------------------- runner: build cache


def _task(tmp_path):
    from types import SimpleNamespace

    fp32, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    fp32.write_bytes(b"model")
    calib.write_bytes(b"calib")
    return SimpleNamespace(name="m", fp32_path=fp32, calib_path=calib)


@pytest.fixture
def fake_worker(monkeypatch):
    """The build child process replaced by a function that writes the model and its record."""
    import json
    import subprocess

    from benchmarks import run

    builds = []

    def fake_run(cmd, **kw):
        name, _, _, out, record = cmd[-5:]
        builds.append(name)
        Path(out).write_bytes(f"built {len(builds)}".encode())
        Path(record).write_text(json.dumps({"ok": True, "wall_s": 1.0, "notes": {"build": len(builds)}}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    return builds


def test_build_cache_reuses_only_the_same_code_and_config(tmp_path, monkeypatch, fake_worker):
    from benchmarks import run
    from benchmarks.candidates import Candidate

    task, cache = _task(tmp_path), tmp_path / "cache"
    cand = Candidate("oc_x", lambda *a: None, kind="onnxcomp", config={"recipe": {"quantize": {"bits": 8}}})
    monkeypatch.setattr(run, "code_revision", lambda: "rev-1")

    assert not run.build_candidate(task, cand, cache, reuse=True).build.get("reused")
    row = run.build_candidate(task, cand, cache, reuse=True)
    assert row.build["reused"] and row.build["notes"] == {"build": 1} and fake_worker == ["oc_x"]
    assert not run.build_candidate(task, cand, cache, reuse=False).build.get("reused")  # no --reuse-builds
    assert len(fake_worker) == 2

    # the same name with another configuration: rebuilt
    other = Candidate("oc_x", cand.build, kind="onnxcomp", config={"recipe": {"quantize": {"bits": 4}}})
    assert not run.build_candidate(task, other, cache, reuse=True).build.get("reused")
    assert len(fake_worker) == 3
    # other code (a commit, or an uncommitted edit): rebuilt, then reused
    monkeypatch.setattr(run, "code_revision", lambda: "rev-2")
    assert not run.build_candidate(task, other, cache, reuse=True).build.get("reused")
    assert run.build_candidate(task, other, cache, reuse=True).build["reused"]
    assert len(fake_worker) == 4
    # another calibration file: rebuilt
    task.calib_path.write_bytes(b"other calib")
    assert not run.build_candidate(task, other, cache, reuse=True).build.get("reused")
    assert len(fake_worker) == 5
    key = json.loads((cache / "builds" / "m" / "oc_x.json").read_text())["key"]
    assert key["code"] == "rev-2" and key["config"] == {"recipe": {"quantize": {"bits": 4}}}
    assert key["versions"]["onnxruntime"]


def test_code_revision_changes_with_any_source_edit(tmp_path):
    from benchmarks.run import BUILD_SOURCES, code_revision

    pkg = tmp_path / "onnxcomp"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.toml").write_text("k = 1\n")
    (pkg / "notes.txt").write_text("ignored")
    first = code_revision((pkg,))
    assert code_revision((pkg,)) == first
    (pkg / "notes.txt").write_text("still ignored")
    assert code_revision((pkg,)) == first
    (pkg / "sub" / "b.toml").write_text("k = 2\n")
    second = code_revision((pkg,))
    assert second != first
    (pkg / "sub" / "b.toml").rename(pkg / "b.toml")  # same content, another place
    assert code_revision((pkg,)) != second
    # the real key covers onnxcomp itself and the modules that build
    names = {p.name for p in BUILD_SOURCES}
    assert {"onnxcomp", "onnxcomp_candidates.py", "baselines.py", "worker.py"} <= names


def test_every_candidate_has_its_config():
    from benchmarks.candidates import load_candidates

    cands = load_candidates()
    assert all(c.config for c in cands.values())
    assert cands["oc_prune30_rec"].config["recipe"]["prune"]["reconstruct"] is True
    assert cands["ort_static_pct_s8"].config["calibration"] == "Percentile"


# --------------------------------------------------------------------------- RESULTS.md


def test_runner_keeps_hand_written_sections_below_the_marker(tmp_path):
    """A new run rewrites the generated tables and keeps the studies appended below its marker, once."""
    from benchmarks import run

    results = json.loads((Path(run.__file__).parent / "results.json").read_text())
    md = tmp_path / "RESULTS.md"
    md.write_text("# old tables\n" + run.KEEP_MARKER + "\n\n## A study\n\nfigures\n")
    run.write_markdown(md, results)
    run.write_markdown(md, results)
    text = md.read_text()
    assert "# old tables" not in text
    assert text.count(run.KEEP_MARKER) == 1
    assert text.count("## A study") == 1 and text.endswith("figures\n")
    assert text.index("## Summary") < text.index(run.KEEP_MARKER) < text.index("## A study")
    fresh = tmp_path / "fresh.md"  # no earlier file: only the generated tables and the marker
    run.write_markdown(fresh, results)
    assert fresh.read_text().rstrip().endswith(run.KEEP_MARKER)


def test_merge_replaces_only_the_models_run_now(tmp_path):
    """``--merge``: the other models and the header stay the earlier run's; each model run now carries
    its own run line, printed under its heading."""
    from benchmarks import run

    old = json.loads((Path(run.__file__).parent / "results.json").read_text())
    name = next(n for n, r in old["models"].items() if r["status"] == "ok" and "run" not in r)
    rerun_before = sum("run" in r for r in old["models"].values())  # models the file already re-ran alone
    other = next(n for n in old["models"] if n != name)
    fresh = {**old["models"][name], "metric_label": "a new metric"}
    new = {"meta": {**old["meta"], "date": "2099-01-01 00:00 UTC", "command": "python -m benchmarks --models " + name,
                    "machine": {**old["meta"]["machine"], "git_commit": "abc1234"}, "elapsed_s": 120.0},
           "models": {name: fresh}}
    merged = run.merge_results(old, new)
    assert merged["meta"] == old["meta"] and merged["models"][other] == old["models"][other]
    assert list(merged["models"]) == list(old["models"])  # the order of the table stays
    assert merged["models"][name]["metric_label"] == "a new metric"
    assert merged["models"][name]["run"]["git_commit"] == "abc1234"
    assert "run" not in old["models"][name]  # the earlier results are not modified
    assert run.merge_results(None, new) is new
    md = tmp_path / "RESULTS.md"
    run.write_markdown(md, merged)
    text = md.read_text()
    section = text[text.index(f"## {name}\n"):]
    assert section.split("\n")[2].startswith("Re-run alone 2099-01-01 00:00 UTC by `python -m benchmarks --models "
                                             f"{name}` (git abc1234; 2.0 min;")
    assert text.count("Re-run alone") == rerun_before + 1

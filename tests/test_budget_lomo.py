"""benchmarks/budget_lomo.py: leave-one-model-out choice of the check's thresholds."""

from __future__ import annotations

from benchmarks import budget_lomo


def _results():
    def model(metric, fp32, rows):
        return {"status": "ok", "metric": metric, "fp32_metric": fp32,
                "rows": [{"candidate": "fp32", "status": "ok", "metrics": {metric: fp32, "agree_fp32": 1.0},
                          "fidelity": {"cosine": 1.0}}] + rows}

    def row(name, metric, value, agree=None, cosine=None):
        metrics = {metric: value}
        if agree is not None:
            metrics["agree_fp32"] = agree
        return {"candidate": name, "status": "ok", "metrics": metrics, "fidelity": {"cosine": cosine}}

    return {"models": {
        "a": model("accuracy", 0.99, [row("ok", "accuracy", 0.985, agree=0.995), row("bad", "accuracy", 0.95, agree=0.96)]),
        "b": model("accuracy", 0.98, [row("ok", "accuracy", 0.98, agree=0.999), row("bad", "accuracy", 0.9, agree=0.97)]),
        "c": model("accuracy", 0.97, [row("edge", "accuracy", 0.955, agree=0.975)]),
        "m": model("f1", 0.9, [row("ok", "f1", 0.899, cosine=0.95), row("bad", "f1", 0.5, cosine=0.93)]),
    }}


def test_builds_classify_good_and_kind():
    rows = budget_lomo.builds_from_results(_results(), set())
    by = {(b.model, b.candidate): b for b in rows}
    assert by["a", "ok"].good and not by["a", "bad"].good and by["a", "ok"].kind == "agreement"
    assert by["m", "ok"].kind == "cosine" and by["m", "bad"].value == 0.93
    assert len(rows) == 7  # fp32 rows are not builds


def test_left_out_model_is_judged_by_thresholds_from_the_others():
    table = {r["model"]: r for r in budget_lomo.lomo(budget_lomo.builds_from_results(_results(), set()))}
    # without c: the worst bad agreement elsewhere is 0.97, so c's 0.975 passes although it lost 1.5 points
    assert table["c"]["thresholds"]["agreement"] == 0.97 and table["c"]["false_pass"] == ["edge"]
    # without a: c's bad build (0.975) sets the threshold; a's good build (0.995) passes, its bad one (0.96) does not
    assert table["a"]["thresholds"]["agreement"] == 0.975
    assert table["a"]["false_pass"] == [] and table["a"]["false_alarm"] == []
    # m is the only cosine model: nothing to learn from, the default 0.985 applies and flags its good build
    assert table["m"]["thresholds"]["cosine"] is None and table["m"]["false_alarm"] == ["ok"]
    text = budget_lomo.render(list(table.values()), "x.json")
    assert "| c | top1_agreement | 1 (0) | - / 0.9750 | 0.9700 | - | 0.9300 | - | edge | 0 | 0 / 0 |" in text


def test_a_detector_is_judged_by_its_own_threshold():
    """The layout detector's ``f1_fp32`` is the check's detection agreement, judged against
    ``min_detection_agreement``, not the shared agreement threshold; no other model has one, so the
    left-out detector falls back to the default (0.98)."""
    results = _results()
    results["models"]["d"] = {"status": "ok", "metric": "f1_labels", "fp32_metric": 0.83, "rows": [
        {"candidate": "fp32", "status": "ok", "metrics": {"f1_labels": 0.83, "f1_fp32": 1.0}, "fidelity": {"cosine": 1.0}},
        {"candidate": "int8", "status": "ok", "metrics": {"f1_labels": 0.825, "f1_fp32": 0.983}, "fidelity": {"cosine": 0.999}},
        {"candidate": "noisy", "status": "ok", "metrics": {"f1_labels": 0.80, "f1_fp32": 0.978}, "fidelity": {"cosine": 0.999}},
    ]}
    rows = budget_lomo.builds_from_results(results, set())
    by = {(b.model, b.candidate): b for b in rows}
    assert by["d", "int8"].kind == "detection" and by["d", "int8"].value == 0.983 and by["d", "int8"].good
    assert not by["d", "noisy"].good
    table = {r["model"]: r for r in budget_lomo.lomo(rows)}
    assert table["d"]["thresholds"]["detection"] is None
    # at the shared agreement threshold chosen without d (0.97) its bad build would pass; at 0.98 neither errs
    assert table["d"]["false_pass"] == [] and table["d"]["false_alarm"] == []
    assert table["a"]["thresholds"]["detection"] == 0.978  # d's bad build, learnt for the others


def _study():
    def row(f1_fp32, diff):
        return {"f1_fp32": {"value": f1_fp32}, "labels": {"f1": {"diff": diff}}}

    return {"pages": 72, "splits": {
        "tune": {"fp32": row(1.0, 0.0), "int8": row(0.983, -0.006), "mse": row(0.979, -0.011),
                 "dx=1": row(0.976, 0.002), "nncf": row(0.82, -0.15)},
        "report": {"fp32": row(1.0, 0.0), "int8": row(0.9799, -0.008), "dyn": row(0.972, -0.02),
                   "dx=1": row(0.979, 0.0)},
    }}


def test_split_study_chooses_on_tune_and_judges_report():
    result = budget_lomo.split_study(_study())
    assert result["chosen"] == 0.979  # the best bad tune build
    tune, report = result["splits"]["tune"], result["splits"]["report"]
    assert tune["builds"] == 4 and tune["good"] == 2 and tune["false_pass"] == [] and tune["false_alarm"] == ["dx=1"]
    # int8 (0.9799) passes "> 0.979"; the pixel-shifted fp32 (0.979 exactly) does not: a false alarm
    assert report["false_pass"] == [] and report["false_alarm"] == ["dx=1"]
    assert report["default_false_alarm"] == ["int8", "dx=1"] and report["default_false_pass"] == []
    text = budget_lomo.render_split_study(result, "study.json")
    assert "Threshold chosen on tune: > 0.9790; default >= 0.98." in text
    assert "| report | 3 (2) | 0.9790 / 0.9720 | 0 | dx=1 | 0 / int8, dx=1 |" in text

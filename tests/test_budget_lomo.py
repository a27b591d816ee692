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
    assert "| c | top1_agreement | 1 (0) | - / 0.9750 | 0.9700 | 0.9300 | edge | 0 | 0 / 0 |" in text

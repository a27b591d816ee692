"""Mixed-width allocation that spends its budget (issue 19, thirteenth session)."""

from __future__ import annotations

import itertools

import numpy as np

from onnxcomp.cluster.passes import _fill_widths, allocate_widths


def _total(options, widths):
    return (sum(options[n][b][0] for n, b in widths.items()), sum(options[n][b][1] for n, b in widths.items()))


def test_allocation_spends_what_the_greedy_leaves_on_the_large_tensor():
    # a large head whose 2 -> 2.5 step costs 250 bytes, and four small tensors whose upgrades
    # pay more per byte: the greedy takes those first and then cannot afford the head
    options = {"head": {2: (5.0, 1000), 2.5: (3.5, 1250)}}
    for i in range(4):
        options[f"t{i}"] = {2: (0.5, 100), 3: (0.1, 150)}
    budget = 1000 + 400 + 300
    greedy = _fill_widths(options, {n: min(r) for n, r in options.items()}, budget)
    assert greedy == {"head": 2, **{f"t{i}": 3 for i in range(4)}}
    g_err, g_bytes = _total(options, greedy)
    assert g_bytes == 1600 and abs(g_err - 5.4) < 1e-12  # 100 bytes unspent, the head at 2 bits
    widths = allocate_widths(options, budget)
    err, spent = _total(options, widths)
    assert widths["head"] == 2.5 and spent == 1700 and spent <= budget
    assert sum(widths[f"t{i}"] == 3 for i in range(4)) == 1  # two upgrades given up for the head
    np.testing.assert_allclose(err, 3.5 + 0.1 + 3 * 0.5)
    assert err < g_err


def test_allocation_is_the_knapsack_optimum_on_seeded_instances():
    rng = np.random.default_rng(19)
    for _ in range(40):
        options = {}
        for t in range(5):
            sizes = np.sort(rng.integers(10, 400, 3))
            errs = np.sort(rng.uniform(0.0, 10.0, 3))[::-1]
            options[f"t{t}"] = {b: (float(e), int(s)) for b, e, s in zip((2, 3, 4), errs, sizes)}
        low = sum(min(s for _, s in r.values()) for r in options.values())
        high = sum(max(s for _, s in r.values()) for r in options.values())
        budget = int(rng.integers(low, high + 1))
        widths = allocate_widths(options, budget)
        err, spent = _total(options, widths)
        assert spent <= budget
        feasible = [e for combo in itertools.product(*[list(r) for r in options.values()])
                    for e, s in [_total(options, dict(zip(options, combo)))] if s <= budget]
        np.testing.assert_allclose(err, min(feasible), rtol=1e-12)
        greedy = _fill_widths(options, {n: min(r) for n, r in options.items()}, budget)
        assert err <= _total(options, greedy)[0] + 1e-12


def test_allocation_on_a_budget_of_many_units_stays_within_it_and_leaves_less_than_one_step():
    # bytes above _ALLOCATION_UNITS units: options rounded up, then the rest spent by the fill
    rng = np.random.default_rng(7)
    options = {}
    for t in range(30):
        n = int(rng.integers(1_000, 200_000))
        options[f"t{t}"] = {b: (float(rng.uniform(0.5, 2.0) * 4.0 ** -b), n * b // 8 + 64) for b in (2, 3, 4)}
    budget = sum(r[3][1] for r in options.values()) - 12_345
    widths = allocate_widths(options, budget)
    err, spent = _total(options, widths)
    assert spent <= budget
    steps = [options[n][nb][1] - options[n][b][1] for n, b in widths.items() for nb in options[n] if nb > b]
    assert budget - spent < min(steps)  # no single upgrade would still fit
    greedy = _fill_widths(options, {n: 2 for n in options}, budget)
    assert err <= _total(options, greedy)[0]


def test_scalar_tensors_take_their_own_candidate_widths_within_the_budget(rng, tmp_path):
    import onnxruntime as ort
    from test_cluster_vq import _feeds, _model, _recipe, _run
    from test_dcmix_ninth import _cluster_stats, _sqnr

    from onnxcomp import io
    from onnxcomp.compress import compress

    model = _model(rng, conv_in=3)  # MatMul w: 64 x 96 (pairs); Conv cw: 16 x 3 x 3 x 3, 27 inputs: scalar
    calib, held = _feeds(rng, 4, conv_in=3), _feeds(rng, 3, conv_in=3)
    ref = _run(model.SerializeToString(), held)
    common = dict(bits_per_weight=3.2, bits_choices=(2, 3), sensitivity="layer")
    plain, rep0 = compress(model, _recipe(**common), calib)
    wide, rep1 = compress(model, _recipe(**common, scalar_choices=(3, 4, 5, 6)), calib)
    s0, s1 = _cluster_stats(rep0), _cluster_stats(rep1)
    assert set(s1["tensors"]["cw"]["candidates"]) == {3, 4, 5, 6}
    assert set(s1["tensors"]["w"]["candidates"]) == set(s0["tensors"]["w"]["candidates"]) == {2, 2.5, 3}
    assert s0["tensors"]["cw"]["bits"] <= 3 < s1["tensors"]["cw"]["bits"]
    for s in (s0, s1):
        assert s["allocation"]["estimated_bytes"] <= s["allocation"]["budget_bytes"]
    path = str(tmp_path / "scalar.onnx")
    io.save_model(wide, path)
    on, off = _run(path, held), _run(path, held, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    for a, b in zip(on, off):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    conv_plain, conv_wide = _sqnr(ref[1], _run(plain, held)[1]), _sqnr(ref[1], on[1])
    assert conv_wide > conv_plain + 5.0, (conv_plain, conv_wide)
    assert s1["tensors"]["w"]["bits"] < s0["tensors"]["w"]["bits"]  # paid for by the MatMul (3 -> 2.5 bits)


def test_scalar_choices_are_refused_without_mixed_vector_widths():
    import pytest

    from onnxcomp.cluster.passes import ClusterConfig
    from onnxcomp.errors import ConfigError

    with pytest.raises(ConfigError, match="scalar_choices"):
        ClusterConfig(format="sparse", bits_per_weight=3.0, scalar_choices=(4,)).validate()
    with pytest.raises(ConfigError, match="scalar_choices"):
        ClusterConfig(format="sparse", vector_dim=2, scalar_choices=(4,)).validate()
    with pytest.raises(ConfigError, match="scalar_choices"):
        ClusterConfig(format="sparse", vector_dim=2, bits_per_weight=3.0, scalar_choices=(9,)).validate()


def test_allocation_finds_the_optimum_that_rounding_bytes_up_misses():
    import numpy as np

    from onnxcomp.cluster.passes import _knapsack

    # 33 equal upgrades of 10,001 bytes that fill the budget exactly: counted in units of 1/32768
    # of it (992.97 units each), rounded up one of them no longer fits; rounded down all do, and
    # the bytes confirm it
    options = {f"t{i}": {2: (1.0, 1000), 3: (0.0, 11_001)} for i in range(33)}
    budget = 33 * 11_001
    smallest = {n: 2 for n in options}
    up = _knapsack(options, smallest, budget - 33 * 1000, np.ceil)
    assert sum(b == 3 for b in up.values()) == 32
    down = _knapsack(options, smallest, budget - 33 * 1000, np.floor)
    assert all(b == 3 for b in down.values()) and _total(options, down)[1] <= budget
    widths = allocate_widths(options, budget)
    assert all(b == 3 for b in widths.values())
    assert _total(options, widths) == (0.0, budget)

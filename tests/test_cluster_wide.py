"""Small tensors at a wide width inside the mixed-width budget (``ClusterConfig.wide_below``, issue 19)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from test_cluster_vq import _decoded, _feeds, _model, _recipe, _run
from test_dcmix_ninth import _cluster_stats as _stats
from test_dcmix_ninth import _sqnr

from onnxcomp import io
from onnxcomp.cluster.passes import ClusterConfig
from onnxcomp.compress import compress
from onnxcomp.errors import ConfigError


def test_small_tensor_takes_the_wide_width_within_the_budget(rng, tmp_path):
    model = _model(rng, conv_in=4)  # MatMul w: 64 x 96 = 6144 weights; Conv cw: 16 x 4 x 3 x 3 = 576
    calib, held = _feeds(rng, 4), _feeds(rng, 3)
    ref = _run(model.SerializeToString(), held)
    plain, rep0 = compress(model, _recipe(bits_per_weight=3.0, bits_choices=(2, 3), sensitivity="layer"), calib)
    wide, rep1 = compress(model, _recipe(bits_per_weight=3.0, bits_choices=(2, 3), sensitivity="layer",
                                         wide_below=1000), calib)
    s0, s1 = _stats(rep0), _stats(rep1)
    assert s0["tensors"]["cw"]["bits"] in (2, 2.5, 3) and s1["tensors"]["cw"]["bits"] == 8
    assert set(s1["tensors"]["cw"]["candidates"]) == {8}  # one option, counted in the budget
    assert s1["tensors"]["w"]["bits"] in (2, 2.5, 3)  # the large tensor keeps the usual widths
    alloc = s1["allocation"]
    assert alloc["estimated_bytes"] <= alloc["budget_bytes"] and not alloc["over_budget"]
    assert alloc["elements"] == 6144 + 576  # the wide tensor's elements are in the budget's count
    path = str(tmp_path / "wide.onnx")
    io.save_model(wide, path)
    on, off = _run(path, held), _run(path, held, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    for a, b in zip(on, off):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    cw = _decoded(path, ["cw"], held[0])["cw"]
    assert 64 < np.unique(cw).size <= 256  # a scalar codebook of 2^8 entries
    conv_plain, conv_wide = _sqnr(ref[1], _run(plain, held)[1]), _sqnr(ref[1], on[1])
    assert conv_wide > 35.0 and conv_wide > conv_plain + 15.0, (conv_plain, conv_wide)
    # the budget paid for it: the MatMul has fewer bytes left than without the wide tensor
    assert s1["tensors"]["w"]["bits"] <= s0["tensors"]["w"]["bits"]


def test_wide_below_needs_bits_per_weight():
    with pytest.raises(ConfigError, match="wide_below"):
        ClusterConfig(format="sparse", wide_below=1000)
    with pytest.raises(ConfigError, match="wide_bits"):
        ClusterConfig(format="sparse", bits_per_weight=3.0, wide_below=1000, wide_bits=9)


def test_cluster_command_takes_wide_below(rng, tmp_path, capsys):
    import json

    import onnx

    from onnxcomp.cli import main

    path, out = tmp_path / "m.onnx", tmp_path / "c.onnx"
    onnx.save(_model(rng, conv_in=4), path)
    common = ["cluster", str(path), "-o", str(out), "--bits-per-weight", "3", "--bits-choices", "2,3",
              "--format", "sparse", "--json"]
    assert main(common + ["--wide-below", "1000"]) == 0
    tensors = json.loads(capsys.readouterr().out)["tensors"]
    assert tensors["cw"]["bits"] == 8 and tensors["w"]["bits"] in (2, 2.5, 3)
    out.unlink()
    assert main(["cluster", str(path), "-o", str(out), "--bits", "3", "--wide-below", "1000"]) == 1
    assert "wide_below" in capsys.readouterr().err and not out.exists()

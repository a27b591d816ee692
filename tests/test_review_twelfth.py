"""Review, twelfth round: a demanding new user on `compress` recipes and `--set`, the Python API's
arguments (labels, latency feeds, progress), and data folders (each defect reduced to a seeded
model built in code, checked before and after the fix)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import file_digest
from test_review_eleventh import _cli, _mlp


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

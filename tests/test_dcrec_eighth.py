"""The accuracy study's size-route builds: ``python -m benchmarks.gptq_study MODEL OVERRIDES --recipe R``.

``benchmarks.gptq_study._compress`` builds with :func:`onnxcomp.compress.compress`, a recipe and
``{"stage.key": value}`` overrides (the Deep Compression measurements on PP-OCR rec, issue 19). A
small seeded MLP built in code, scored with onnxruntime on data the calibration did not see.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_gptq import _correlated, _mlp, _sqnr_on

from benchmarks.gptq_study import _compress
from onnxcomp.errors import ConfigError

RECIPE = {
    "name": "test-size-route",
    "cleanup": {},
    "cluster": {"bits": 4, "format": "sparse", "min_elements": 128, "codebook_int8": True,
                "float16_biases": True, "compensate": True, "max_samples": 64, "compact_graph": True},
}


def test_recipe_build_applies_the_overrides_and_keeps_the_outputs(rng):
    model = _mlp(rng, k=96, h=128, m=48)
    calib, held = _correlated(rng, 8, 32, 96), _correlated(rng, 4, 32, 96)
    four, rep4 = _compress(model, RECIPE, {}, calib)
    three, rep3 = _compress(model, RECIPE, {"cluster.bits": 3}, calib)
    stats = {r["stage"]: r["stats"] for r in rep3["stages"]}
    assert stats["cluster"]["clusters"] == 8
    assert stats["cluster"]["totals"]["storage"]["label_bits"] == 3
    assert {r["stage"]: r["stats"] for r in rep4["stages"]}["cluster"]["clusters"] == 16
    s4, s3 = _sqnr_on(model, four, held), _sqnr_on(model, three, held)
    assert s4 > 18.0, s4  # 4-bit per-tensor codebooks with compensation
    assert s3 > 12.0, s3
    assert s4 > s3 + 3.0, (s4, s3)  # one bit fewer costs ~6 dB; the override took effect


def test_recipe_build_rejects_a_bad_override(rng):
    model = _mlp(rng, k=96, h=128, m=48)
    with pytest.raises(ConfigError):
        _compress(model, RECIPE, {"cluster": 3}, _correlated(rng, 2, 8, 96))

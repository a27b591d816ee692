"""One config class per quantization mode; QuantizeConfig stays the public entry and builds it."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx.helper as oh
import pytest
from conftest import MODELS, make_proto

from onnxcomp.cli import main
from onnxcomp.errors import ConfigError
from onnxcomp.io import load_model
from onnxcomp.quant.api import MODES, quantize
from onnxcomp.quant.config import (
    MODE_CONFIGS,
    DynamicConfig,
    QuantizeConfig,
    StaticConfig,
    WeightOnlyConfig,
)
from onnxcomp.recipe import load_recipe
from onnxcomp.runtime import create_session, session_options


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_each_mode_has_its_config_and_handler():
    assert set(MODE_CONFIGS) == {"static", "dynamic", "weight-only"}
    assert set(MODES) == set(MODE_CONFIGS.values())
    static, dynamic, weight_only = _fields(StaticConfig), _fields(DynamicConfig), _fields(WeightOnlyConfig)
    assert {"calibration", "equalize", "bias_correction", "fidelity_target"} <= static - dynamic - weight_only
    assert {"bits", "weight_only_format"} <= weight_only - static - dynamic
    assert "dynamic_op_types" in dynamic - static - weight_only
    assert "per_channel" in static & dynamic and "per_channel" not in weight_only
    # QuantizeConfig is exactly the union plus the mode
    assert _fields(QuantizeConfig) == static | dynamic | weight_only | {"mode"}


@pytest.mark.parametrize(("mode", "field", "value", "applies"), [
    ("static", "bits", 8, "weight-only mode"),
    ("dynamic", "bias_correction", True, "static mode"),
    ("dynamic", "calibration", "entropy", "static mode"),
    ("weight-only", "per_channel", False, "static and dynamic mode"),
    ("weight-only", "smoothquant", True, "static and dynamic mode"),
    ("static", "dynamic_op_types", ("Conv",), "dynamic mode"),
])
def test_a_field_of_another_mode_is_refused(mode, field, value, applies):
    with pytest.raises(ConfigError, match=f"quantize: {field} applies to {applies}, not {mode} mode"):
        QuantizeConfig(mode=mode, **{field: value})


def test_fields_of_other_modes_at_their_defaults_pass():
    """A recipe that spells out static defaults still takes ``--set quantize.mode=dynamic``."""
    recipe = load_recipe("int8").with_overrides({"quantize.mode": "dynamic"})
    config = recipe.stages["quantize"]
    assert config.mode == "dynamic" and isinstance(config.for_mode, DynamicConfig)
    assert config.for_mode.per_channel is True
    with pytest.raises(ConfigError, match="calibration applies to static mode, not dynamic mode"):
        load_recipe("int8-accurate").with_overrides({"quantize.mode": "dynamic"})


def test_mode_rules_live_in_the_mode_config():
    with pytest.raises(ConfigError, match="bits must be 4 or 8"):
        WeightOnlyConfig(bits=3)
    with pytest.raises(ConfigError, match="is for bits = 4"):
        QuantizeConfig(mode="weight-only", bits=8, weight_only_format="ort")
    with pytest.raises(ConfigError, match="calibration must be one of"):
        StaticConfig(calibration="median")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="block_size must be a power of two"):
        DynamicConfig(block_size=48)
    with pytest.raises(ConfigError, match="mode must be one of"):
        QuantizeConfig(mode="int3")  # type: ignore[arg-type]
    config = QuantizeConfig(mode="weight-only", bits=8, block_size=64)
    assert config.for_mode == WeightOnlyConfig(bits=8, block_size=64)
    assert QuantizeConfig.of(config.for_mode) == config


def _mlp(rng):
    w1 = rng.standard_normal((64, 32)).astype(np.float32) * 0.1
    w2 = rng.standard_normal((32, 16)).astype(np.float32) * 0.1
    return make_proto(
        [oh.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), oh.make_node("Relu", ["h"], ["r"], name="relu"),
         oh.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")],
        [("x", ["B", 64])], [("y", ["B", 16])], [("w1", w1), ("w2", w2)],
    )


@pytest.mark.parametrize("mode_config", [WeightOnlyConfig(bits=8, block_size=16), DynamicConfig(per_channel=False)])
def test_quantize_takes_a_mode_config(rng, mode_config):
    """A per-mode config gives the same model as the QuantizeConfig spelling it out, and that model
    stays close to the float one on onnxruntime (graph optimizations off and on)."""
    proto = _mlp(rng)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    direct, report = quantize(proto, None, mode_config)
    spelled, _ = quantize(proto, None, QuantizeConfig(mode=mode_config.mode, **dataclasses.asdict(mode_config)))
    assert report["nodes_quantized"] == 2
    ref = create_session(load_model(proto), sess_options=session_options("disable")).run(None, {"x": x})[0]
    for level in ("disable", "all"):
        a = create_session(direct, sess_options=session_options(level)).run(None, {"x": x})[0]
        b = create_session(spelled, sess_options=session_options(level)).run(None, {"x": x})[0]
        np.testing.assert_array_equal(a, b)
        sqnr = 10 * np.log10(np.sum(ref**2) / np.sum((ref - a) ** 2))
        assert sqnr > 25, (level, sqnr)


def test_cli_refuses_a_flag_of_another_mode(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    code = main(["quantize", str(MODELS / "digits_mlp.onnx"), "-o", str(out), "--mode", "weight-only",
                 "--per-tensor", "--no-check"])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert err.startswith("onnxcomp: error: quantize: per_channel applies to static and dynamic mode, not weight-only")

r"""Input specialisation: fix some graph inputs to constants (or static shapes) and fold what follows.

A model exported for several configurations often branches on an input the deployment never
varies: silero-vad's sample rate selects one of two ``If`` branches on every call, and the Convs
of the branch not taken are dead weight that no calibration can reach. Fixing such an input turns
it into an initializer; constant folding (:class:`~onnxcomp.passes.cleanup.CleanupPass`, i.e.
onnxscript's folder) then evaluates the condition, inlines the branch taken into the enclosing
graph and drops the other, like onnxsim's input overwrite. Fixing a shape gives a graph input
static dimensions, so that ``Shape``/``Reshape`` arithmetic on it folds too.

The rewrite is exact *for the fixed values*: for any feed whose other inputs are unchanged, the
specialised model computes what the original computes with the fixed inputs set to those values.
It refuses a name that is not a graph input, a value whose dtype cannot represent it exactly
(``1.5`` for an int64 input), and a value or shape that contradicts a static dimension the input
declares.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from onnxcomp.data import SHAPE_FIXED_BY
from onnxcomp.errors import ConfigError
from onnxcomp.passes.base import CompressionPass, PassConfig
from onnxcomp.passes.cleanup import CleanupPass, op_histogram

__all__ = ["SpecializeConfig", "SpecializePass", "control_flow_count"]

_CONTROL_FLOW = ("If", "Loop", "Scan")


def control_flow_count(model: ir.Model) -> int:
    """Control-flow nodes (If, Loop, Scan) anywhere in ``model``, subgraphs included."""
    hist = op_histogram(model)
    return sum(hist.get(op, 0) for op in _CONTROL_FLOW)


@dataclasses.dataclass(frozen=True)
class SpecializeConfig(PassConfig):
    """Which inputs to fix.

    Attributes:
        values: ``{input name: value}``; a value is anything ``numpy.asarray`` takes (a scalar
            fills a declared shape whose size is 1).
        shapes: ``{input name: static shape}`` for inputs that stay inputs.
        cleanup: fold what the fixed inputs make constant (conditions, shapes); without it the
            inputs only become initializers.
    """

    values: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    cleanup: bool = True

    def validate(self) -> None:
        both = sorted(set(self.values) & set(self.shapes))
        if both:
            raise ConfigError(f"input(s) {', '.join(map(repr, both))} given both a value and a shape")
        for name, shape in self.shapes.items():
            if any(int(d) < 0 for d in shape):
                raise ConfigError(f"shape of input {name!r} has a negative dimension: {tuple(shape)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "values": {k: np.asarray(v).tolist() for k, v in self.values.items()},
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "cleanup": self.cleanup,
        }


def _declared(value: ir.Value) -> list[int | None]:
    return [] if value.shape is None else [d if isinstance(d, int) else None for d in value.shape]


def _shown(declared: list[int | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in declared) or "a scalar"


def _typed(name: str, value: ir.Value, given: Any) -> np.ndarray:
    """``given`` as the input's dtype and declared shape; ConfigError says what does not fit."""
    if value.type is None or not isinstance(value.type, ir.TensorType):
        raise ConfigError(f"input {name!r} is not a tensor of known element type; it cannot be fixed")
    dtype = value.dtype.numpy()
    raw = np.asarray(given)
    try:
        arr = raw.astype(dtype)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"input {name!r} ({value.dtype.name}): value {given!r} does not convert ({exc})") from None
    # a float with a fraction, an integer out of the type's range (300 as UINT8 wrapped to 44) or
    # other than 0 and 1 as BOOL (2 became true) does not round-trip
    if raw.dtype.kind in "fciu" and dtype.kind in "iub" and not np.array_equal(arr.astype(raw.dtype), raw):
        raise ConfigError(f"input {name!r} is {value.dtype.name}: {given!r} is not exactly representable")
    declared = _declared(value)
    if value.shape is not None:
        if arr.size == 1 and arr.ndim < len(declared) and all(d in (1, None) for d in declared):
            arr = arr.reshape([1] * len(declared))
        if arr.ndim != len(declared) or any(d is not None and d != s for d, s in zip(declared, arr.shape)):
            raise ConfigError(f"input {name!r} is declared {_shown(declared)}; the value has shape {list(arr.shape)}")
    return np.ascontiguousarray(arr)


class SpecializePass(CompressionPass[SpecializeConfig]):
    """Fixes graph inputs to constants or static shapes and folds the consequences (exact).

    ``stats``: ``fixed`` (name -> shape and dtype), ``shaped`` (name -> shape), ``control_flow``
    (If/Loop/Scan nodes before and after), ``nodes`` (before and after), ``cleanup`` (its stats).
    Refuses (ConfigError) names that are not graph inputs and values that do not fit them.
    """

    config_class: ClassVar = SpecializeConfig

    def apply(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:
        cfg = self.config
        inputs = {v.name: v for v in model.graph.inputs}
        unknown = sorted((set(cfg.values) | set(cfg.shapes)) - set(inputs))
        if unknown:
            raise ConfigError(f"{', '.join(map(repr, unknown))} not an input of the model; "
                              f"model inputs: {', '.join(map(repr, inputs))}")
        before = {"control_flow": control_flow_count(model), "nodes": sum(1 for _ in model.graph.all_nodes())}
        fixed: dict[str, dict[str, Any]] = {}
        for name, given in cfg.values.items():
            value = inputs[name]
            arr = _typed(name, value, given)
            model.graph.inputs.remove(value)
            value.shape = ir.Shape(arr.shape)
            value.const_value = ir.Tensor(arr, name=name)
            model.graph.register_initializer(value)
            fixed[name] = {"shape": list(arr.shape), "dtype": value.dtype.name,
                           "value": arr.tolist() if arr.size <= 16 else f"{arr.size} values"}
        shaped: dict[str, list[int]] = {}
        for name, shape in cfg.shapes.items():
            value = inputs[name]
            declared = _declared(value)
            shape = [int(d) for d in shape]
            if value.shape is not None and (len(declared) != len(shape) or any(
                    d is not None and d != s for d, s in zip(declared, shape))):
                raise ConfigError(f"input {name!r} is declared {_shown(declared)}; "
                                  f"cannot make it {'x'.join(map(str, shape))}")
            value.shape = ir.Shape(shape)
            value.meta[SHAPE_FIXED_BY] = (f"the specialised shape {name}={'x'.join(map(str, shape))}",
                                          tuple(i for i in range(len(shape)) if not declared or declared[i] is None))
            shaped[name] = shape
        stats: dict[str, Any] = {"fixed": fixed, "shaped": shaped}
        if cfg.cleanup and (fixed or shaped):
            stats["cleanup"] = CleanupPass()(model).stats
        stats["control_flow"] = {"before": before["control_flow"], "after": control_flow_count(model)}
        stats["nodes"] = {"before": before["nodes"], "after": sum(1 for _ in model.graph.all_nodes())}
        return bool(fixed or shaped), stats

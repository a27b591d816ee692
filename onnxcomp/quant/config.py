"""Configuration of the quantization passes (frozen, validated on construction)."""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from onnxcomp.errors import ConfigError
from onnxcomp.passes.base import PassConfig

__all__ = ["QuantizeConfig", "NodeSelector"]

_METHODS = ("minmax", "percentile", "entropy", "mse", "auto")


@dataclasses.dataclass(frozen=True)
class QuantizeConfig(PassConfig):
    """How to quantize.

    Attributes:
        mode: ``static`` (Q/DQ on activations and weights from calibration ranges),
            ``weight-only`` (blockwise int8/int4 weights of MatMul/Gemm, activations in float) or
            ``dynamic`` (int8 weights, activations quantized at run time by onnxruntime).
        cleanup: run the cleanup pass first (BatchNorm fusion, constant folding): a Conv whose
            output feeds a BatchNormalization cannot become an int8 kernel.
        activation_type: ``uint8`` (default: the fast path of onnxruntime's x86 int8 kernels) or
            ``int8``.
        activation_symmetric: symmetric activation ranges (zero point at 0 / 128).
        weight_type: ``int8`` (``uint8`` is refused: onnxruntime's fused kernels want int8 weights).
        per_channel: weights get one scale per output channel.
        calibration: range method, one of minmax, percentile, entropy, mse, or auto (per tensor,
            the candidate of those whose consumers' outputs err least; onnxcomp.quant.ranges).
        percentile: for ``percentile`` (and one of ``auto``'s candidates).
        bins: histogram bins for percentile/entropy/mse.
        op_types: quantize only these op types (empty: every op the placement table knows).
        exclude: node names, op types, or ``re:PATTERN`` regular expressions on node names.
        quantize_outputs: also quantize tensors that are graph outputs (default: keep them float).
        fold_activations: remove Relu/Clip(0,..) after a quantized producer, folding them into the
            output range (exact for asymmetric ranges, whose zero point saturates at 0).
        max_samples: calibrate on at most this many feeds.
        max_range_ratio: a Concat whose inputs' ranges differ by more than this factor stays float
            (a detector's boxes and scores in one tensor).
        bits / block_size: weight-only settings (``bits`` 8 or 4; ``block_size`` a power of two >= 16).
        weight_only_format: ``qdq`` (DequantizeLinear with block quantization, opset 21) or ``ort``
            (onnxruntime's ``com.microsoft.MatMulNBits``, 4 bits only).
        dynamic_op_types: op types quantized in dynamic mode (Conv is not among the defaults: its
            ConvInteger form is several times slower on onnxruntime's CPU provider).
        equalize: cross-layer equalization before quantizing (Conv/Gemm/MatMul chains; exact in
            float; helps per-tensor weights most), see onnxcomp.quant.equalize.
        smoothquant: migrate activation outliers into the weights of MatMul/Gemm (exact in float),
            ``smoothquant_alpha`` fixed, or searched per group when None; see onnxcomp.quant.smoothquant.
        bias_correction: after quantizing, subtract each layer's mean output error on the
            calibration data from its bias; see onnxcomp.quant.bias_correction.
        fidelity_target: static mode: move the most helpful nodes back to float until the output
            SQNR on the evaluation data reaches this many dB (see onnxcomp.quant.sensitivity).
        max_drop: the same with an accuracy budget in points (needs labelled evaluation data).
        latency_aware: keep float the op types whose int8 form is measured slower on this CPU.
    """

    mode: Literal["static", "weight-only", "dynamic"] = "static"
    cleanup: bool = True
    activation_type: Literal["uint8", "int8"] = "uint8"
    activation_symmetric: bool = False
    weight_type: Literal["int8"] = "int8"
    per_channel: bool = True
    calibration: Literal["minmax", "percentile", "entropy", "mse", "auto"] = "minmax"
    percentile: float = 99.999
    bins: int = 2048
    op_types: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    quantize_outputs: bool = False
    fold_activations: bool = True
    max_samples: int | None = None
    max_range_ratio: float = 16.0
    bits: int = 4
    block_size: int = 32
    weight_only_format: Literal["qdq", "ort"] = "qdq"
    dynamic_op_types: tuple[str, ...] = ("MatMul", "Gemm")
    equalize: bool = False
    smoothquant: bool = False
    smoothquant_alpha: float | None = None
    bias_correction: bool = False
    fidelity_target: float | None = None
    max_drop: float | None = None
    latency_aware: bool = False

    def validate(self) -> None:
        if self.calibration not in _METHODS:
            raise ConfigError(f"quantize: calibration must be one of {', '.join(_METHODS)}, got {self.calibration!r}")
        if not 0.0 < self.percentile <= 100.0:
            raise ConfigError(f"quantize: percentile must be in (0, 100], got {self.percentile}")
        if self.bins < 16:
            raise ConfigError(f"quantize: bins must be >= 16, got {self.bins}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"quantize: max_samples must be >= 1, got {self.max_samples}")
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ConfigError(f"quantize: smoothquant_alpha must be in [0, 1], got {self.smoothquant_alpha}")
        if (self.equalize or self.smoothquant or self.bias_correction) and self.mode != "static":
            raise ConfigError("quantize: equalize, smoothquant and bias_correction apply to static mode")
        if self.max_drop is not None and self.max_drop < 0:
            raise ConfigError(f"quantize: max_drop must be >= 0 points, got {self.max_drop}")
        if (self.fidelity_target is not None or self.max_drop is not None or self.latency_aware) and self.mode != "static":
            raise ConfigError("quantize: fidelity_target, max_drop and latency_aware apply to static mode")
        if self.max_range_ratio <= 1.0:
            raise ConfigError(f"quantize: max_range_ratio must be > 1, got {self.max_range_ratio}")
        if self.bits not in (4, 8):
            raise ConfigError(f"quantize: bits must be 4 or 8, got {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"quantize: block_size must be a power of two >= 16, got {self.block_size}")
        if self.weight_only_format == "ort" and self.bits != 4 and self.mode == "weight-only":
            raise ConfigError("quantize: weight_only_format 'ort' (MatMulNBits) is for bits = 4")
        for item in self.exclude:
            if item.startswith("re:"):
                try:
                    re.compile(item[3:])
                except re.error as exc:
                    raise ConfigError(f"quantize: exclude pattern {item!r} is not a valid regex: {exc}") from None

    @property
    def uses_fallback(self) -> bool:
        return self.fidelity_target is not None or self.max_drop is not None or self.latency_aware

    @property
    def selector(self) -> NodeSelector:
        return NodeSelector(self.op_types, self.exclude)


class NodeSelector:
    """Which nodes a pass may touch: ``op_types`` (empty = all) minus ``exclude``.

    An exclude entry matches a node by exact name, by op type, or by regex on the name when it is
    written ``re:PATTERN``.
    """

    def __init__(self, op_types: tuple[str, ...], exclude: tuple[str, ...]) -> None:
        self.op_types = frozenset(op_types)
        self.names = frozenset(e for e in exclude if not e.startswith("re:"))
        self.patterns = [re.compile(e[3:]) for e in exclude if e.startswith("re:")]

    def excluded(self, name: str, op_type: str) -> bool:
        if name in self.names or op_type in self.names:
            return True
        return any(p.search(name or "") for p in self.patterns)

    def allows(self, name: str, op_type: str) -> bool:
        if self.op_types and op_type not in self.op_types:
            return False
        return not self.excluded(name, op_type)

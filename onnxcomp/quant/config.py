"""Configuration of the quantization passes (frozen, validated on construction).

Each mode has its own config class holding the fields that mode reads: :class:`StaticConfig`,
:class:`DynamicConfig` and :class:`WeightOnlyConfig` (``onnxcomp.quant.api.MODES`` maps each to
its handler). :class:`QuantizeConfig` is the public entry the CLI, the recipes' ``[quantize]``
sections and the API take: every field of every mode plus ``mode``; it builds and validates the
mode's config (:attr:`QuantizeConfig.for_mode`) and refuses a field of another mode set away from
its default, naming the modes it applies to.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Literal

from onnxcomp.bounds import Range
from onnxcomp.errors import ConfigError
from onnxcomp.passes.base import PassConfig
from onnxcomp.selection import NodeSelector

__all__ = ["QuantizeConfig", "StaticConfig", "DynamicConfig", "WeightOnlyConfig", "ModeConfig", "MODE_CONFIGS",
           "NodeSelector", "STATIC_MIN_OPSET"]

_METHODS = ("minmax", "percentile", "entropy", "mse", "auto", "per-tensor")
#: the range methods that read ``percentile`` / ``bins`` (onnxcomp.quant.static.observer_kwargs)
_PERCENTILE_METHODS = ("percentile", "auto", "per-tensor")
_HISTOGRAM_METHODS = ("percentile", "entropy", "mse", "auto", "per-tensor")

#: Static Q/DQ needs per-axis QuantizeLinear/DequantizeLinear (opset 13).
STATIC_MIN_OPSET = 13



_RANGES: dict[str, Range] = {
    "percentile": Range(float, 0.0, 100.0, min_open=True),
    "bins": Range(int, 16, 1 << 20),
    "max_samples": Range(int, 1),
    "max_range_ratio": Range(float, 1.0, min_open=True),
    "block_size": Range(int, 16, 1 << 16),
    "smoothquant_alpha": Range(float, 0.0, 1.0),
    "fidelity_target": Range(float, 0.0, 200.0),
    "max_drop": Range(float, 0.0, 100.0),
    "gptq_damp": Range(float, 0.0, 1.0, min_open=True),
    "gptq_stages": Range(int, 1, 4096),
    "conv_block_size": Range(int, 1, 1 << 16),
    "split_outliers_channels": Range(int, 1, 64),
    "split_outliers_target_db": Range(float, 0.0, 200.0),
    "split_outliers_below_db": Range(float, 0.0, 200.0),
}


# The field groups below are mixins (no validation of their own); the classes that combine them
# are PassConfigs. Attributes are documented on QuantizeConfig.


@dataclasses.dataclass(frozen=True)
class _SharedFields:
    """What every mode reads: node selection, cleanup, rounding, embedding tables, the transformer path."""

    cleanup: bool = True
    op_types: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_samples: int | None = None
    block_size: int = 32  # weight-only blocks and 4-bit embedding tables in every mode
    rounding: Literal["auto", "nearest", "gptq"] = "auto"
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    gptq_stages: int = 1
    embedding_bits: int | None = None
    transformer: Literal["auto", "on", "off"] = "auto"
    ffn_output: Literal["auto", "float", "int8"] = "auto"

    @property
    def selector(self) -> NodeSelector:
        return NodeSelector(self.op_types, self.exclude)


@dataclasses.dataclass(frozen=True)
class _Int8WeightFields:
    """Per-channel int8 weights (static and dynamic mode)."""

    weight_type: Literal["int8"] = "int8"
    per_channel: bool = True
    weight_range: Literal["auto", "full", "reduced", "exact"] = "auto"

    @property
    def reduce_weights(self) -> bool:
        """Whether int8 weights use 7 bits (``weight_range``, resolved on this CPU); under ``exact``
        the kernels that only take signed weights (attention, LSTM) resolve as ``auto`` does."""
        from onnxcomp.quant.kernels import reduce_weight_range

        return reduce_weight_range("auto" if self.weight_range == "exact" else self.weight_range)

    @property
    def unsigned_weights(self) -> bool:
        """Whether Q/DQ weights are stored as uint8 around 128 (``weight_range="exact"``)."""
        return self.weight_range == "exact"


@dataclasses.dataclass(frozen=True)
class _SmoothQuantFields:
    smoothquant: bool | None = None
    smoothquant_alpha: float | None = None
    split_outliers: bool = False
    split_outliers_channels: int = 8
    split_outliers_target_db: float = 30.0
    split_outliers_below_db: float | None = None


@dataclasses.dataclass(frozen=True)
class _StaticFields:
    activation_type: Literal["uint8", "int8"] = "uint8"
    activation_symmetric: bool = False
    activation_range: Literal["full", "reduced"] = "full"
    calibration: Literal["minmax", "percentile", "entropy", "mse", "auto", "per-tensor"] = "minmax"
    percentile: float = 99.999
    bins: int = 2048
    quantize_outputs: bool = False
    fold_activations: bool = True
    max_range_ratio: float = 16.0
    excitation_float: bool = False
    equalize: bool = False
    bias_correction: bool = False
    fidelity_target: float | None = None
    max_drop: float | None = None
    latency_aware: bool = False

    @property
    def reduce_activations(self) -> bool:
        """Whether activation scales are fitted to 7 bits (``activation_range="reduced"``)."""
        return self.activation_range == "reduced"

    @property
    def uses_fallback(self) -> bool:
        return self.fidelity_target is not None or self.max_drop is not None or self.latency_aware


@dataclasses.dataclass(frozen=True)
class _DynamicFields:
    dynamic_op_types: tuple[str, ...] = ("MatMul", "Gemm", "LSTM")


@dataclasses.dataclass(frozen=True)
class _WeightOnlyFields:
    bits: int = 4
    weight_only_format: Literal["qdq", "ort"] = "qdq"
    eight_bit: tuple[str, ...] = ()
    conv_block_size: int | None = None
    scale_search: Literal["none", "mse", "hessian"] = "none"
    scale_refit: bool = True
    gptq_bias: bool = False


def _validate_shared(config: _SharedFields) -> None:
    if config.rounding not in ("auto", "nearest", "gptq"):
        raise ConfigError(f"quantize: rounding must be auto, nearest or gptq, got {config.rounding!r}")
    if config.ffn_output not in ("auto", "float", "int8"):
        raise ConfigError(f"quantize: ffn_output must be auto, float or int8, got {config.ffn_output!r}")
    if config.embedding_bits not in (None, 0, 4, 8):
        raise ConfigError(f"quantize: embedding_bits must be 0 (float), 4 or 8, got {config.embedding_bits}")
    if config.block_size & (config.block_size - 1):
        raise ConfigError(f"quantize: block_size must be a power of two >= 16, got {config.block_size}")
    for item in (*config.exclude, *getattr(config, "eight_bit", ())):
        if item.startswith("re:"):
            try:
                re.compile(item[3:])
            except re.error as exc:
                raise ConfigError(f"quantize: pattern {item!r} is not a valid regex: {exc}") from None


def _validate_split(config: _SmoothQuantFields) -> None:
    """The outlier split's settings need the split on (onnxcomp.quant.outliers)."""
    changed = [f.name for f in dataclasses.fields(_SmoothQuantFields)
               if f.name.startswith("split_outliers_") and getattr(config, f.name) != f.default]
    if changed and not config.split_outliers:
        raise ConfigError(f"quantize: {', '.join(changed)} set without split_outliers")


@dataclasses.dataclass(frozen=True)
class ModeConfig(PassConfig):
    """Base of the per-mode configs: ``mode`` names the mode (a class constant)."""

    mode: ClassVar[str] = ""
    stage: ClassVar[str] = "quantize"
    ranges: ClassVar[dict[str, Range]] = _RANGES

    def validate(self) -> None:
        _validate_shared(self)


@dataclasses.dataclass(frozen=True)
class StaticConfig(ModeConfig, _StaticFields, _SmoothQuantFields, _Int8WeightFields, _SharedFields):
    """Static mode: Q/DQ on activations and weights from calibration ranges."""

    mode: ClassVar[str] = "static"

    def validate(self) -> None:
        super().validate()
        _validate_split(self)
        if self.calibration not in _METHODS:
            raise ConfigError(f"quantize: calibration must be one of {', '.join(_METHODS)}, got {self.calibration!r}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, methods in (("percentile", _PERCENTILE_METHODS), ("bins", _HISTOGRAM_METHODS)):
            if getattr(self, key) != defaults[key] and self.calibration not in methods:  # it would be ignored
                raise ConfigError(f"quantize: {key} applies to calibration {', '.join(map(repr, methods))}, not "
                                  f"{self.calibration!r} (set calibration, --method on the command line, or drop it)")
        if self.activation_range == "reduced" and self.activation_type != "uint8":
            raise ConfigError("quantize: activation_range 'reduced' is for uint8 activations (onnxruntime shifts int8 "
                              "activations into 0..255, where 7 bits do not keep its kernels exact)")


@dataclasses.dataclass(frozen=True)
class DynamicConfig(ModeConfig, _DynamicFields, _SmoothQuantFields, _Int8WeightFields, _SharedFields):
    """Dynamic mode: int8 weights, activations quantized at run time by onnxruntime."""

    mode: ClassVar[str] = "dynamic"

    def validate(self) -> None:
        super().validate()
        _validate_split(self)
        if self.weight_range == "exact":
            raise ConfigError("quantize: weight_range 'exact' (uint8 weights for onnxruntime's u8 x u8 kernels) is "
                              "for static mode; dynamic mode's kernels take int8 weights")


@dataclasses.dataclass(frozen=True)
class WeightOnlyConfig(ModeConfig, _WeightOnlyFields, _SharedFields):
    """Weight-only mode: blockwise int8/int4 weights of MatMul/Gemm, activations in float."""

    mode: ClassVar[str] = "weight-only"

    def validate(self) -> None:
        super().validate()
        if self.bits not in (4, 8):
            raise ConfigError(f"quantize: bits must be 4 or 8, got {self.bits}")
        if self.weight_only_format == "ort" and self.bits != 4:
            raise ConfigError("quantize: weight_only_format 'ort' (MatMulNBits) is for bits = 4")
        if self.scale_search not in ("none", "mse", "hessian"):
            raise ConfigError(f"quantize: scale_search must be none, mse or hessian, got {self.scale_search!r}")


#: Mode name -> its config class.
MODE_CONFIGS: dict[str, type[ModeConfig]] = {c.mode: c for c in (StaticConfig, DynamicConfig, WeightOnlyConfig)}


def _toml(value: object) -> str:
    """A default as a --set value (TOML): strings quoted, booleans lower case, lists bracketed."""
    import json

    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _modes_of(name: str) -> list[str]:
    return [mode for mode, cls in MODE_CONFIGS.items() if name in {f.name for f in dataclasses.fields(cls)}]


@dataclasses.dataclass(frozen=True)
class QuantizeConfig(PassConfig, _StaticFields, _DynamicFields, _WeightOnlyFields, _SmoothQuantFields, _Int8WeightFields,
                     _SharedFields):
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
        activation_range: ``full`` (default) fits activation scales to the type's 8 bits;
            ``reduced`` to 7 (uint8 0..127; refused for int8 activations, which onnxruntime
            shifts into 0..255, measured not exact). uint8 activations up to 127 times int8
            weights up to 127 keep every pair of products below 2^15, so 8-bit weights
            (``weight_range="full"``) are exact on CPUs whose int8 kernels saturate, as long as the
            activations stay inside their calibrated range (values beyond it still quantize up to
            255; Clip is then not folded into the producer's range). See onnxcomp.quant.kernels.
        weight_type: ``int8`` (uint8 storage: ``weight_range="exact"``).
        per_channel: weights get one scale per output channel.
        weight_range: int8 weights in ``full`` 8 bits ([-127, 127]) or ``reduced`` to 7 bits
            ([-63, 63]); ``auto`` (default) reduces them when this CPU's int8 kernels saturate
            (x86 without VNNI, see onnxcomp.quant.kernels), where full-range weights give wrong
            results. Reduced weights are exact on every CPU. ``exact`` (static mode): full 8-bit
            weights stored as uint8 with zero point 128, which onnxruntime runs with its u8 x u8
            kernels: exact on every CPU without giving up the bit, but slower than u8 x s8 where
            those saturate (AVX2). Kernels that only take int8 weights (QAttention, LSTM) resolve
            as ``auto``.
        calibration: range method, one of minmax, percentile, entropy, mse; auto (each of those
            four methods' ranges from one histogram pass, the model built with each and judged
            whole on fitting feeds by the check's figures, the best kept; onnxcomp.quant.select);
            or per-tensor (each tensor the candidate whose consumers' outputs err least,
            onnxcomp.quant.ranges, then judged whole against the four like auto).
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
        excitation_float: keep the Conv/Gemm/MatMul of squeeze-and-excitation paths (global
            pooling -> small layers -> a gate multiplying the pooled feature map) float
            (onnxcomp.analysis.excitation.excitation_nodes). Off by default: it helps PP-OCRv6
            tiny rec and PP-OCR cls, and breaks PP-OCRv4 rec, whose int8 gate convolution clamps
            the overshoots of its upstream error to the calibrated range (benchmarks/RESULTS.md,
            ninth session).
        bits / block_size: weight-only settings (``bits`` 8 or 4; ``block_size`` a power of two >= 16).
        weight_only_format: ``qdq`` (DequantizeLinear with block quantization, opset 21) or ``ort``
            (onnxruntime's ``com.microsoft.MatMulNBits``, 4 bits only).
        dynamic_op_types: op types quantized in dynamic mode (Conv is not among the defaults: its
            ConvInteger form is several times slower on onnxruntime's CPU provider; LSTM becomes
            onnxruntime's DynamicQuantizeLSTM, see onnxcomp.quant.recurrent).
        equalize: cross-layer equalization before quantizing (Conv/Gemm/MatMul chains; exact in
            float; helps per-tensor weights most), see onnxcomp.quant.equalize.
        smoothquant: migrate activation outliers into the weights of MatMul/Gemm (exact in float),
            ``smoothquant_alpha`` fixed, or searched per group when None; see onnxcomp.quant.smoothquant.
            In dynamic mode, for encoders on the transformer path only (needs calibration data;
            onnxcomp.quant.transformer.smooth_encoder, alpha 0.75 unless ``smoothquant_alpha``).
            None (default): on for encoders on the transformer path given calibration data, off elsewhere.
        bias_correction: after quantizing, subtract each layer's mean output error on the
            calibration data from its bias; see onnxcomp.quant.bias_correction.
        split_outliers: static mode, and dynamic mode given calibration data: a MatMul input
            whose 8-bit grid is too coarse because of a few outlier channels (an encoder's GELU
            output) gets those channels split off into a small float correction, so that the
            MatMul runs in int8 on a fine grid (onnxcomp.quant.outliers). Off by default: faster
            (all-MiniLM-L6-v2 1.20x -> 1.47x fp32 at batch 1) but measured less accurate
            (nearest-neighbour agreement -1.3 points on MiniLM, -4.5 on all-mpnet-base-v2).
        split_outliers_channels / split_outliers_target_db / split_outliers_below_db: with
            ``split_outliers``, the split's own knobs (onnxcomp.quant.outliers.OutlierSplitConfig's
            ``max_channels``, ``target_db``, ``below_db``): at most this many channels split off one
            tensor (8), the fewest reaching this SQNR on the remaining channels' 8-bit grid taken
            (30 dB; 200: the best count), and tensors whose whole-range grid keeps at least the
            coarse-grid floor (25 dB) split too when it keeps less than ``below_db`` (None: not).
        fidelity_target: static mode: move the most helpful nodes back to float until the output
            SQNR on the evaluation data reaches this many dB (see onnxcomp.quant.sensitivity).
        max_drop: the same with an accuracy budget in points (needs labelled evaluation data).
        latency_aware: keep float the op types whose int8 form is measured slower on this CPU, and
            the whole model when the float model is measurably faster than what is left in int8.
        rounding: how weights become integers: ``nearest`` (round-to-nearest, no data needed),
            ``gptq`` (error-compensating rounding on the layer-input Hessian from the calibration
            data, onnxcomp.quant.gptq) or ``auto`` (GPTQ for 4-bit weight-only with calibration
            data, nearest elsewhere).
        gptq_damp: GPTQ's relative dampening of the Hessian diagonal.
        gptq_act_order: GPTQ rounds the columns by decreasing input energy.
        gptq_stages: 1 (default): every layer's Hessian comes from the float model; N > 1: the
            weights are rounded in N groups in graph order and each group's Hessians come from
            the model whose earlier groups are already quantized (sequential GPTQ: a layer sees
            the inputs the quantized model really gives it; one pass over the data per group).
        eight_bit: weight-only mixed precision: the weights of these nodes get 8 bits instead of
            ``bits`` (node or weight names, op types, ``re:PATTERN``, or the keywords ``:first`` / ``:last``
            for the first / last quantized node in graph order and ``:depthwise`` for depthwise
            convolutions); the report gives their share of the weight bytes.
        conv_block_size: weight-only Conv weights: None (default) one scale per output channel;
            B: blocks of B consecutive values along the flattened input axis (``C/group x
            kernel``) of each output channel, as MatMul weights along K.
        scale_search: weight-only block scales: ``none`` (default) fitted to each block's range;
            ``mse`` the range scale shrunk by the factor (1.0 down to 0.5) with the smallest
            squared rounding error of the block (clipping its extremes when that pays);
            ``hessian`` the same error weighted per input feature by the layer Hessian's diagonal
            (the input energy, from the calibration data; ``mse`` where there is none). GPTQ then
            rounds on the chosen grid.
        scale_refit: True (default): after GPTQ (weight-only), each row's block scales are
            refitted by least squares to the integers chosen, minimizing the layer's output error
            on the Hessian (onnxcomp.quant.gptq.refit_scales; a row keeps its scales where that
            does not lower its error); the integers and the format stay as they are. Only where
            GPTQ rounds (weight-only with calibration data, ``rounding`` auto or gptq); False:
            GPTQ's integers on the range scales, as before the eighth session.
        gptq_bias: weight-only with GPTQ: round (and refit) on the input covariance instead of
            the raw Gram, and add the mean output error ``(W - W_hat) E[x]`` to the layer's bias
            (a Conv's bias, a Gemm's ``C``, or the constant ``[N]`` operand of the Add after a
            MatMul), so the bias absorbs what the 4-bit weights miss on average.
        embedding_bits: embedding tables (Gather on a constant float matrix) as onnxruntime's
            GatherBlockQuantized with 4- or 8-bit blocks (onnxcomp.quant.embedding); None:
            weight-only uses ``bits``, dynamic and static 8; 0: tables stay float.
        transformer: the transformer path (onnxcomp.quant.transformer): ``auto`` (default) runs
            onnxruntime's transformer optimizer first when the graph is an encoder and quantizes
            its fused Attention as QAttention; ``on`` insists; ``off`` leaves the graph as it is.
        ffn_output: on the transformer path (static and dynamic modes), the feed-forward output
            projections (MatMuls reading a GELU, whose input carries the encoder's largest
            activation outliers, growing with the sequence; never smoothed). ``auto`` (default):
            static mode treats them as any MatMul, int8 where their input's calibrated 8-bit grid
            keeps >= 25 dB (onnxcomp.quant.static.coarse_grid_nodes), after ``split_outliers``
            (when on) has split off their input's few outlier channels, float elsewhere; dynamic mode
            (no calibrated range to judge by) keeps them float. ``float``: always float; ``int8``:
            always int8, even where the grid rule would keep them float
            (onnxcomp.quant.transformer.ffn_output_matmuls).
    """

    mode: Literal["static", "weight-only", "dynamic"] = "static"

    stage: ClassVar[str] = "quantize"
    ranges: ClassVar[dict[str, Range]] = _RANGES

    def validate(self) -> None:
        if self.mode not in MODE_CONFIGS:
            raise ConfigError(f"quantize: mode must be one of {', '.join(MODE_CONFIGS)}, got {self.mode!r}")
        own = {f.name for f in dataclasses.fields(MODE_CONFIGS[self.mode])}
        for f in dataclasses.fields(self):
            if f.name == "mode" or f.name in own or getattr(self, f.name) == f.default:
                continue
            # a shipped recipe's setting cannot be dropped with --set: its default can be set (not None)
            back = "" if f.default is None else \
                f"; over a recipe that sets it, --set quantize.{f.name}={_toml(f.default)} puts back its default"
            raise ConfigError(f"quantize: {f.name} applies to {' and '.join(_modes_of(f.name))} mode, not "
                              f"{self.mode} mode (drop it or change the mode{back})")
        self.for_mode  # noqa: B018  (validates the mode's own rules)

    @property
    def for_mode(self) -> ModeConfig:
        """The config of ``mode`` (:class:`StaticConfig`, ...) with this config's values for its fields."""
        cls = MODE_CONFIGS[self.mode]
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def of(cls, config: ModeConfig) -> QuantizeConfig:
        """The QuantizeConfig of a per-mode config (the entry point's form of it)."""
        return cls(mode=config.mode, **dataclasses.asdict(config))

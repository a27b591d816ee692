"""The pass framework every onnxcomp transform is built on.

A transform is an :class:`onnx_ir.passes.InPlacePass` that takes one frozen, validated dataclass
config (:class:`PassConfig`) and returns a :class:`PassResult` that carries statistics: what it
changed and how much. Pipelines are plain :class:`onnx_ir.passes.PassManager` /
``Sequential`` objects; :func:`run_pipeline` runs passes one after the other and keeps each one's
statistics, which ``PassManager`` alone would drop.

Every pass's output is checked (``CompressionPass.output_checks``): subgraph outputs that became
outer-scope values get an Identity (:func:`onnxcomp.graph.fix_subgraph_outputs`), then the model
must pass ``onnx.checker`` and load in onnxruntime whenever its input did; otherwise the pass raises
:class:`InvalidModelError` naming the check and the complaint, so that no command writes a model
that cannot be loaded.

Passes declare the default-domain opset range they accept (``min_opset`` / ``max_opset``); a
check before the pass runs refuses a model outside it with an :class:`~onnxcomp.errors.OpsetError` that
says how to upgrade (``onnxcomp.io.upgrade_opset``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes

from onnxcomp.bounds import Range
from onnxcomp.errors import ConfigError, OnnxcompError, OpsetError
from onnxcomp.io import check_model, initializer_nbytes, onnx_opset
from onnxcomp.runtime import create_session, session_options

__all__ = [
    "PassConfig", "PassResult", "CompressionPass", "run_pipeline", "PipelineResult", "config_argument", "is_list_field",
    "list_item_hint",
    "MODEL_CHECKS", "InvalidModelError", "model_problems", "new_problems", "known_problems", "ensure_valid",
]

#: Validity checks, cheapest first: ``checker`` (onnx.checker, structure), ``full_check``
#: (onnx.checker with strict shape inference), ``onnxruntime`` (a session is created).
MODEL_CHECKS = ("checker", "full_check", "onnxruntime")


class InvalidModelError(OnnxcompError):
    """A pass turned a model that passed a validity check into one that fails it."""


def model_problems(model: ir.Model, checks: Sequence[str] = MODEL_CHECKS) -> dict[str, str]:
    """``{check: first complaint}`` for each check of :data:`MODEL_CHECKS` that ``model`` fails."""

    problems: dict[str, str] = {}
    for check in checks:
        if check == "full_check" and "checker" in problems:
            problems[check] = problems["checker"]
            continue
        try:
            if check == "onnxruntime":
                create_session(model, sess_options=session_options("disable"))
            elif check in ("checker", "full_check"):
                check_model(model, full_check=check == "full_check")
            else:
                raise ValueError(f"unknown model check {check!r}; known: {', '.join(MODEL_CHECKS)}")
        except OnnxcompError as exc:
            problems[check] = str(exc)
        except ValueError:
            raise
        except Exception as exc:  # serialization of a broken graph, onnx internals
            problems[check] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return problems


def new_problems(model: ir.Model, reference: ir.Model, checks: Sequence[str] = MODEL_CHECKS) -> dict[str, str]:
    """The checks ``model`` fails that ``reference`` (its input) passed; the reference is only
    checked when the model fails something."""
    problems = model_problems(model, checks)
    if problems:
        before = model_problems(reference, tuple(problems))
        problems = {check: why for check, why in problems.items() if check not in before}
    return problems


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Base for pass configs: frozen dataclasses validated on construction.

    Numeric fields declare their accepted values in ``ranges`` (field name -> :class:`Range`),
    checked on construction before :meth:`validate`; a float field must be finite whether or not it
    has a range. Subclasses override :meth:`validate` for the checks a range cannot express and
    raise :class:`ConfigError` naming the field. Configs can be built from plain mappings (a recipe
    section) with :meth:`from_dict`, which refuses unknown keys and wrong types with a message
    naming the key and the expected type.
    """

    #: Name in messages (the recipe stage), e.g. ``quantize``.
    stage: ClassVar[str] = ""
    #: Field name -> accepted numeric values (None stays allowed where the field's type allows it).
    ranges: ClassVar[Mapping[str, Range]] = {}

    def __post_init__(self) -> None:
        self.check_ranges()
        self.check_types()
        self.validate()

    def check_types(self) -> None:
        """Refuse a value of the wrong type, which would otherwise pass unnoticed (a string where
        a list of names belongs is read letter by letter; ``"no"`` where a bool belongs is true),
        and store a list as a tuple and an integer as a float where the field says so. A field of
        fixed choices (``Literal``) is left to :meth:`validate`, which names them."""
        stage = self.stage or type(self).__name__
        for f in dataclasses.fields(self):
            hint = _field_hints(type(self))[f.name]
            if typing.get_origin(hint) is typing.Literal:
                continue
            value = getattr(self, f.name)
            try:
                coerced = _coerce(value, f.name, hint, "")
            except ConfigError:
                raise ConfigError(
                    f"{stage}: {f.name} expects {_type_name(hint)}, got {type(value).__name__} {value!r}"
                ) from None
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)

    def check_ranges(self) -> None:
        """Refuse a value outside its declared range, and any NaN or infinite float."""
        stage = self.stage or type(self).__name__
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            for item in values:
                rng = self.ranges.get(f.name)
                if rng is None and isinstance(item, float):
                    rng = Range(float)
                problem = rng.problem(item) if rng is not None and item is not None else None
                if problem:
                    raise ConfigError(f"{stage}: {f.name} {problem}")

    def validate(self) -> None:
        """Check field values; raise ConfigError naming the field. Default: nothing to check."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, where: str = "") -> PassConfig:
        """Build a config from a mapping, refusing unknown keys and wrong types."""
        prefix = f"{where}: " if where else ""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ConfigError(
                f"{prefix}unknown key(s) {', '.join(map(repr, unknown))}; "
                f"valid keys: {', '.join(sorted(fields))}"
            )
        hints = _field_hints(cls)
        converted = {key: _coerce(value, key, hints[key], prefix) for key, value in values.items()}
        try:
            return cls(**converted)
        except TypeError as exc:
            raise ConfigError(f"{prefix}{exc}") from None
        except ConfigError as exc:  # name the recipe and stage rather than the stage alone
            text = str(exc)
            if prefix and cls.stage and text.startswith(f"{cls.stage}: "):
                text = text[len(cls.stage) + 2 :]
            raise ConfigError(f"{prefix}{text}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, name: str, hint: Any, prefix: str) -> Any:
    """Check a recipe value against a field's type hint; lists become tuples, ints become floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            with contextlib.suppress(ConfigError):
                return _coerce(value, name, option, prefix)
        raise ConfigError(f"{prefix}key {name!r} expects {_type_name(hint)}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
    elif origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        raise ConfigError(
            f"{prefix}key {name!r} must be one of {', '.join(map(repr, typing.get_args(hint)))}, got {value!r}"
        )
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            item = args[0] if args else Any
            return tuple(_coerce(v, name, item, prefix) for v in value)
    elif hint is Any:
        return value
    elif hint is float:  # numpy scalars too (numbers.Real / Integral); a bool is no number here
        if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            return value if type(value) is float else float(value)
    elif hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
            return value if type(value) is int else int(value)
    elif hint is bool:
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
    else:
        return value
    raise ConfigError(
        f"{prefix}key {name!r} expects {_type_name(hint)}, got {type(value).__name__} {value!r}"
    )


def config_argument(value: Any, *classes: type[PassConfig], what: str = "config") -> Any:
    """``value`` when it is one of the config ``classes`` (or None: the caller's default); else a
    ConfigError naming what was given: an API call with a mapping or a string where a config
    belongs would otherwise fail deep inside with an AttributeError."""
    if value is None or isinstance(value, classes):
        return value
    names = " or ".join(c.__name__ for c in classes)
    built = f"; build one with {classes[0].__name__}.from_dict(...)" if isinstance(value, Mapping) else ""
    raise ConfigError(f"{what} must be a {names}, got {type(value).__name__} {value!r:.80}{built}")


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _list_hint(cls: type, name: str) -> Any:
    """The ``tuple[...]`` hint of field ``name`` of ``cls`` (optionally or None), else None."""
    hint = _field_hints(cls).get(name)
    hints = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return next((h for h in hints if typing.get_origin(h) is tuple), None)


def is_list_field(cls: type, name: str) -> bool:
    """Whether the config class ``cls`` declares field ``name`` as a list (a tuple, optionally or None)."""
    return _list_hint(cls, name) is not None


def list_item_hint(cls: type, name: str) -> Any:
    """The item type of the list field ``name`` of ``cls`` (``str`` for ``tuple[str, ...]``);
    None when the field is no list (:func:`is_list_field`) or its items are untyped."""
    args = [a for a in typing.get_args(_list_hint(cls, name)) if a is not Ellipsis]
    return args[0] if args else None


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:  # a TOML array, a Python list or tuple
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


@dataclasses.dataclass
class PassResult(onnx_ir.passes.PassResult):
    """``onnx_ir`` pass result with statistics: what changed, counts, per-item details."""

    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


C = TypeVar("C", bound=PassConfig)


class CompressionPass(onnx_ir.passes.InPlacePass, Generic[C]):
    """Base of onnxcomp passes: one config in, an in-place rewrite, a result with statistics.

    Subclasses set ``config_class``, optionally ``min_opset`` / ``max_opset``, and implement
    :meth:`apply`, returning ``(modified, stats)``. The last result is kept in ``self.result``.

    A modified model is checked with ``output_checks`` (names from :data:`MODEL_CHECKS`; empty
    for a pass that checks its own output): a check the input passed and the output fails
    raises :class:`InvalidModelError`.
    """

    config_class: ClassVar[type[PassConfig]] = PassConfig
    min_opset: ClassVar[int] = 1
    max_opset: ClassVar[int | None] = None
    #: ``onnx.checker`` by default (no session: passes run many times inside the sensitivity study
    #: and compress); passes whose failures only onnxruntime sees add "onnxruntime".
    output_checks: ClassVar[tuple[str, ...]] = ("checker",)

    def __init__(self, config: C | None = None) -> None:
        super().__init__()
        if config is None:
            config = self.config_class()  # type: ignore[assignment]
        if not isinstance(config, self.config_class):
            raise ConfigError(
                f"{type(self).__name__} takes a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config: C = config  # type: ignore[assignment]
        self.result: PassResult | None = None

    @classmethod
    def required_opset(cls, config: PassConfig) -> int:
        """The lowest default-domain opset the pass accepts with ``config`` (default: ``min_opset``)."""
        return cls.min_opset

    def check_opset(self, model: ir.Model) -> None:
        """Refuse a model outside the pass's opset range (an OpsetError, not onnx_ir's wrapper)."""
        opset = onnx_opset(model)
        lowest = self.required_opset(self.config)
        if opset < lowest or (self.max_opset is not None and opset > self.max_opset):
            upper = f"..{self.max_opset}" if self.max_opset is not None else "+"
            raise OpsetError(
                f"{type(self).__name__} needs default-domain opset {lowest}{upper}, "
                f"the model has {opset}; upgrade it (onnxcomp.io.upgrade_opset) or allow the "
                "command to upgrade"
            )

    def call(self, model: ir.Model) -> PassResult:
        self.check_opset(model)
        output_checks = self.output_checks
        if output_checks and initializer_nbytes(model) > OUTPUT_CHECK_MAX_BYTES:
            output_checks = ()  # serializing for the checker would hold the weights once more
        tolerated = known_problems(model, output_checks)
        modified, stats = self.apply(model)
        checks = tuple(c for c in output_checks if c not in tolerated)
        if modified and not output_checks and self.output_checks:
            stats["output_check"] = (f"skipped: over {OUTPUT_CHECK_MAX_BYTES / 2**30:.0f} GiB of weights "
                                     "(the verify stage and the written file's check still run)")
        if modified and output_checks:
            ensure_valid(model, None, type(self).__name__, stats, checks)
        self.result = PassResult(model=model, modified=modified, stats=stats)
        return self.result


#: Models with more weight bytes than this skip the per-pass output check: serializing them for
#: onnx.checker or onnxruntime would hold their weights once more (2.15 GiB extra for 2.25 GiB).
OUTPUT_CHECK_MAX_BYTES = 1 << 30


def known_problems(model: ir.Model, checks: Sequence[str]) -> set[str]:
    """The checks an input already fails, for those a pass's output must not be blamed for.

    Only the onnxruntime check is run on the input (a custom-domain op onnxruntime does not know
    is the user's business, not the pass's); models reach the passes through a load that already
    ran ``onnx.checker``.
    """
    return set(model_problems(model, ("onnxruntime",))) if "onnxruntime" in checks else set()


def ensure_valid(
    model: ir.Model,
    before: ir.Model | None,
    who: str,
    stats: dict[str, Any],
    checks: Sequence[str] = ("checker", "onnxruntime"),
) -> None:
    """The output check of every step that rewrites a model (passes, ``prune``): subgraph outputs
    that became outer-scope values get an Identity (counted in ``stats``), then a check of
    ``checks`` that ``model`` fails and ``before`` (its input) passed raises InvalidModelError.
    Without ``before`` the input is taken to have passed (models are checked when loaded): the
    passes check their output without keeping a copy of their input."""
    from onnxcomp.graph import fix_subgraph_outputs

    fixed = fix_subgraph_outputs(model)
    if fixed:
        stats["subgraph_outputs_fixed"] = stats.get("subgraph_outputs_fixed", 0) + fixed
    problems = new_problems(model, before, checks) if before is not None else model_problems(model, checks)
    if problems:
        check, why = next(iter(problems.items()))
        raise InvalidModelError(
            f"{who} produced an invalid model ({check}): {why}; the model it was given passed this "
            "check, so nothing is written (exclude the node it names or leave this step out)"
        )

    def apply(self, model: ir.Model) -> tuple[bool, dict[str, Any]]:  # pragma: no cover
        raise NotImplementedError


@dataclasses.dataclass
class PipelineResult:
    """Result of :func:`run_pipeline`: the model, whether anything changed, each pass's stats."""

    model: ir.Model
    modified: bool
    stages: list[tuple[str, dict[str, Any]]]


def run_pipeline(model: ir.Model, passes: Sequence[onnx_ir.passes.PassBase]) -> PipelineResult:
    """Run passes in order, keeping each pass's statistics (PassManager would drop them)."""
    stages: list[tuple[str, dict[str, Any]]] = []
    modified = False
    for p in passes:
        result = p(model)
        model = result.model
        modified = modified or result.modified
        stats = result.stats if isinstance(result, PassResult) else {}
        stages.append((type(p).__name__, {"modified": result.modified, **stats}))
    return PipelineResult(model=model, modified=modified, stages=stages)

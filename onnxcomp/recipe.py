"""Recipes: which compression stages run, in a fixed order, with which settings (TOML).

A recipe is a TOML document with optional ``name`` and ``description`` and one table per stage::

    name = "int8"
    description = "static int8, min/max ranges"
    [cleanup]
    [quantize]
    calibration = "minmax"
    [verify]
    [measure]
    runs = 100

Stages always run in the order of :data:`STAGES` whatever the order in the file: cleanup, prune,
sparsity, cluster, quantize, verify, measure. Each table is validated by the stage's frozen config class
before any work starts; errors name the recipe, the stage, the key and the expected type.
Recipes shipped with onnxcomp are found by name (``int8``, ``int8-accurate``, ...); anything else
is read as a file path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from onnxcomp.cluster.api import ClusterStage
from onnxcomp.errors import ConfigError
from onnxcomp.measure.stages import MeasureConfig, MeasureStage, VerifyConfig, VerifyStage
from onnxcomp.passes.base import PassConfig, is_list_field, list_item_hint
from onnxcomp.passes.cleanup import CleanupStage
from onnxcomp.prune.api import PruneStage
from onnxcomp.quant.api import QuantizeStage
from onnxcomp.sparsity.passes import SparsityStage
from onnxcomp.stage import Stage

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["STAGES", "STAGE_CLASSES", "register_stage", "MeasureConfig", "VerifyConfig", "Recipe", "load_recipe",
           "shipped_recipes", "parse_override", "parse_overrides", "recipe_toml"]


#: The stage registry: name -> :class:`~onnxcomp.stage.Stage` class, in execution order.
STAGE_CLASSES: dict[str, type[Stage]] = {
    "cleanup": CleanupStage,
    "prune": PruneStage,
    "sparsity": SparsityStage,
    "cluster": ClusterStage,
    "quantize": QuantizeStage,
    "verify": VerifyStage,
    "measure": MeasureStage,
}

#: Stage name -> config class, in execution order (follows :data:`STAGE_CLASSES`).
STAGES: dict[str, type[PassConfig]] = {name: cls.config_class for name, cls in STAGE_CLASSES.items()}


def register_stage(stage: type[Stage], *, after: str | None = None) -> None:
    """Add (or replace) a stage under ``stage.name``, run after the stage ``after`` (default: last).

    A recipe may then have a ``[name]`` table, parsed by ``stage.config_class``.
    """
    if not stage.name:
        raise ValueError("a stage needs a name")
    order = [n for n in STAGE_CLASSES if n != stage.name]
    if after is not None and after not in order:
        raise ValueError(f"no stage {after!r} to run {stage.name!r} after; stages are {', '.join(order)}")
    position = order.index(after) + 1 if after is not None else len(order)
    order.insert(position, stage.name)
    classes = {**STAGE_CLASSES, stage.name: stage}
    STAGE_CLASSES.clear()
    STAGE_CLASSES.update((n, classes[n]) for n in order)
    STAGES.clear()
    STAGES.update((n, c.config_class) for n, c in STAGE_CLASSES.items())


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe: its name, description and the configs of the stages it runs."""

    name: str
    description: str
    stages: dict[str, PassConfig]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "recipe") -> Recipe:
        name = data.get("name", where)
        description = data.get("description", "")
        if not isinstance(name, str) or not isinstance(description, str):
            raise ConfigError(f"{where}: 'name' and 'description' must be strings")
        stages: dict[str, PassConfig] = {}
        for key, value in data.items():
            if key in ("name", "description"):
                continue
            if key not in STAGES:
                raise ConfigError(
                    f"{where}: unknown stage {key!r}; stages are {', '.join(STAGES)} "
                    "(plus top-level 'name' and 'description')"
                )
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: stage {key!r} must be a table ([{key}]), got {type(value).__name__}")
        for stage, config_class in STAGES.items():
            if stage in data:
                stages[stage] = config_class.from_dict(data[stage], where=f"{where}: stage {stage!r}")
        if not stages:
            raise ConfigError(f"{where}: no stage; a recipe needs at least one of {', '.join(STAGES)}")
        return cls(name=name, description=description, stages=stages)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                **{stage: cfg.to_dict() for stage, cfg in self.stages.items()}}

    def with_overrides(self, overrides: Mapping[str, Any]) -> Recipe:
        """A copy with ``{"stage.key": value}`` overrides applied (a new stage table if needed).

        A single string given for a list setting is that list's one entry
        (``--set quantize.exclude=fc1`` is ``exclude = ["fc1"]``)."""
        data: dict[str, Any] = {"name": self.name, "description": self.description}
        for stage, cfg in self.stages.items():
            data[stage] = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        for dotted, value in overrides.items():
            stage, _, key = dotted.partition(".")
            if not key:
                raise ConfigError(f"override {dotted!r}: expected STAGE.KEY=VALUE")
            if stage not in STAGES:  # 'name' / 'description' are top-level strings, not tables
                raise ConfigError(f"override {dotted!r}: unknown stage {stage!r}; stages are {', '.join(STAGES)}")
            if isinstance(value, str) and is_list_field(STAGES[stage], key):
                value = [value]
            data.setdefault(stage, {})[key] = value
        return Recipe.from_dict(data, where=f"recipe {self.name!r} with overrides")


def shipped_recipes() -> dict[str, str]:
    """Names of the recipes that come with onnxcomp -> their descriptions."""
    found = {}
    for entry in sorted(resources.files("onnxcomp.recipes").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text(encoding="utf-8"))
            found[entry.name[:-5]] = data.get("description", "")
    return found


def load_recipe(source: str | Path | Mapping[str, Any]) -> Recipe:
    """A recipe from a mapping, a TOML file path, or the name of a shipped recipe."""
    if isinstance(source, Mapping):
        return Recipe.from_dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"recipe must be a Recipe, a shipped recipe's name, a TOML path or a mapping, "
                          f"got {type(source).__name__} {source!r:.80}")
    path = Path(source)
    if path.is_file():
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is no TOML
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{where}: not a TOML recipe (not UTF-8 text: byte {exc.start} is invalid)") from None
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read the recipe: {exc.strerror or exc}") from None
    else:
        shipped = resources.files("onnxcomp.recipes") / f"{source}.toml"
        if not shipped.is_file() and path.is_dir():
            raise ConfigError(f"recipe {str(source)!r} is a folder; give a recipe's TOML file or a shipped recipe's "
                              f"name ({', '.join(shipped_recipes())})")
        if not shipped.is_file():
            raise ConfigError(
                f"recipe {str(source)!r}: no such file and no shipped recipe of that name; "
                f"shipped recipes: {', '.join(shipped_recipes())}"
            )
        text, where = shipped.read_text(encoding="utf-8"), f"recipe {source!r}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    return Recipe.from_dict(data, where=where)


def parse_override(item: str) -> tuple[str, Any]:
    """``"quantize.calibration=percentile"`` -> ``("quantize.calibration", "percentile")``.

    The value is read as a TOML value (numbers, booleans, arrays, quoted strings); anything that is
    not valid TOML is taken as a plain string. For a list setting (``exclude``, ``op_types``,
    ``bits_choices``...) such a plain string is a comma-separated list, as ``--op-types`` and
    ``--bits-choices`` read theirs: ``quantize.exclude=fc1,re:^/head/`` is
    ``["fc1", "re:^/head/"]`` (spaces around an entry dropped; an empty value is the empty list). A
    comma inside brackets does not separate (``re:^conv{1,2}$``, ``re:[,;]``); any other entry
    holding a comma is given in TOML: a quoted string is one entry (``quantize.exclude='"a,b"'``),
    an array any number (``quantize.exclude='["a,b", "fc1"]'``). Any other single value of a list
    setting is its one entry.
    """
    key, sep, raw = item.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"--set {item!r}: expected STAGE.KEY=VALUE, e.g. quantize.calibration=percentile")
    key = key.strip()
    stage, _, field = key.partition(".")
    config = STAGES.get(stage)
    listed = config is not None and is_list_field(config, field)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = _split_list(item, raw, list_item_hint(config, field)) if listed else raw
    if listed and not isinstance(value, list):
        # a name that TOML reads as a number, boolean or date (exclude=123) is the name as written
        value = [raw.strip() if list_item_hint(config, field) is str and not isinstance(value, str) else value]
    return key, value


def _split_list(item: str, raw: str, hint: Any) -> list[Any]:
    """The entries of a comma-separated ``--set`` value of a list setting whose items are ``hint``."""
    if not raw.strip():
        return []
    entries = [entry.strip() for entry in _top_level_split(raw)]
    if "" in entries:
        raise ConfigError(f"--set {item!r}: entry {entries.index('') + 1} of the comma-separated list is empty; "
                          "give the entries separated by single commas, or a TOML array "
                          "(STAGE.KEY='[\"a\", \"b\"]') for an entry holding a comma")
    if hint is str:
        return entries
    values: list[Any] = []
    for entry in entries:  # numbers (bits_choices=2,3,4) read as TOML, the rest as written
        try:
            values.append(tomllib.loads(f"v = {entry}")["v"])
        except tomllib.TOMLDecodeError:
            values.append(entry)
    return values


_CLOSING = {"(": ")", "[": "]", "{": "}"}


def _top_level_split(text: str) -> list[str]:
    """``text`` cut at its commas, but not at those inside brackets (a regex's ``{1,2}`` or
    ``[,;]``; a character after a backslash is no bracket); text whose brackets do not balance is
    cut at every comma."""
    pieces, start, stack, escaped = [], 0, [], False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif stack and stack[-1] == "]" and char != "]":
            continue  # inside a character class every other character is literal
        elif char in _CLOSING:
            stack.append(_CLOSING[char])
        elif stack and char == stack[-1]:
            stack.pop()
        elif char in ")]}" or (char == "," and not stack):
            if char != ",":  # a closing bracket that opened nowhere
                return text.split(",")
            pieces.append(text[start:i])
            start = i + 1
    return pieces + [text[start:]] if not stack else text.split(",")


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``--set`` items as the overrides of :meth:`Recipe.with_overrides`: a later item of the same
    setting wins, but a list setting given again gets the entries added (``--set quantize.exclude=a
    --set quantize.exclude=b`` is ``["a", "b"]``, as ``--exclude a --exclude b``)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, value = parse_override(item)
        if isinstance(value, list) and isinstance(overrides.get(key), list):
            value = overrides[key] + value
        overrides[key] = value
    return overrides


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if value == value else "nan"  # repr gives 1e-05, inf, -inf: all TOML
    if isinstance(value, str):
        # JSON string escapes are TOML basic-string escapes; TOML also wants DEL escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"recipe value {value!r} has no TOML form")


def recipe_toml(recipe: Recipe | Mapping[str, Any]) -> str:
    """The recipe as a TOML document that :func:`load_recipe` reads back into the same recipe.

    Settings that are None (unset; every such field defaults to None) are written as comments,
    since TOML has no null.
    """
    data = recipe.to_dict() if isinstance(recipe, Recipe) else recipe
    lines = [f"name = {_toml_value(data.get('name', ''))}",
             f"description = {_toml_value(data.get('description', ''))}"]
    for stage, cfg in data.items():
        if not isinstance(cfg, Mapping):
            continue
        lines.append(f"\n[{stage}]")
        for key, value in cfg.items():
            lines.append(f"# {key} unset" if value is None else f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"

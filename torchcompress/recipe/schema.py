"""Recipe = ordered stages. Built from YAML through the explicit name table in :mod:`..config`.

Example recipe::

    name: w4-rtn
    stages:
      - kind: rtn
        name: linears-w4
        scheme: {bits: 4, group_size: 128, symmetric: true}
        ignore: [lm_head]
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from ..errors import ConfigError, InputError, RecipeError
from .yaml_lines import LList, LMap, load_yaml_with_lines

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "recipes"

# module type names usable in YAML `targets`/`ignore` (names of real classes, resolved here, never
# matched against a module's class name)
MODULE_TYPES = {"Linear": nn.Linear}

_STAGE_KEYS = {"kind", "name", "targets", "ignore"}
_RECIPE_KEYS = {"name", "description", "stages"}


@dataclass(frozen=True)
class Stage:
    kind: str
    name: str
    config: object
    targets: tuple = (nn.Linear,)
    ignore: tuple | None = None  # None: the verb's default (lm_head, embeddings)


@dataclass(frozen=True)
class Recipe:
    name: str
    stages: tuple[Stage, ...]
    description: str = ""
    source: str = field(default="<recipe>", compare=False)


def _line(obj, key=None) -> int | None:
    if isinstance(obj, LMap) and key is not None:
        return obj.lines.get(key, obj.line)
    return getattr(obj, "line", None) or None


def _build_dataclass(cls, data, where: str, source: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}", source, _line(data))
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise RecipeError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(fields))})", source, _line(data, key))
        sub = hints.get(key)
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):  # name the line of the key (a scalar has no line of its own)
                raise RecipeError(f"{where}.{key}: expected a mapping, got {type(value).__name__}", source, _line(data, key))
            value = _build_dataclass(sub, value, f"{where}.{key}", source)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        first = e.field.split(".")[0]
        raise RecipeError(f"{where}.{e.field}: {str(e).split(': ', 1)[1]}", source, _line(data, first)) from None


def _patterns(value, key: str, stage: LMap, source: str) -> tuple:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RecipeError(f"stage {key}: expected a list of module names, 're:' regexes or types", source, _line(stage, key))
    return tuple(MODULE_TYPES.get(v, v) for v in value)


def _build_stage(raw, index: int, source: str) -> Stage:
    if not isinstance(raw, dict):
        raise RecipeError(f"stages[{index}]: expected a mapping", source, _line(raw))
    kind = raw.get("kind")
    from .registry import STAGE_KINDS

    if not isinstance(kind, str) or kind not in STAGE_KINDS:
        raise RecipeError(f"stages[{index}].kind: {kind!r} is not a stage kind (allowed: {', '.join(sorted(STAGE_KINDS))})",
                          source, _line(raw, "kind"))
    cfg_cls = STAGE_KINDS[kind]
    allowed = _STAGE_KEYS | {f.name for f in dataclasses.fields(cfg_cls)}
    for key in raw:
        if key not in allowed:
            raise RecipeError(f"stages[{index}]: unknown key {key!r} for kind {kind!r} (allowed: {', '.join(sorted(allowed))})",
                              source, _line(raw, key))
    cfg_data = LMap({k: v for k, v in raw.items() if k not in _STAGE_KEYS})
    cfg_data.line, cfg_data.lines = _line(raw) or 0, {k: _line(raw, k) for k in cfg_data}
    config = _build_dataclass(cfg_cls, cfg_data, f"stages[{index}]", source)
    name = raw.get("name", f"{kind}-{index}")
    if not isinstance(name, str) or not name:
        raise RecipeError(f"stages[{index}].name: must be a non-empty string", source, _line(raw, "name"))
    targets = _patterns(raw["targets"], "targets", raw, source) if "targets" in raw else (nn.Linear,)
    ignore = _patterns(raw["ignore"], "ignore", raw, source) if "ignore" in raw else None
    return Stage(kind=kind, name=name, config=config, targets=targets, ignore=ignore)


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    data = load_yaml_with_lines(text, source)
    if not isinstance(data, dict):
        raise RecipeError("top level must be a mapping with 'stages'", source, _line(data))
    for key in data:
        if key not in _RECIPE_KEYS:
            raise RecipeError(f"unknown key {key!r} (allowed: {', '.join(sorted(_RECIPE_KEYS))})", source, _line(data, key))
    stages = data.get("stages")
    if not isinstance(stages, LList) or not stages:
        raise RecipeError("'stages' must be a non-empty list", source, _line(data, "stages"))
    built = tuple(_build_stage(s, i, source) for i, s in enumerate(stages))
    names = [s.name for s in built]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise RecipeError(f"duplicate stage name(s): {', '.join(sorted(dup))}", source, _line(data, "stages"))
    name = data.get("name", Path(source).stem)
    desc = data.get("description", "")
    if not isinstance(name, str) or not isinstance(desc, str):
        raise RecipeError("'name' and 'description' must be strings", source, _line(data))
    return Recipe(name=name, stages=built, description=desc, source=source)


def bundled_recipes() -> list[str]:
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.yaml"))


def load_recipe(spec: str | Path) -> Recipe:
    """A YAML file path, or the name of a bundled recipe (``w4-rtn``)."""
    path = Path(spec)
    if not path.is_file():
        bundled = BUNDLED_DIR / f"{spec}.yaml"
        if not bundled.is_file():
            raise InputError(f"recipe {spec!r}: no such file and no bundled recipe of that name "
                             f"(bundled: {', '.join(bundled_recipes())})")
        path = bundled
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read recipe: {e}") from None
    return parse_recipe(text, str(path))

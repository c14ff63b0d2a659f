"""Recipes and the command line into a task's config: dataclass defaults < YAML recipe (only changes) <
``--key value`` overrides. Unknown keys and values of the wrong type raise naming the key; ``--help`` lists every
key with its default, the recipe's value and its help text (:func:`~.config.arg`). The resolved config is written
to the output directory as ``config.yaml``."""

from __future__ import annotations

import dataclasses
import shlex
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .config import ADAPTER_ONLY, ConfigError, TrainConfig, field_defaults, unmet_needs

__all__ = ["parse_config", "config_help", "load_recipe", "apply_overrides", "config_to_dict", "save_resolved_config",
           "RESOLVED_CONFIG_NAME"]

RESOLVED_CONFIG_NAME = "config.yaml"
C = TypeVar("C", bound=TrainConfig)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _whole_strings(cls: type) -> set[str]:
    """List fields whose command-line value is one item (prompts hold commas), unless written [a, b]."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("whole")}


def _coerce(key: str, value: Any, tp: Any, from_cli: bool, whole: bool = False) -> Any:
    """Check (YAML) or convert (command-line string) ``value`` to the field type ``tp``."""
    base, optional = _strip_optional(tp)
    where = "command-line override" if from_cli else "recipe"
    if from_cli and isinstance(value, str) and optional and value.lower() in ("none", "null", "~"):
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed ({where}); expected {getattr(base, '__name__', base)}")
    if typing.get_origin(base) is list:
        if from_cli and isinstance(value, str):
            if value.strip().startswith("["):
                try:
                    value = yaml.safe_load(value)
                except yaml.YAMLError as err:
                    raise ConfigError(f"{key}: {value!r} is not a valid YAML list ({err})") from None
            else:
                value = [value] if whole else [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings ({where}), got {value!r}")
        return list(value)
    if base is bool:
        if isinstance(value, bool):
            return value
        if from_cli and isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key} must be true or false ({where}), got {value!r}")
    if base in (int, float):  # a bool is an int to Python, never to a config
        what, allowed = ("an integer", (int,)) if base is int else ("a number", (int, float))
        if from_cli and isinstance(value, str):
            try:
                return base(value)
            except ValueError:
                raise ConfigError(f"{key} must be {what} ({where}), got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise ConfigError(f"{key} must be {what} ({where}), got {value!r}")
        return base(value)
    if base is str:
        if not isinstance(value, str):
            if from_cli or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{key} must be a string ({where}), got {value!r}")
            value = str(value)
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover - a programming error


def _unknown(cls: type, key: str) -> ConfigError:
    import difflib

    known = sorted(_field_types(cls))
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else f" Known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key {key!r} for {cls.__name__}.{hint}")


def load_recipe(cls: type[C], path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe (a mapping holding only the changes) and type-check its keys for ``cls``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of key: value, got {type(data).__name__}")
    types_ = _field_types(cls)
    out = {}
    for key, value in data.items():
        if key not in types_:
            raise ConfigError(f"{path}: {_unknown(cls, str(key))}")
        try:
            out[key] = _coerce(key, value, types_[key], from_cli=False)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    return out


def apply_overrides(cls: type[C], argv: list[str]) -> dict[str, Any]:
    """Parse ``--key value`` / ``--key=value`` pairs (``--flag`` alone means true for booleans)."""
    types_ = _field_types(cls)
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: overrides are written --key value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in types_:
            raise _unknown(cls, key)
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            is_bool = _strip_optional(types_[key])[0] is bool
            if nxt is None or (nxt.startswith("--") and len(nxt) > 2):
                if not is_bool:
                    raise ConfigError(f"--{key} needs a value")
                value = "true"
            else:
                value = nxt
                i += 1
        out[key] = _coerce(key, value, types_[key], from_cli=True, whole=key in _whole_strings(cls))
        i += 1
    return out


def config_help(cls: type, default_recipe: str | Path | None = None, program: str = "") -> str:
    """``--help`` text: usage, then every key with its type, default (and the recipe's value) and meaning."""
    recipe = load_recipe(cls, default_recipe) if default_recipe and Path(default_recipe).is_file() else {}
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
                for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    lines = [f"usage: {program or cls.__name__} [--config RECIPE.yaml] [--key value ...]", ""]
    if default_recipe:
        lines += [f"With no --config the recipe is {default_recipe}; a recipe holds only changes from the defaults.",
                  "Booleans: --flag alone means true; lists: --key a,b or --key '[a, b]'. Unknown keys are errors."]
    lines.append("Keys (type, default; 'recipe:' where the default recipe changes it):")
    for name, tp in _field_types(cls).items():
        base, optional = _strip_optional(tp)
        tname = "list" if typing.get_origin(base) is list else getattr(base, "__name__", str(base))
        shown = f"  --{name} {tname.upper()}{' | null' if optional else ''}  (default: {defaults[name]!r}"
        if name in recipe and recipe[name] != defaults[name]:
            shown += f"; recipe: {recipe[name]!r}"
        lines.append(shown + ")")
        if helps.get(name):
            lines += [f"      {line}" for line in textwrap.wrap(helps[name], 100)]
    return "\n".join(lines)


def _other_adapters_settings(cls: type[C], recipe: dict[str, Any], overrides: dict[str, Any]) -> dict[str, str]:
    """``--adapter X`` on the command line over a recipe written for another adapter: the recipe's settings that
    do not apply to X (its HRA reflections ``r`` for OFT, its text-encoder HRA for LoRA, ...), each with why.
    The same settings typed on the command line stay errors (the user asked for them)."""
    defaults = field_defaults(cls)
    kind = overrides.get("adapter")
    if kind is None or kind == recipe.get("adapter", defaults.get("adapter")):
        return {}
    return {k: f"not for adapter {kind!r}" for k in recipe
            if k in ADAPTER_ONLY and k not in overrides and kind not in ADAPTER_ONLY[k]}


def _moot_settings(cls: type[C], recipe: dict[str, Any], overrides: dict[str, Any]) -> dict[str, str]:
    """The recipe's settings that the command line made moot: ``cls.NEEDS`` says what each option needs on,
    and what the user typed (or a setting dropped before) turned that off. Typed options are never dropped:
    an unmet need of theirs is the config's error."""
    defaults = field_defaults(cls)
    dropped = _other_adapters_settings(cls, recipe, overrides)
    while True:
        values = {**defaults, **{k: v for k, v in recipe.items() if k not in dropped}, **overrides}
        off_by_user = set(overrides) | set(dropped)
        more = {k: "need " + " and ".join(n for n in off if n in off_by_user)
                for k, off in unmet_needs(cls, values).items()
                if k in recipe and k not in overrides and k not in dropped and any(n in off_by_user for n in off)}
        if not more:
            return dropped
        dropped.update(more)


def parse_config(
    cls: type[C], argv: list[str], default_recipe: str | Path | None = None, program: str = ""
) -> C:
    """Build ``cls`` from ``[--config recipe.yaml] [--key value ...]`` (recipe: changes from defaults).

    ``-h``/``--help`` prints every key (config_help) and exits, as argparse does.
    """
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        print(config_help(cls, default_recipe, program))
        raise SystemExit(0)
    recipe = default_recipe
    rest: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path to a YAML recipe")
            recipe = argv[i + 1]
            i += 2
            continue
        if argv[i].startswith("--config="):
            recipe = argv[i].split("=", 1)[1]
            i += 1
            continue
        rest.append(argv[i])
        i += 1
    values: dict[str, Any] = {}
    if recipe is not None:
        values.update(load_recipe(cls, recipe))
    overrides = apply_overrides(cls, rest)
    moot = _moot_settings(cls, values, overrides)
    recipe_values, values = values, {k: v for k, v in values.items() if k not in moot}
    values.update(overrides)
    try:
        cfg = cls(**values)
    except TypeError as err:  # pragma: no cover - guarded by the key checks above
        raise ConfigError(str(err)) from None
    cfg.command = " ".join(p for p in [program, shlex.join(argv)] if p)
    if moot:
        groups: dict[str, list[str]] = {}
        for k, why in moot.items():
            groups.setdefault(why, []).append(f"{k}: {recipe_values[k]!r}")
        print("note: the command line leaves the recipe's " + "; ".join(
            f"{', '.join(keys)} ({why})" for why, keys in groups.items()) + " unused: they are dropped",
              file=sys.stderr)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_resolved_config(cfg: TrainConfig, output_dir: str | Path) -> Path:
    """Write every resolved value (defaults included) to ``<output_dir>/config.yaml``."""
    path = Path(output_dir) / RESOLVED_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in config_to_dict(cfg).items() if k != "command"}
    header = f"# resolved {type(cfg).__name__}; produced by: {cfg.command}\n" if cfg.command else ""
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return path

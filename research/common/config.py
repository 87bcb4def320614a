"""Config loading: ``--config path.py[:arg]``, dotted overrides, ``--workdir``, value checks.

A small argparse-like layer with the ``ml_collections.config_flags`` conventions, written out
so that every mistake gives one clear message naming the key:

    python -m research.logistic_regression --config configs/logistic_regression.py:smoke \
        --config.learning_rate=0.1 --workdir /tmp/lr
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message names it."""


def load_config(spec: str | Path) -> ml_collections.ConfigDict:
    """Load ``path.py[:arg]`` by calling its ``get_config(arg)`` (``arg`` is None if absent)."""
    spec = str(spec)
    path_str, arg = spec, None
    if ":" in spec and not spec.endswith(".py"):
        path_str, arg = spec.rsplit(":", 1)
    path = Path(path_str)
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    if not path.is_file():
        raise ConfigError(f"--config: file {path_str!r} not found (spec {spec!r})")
    module_spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {path} defines no get_config(arg=None)")
    config = module.get_config(arg)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config: {path}:get_config returned {type(config).__name__}")
    return config


def leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted leaf keys of ``config``, sorted."""
    keys = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(leaf_keys(value, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return sorted(keys)


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


def _unknown_key(config: ml_collections.ConfigDict, key: str) -> ConfigError:
    valid = leaf_keys(config)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean 'config.{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key 'config.{key}'.{hint} Valid keys: {', '.join(valid)}")


def _parse_scalar(key: str, raw: str, current: Any) -> Any:
    bad = ConfigError(
        f"bad value for 'config.{key}': {raw!r} is not a valid {type(current).__name__} "
        f"(current value {current!r})"
    )
    if isinstance(current, bool):
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise bad
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise bad from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise bad from None
    return raw


def _parse_value(key: str, raw: str, current: Any) -> Any:
    if isinstance(current, bool | int | float | str):
        return _parse_scalar(key, raw, current)
    if isinstance(current, tuple | list):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = tuple(part.strip() for part in raw.split(",") if part.strip())
        if not isinstance(value, tuple | list):
            value = (value,)
        if current:
            kind = current[0]
            value = [_parse_scalar(key, str(v), kind) for v in value]
        return type(current)(value)
    if current is None:
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
    raise ConfigError(f"cannot override 'config.{key}' of type {type(current).__name__}")


def apply_override(config: ml_collections.ConfigDict, key: str, raw: str) -> None:
    """Set dotted ``key`` of ``config`` from the string ``raw``, parsed as the current type."""
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise _unknown_key(config, key)
        if i < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(
            f"'config.{key}' is a group; set one of its keys: "
            + ", ".join(f"config.{key}.{k}" for k in leaf_keys(current))
        )
    with node.unlocked():
        node[parts[-1]] = _parse_value(key, raw, current)


Rule = tuple[Callable[[Any], bool], str]


def check_config(config: ml_collections.ConfigDict, rules: Mapping[str, Rule]) -> None:
    """Raise ConfigError naming the first key whose value fails its ``(predicate, text)`` rule."""
    for key, (predicate, text) in rules.items():
        node: Any = config
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise _unknown_key(config, key)
            node = node[part]
        try:
            ok = bool(predicate(node))
        except Exception:  # any failure of the predicate means a bad value
            ok = False
        if not ok:
            raise ConfigError(f"bad value for 'config.{key}': {node!r} ({text})")


USAGE = """usage: python -m research.{name} [--config configs/{name}.py[:smoke]]
       [--config.KEY=VALUE ...] [--workdir DIR]"""


def parse_args(argv: Sequence[str], name: str) -> tuple[ml_collections.ConfigDict, Path | None]:
    """Parse ``--config``, ``--config.KEY=VALUE`` and ``--workdir`` from ``argv``.

    Returns the config (overrides applied, then locked) and the workdir (None if not given).
    """
    spec: str | None = None
    workdir: str | None = None
    overrides: list[tuple[str, str]] = []
    args = list(argv)
    want_help = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            want_help, i = True, i + 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}\n{USAGE.format(name=name)}")
        flag, has_eq, value = arg[2:].partition("=")
        if not has_eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{flag} needs a value")
            value = args[i + 1]
            i += 1
        i += 1
        if flag == "config":
            spec = value
        elif flag == "workdir":
            workdir = value
        elif flag.startswith("config."):
            overrides.append((flag[len("config.") :], value))
        else:
            raise ConfigError(f"unknown flag --{flag}\n{USAGE.format(name=name)}")
    config = load_config(spec or CONFIG_DIR / f"{name}.py")
    if want_help:
        keys = "\n".join(f"  --config.{k}={_get(config, k)!r}" for k in leaf_keys(config))
        print(f"{USAGE.format(name=name)}\n\nconfig keys (current values):\n{keys}")
        raise SystemExit(0)
    for key, value in overrides:
        apply_override(config, key, value)
    config.lock()
    return config, Path(workdir) if workdir else None

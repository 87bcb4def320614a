"""Configs: ``configs/<name>.py`` modules with ``get_config(arg=None)``, and the value checks.

Command lines go through ``ml_collections.config_flags`` (see ``research/common/cli.py``);
this module holds what config_flags does not: loading a config by name without a command line
(``get_config``, for ``research.run_all`` and the tests), the value checks each script declares
(``check_config``) and the message for a key that does not exist (``unknown_key_message``).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"

Rule = tuple[Callable[[Any], bool], str]


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names it."""


def get_config(name: str, variant: str | None = None) -> ml_collections.ConfigDict:
    """``configs/<name>.py``'s ``get_config(variant)``: the config that
    ``--config configs/<name>.py[:variant]`` loads on a command line."""
    module = importlib.import_module(f"configs.{name}")
    return module.get_config(variant)


def leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted leaf keys of ``config``, sorted."""
    keys = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(leaf_keys(value, f"{prefix}{key}."))
        else:
            keys.append(f"{prefix}{key}")
    return sorted(keys)


def has_key(config: ml_collections.ConfigDict, key: str) -> bool:
    """Whether the dotted ``key`` names a field (leaf or group) of ``config``."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def unknown_key_message(config: ml_collections.ConfigDict, key: str) -> str:
    """One line naming the unknown ``config.<key>``, the closest valid key and all of them."""
    valid = leaf_keys(config)
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean 'config.{close[0]}'?" if close else ""
    return f"unknown config key 'config.{key}'.{hint} Valid keys: {', '.join(valid)}"


def check_config(config: ml_collections.ConfigDict, rules: Mapping[str, Rule]) -> None:
    """Raise ConfigError naming the first key whose value fails its ``(predicate, text)`` rule."""
    for key, (predicate, text) in rules.items():
        if not has_key(config, key):
            raise ConfigError(unknown_key_message(config, key))
        node: Any = config
        for part in key.split("."):
            node = node[part]
        try:
            ok = bool(predicate(node))
        except Exception:  # any failure of the predicate means a bad value
            ok = False
        if not ok:
            raise ConfigError(f"bad value for 'config.{key}': {node!r} ({text})")

"""Loading ``ml_collections`` experiment configs, big_vision style.

A config file defines ``get_config(arg=None)`` returning a ``ConfigDict``;
``--config configs/popalign_mog.py:sft`` calls ``get_config("sft")``.
Overrides are ``--config.key=value`` / ``--config.a.b value``; an unknown key
or a value of the wrong type is a one-line :class:`ConfigError`.

The resolved config is saved as ``config.json`` in the workdir; a later run in
the same workdir must resolve to the same config (the differing keys are
reported) unless the caller allows the change explicitly.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from fairjax.errors import ConfigError

CONFIG_FILE = "config.json"

# keys of the two schemas before they became one (every task: model.{dir, dtype, param_dtype, remat,
# attention}, data.{path, split}, lora.*, optimizer.*, mesh.*, checkpoint.*): old -> new
RENAMED = {
    "model_dir": "model.dir",
    "dtype": "model.dtype",
    "remat": "model.remat",
    "attention_implementation": "model.attention",
    "model.attention_impl": "model.attention",
    "data.dir": "data.path",
}


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``path/to/file.py[:arg]`` -> the ConfigDict its ``get_config(arg)`` returns."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found")
    mod_spec = importlib.util.spec_from_file_location(f"_fairjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path} does not parse: {e}") from None
    get = getattr(module, "get_config", None)
    if get is None:
        raise ConfigError(f"config file {path} defines no get_config(arg)")
    takes_arg = bool(inspect.signature(get).parameters)
    if arg and not takes_arg:
        raise ConfigError(f"config file {path} takes no preset, got ':{arg}'")
    presets = getattr(module, "PRESETS", None)
    if arg and presets is not None and arg not in presets:
        raise ConfigError(f"unknown preset '{arg}' for {path}; choose one of: {', '.join(presets)}")
    cfg = get(arg or None) if takes_arg else get()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"get_config in {path} must return an ml_collections.ConfigDict")
    return cfg


def _parse_value(text: str, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected true/false, got {text!r}")
    if isinstance(current, str) or current is None and not _looks_literal(text):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if isinstance(current, (int, float, tuple, list)):
            raise ConfigError(f"--config.{key}: cannot parse {text!r} as {type(current).__name__}") from None
        return text
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if current is not None and not isinstance(value, type(current)):
        raise ConfigError(f"--config.{key}: expected {type(current).__name__}, got {text!r}")
    return value


def _looks_literal(text: str) -> bool:
    try:
        ast.literal_eval(text)
        return True
    except (ValueError, SyntaxError):
        return False


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """Set ``a.b.c = value`` for each override, refusing keys the config does not have."""
    for key, text in overrides.items():
        node = cfg
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
                if key in RENAMED:
                    raise ConfigError(f"config key '{key}' was renamed to '{RENAMED[key]}': use "
                                      f"--config.{RENAMED[key]}={text}")
                where = ".".join(parts[:i]) or "the config"
                known = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
                raise ConfigError(f"unknown config key '{key}' (keys of {where}: {', '.join(known)})")
            if i < len(parts) - 1:
                node = node[part]
        last = parts[-1]
        value = _parse_value(text, node[last], key)
        try:
            node[last] = value
        except TypeError as e:
            raise ConfigError(f"--config.{key}: {e}") from None
    return cfg


def split_overrides(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Pull ``--config.key=value`` / ``--config.key value`` out of ``argv``."""
    rest: list[str] = []
    overrides: dict[str, str] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            key, eq, value = a[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{a} needs a value")
                value = argv[i + 1]
                i += 1
            overrides[key] = value
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
    """A JSON-safe plain dict (tuples become lists) for saving and comparing."""
    return json.loads(cfg.to_json_best_effort(sort_keys=True))


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            key = f"{prefix}.{k}" if prefix else k
            if k not in a or k not in b:
                out.append(key)
            else:
                out += _diff(a[k], b[k], key)
        return out
    return [] if a == b else [prefix]


def _has_key(d: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return True


def check_or_save(cfg: ml_collections.ConfigDict, workdir: str, allow_change: bool = False) -> list[str]:
    """Save the resolved config in ``workdir``, or compare with the one there.

    Returns the keys that differ from a saved config (empty for a new run).
    A difference is an error unless ``allow_change``; the saved file is then
    kept as ``config.json`` of the run and the new one written beside it.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    new = to_dict(cfg)
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except json.JSONDecodeError:
            raise ConfigError(f"{path} is not valid JSON; use a fresh --workdir") from None
        changed = _diff(old, new)
        renamed = [k for k in RENAMED if _has_key(old, k) and not _has_key(new, k)]
        if changed and renamed and not allow_change:
            raise ConfigError(
                f"workdir {workdir} holds a run saved with config keys renamed since "
                f"({', '.join(f'{k} -> {RENAMED[k]}' for k in renamed)}); use a new --workdir, or pass "
                "--allow-config-change to resume it under the new keys"
            )
        if changed and not allow_change:
            raise ConfigError(
                f"workdir {workdir} holds a run with a different config (differs in: {', '.join(changed)}); "
                f"use a new --workdir, or pass --allow-config-change to resume with the new values"
            )
        if changed:
            _write_json(os.path.join(workdir, "config.resumed.json"), new)
        return changed
    _write_json(path, new)
    return []


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)

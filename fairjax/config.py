"""Loading ``ml_collections`` experiment configs, big_vision style.

A config file defines ``get_config(arg=None)`` returning a ``ConfigDict``;
``--config configs/popalign_mog.py:sft`` calls ``get_config("sft")``.
Overrides are ``--config.key=value`` / ``--config.a.b value``; an unknown key
or a value of the wrong type is a one-line :class:`ConfigError`.

The resolved config is saved as ``config.json`` in the workdir; a later run in
the same workdir must resolve to the same config (the differing keys are
reported) unless the caller allows the change explicitly, or the run there never
saved a checkpoint (nothing to resume: the new config replaces the old one).

Valid values: every key's range is declared beside its default, in a table
``{dotted key: Range}`` (:data:`fairjax.trainer.TRAIN_RANGES` next to
``default_train_config()``, a ``RANGES`` table next to each task's config
function); :func:`validate` checks a config against the tables before anything
is built or compiled, and lists every bad value in one line with its key, its
value and its range.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import json
import math
import os
from collections.abc import Mapping, Sequence
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


# ----------------------------------------------------------------------------- valid values


@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of one config key: a number in ``[lo, hi]`` (``lo_open`` / ``hi_open``: that end
    excluded; None: unbounded; always finite), an integer when ``integer`` (an integral float such as
    ``1e3`` counts); or one of ``choices``; or a bool when ``boolean``. ``also`` lists extra valid
    values (``mesh.data = -1``: all devices); ``note`` is added to the message."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    choices: tuple = ()
    boolean: bool = False
    also: tuple = ()
    note: str = ""  # why, when the range alone does not say it

    def ok(self, v: Any) -> bool:
        if any(type(v) is type(a) and v == a for a in self.also):
            return True
        if self.boolean:
            return isinstance(v, bool)
        if self.choices:
            return isinstance(v, (str, int, float)) and not isinstance(v, bool) and v in self.choices
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.integer and not (isinstance(v, int) or float(v).is_integer()):
            return False
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return self.hi is None or (v < self.hi or (not self.hi_open and v == self.hi))

    def describe(self) -> str:
        if self.boolean:
            text = "true or false"
        elif self.choices:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            text = self._describe_number()
        return f"{text} ({self.note})" if self.note else text

    def _describe_number(self) -> str:
        kind = "an integer" if self.integer else "a number"
        lo, hi = (_num(self.lo), _num(self.hi))
        if self.lo is not None and self.hi is not None:
            text = f"{kind} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{kind} {'>' if self.lo_open else '>='} {lo}"
        elif self.hi is not None:
            text = f"{kind} {'<' if self.hi_open else '<='} {hi}"
        else:
            text = f"a finite {kind.split()[-1]}"
        return " or ".join([repr(a) for a in self.also] + [text])


def _num(x) -> str:
    if x is None:
        return ""
    if float(x).is_integer() and abs(x) >= 2**16 and (int(x) & (int(x) - 1)) == 0:
        return f"2**{int(x).bit_length() - 1}"
    if float(x).is_integer() and abs(x) >= 2**16 and ((int(x) + 1) & int(x)) == 0:
        return f"2**{int(x).bit_length()} - 1"
    return f"{x:g}" if isinstance(x, float) else str(x)


def ints(lo: int | None = None, hi: int | None = None, **kw) -> Range:
    """An integer in ``[lo, hi]``."""
    return Range(lo, hi, integer=True, **kw)


def floats(lo: float | None = None, hi: float | None = None, **kw) -> Range:
    """A finite number in ``[lo, hi]`` (``lo_open`` / ``hi_open`` to exclude an end)."""
    return Range(lo, hi, **kw)


def one_of(*choices, note: str = "") -> Range:
    return Range(choices=tuple(choices), note=note)


BOOL = Range(boolean=True)
SEED = ints(0, 2**32 - 1)  # numpy and jax.random.key both take [0, 2**32)


def _lookup(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, Mapping)) or part not in node:
            return False, None
        node = node[part]
    return True, node


def validate(cfg, *tables: Mapping[str, Range]) -> None:
    """Check every key of ``tables`` (later tables win for the same key) that ``cfg`` holds and that is
    not None (None: the trainer's default); one :class:`ConfigError` lists every bad value with its range."""
    merged: dict[str, Range] = {}
    for t in tables:
        merged.update(t)
    bad = []
    for key, rng in merged.items():
        present, value = _lookup(cfg, key)
        if present and value is not None and not rng.ok(value):
            bad.append(f"config.{key}={value!r} is out of range: must be {rng.describe()}")
    if bad:
        raise ConfigError("; ".join(bad) + " (fix it in the config file or with --config.KEY=VALUE)")


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
                if not isinstance(node, (ml_collections.ConfigDict, dict)):  # a value, not a section
                    raise ConfigError(f"unknown config key '{key}': {where} is a value ({node!r}), not a section; "
                                      f"set it with --config.{where}=VALUE")
                raise ConfigError(f"unknown config key '{key}' (keys of {where}: {', '.join(sorted(node.keys()))})")
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


def check_or_save(cfg: ml_collections.ConfigDict, workdir: str, allow_change: bool = False,
                  resumable: bool = True) -> list[str]:
    """Save the resolved config in ``workdir``, or compare with the one there.

    Returns the keys that differ from a saved config (empty for a new run).
    A difference is an error unless ``allow_change``; the saved file is then
    kept as ``config.json`` of the run and the new one written beside it.
    ``resumable=False`` (the run there saved no checkpoint: nothing to resume) replaces
    a differing or unreadable saved config with this one.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG_FILE)
    new = to_dict(cfg)
    if os.path.exists(path) and not resumable:
        _write_json(path, new)
        return []
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
    from fairjax.io.model_dir import write_json

    write_json(path, obj)

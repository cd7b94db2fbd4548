"""How command-line values reach a typed config: ``--set`` pairs, and which flag gave which value.

A command builds ``overrides`` (config key → the value of one of its options) and calls :func:`load`;
when validation fails, the error names the option the bad value came from (``--batch-size``,
``--set loss.gamma``) rather than blaming the config file, which may not even hold that key.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
import yaml

from sdxl_trainer.config import Section, load_config
from sdxl_trainer.errors import UserError

C = TypeVar("C", bound=Section)


def parse_sets(pairs: list[str] | None) -> dict[str, Any]:
    """``--set key.sub=value`` pairs → overrides (values parsed as YAML: 1e-4, true, [a, b])."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set {pair!r} is not KEY=VALUE", fix="e.g. --set objective.sigma_max=20000")
        out[key.strip()] = yaml.safe_load(raw)
    return out


_given: dict[str, tuple[Any, str]] = {}  # the running command's options: name → (value, how it is spelt)


def remember(fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Note the options a command was called with and their spelling (the CLI calls this first)."""
    _given.clear()
    params = inspect.signature(fn).parameters
    for name, value in kwargs.items():
        if value is None or name not in params:
            continue
        info = params[name].default
        if isinstance(info, typer.models.ArgumentInfo):
            _given[name] = (value, name.upper())
            continue
        decls = [d.split("/")[0] for d in getattr(info, "param_decls", None) or () if d.startswith("--")]
        _given[name] = (value, decls[0] if decls else "--" + name.replace("_", "-"))


def _words(name: str) -> set[str]:
    return set(name.replace(".", "_").split("_")) - {"", "n", "of"}


def _option_of(key: str, value: Any) -> str | None:
    """The option this override came from: equal value, sharing the most words with the key."""
    scored = []
    for name, (v, spelt) in _given.items():
        try:
            equal = v is value or (type(v) is not bool and type(value) is not bool and v == value)
        except Exception:  # an exotic __eq__
            equal = False
        if equal and (shared := len(_words(name) & _words(key))):
            scored.append((shared, v is value, spelt))
    scored.sort(reverse=True)
    if not scored or (len(scored) > 1 and scored[0][:2] == scored[1][:2]):
        return None
    return scored[0][2]


def flag_names(overrides: dict[str, Any], sets: dict[str, Any] | None = None) -> dict[str, str]:
    """Config key → the option that set it, for the running command."""
    names = {k: f"--set {k}" for k in sets or {}}
    for key, value in overrides.items():
        if value is not None and key not in names and (opt := _option_of(key, value)):
            names[key] = opt
    return names


def load(cls: type[C], file: Path | None, overrides: dict[str, Any], sets: dict[str, Any] | None = None) -> C:
    """``load_config`` with the command's flag names, so a bad value is blamed on where it came from."""
    return load_config(cls, file, {**overrides, **(sets or {})}, flags=flag_names(overrides, sets))

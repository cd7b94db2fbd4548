"""How command-line values reach a typed config: ``--set`` pairs, and which flag gave which value.

A command builds ``overrides`` (config key → the value of one of its options) and calls :func:`load`;
when validation fails, the error names the option the bad value came from (``--batch-size``,
``--set loss.gamma``) rather than blaming the config file, which may not even hold that key.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
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
_command: list[Callable[..., Any]] = []  # the running command's function


def spelling(name: str, info: Any) -> str:
    """How a command parameter is written on the command line: ``--batch-size``, or ``WORK`` for an argument."""
    if isinstance(info, typer.models.ArgumentInfo):
        return name.upper()
    decls = [d.split("/")[0] for d in getattr(info, "param_decls", None) or () if d.startswith("--")]
    return decls[0] if decls else "--" + name.replace("_", "-")


@functools.cache
def option_keys(fn: Callable[..., Any]) -> dict[str, str]:
    """Config key → the parameter that sets it, read from the command's ``{"key": param, …}`` overrides.

    Only a key whose value is the parameter itself (or the ``else`` of a conditional, as in
    ``"adafactor" if use_adafactor else optimizer``) counts: that option sets exactly that key.
    """
    fn = inspect.unwrap(fn)
    params = inspect.signature(fn).parameters
    out: dict[str, str] = {}
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn)))):
        if not isinstance(node, ast.Dict):
            continue
        for key, value in zip(node.keys, node.values):
            value = value.orelse if isinstance(value, ast.IfExp) else value
            if isinstance(key, ast.Constant) and isinstance(key.value, str) and isinstance(value, ast.Name) \
                    and value.id in params:  # fmt: skip
                out.setdefault(key.value, value.id)
    return out


def option_flags(fn: Callable[..., Any]) -> dict[str, str]:
    """Config key → the flag that sets it (``optimizer.learning_rate`` → ``--learning-rate``)."""
    params = inspect.signature(inspect.unwrap(fn)).parameters
    return {key: spelling(name, params[name].default) for key, name in option_keys(fn).items()}


def remember(fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Note the options a command was called with and their spelling (the CLI calls this first)."""
    _given.clear()
    _command[:] = [fn]
    params = inspect.signature(fn).parameters
    for name, value in kwargs.items():
        if value is not None and name in params:
            _given[name] = (value, spelling(name, params[name].default))


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
    exact = option_keys(_command[0]) if _command else {}  # the option written as this key's value
    for key, value in overrides.items():
        if value is None or key in names:
            continue
        if exact.get(key) in _given:
            names[key] = _given[exact[key]][1]
        elif opt := _option_of(key, value):  # a value computed from options ("min_snr" if min_snr_gamma …)
            names[key] = opt
    return names


def load(cls: type[C], file: Path | None, overrides: dict[str, Any], sets: dict[str, Any] | None = None) -> C:
    """``load_config`` with the command's flag names, so a bad value is blamed on where it came from
    and an unknown key is answered with the key (and flag) meant."""
    options = option_flags(_command[0]) if _command else {}
    return load_config(cls, file, {**overrides, **(sets or {})}, flags=flag_names(overrides, sets), options=options)

"""`--help` that reads well at 80 columns: argument names in capitals, config defaults shown.

Every option of a stage defaults to ``None`` ("not given: the config file's value, else the
config's default"), so Typer has no default to show. :func:`config_defaults` writes the config's
default into the option's help instead (``[default: 1e-05]``), from the same key the option sets
(cli_options.option_keys): the help cannot drift from docs/configuration.md. :class:`HelpCommand`
writes arguments as ``WORK`` — in the usage line too, where Typer writes ``{work}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, get_args

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from typer.core import TyperArgument, TyperCommand

from sdxl_trainer.cli_options import option_keys

F = TypeVar("F", bound=Callable[..., Any])


class HelpCommand(TyperCommand):
    """A Typer command whose arguments are written in capitals (``sdxl prep stats [OPTIONS] WORK``), and
    whose repeatable options show the type of one value (``--set <str>``, not ``<list[str]>``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.metavar is not None or not param.name:
                continue
            if isinstance(param, TyperArgument):
                param.metavar = param.name.upper()
            elif getattr(getattr(param, "type_descriptor", None), "is_list", False):
                inner = (get_args(param.type_descriptor.annotation) or (str,))[0]
                param.metavar = f"<{getattr(inner, '__name__', 'value')}>"

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = (param.metavar or param.name or "").upper() + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces


def _default_of(cls: type[BaseModel], key: str) -> Any:
    model: Any = cls
    *sections, name = key.split(".")
    for part in sections:
        model = model.model_fields[part].annotation
    field = model.model_fields[name]
    if field.default_factory is not None:
        return field.default_factory()
    return None if field.default is PydanticUndefined else field.default


def shown_default(value: Any, decls: tuple[str, ...] = ()) -> str | None:
    """A default as ``--help`` writes it; None when there is nothing to show (unset, required)."""
    if value is None or value == [] or value == "":
        return None
    if isinstance(value, bool):
        pair = next((d for d in decls if "/" in d), None)
        on, off = (s.strip().lstrip("-") for s in pair.split("/", 1)) if pair else ("", "")
        if pair and off != f"no-{on}":  # --lora/--full: the side that is the default
            return on if value else off
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    return str(value)


def config_defaults(cls: type[BaseModel]) -> Callable[[F], F]:
    """Decorate a command: each option that sets a config key shows that key's default in its help."""

    def decorate(fn: F) -> F:
        import inspect

        params = inspect.signature(fn).parameters
        for key, name in option_keys(fn).items():
            info = params[name].default
            if not isinstance(info, typer.models.OptionInfo):
                continue
            text = shown_default(_default_of(cls, key), tuple(info.param_decls or ()))
            if text is not None and "[default:" not in (info.help or ""):
                info.help = f"{info.help or ''}  [default: {text}]".strip()
        return fn

    return decorate

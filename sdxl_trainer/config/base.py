"""Config machinery: the Section base, YAML/TOML files plus flag overrides, clear errors.

Each stage's config is a pydantic model with ``extra="forbid"``; :func:`load_config` merges a file
and ``--flag`` overrides (dotted keys for nested sections) and turns validation errors into one
clear :class:`~sdxl_trainer.errors.UserError` with a "did you mean" suggestion for a misspelt key.
"""

from __future__ import annotations

import copy
import difflib
import tomllib
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from sdxl_trainer.errors import UserError


class Section(BaseModel):
    """Base for every config section: unknown keys are an error, values validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


Precision = Literal["fp32", "bf16", "fp16"]


C = TypeVar("C", bound=Section)


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a YAML (.yaml/.yml) or TOML (.toml) config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise UserError("config file not found", where=str(path), fix="check the --config path")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"cannot parse config: {e}", where=str(path)) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError("a config file must hold a mapping of keys to values", where=str(path))
    return data


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"cannot set {key}: {p} is not a section")
    node[parts[-1]] = value


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    model: Any = cls
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _source(key: str, file: Path | None, given: set[str], flags: Mapping[str, str]) -> str | None:
    """Where the value at ``key`` came from: the flag that set it (or a section above it), else the file."""
    for k in given:
        if key == k or key.startswith(k + "."):
            return flags.get(k) or f"the command-line option for {k}"
    return str(file) if file else None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of ``model`` as a dotted path, sections and their keys alike."""
    out = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        nested = _model_at(model, (name,)) or list_item_model(field.annotation)
        if nested is not None:
            out += _key_paths(nested, f"{prefix}{name}.")
    return out


def list_item_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a ``list[Model]`` field (the scan's ``datasets:``): its keys are suggested too."""
    args = get_args(annotation) if get_origin(annotation) is list else ()
    return args[0] if args and isinstance(args[0], type) and issubclass(args[0], BaseModel) else None


def suggest_key(cls: type[BaseModel], loc: tuple, options: Mapping[str, str] | None = None) -> str:
    """" — did you mean …?" for an unknown key at ``loc``: the key of that name in another section (with the
    flag that sets it), else a near-miss in its own section, else one anywhere; "" when nothing is close."""
    name, parent = str(loc[-1]), ".".join(str(p) for p in loc[:-1] if not isinstance(p, int))  # datasets.0.x
    paths = _key_paths(cls)
    # the key of another section (learning_rate → optimizer.learning_rate; lora_rank → lora.rank)
    found = [p for p in paths if name in (p.rpartition(".")[2], p.replace(".", "_"))]
    if not found:  # a typo in its own section (batch_sise → batch_size)
        here = [p.rpartition(".")[2] for p in paths if p.rpartition(".")[0] == parent]
        found = [".".join(filter(None, [parent, c])) for c in difflib.get_close_matches(name, here, n=1)]
    if not found:  # a typo of another section's key (learning_rat → optimizer.learning_rate)
        forms = {p.rpartition(".")[2]: p for p in reversed(paths)} | {p.replace(".", "_"): p for p in paths}
        found = [forms[c] for c in difflib.get_close_matches(name, list(forms), n=1)]
    if not found:
        return ""
    shown = [f"{p!r}" + (f" (flag {options[p]})" if options and p in options else "") for p in found[:4]]
    return f" — did you mean {' or '.join(shown)}?"


def _explain(
    cls: type[BaseModel], err: ValidationError, file: Path | None, given: set[str], flags: Mapping[str, str],
    options: Mapping[str, str] | None = None,
) -> UserError:
    lines, sources = [], set()
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        source = _source(key, file, given, flags) if loc else None
        sources.add(source if source == str(file) else "command line")
        if e["type"] == "extra_forbidden":
            hint = suggest_key(cls, loc, options)
            lines.append(f"unknown key {key!r}{hint}" + (f" (from {source})" if source and source != str(file) else ""))
        elif source is None or e["type"] == "missing":
            lines.append(f"{key}: {e['msg']}")
        else:  # name the value and who gave it: a bad --batch-size must not be blamed on the file
            origin = f"{source}, key {key}" if source == str(file) else source
            lines.append(f"{key}: {e['msg']} (got {_shown(e.get('input'))} from {origin})")
    where = str(file) if file and str(file) in sources else "command line"
    return UserError("; ".join(lines), where=where, fix="see `--help` or docs/configuration.md for the keys")


def load_config(
    cls: type[C],
    file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    flags: Mapping[str, str] | None = None,
    options: Mapping[str, str] | None = None,
) -> C:
    """Build a ``cls`` from an optional config file plus overrides (dotted keys; ``None`` = unset).

    ``flags`` names the command-line option behind each override key (``{"batch_size": "--batch-size"}``),
    so that a validation error blames the option that gave the bad value, not the config file;
    ``options`` names the flag of every key that has one, for the "did you mean" of an unknown key.
    """
    return _validate(cls, read_config_file(file) if file else {}, overrides, file=file, flags=flags, options=options)


def _validate(
    cls: type[C], data: dict[str, Any], overrides: dict[str, Any] | None, *, file: Path | None,
    flags: Mapping[str, str] | None = None, options: Mapping[str, str] | None = None,
) -> C:
    """``data`` with the set ``overrides`` (dotted keys) applied, validated; a failure is one UserError."""
    given = set()
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
            given.add(key)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _explain(cls, e, Path(file) if file else None, given, flags or {}, options) from None


def load_section(
    cls: type[C], data: Mapping[str, Any], overrides: dict[str, Any] | None = None, *, file: Path | None = None,
    section: str = "",
) -> C:
    """Like :func:`load_config`, from one section of an already read file (``sdxl train --prep-config``);
    an error names the file and the section."""
    try:
        return _validate(cls, copy.deepcopy(dict(data)), overrides, file=file)  # the file's dict stays as read
    except UserError as err:
        raise UserError(f"section {section}: {err.what}", where=err.where, fix=err.fix) from None


def dump_config(config: BaseModel, path: Path) -> None:
    """Write the resolved config as YAML (what a user can pass back with --config)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


# Tags that describe how good or how explicit an image is rather than what it shows: a user
# prompts for them on purpose, so flattening their frequency would fight the very conditioning
# they exist for. Matched case-insensitively with "_" read as " ".

"""Config machinery: the Section base, YAML/TOML files plus flag overrides, clear errors.

Each stage's config is a pydantic model with ``extra="forbid"``; :func:`load_config` merges a file
and ``--flag`` overrides (dotted keys for nested sections) and turns validation errors into one
clear :class:`~sdxl_trainer.errors.UserError` with a "did you mean" suggestion for a misspelt key.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

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


def _explain(cls: type[BaseModel], err: ValidationError, source: str) -> UserError:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = _model_at(cls, loc[:-1])
            known = list(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f" — did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
            lines.append(f"unknown key {key!r}{hint}")
        else:
            lines.append(f"{key}: {e['msg']}")
    return UserError("; ".join(lines), where=source, fix="see `--help` or docs/configuration.md for the keys")


def load_config(cls: type[C], file: Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Build a ``cls`` from an optional config file plus overrides (dotted keys; ``None`` = unset)."""
    data = read_config_file(file) if file else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise _explain(cls, e, str(file) if file else "options") from None


def dump_config(config: BaseModel, path: Path) -> None:
    """Write the resolved config as YAML (what a user can pass back with --config)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


# Tags that describe how good or how explicit an image is rather than what it shows: a user
# prompts for them on purpose, so flattening their frequency would fight the very conditioning
# they exist for. Matched case-insensitively with "_" read as " ".

"""Typed configs for every stage: a YAML/TOML file plus flag overrides, unknown keys rejected.

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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sdxl_trainer.errors import UserError


class Section(BaseModel):
    """Base for every config section: unknown keys are an error, values validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class BucketConfig(Section):
    """NovelAI's aspect-ratio bucket algorithm (diffusion-facts.md), SDXL parameters by default."""

    max_area: int = Field(1024 * 1024, gt=0, description="largest w·h of a bucket, in pixels")
    step: int = Field(64, gt=0, description="bucket sides are multiples of this (8 = one latent pixel)")
    min_side: int = Field(512, gt=0, description="shortest bucket side walked")
    max_side: int = Field(2048, gt=0, description="longest bucket side allowed")
    base: int = Field(1024, gt=0, description="the square base resolution, always a bucket")
    fold_below: int = Field(0, ge=0, description="fold buckets with fewer images than this into the nearest one")

    @model_validator(mode="after")
    def _sides(self) -> "BucketConfig":
        for name in ("min_side", "max_side", "base"):
            if getattr(self, name) % self.step:
                raise ValueError(f"buckets.{name}={getattr(self, name)} is not a multiple of step={self.step}")
        if self.step % 8:
            raise ValueError(f"buckets.step={self.step} must be a multiple of 8 (the VAE downsamples by 8)")
        if self.min_side > self.max_side:
            raise ValueError("buckets.min_side must not exceed buckets.max_side")
        return self


class ScanConfig(Section):
    """`sdxl prep scan`: find, validate and bucket every image; write WORK/manifest.parquet."""

    data_dir: Path | None = Field(None, description="folder tree of images with optional .txt sidecars")
    hf_dataset: Path | None = Field(None, description="a local Hugging Face dataset (save_to_disk folder or Parquet)")
    image_column: str | None = Field(None, description="HF dataset image column (auto-detected when unset)")
    caption_column: str | None = Field(None, description="HF dataset caption column (auto-detected when unset)")
    hf_split: str | None = Field(None, description="HF dataset split (the only one, or 'train', when unset)")
    out: Path = Field(..., description="work directory that receives manifest.parquet")
    model: Path | None = Field(None, description="SDXL folder whose tokenizer counts caption chunks")
    fast: bool = Field(False, description="read headers only (no full decode check)")
    min_side: int = Field(256, ge=1, description="skip images whose short side is smaller than this")
    max_pixels: int = Field(120_000_000, gt=0, description="skip larger images (decompression bombs) unallocated")
    workers: int = Field(0, ge=0, description="decode processes; 0 = all cores")
    underscores_to_spaces: bool = Field(False, description="rewrite tag underscores as spaces")
    alpha_background: Literal["white", "black"] = Field("white", description="what transparent pixels become")
    max_chunks: int = Field(3, ge=1, description="75-token chunks a caption may use")
    buckets: BucketConfig = Field(default_factory=BucketConfig)

    @model_validator(mode="after")
    def _one_source(self) -> "ScanConfig":
        if (self.data_dir is None) == (self.hf_dataset is None):
            raise ValueError("give exactly one input: a DATA_DIR folder or --hf-dataset PATH")
        return self


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

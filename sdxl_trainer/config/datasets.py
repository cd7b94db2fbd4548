"""One entry of the scan's ``datasets:`` list (kohya's "subset"): a source and how its images train.

docs/datasets.md describes every key. kohya's spellings ``image_dir`` (for ``path``) and
``class_tokens`` (for ``activation_token``) are accepted; giving both spellings of one key is an error.
Names default to the folder's (or dataset's) name and are made unique by :func:`name_entries`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from sdxl_trainer.config.base import Section

ALIASES = {"image_dir": "path", "class_tokens": "activation_token"}  # kohya spelling → ours
HF_ONLY = ("image_column", "caption_column", "hf_split")
FOLDER_ONLY = ("caption_extension", "folder_repeats")


class DatasetEntry(Section):
    """A folder (``path``) or a local HF dataset (``hf_dataset``), with its repeats and caption options."""

    name: str | None = Field(None, description="rows are <name>/<path in the entry>; default: the folder's name")
    path: Path | None = Field(None, description="folder tree of images with caption sidecars (kohya: image_dir)")
    hf_dataset: Path | None = Field(None, description="a local Hugging Face dataset instead of a folder")
    image_column: str | None = Field(None, description="HF dataset image column (auto-detected when unset)")
    caption_column: str | None = Field(None, description="HF dataset caption column (auto-detected when unset)")
    hf_split: str | None = Field(None, description="HF dataset split (the only one, or 'train', when unset)")
    num_repeats: int = Field(1, ge=1, description="times an epoch shows each image (an N_name folder overrides it)")
    caption_extension: str = Field(".txt", description="the caption sidecar of a.jpg is a<caption_extension>")
    keep_tokens: int | None = Field(None, ge=0, description="first K tags never shuffled or dropped "
                                    "(unset: 1 per activation-token tag when one is set, else the cache's keep_first)")
    activation_token: str | None = Field(None, description="put first in every caption of the entry, kept there "
                                         "(kohya: class_tokens)")
    underscores_to_spaces: bool | None = Field(None, description="tag '_' → ' ' (unset: the top-level value)")
    caption_dropout_rate: float | None = Field(None, ge=0, le=1, description="chance of the empty prompt "
                                               "when training (unset: the trainer's data.p_uncond)")
    folder_repeats: bool | None = Field(None, description="N_name sub-folders repeat N times (unset: top level)")

    @model_validator(mode="before")
    @classmethod
    def _kohya_spellings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for alias, key in ALIASES.items():
            if alias in data:
                if key in data:
                    raise ValueError(f"give {key} or {alias} (kohya's spelling), not both")
                data[key] = data.pop(alias)
        return data

    @model_validator(mode="after")
    def _check(self) -> "DatasetEntry":
        if (self.path is None) == (self.hf_dataset is None):
            raise ValueError("a datasets entry needs exactly one of path (image_dir) or hf_dataset")
        wrong = [k for k in (FOLDER_ONLY if self.hf_dataset is not None else HF_ONLY) if k in self.model_fields_set]
        if wrong:
            kind = "a folder (path)" if self.hf_dataset is not None else "an hf_dataset"
            raise ValueError(f"{', '.join(wrong)} only applies to {kind} entry")
        if not self.caption_extension.startswith(".") or "/" in self.caption_extension or len(self.caption_extension) < 2:
            raise ValueError(f"caption_extension {self.caption_extension!r} must look like '.txt' or '.caption'")
        if self.activation_token is not None and not self.activation_token.strip(" ,\n"):
            raise ValueError("activation_token is empty: drop it or give the token")
        if self.name is not None:
            check_name(self.name)
        return self

    def default_name(self) -> str:
        """The folder's (or dataset's) own name, for an entry without ``name``."""
        source = self.path if self.path is not None else self.hf_dataset
        return Path(source).expanduser().resolve().name or "dataset"


def check_name(name: str) -> None:
    """A name is the first part of its rows' paths: one non-hidden path component."""
    if not name.strip() or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"dataset name {name!r} must be one folder-like word: not empty, no '/', not starting with '.'")


def name_entries(entries: list[DatasetEntry]) -> None:
    """Give each unnamed entry its folder's name, made unique (``photos``, ``photos_2``); named ones must differ."""
    taken: set[str] = set()
    for e in entries:
        if e.name is not None:
            if e.name in taken:
                raise ValueError(f"two datasets entries are named {e.name!r}: names must be unique")
            taken.add(e.name)
    for e in entries:
        if e.name is None:
            base = e.default_name().lstrip(".") or "dataset"
            name, n = base, 1
            while name in taken:
                n += 1
                name = f"{base}_{n}"
            e.name = name
            taken.add(name)

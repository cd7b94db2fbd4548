"""``sdxl prep scan --dataset-config FILE``: the ``datasets:`` list, from our layout or kohya's dataset TOML.

Ours: a YAML or TOML file holding one key, ``datasets:``, the list a ``--config`` file may also hold.
kohya's (sd-scripts ``--dataset_config``): ``[general]``, ``[[datasets]]`` and ``[[datasets.subsets]]``;
each subset becomes one entry, its options looked up subset → dataset → general as kohya does. What
the scan cannot honour is refused (regularisation images, metadata files, caption prefixes); what
belongs to training (resolution, batch size, shuffling) is named in a note and left to `sdxl train`.
The mapping table is in docs/datasets.md.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.markup import escape

from sdxl_trainer import console
from sdxl_trainer.config import read_config_file
from sdxl_trainer.config.datasets import ALIASES, DatasetEntry
from sdxl_trainer.errors import UserError

# kohya subset key → ours. All but image_dir and class_tokens may also sit in [general] or [[datasets]].
KOHYA_KEYS = {"image_dir": "path", "class_tokens": "activation_token", "name": "name", "num_repeats": "num_repeats",
              "caption_extension": "caption_extension", "keep_tokens": "keep_tokens",
              "caption_dropout_rate": "caption_dropout_rate"}  # fmt: skip
SUBSET_ONLY = ("image_dir", "class_tokens", "name")
KOHYA_DEFAULT_EXTENSION = ".caption"  # DreamBoothSubsetParams' default in sd-scripts
TRAINING_KEYS = frozenset((
    "resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
    "bucket_no_upscale", "shuffle_caption", "flip_aug", "color_aug", "random_crop", "face_crop_aug_range",
    "caption_tag_dropout_rate", "caption_dropout_every_n_epochs", "token_warmup_min", "token_warmup_step",
    "keep_tokens_separator", "secondary_separator", "caption_separator", "cache_info", "network_multiplier",
    "debug_dataset", "max_token_length", "resize_interpolation", "skip_image_resolution", "validation_seed",
    "validation_split", "custom_attributes",
))  # fmt: skip
REFUSED = {
    "metadata_file": "kohya fine-tuning metadata (JSON captions) is not read: keep captions as sidecar files",
    "conditioning_data_dir": "ControlNet conditioning images are not supported",
    "caption_prefix": "write it as activation_token in a datasets: list (put first and kept there)",
    "caption_suffix": "append it to the sidecars, or use the cache's variants.quality_tags (append)",
    "mask_dir": "masked loss is not supported",
}
REFUSED_IF_TRUE = {
    "is_reg": "regularisation (prior-preservation) images are not supported: drop that subset",
    "alpha_mask": "masked loss is not supported",
    "enable_wildcard": "caption wildcards are not supported",
}


def read_dataset_config(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The ``datasets:`` entries a file describes, each checked (errors name the file and the entry), and
    notes on what of a kohya file the scan does differently or leaves to training (:func:`print_notes`)."""
    data = read_config_file(path)
    listed = data.get("datasets")
    if not isinstance(listed, list) or not listed or not all(isinstance(d, dict) for d in listed):
        raise UserError("no datasets list: expected datasets: (a list of entries) or kohya's datasets tables",
                        where=str(path), fix="see docs/datasets.md for both layouts")  # fmt: skip
    kohya = [("subsets" in d) for d in listed]
    if any(kohya) and not all(kohya):
        raise UserError("some datasets entries have subsets (kohya's layout) and some do not", where=str(path),
                        fix="give every entry kohya's subsets, or none")
    extra = sorted(set(data) - {"datasets", "general"} if all(kohya) else set(data) - {"datasets"})
    if extra:
        raise UserError(f"unexpected top-level keys {extra}: a dataset config holds only the datasets list",
                        where=str(path), fix="put other scan options in --config or on the command line")
    entries, notes = _from_kohya(data, path) if all(kohya) else ([dict(d) for d in listed], [])
    for i, entry in enumerate(entries):
        try:
            DatasetEntry.model_validate(entry)
        except ValidationError as e:
            errors = "; ".join(_explain(x) for x in e.errors())
            raise UserError(f"datasets entry {i + 1} ({entry.get('path') or entry.get('hf_dataset')}): {errors}",
                            where=str(path), fix="see docs/datasets.md for the keys") from None
    return entries, notes


def print_notes(notes: list[str]) -> None:
    """The notes of :func:`read_dataset_config`, printed once the whole config is known to be valid."""
    for note in notes:
        console.info(f"[yellow]{escape(note)}[/]")


def _explain(error: dict[str, Any]) -> str:
    key = ".".join(map(str, error["loc"])) or "entry"
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, [*DatasetEntry.model_fields, *ALIASES], n=1)
        return f"unknown key {key!r}" + (f" — did you mean {close[0]!r}?" if close else "")
    return f"{key}: {error['msg']}"


def _check_keys(section: dict[str, Any], where: str, path: Path, *, subset: bool) -> None:
    allowed = (set(KOHYA_KEYS) if subset else set(KOHYA_KEYS) - set(SUBSET_ONLY)) | TRAINING_KEYS | set(REFUSED) \
        | set(REFUSED_IF_TRUE)  # fmt: skip
    for key, value in section.items():
        if key in REFUSED or (key in REFUSED_IF_TRUE and value):
            raise UserError(f"{where}: {key} is not supported ({(REFUSED | REFUSED_IF_TRUE)[key]})", where=str(path),
                            fix="remove it (docs/datasets.md lists the kohya keys the scan reads)")
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"{where}: unknown kohya dataset key {key!r}{hint}", where=str(path),
                            fix="docs/datasets.md lists the kohya keys the scan reads")


def _from_kohya(data: dict[str, Any], path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    general = data.get("general") or {}
    if not isinstance(general, dict):
        raise UserError("general must be a table of options", where=str(path), fix="see docs/datasets.md")
    _check_keys(general, "general", path, subset=False)
    entries, ignored, default_ext = [], set(), []
    for i, dataset in enumerate(data["datasets"], 1):
        subsets = dataset.get("subsets")
        if not isinstance(subsets, list) or not subsets or not all(isinstance(x, dict) for x in subsets):
            raise UserError(f"dataset {i} has no subsets", where=str(path),
                            fix="give each dataset at least one subset with an image_dir")
        _check_keys({k: v for k, v in dataset.items() if k != "subsets"}, f"dataset {i}", path, subset=False)
        for j, subset in enumerate(subsets, 1):
            _check_keys(subset, f"dataset {i}, subset {j}", path, subset=True)
            merged = {**general, **dataset, **subset}
            entry = {ours: merged[k] for k, ours in KOHYA_KEYS.items() if k in merged}
            entry["folder_repeats"] = False  # kohya ignores N_name folder names in a dataset config
            if "caption_extension" not in entry:
                entry["caption_extension"] = KOHYA_DEFAULT_EXTENSION
                default_ext.append(str(subset.get("image_dir")))
            ignored |= {k for k in merged if k in TRAINING_KEYS}
            entries.append(entry)
    notes = []
    if default_ext:
        notes.append(f"no caption_extension for {', '.join(default_ext)}: kohya's default {KOHYA_DEFAULT_EXTENSION!r} "
                     "is used (add caption_extension = '.txt' to [general] for .txt sidecars)")
    if any("activation_token" in e for e in entries):
        notes.append("class_tokens is put first in every caption of its subset (kohya uses it only for images "
                     "without a caption file); it is not doubled where a caption already starts with it")
    if ignored:
        notes.append(f"kohya keys for training, not the scan (set them for `sdxl train`): {', '.join(sorted(ignored))}")
    return entries, notes

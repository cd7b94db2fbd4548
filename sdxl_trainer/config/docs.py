"""Every config as a commented YAML template: `sdxl config STAGE` prints one, docs/configuration.md has all.

Regenerate the docs page after changing a config: ``python -m sdxl_trainer.config.docs > docs/configuration.md``
(a test fails while they differ).
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from sdxl_trainer.config.base import list_item_model
from sdxl_trainer.config.evaluate import EvaluateConfig, GenerateConfig
from sdxl_trainer.config.prep import CacheConfig, ScanConfig, StatsConfig, WeightsConfig
from sdxl_trainer.config.train import TrainConfig
from sdxl_trainer.config.vae_train import VaeTrainConfig

STAGES: dict[str, tuple[type[BaseModel], str]] = {
    "scan": (ScanConfig, "sdxl prep scan"),
    "stats": (StatsConfig, "sdxl prep stats"),
    "cache": (CacheConfig, "sdxl prep cache"),
    "weights": (WeightsConfig, "sdxl prep weights"),
    "train": (TrainConfig, "sdxl train"),
    "train-vae": (VaeTrainConfig, "sdxl train-vae"),
    "generate": (GenerateConfig, "sdxl generate"),
    "evaluate": (EvaluateConfig, "sdxl evaluate"),
}


def _value(v: Any) -> str:
    if isinstance(v, BaseModel):
        v = v.model_dump(mode="json")
    if isinstance(v, (tuple, PurePath)):
        v = list(v) if isinstance(v, tuple) else str(v)
    text = yaml.safe_dump(v, default_flow_style=True, width=10_000, allow_unicode=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def template(cls: type[BaseModel], indent: int = 0) -> list[str]:
    """Commented YAML lines: each key with its default (or ``# required``) and its description."""
    pad, lines = "  " * indent, []
    for name, field in cls.model_fields.items():
        nested = _nested_model(field.annotation)
        note = f"  # {field.description}" if field.description else ""
        if nested is not None:
            lines.append(f"{pad}{name}:{note}")
            lines.extend(template(nested, indent + 1))
            continue
        if field.default is PydanticUndefined and field.default_factory is None:
            lines.append(f"{pad}{name}:  # required{' — ' + field.description if field.description else ''}")
            continue
        default = field.default_factory() if field.default_factory is not None else field.default
        lines.append(f"{pad}{name}: {_value(default)}{note}")
        item = list_item_model(field.annotation)
        if item is not None:  # the keys of one entry, commented out: the template stays valid as it is
            keys = template(item, indent + 1)
            lines += [f"{pad}  # - {keys[0].strip()}"] + [f"{pad}  #   {k.strip()}" for k in keys[1:]]
    return lines


def page() -> str:
    """docs/configuration.md."""
    out = [
        "# Configuration",
        "",
        "Every stage reads a YAML (or TOML) file given with `--config`; flags override it, and an unknown key is",
        "an error with a suggestion. `sdxl config STAGE` prints the template below for one stage. Keys are",
        "listed with their defaults; nested sections are written as `section.key` in flags (`--set key=value`).",
        "This page is generated: `python -m sdxl_trainer.config.docs > docs/configuration.md`.",
    ]
    for stage, (cls, command) in STAGES.items():
        out += ["", f"## `{command}` ({stage})", "", (cls.__doc__ or "").strip().splitlines()[0], "", "```yaml"]
        out += template(cls)
        out += ["```"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(page(), end="")

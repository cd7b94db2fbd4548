"""`sdxl train --data-dir DATA --model MODEL --out RUN`: every stage in one command (docs/one-command.md).

scan → [train-vae, with ``--finetune-vae``] → stats (with per-channel latent normalisation) → cache →
weights (with tag weights) → train, into ``RUN/work`` (or ``--work``). Run again after an
interruption, the same command picks up where it stopped:

- **scan** always runs: it is incremental (files unchanged since the manifest are not re-read), so
  images added or removed since the last run are seen;
- **stats**, **cache** and **weights** are skipped when their artifact is *current*: it exists and
  ``WORK/pipeline.json`` records, for it, the digest of what it was made from — the manifest rows it
  reads, its config and the model parts it used — equal to today's. Otherwise the stage runs, and
  ``prep cache`` itself resumes a stopped encoding and re-encodes only rows that changed;
- **train-vae** (``--finetune-vae``: the VAE decoder, into ``RUN/vae/``, vae_train/) resumes from
  ``RUN/vae/checkpoints/latest`` and is skipped when that checkpoint reached its length. The encoder
  is frozen, so the cache and the UNet's training are the same with it or without;
- **train** resumes from ``RUN/checkpoints/latest`` when there is one (``--resume`` unset); a run
  that already reached its length says so and trains nothing.

The staged commands stay the contract for larger jobs (torchrun, a shared WORK, other settings
per stage); this one refuses to run under torchrun. Each stage takes the same WORK/RUN lock as its
staged command.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sdxl_trainer import console, disk
from sdxl_trainer.config import CacheConfig, ScanConfig, StatsConfig, TrainConfig, VaeTrainConfig, WeightsConfig
from sdxl_trainer.config import load_section, read_config_file
from sdxl_trainer.errors import UserError
from sdxl_trainer.schema import read_json, read_table, write_json

STATE = "pipeline.json"
SECTIONS = {"scan": ScanConfig, "stats": StatsConfig, "cache": CacheConfig, "weights": WeightsConfig,
            "vae": VaeTrainConfig}  # vae: `sdxl train-vae`'s keys, used with --finetune-vae
VAE_RUN = "vae"  # RUN/vae/: the --finetune-vae run folder
# the manifest columns each stage's output depends on (a change elsewhere does not make it stale)
READS = {
    "stats": ("id", "path", "source", "bucket_width", "bucket_height"),
    "cache": ("id", "path", "source", "bucket_width", "bucket_height", "tags", "caption", "caption_kind", "n_chunks",
              "keep_tokens"),
    "weights": ("id", "tags"),
}  # fmt: skip
ARTIFACT = {"stats": "latent_stats.json", "cache": "cache/cache_meta.json", "weights": "tag_weights.parquet"}


@dataclass
class DataSource:
    """Where the images come from and how they are bucketed (the one-command flags)."""

    data_dir: Path | None = None
    hf_dataset: Path | None = None
    prep_config: Path | None = None  # sections scan:, stats:, cache:, weights: (each as `sdxl config STAGE`)
    dataset_config: Path | None = None  # a datasets: list, ours or kohya's dataset TOML (docs/datasets.md)
    resolution: str | None = None
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    force_unlock: bool = False
    finetune_vae: bool = False  # train-vae into RUN/vae/ after the scan
    vae_learning_rate: float | None = None
    vae_steps: int | None = None


def _section(file: Path | None, data: dict[str, Any], name: str, fixed: dict[str, Any], extra: dict[str, Any]):
    """A stage's config: its section of --prep-config, the one-command flags, and the paths this path owns."""
    section = dict(data.get(name) or {})
    for key, value in fixed.items():  # WORK, RUN and MODEL come from the command, never from the file
        given = section.get(key)
        if given is not None and Path(given).expanduser().resolve() != Path(value).expanduser().resolve():
            raise UserError(f"{name}.{key} is {given} but the command gives {value}", where=str(file),
                            fix=f"remove {name}.{key} from the file: the one-command path sets it")  # fmt: skip
    return load_section(SECTIONS[name], section, {**extra, **fixed}, file=file, section=name)


def stage_configs(src: DataSource, cfg: TrainConfig) -> dict[str, Any]:
    """The four prep configs the one-command path runs, from --prep-config and the flags."""
    data = read_config_file(src.prep_config) if src.prep_config else {}
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise UserError(f"unknown section(s) {', '.join(unknown)} in the prep config", where=str(src.prep_config),
                        fix=f"use the sections {', '.join(SECTIONS)} (each as `sdxl config STAGE` prints it)")  # fmt: skip
    work, model = Path(cfg.work), Path(cfg.model)
    scan_extra = {"data_dir": src.data_dir, "hf_dataset": src.hf_dataset, "buckets.resolution": src.resolution,
                  "buckets.min_side": src.min_bucket_reso, "buckets.max_side": src.max_bucket_reso}  # fmt: skip
    if src.dataset_config is not None:
        from sdxl_trainer.prep.dataset_config import print_notes, read_dataset_config

        entries, notes = read_dataset_config(src.dataset_config)
        print_notes(notes)
        scan_extra["datasets"] = entries
    scan = data.get("scan") or {}
    if not any(scan_extra.get(k) for k in ("data_dir", "hf_dataset", "datasets")) and \
            not any(scan.get(k) for k in ("data_dir", "hf_dataset", "datasets")):  # fmt: skip
        raise UserError("no images given", fix="give --data-dir DATA (or --hf-dataset, --dataset-config, or "
                        "scan.datasets in --prep-config)")  # fmt: skip
    if data.get("vae") and not src.finetune_vae:
        console.info(f"[yellow]warning: {src.prep_config} has a vae: section; it is used with --finetune-vae only[/]")
    return {
        "vae": _vae_config(src, data, cfg) if src.finetune_vae else None,
        "scan": _section(src.prep_config, data, "scan", {"out": work, "model": model}, scan_extra),
        "stats": _section(src.prep_config, data, "stats", {"work": work, "model": model}, {}),
        "cache": _section(src.prep_config, data, "cache", {"work": work, "model": model}, {}),
        "weights": _section(src.prep_config, data, "weights", {"work": work}, {}),
    }


def _vae_config(src: DataSource, data: dict[str, Any], cfg: TrainConfig) -> VaeTrainConfig:
    """`train-vae`'s config for --finetune-vae: the vae: section of --prep-config, the --vae-* flags, and
    from the train config what the file leaves unset (device, seed, precision, logging)."""
    section = dict(data.get("vae") or {})
    inherited = {"device": cfg.device, "seed": cfg.seed, "logging": cfg.logging.model_dump(mode="json"),
                 "precision": cfg.precision if cfg.precision in ("bf16", "fp32") else "auto"}  # fp16: not for the VAE
    for key, value in inherited.items():
        section.setdefault(key, value)
    fixed = {"work": Path(cfg.work), "model": Path(cfg.model), "out": Path(cfg.out) / VAE_RUN}
    flags = {"optimizer.learning_rate": src.vae_learning_rate, "num_steps": src.vae_steps}
    return _section(src.prep_config, {**data, "vae": section}, "vae", fixed, flags)


def manifest_digest(work: Path, columns: tuple[str, ...]) -> str:
    """SHA-256 of the ok rows' ``columns`` (those present), in path order: what a later stage reads."""
    table, _ = read_table(Path(work) / "manifest.parquet", artifact="manifest", produced_by="sdxl prep scan")
    table = table.filter(pc.equal(table["status"], "ok"))
    table = table.select([c for c in columns if c in table.column_names]).combine_chunks().replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def stage_digest(name: str, stage_cfg: Any, work: Path) -> str:
    """What stage ``name``'s artifact is made from: manifest rows, its config (less WORK), model parts."""
    from sdxl_trainer.models import fingerprint

    config = stage_cfg.model_dump(mode="json", exclude={"work", "overwrite", "allow_model_change"})
    parts: dict[str, Any] = {}
    if name == "stats":
        parts = fingerprint.model_fingerprint(stage_cfg.model, vae=stage_cfg.vae, parts=("vae",))
    elif name == "cache":
        parts = fingerprint.model_fingerprint(stage_cfg.model, vae=stage_cfg.vae, parts=fingerprint.CACHE_PARTS)
    doc = {"manifest": manifest_digest(work, READS[name]), "config": config, "model": parts}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _recorded(work: Path) -> dict[str, str]:
    path = work / STATE
    if not path.is_file():
        return {}
    try:
        return dict(read_json(path, artifact="pipeline_state", produced_by="sdxl train --data-dir").get("stages", {}))
    except UserError:
        return {}  # damaged or foreign: every stage is checked again


def _record(work: Path, name: str, digest: str) -> None:
    stages = _recorded(work)
    stages[name] = digest
    write_json({"stages": stages}, work / STATE, artifact="pipeline_state", config={})


def _damaged(name: str, work: Path) -> str | None:
    """Why a stage's recorded artifact cannot be used as it is (missing, damaged), or None."""
    from sdxl_trainer.cache_format import read_meta
    from sdxl_trainer.cache_format.checksum import quick_check

    path = work / ARTIFACT[name]
    try:
        if name == "cache":
            quick_check(path.parent, read_meta(path.parent))  # every shard there, sizes and footers as recorded
        elif name == "stats":
            read_json(path, artifact="latent_stats", produced_by="sdxl prep stats")
        else:
            read_table(path, artifact="tag_weights", produced_by="sdxl prep weights", columns=["id"])
    except UserError as e:
        return str(e)
    return None


def _prep_stage(name: str, stage_cfg: Any, work: Path, number: str, force_unlock: bool) -> str:
    """Run stage ``name`` unless its artifact is current; returns "ran" or "current"."""
    from sdxl_trainer.prep import cache, stats, weights

    digest = stage_digest(name, stage_cfg, work)
    if _recorded(work).get(name) == digest:
        problem = _damaged(name, work)
        if problem is None:
            console.info(f"── {number} prep {name}: current, skipped ({work / ARTIFACT[name]})")
            return "current"
        console.info(f"[yellow]{problem}: running prep {name} again[/]")
    console.info(f"── {number} prep {name} → {work / ARTIFACT[name]}")
    with disk.one_writer(work, f"prep {name}", force_unlock):
        {"stats": stats.run, "cache": cache.run, "weights": weights.run}[name](stage_cfg)
        _record(work, name, digest)
    return "ran"


def _vae_stage(vae_cfg: VaeTrainConfig, number: str, force_unlock: bool) -> tuple[str, Path]:
    """--finetune-vae: `train-vae` into RUN/vae/, resumed from its latest checkpoint, skipped when that one
    reached the run's length; returns what happened and the finetuned VAE folder (diffusers)."""
    from sdxl_trainer.train.checkpoint_dir import read_latest
    from sdxl_trainer.vae_train import loop as vae_loop

    out = Path(vae_cfg.out)
    latest = read_latest(out)
    if latest is not None and int(latest.removeprefix("step-")) >= vae_cfg.num_steps:
        console.info(f"── {number} train-vae: finished, skipped ({out / 'checkpoints' / latest / 'vae'})")
        return "finished", out / "checkpoints" / latest / "vae"
    if latest is not None and vae_cfg.resume is None:
        console.info(f"{out} has checkpoint {latest}: resuming from it")
        vae_cfg = vae_cfg.model_copy(update={"resume": "latest"})
    console.info(f"── {number} train-vae → {out}")
    with disk.one_writer(out, "train-vae", force_unlock):
        summary = vae_loop.run(vae_cfg)
    return "ran", Path(summary["checkpoint"]) / "vae"


def run(src: DataSource, cfg: TrainConfig) -> dict[str, Any]:
    """Every stage for one folder (or dataset config) and one run; returns train's summary and the stages'."""
    from sdxl_trainer.prep import scan
    from sdxl_trainer.train import loop
    from sdxl_trainer.train.checkpoint_dir import read_latest

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("the one-command path runs in one process, not under torchrun",
                        fix="run the prep stages first (`sdxl prep scan/stats/cache/weights`), then "
                        "`torchrun … sdxl train --work WORK`")  # fmt: skip
    configs = stage_configs(src, cfg)
    work = Path(cfg.work)
    wanted = ["stats"] if cfg.latents.normalization == "per_channel" else []
    wanted += ["cache"] + (["weights"] if cfg.loss.tag_weights else [])
    first = 3 if configs["vae"] is not None else 2  # the number of the first stage after scan (and train-vae)
    total = first + len(wanted)
    done: dict[str, str] = {}
    console.info(f"── 1/{total} prep scan → {work / 'manifest.parquet'}")
    with disk.one_writer(work, "prep scan", src.force_unlock):
        scan.run(configs["scan"])
    done["scan"] = "ran"
    extra: dict[str, Any] = {}
    if configs["vae"] is not None:
        done["train-vae"], vae_folder = _vae_stage(configs["vae"], f"2/{total}", src.force_unlock)
        extra["finetuned_vae"] = str(vae_folder)
    for i, name in enumerate(wanted, start=first):
        done[name] = _prep_stage(name, configs[name], work, f"{i}/{total}", src.force_unlock)
    latest = read_latest(Path(cfg.out))
    if cfg.resume is None and latest is not None:
        console.info(f"{cfg.out} has checkpoint {latest}: resuming from it (a new run needs another --out)")
        cfg = cfg.model_copy(update={"resume": "latest"})
    console.info(f"── {total}/{total} train → {cfg.out}")
    with disk.one_writer(Path(cfg.out), "train", src.force_unlock):
        summary = loop.run(cfg)
    if latest is not None and summary.get("checkpoint") is None:
        console.info(f"the run in {cfg.out} had already reached its length ({summary['steps']} updates): nothing "
                     "trained; raise --num-steps / --num-epochs to extend it")  # fmt: skip
    if "finetuned_vae" in extra:
        console.info(f"finetuned VAE (decoder; pairs with this run's UNet): {extra['finetuned_vae']}")
    return {**summary, **extra, "stages": done}

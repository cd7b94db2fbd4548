"""Load SDXL parts from a local diffusers folder: the only place that calls ``from_pretrained``.

A diffusers SDXL folder holds ``model_index.json`` and one sub-folder per part (``unet/``, ``vae/``,
``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``). Every
loader checks, before any weights are read, that the folder is an SDXL pipeline and that the part it
needs is there, and turns the library's errors into one-line :class:`UserError` messages. Nothing is
ever downloaded (``local_files_only=True``): a Hub id instead of a folder is refused with the command
that fetches it.

Weights saved only as a variant (``diffusion_pytorch_model.fp16.safetensors``, as in a partial copy
of the Hub repository) are found and loaded without the caller naming the variant.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdxl_trainer.errors import UserError

SDXL_PIPELINES = frozenset(
    {
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
        "StableDiffusionXLControlNetPipeline",
    }
)
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip
_WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
    "text_encoder": "model", "text_encoder_2": "model",
}  # fmt: skip

DType = torch.dtype | str
Device = torch.device | str


def resolve_dtype(dtype: DType) -> torch.dtype:
    """``torch.float32`` or one of "fp32", "fp16", "bf16" (and their long spellings) → a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise UserError(f"unknown dtype {dtype!r}", fix=f"use one of {', '.join(sorted(_DTYPES))}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path.name}: {e}", where=str(path)) from e
    if not isinstance(data, dict):
        raise UserError("expected a JSON object", where=str(path))
    return data


def check_sdxl_folder(model_dir: Path | str) -> Path:
    """Check ``model_dir`` is a local diffusers SDXL folder (exists, model_index.json names an SDXL pipeline)."""
    path = Path(model_dir).expanduser()
    if not path.exists():
        hub = str(model_dir).count("/") == 1 and not str(model_dir).startswith((".", "/", "~"))
        fix = (
            "models are never downloaded here; if this is a Hub id, fetch it first "
            f"(`huggingface-cli download {model_dir} --local-dir DIR`) and pass DIR"
            if hub
            else "pass the folder that holds model_index.json, unet/, vae/, text_encoder/ …"
        )
        raise UserError("model folder not found", where=str(path), fix=fix)
    if not path.is_dir():
        raise UserError(
            "not a folder: the model must be a diffusers SDXL folder",
            where=str(path),
            fix="single-file checkpoints are not loaded here; convert the file to a diffusers folder first",
        )
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(
            "no model_index.json",
            where=str(path),
            fix="is this a diffusers SDXL folder? Pass its top folder (the one with model_index.json)",
        )
    cls = _read_json(index).get("_class_name")
    if cls not in SDXL_PIPELINES:
        raise UserError(
            f"model_index.json names {cls!r}, not an SDXL pipeline ({', '.join(sorted(SDXL_PIPELINES))})",
            where=str(path),
            fix="this trainer needs Stable Diffusion XL weights",
        )
    return path


def part_dir(model_dir: Path | str, part: str) -> Path:
    """``model_dir/part`` after checking the folder is SDXL and the part (with its config) is there."""
    root = check_sdxl_folder(model_dir)
    sub = root / part
    if not sub.is_dir():
        raise UserError(f"no {part}/ in {root}", fix=f"is this an SDXL diffusers folder? It needs {', '.join(PARTS)}")
    config = "scheduler_config.json" if part == "scheduler" else None if part.startswith("tokenizer") else "config.json"
    if config and not (sub / config).is_file():
        raise UserError(f"no {part}/{config} in {root}", fix="the part's folder is incomplete; copy it again")
    return sub


def _variant(folder: Path, part: str) -> str | None:
    """None when plain weights exist, else the variant that does (e.g. "fp16" for ``model.fp16.safetensors``)."""
    stem = _WEIGHT_NAMES[part]
    names = {p.name for p in folder.iterdir() if p.name.startswith(stem + ".")}
    plain = {f"{stem}.{ext}" for ext in ("safetensors", "bin", "safetensors.index.json", "bin.index.json")}
    if names & plain:
        return None
    found = {t.split("-")[0] for n in names for t in n.split(".")[1:-1]} - {"safetensors", "bin", "index"}
    if not found:
        raise UserError(
            f"no weights in {folder}", fix=f"expected {stem}.safetensors (or .bin, or a variant such as .fp16)"
        )
    return "fp16" if "fp16" in found else sorted(found)[0]


@contextmanager
def quiet_hf(*, warnings: bool = False):
    """Hide transformers' per-model progress bars (and, with ``warnings=True``, its warnings) inside the block.

    Our own progress bars are the ones a person should see; the warnings hidden are import-time
    notices such as "CLIPImageProcessor requires torchvision", about parts SDXL training never uses.
    """
    from transformers.utils import logging as hf_logging

    was_on, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    if warnings:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if was_on:
            hf_logging.enable_progress_bar()


def _loaded(what: str, where: Path, fn, *args, **kwargs):
    """Call a ``from_pretrained`` and turn a broken or incomplete folder into a UserError."""
    try:
        with quiet_hf():
            return fn(*args, local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {what}: {first}", where=str(where)) from e


def _transformers_dtype_kw() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_clip_tokenizer(folder: Path | str):
    """A CLIP tokenizer from one tokenizer folder (vocab.json + merges.txt, or tokenizer.json)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError("tokenizer folder not found", where=str(folder))
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe and not (folder / "tokenizer.json").is_file():
        # transformers would quietly build a 3-token tokenizer from an empty folder
        raise UserError("no tokenizer files (vocab.json + merges.txt, or tokenizer.json)", where=str(folder))
    tok = _loaded("tokenizer", folder, CLIPTokenizer.from_pretrained, str(folder))
    if tok.bos_token_id is None or tok.eos_token_id is None or len(tok) <= 512:
        raise UserError(f"not a CLIP tokenizer ({len(tok)} tokens, BOS/EOS missing or no merges)", where=str(folder))
    return tok


def load_tokenizers(model_dir: Path | str):
    """``(tokenizer, tokenizer_2)``: CLIP ViT-L's (pads with EOS) and OpenCLIP bigG's (pads with "!")."""
    return tuple(load_clip_tokenizer(part_dir(model_dir, p)) for p in ("tokenizer", "tokenizer_2"))


def load_text_encoders(model_dir: Path | str, *, dtype: DType = torch.float32, device: Device = "cpu"):
    """``(text_encoder, text_encoder_2)``: ``CLIPTextModel`` and ``CLIPTextModelWithProjection``, eval mode."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out = []
    for part, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        sub = part_dir(model_dir, part)
        kw = {_transformers_dtype_kw(): resolve_dtype(dtype), "variant": _variant(sub, part)}
        model, info = _loaded(part, sub, cls.from_pretrained, str(sub), output_loading_info=True, **kw)
        # transformers fills missing weights with random ones and only warns: a wrong folder must not pass.
        bad = sorted(info.get("missing_keys", ())) + sorted(str(k) for k in info.get("mismatched_keys", ()))
        if bad:
            raise UserError(
                f"{part} weights do not fit {cls.__name__}: {len(bad)} missing or mismatched, e.g. {bad[0]}",
                where=str(sub),
                fix=f"{part}/ must hold a {cls.__name__} checkpoint",
            )
        out.append(model.to(device).eval())
    return tuple(out)


def load_vae(
    model_dir: Path | str, *, vae: Path | str | None = None, dtype: DType = torch.float32, device: Device = "cpu"
):
    """The ``AutoencoderKL`` of ``model_dir``, or of ``vae`` (a diffusers AutoencoderKL folder) when given."""
    from diffusers import AutoencoderKL

    if vae is None:
        sub = part_dir(model_dir, "vae")
    else:
        sub = Path(vae).expanduser()
        if not sub.is_dir():
            raise UserError("VAE folder not found", where=str(sub), fix="--vae takes a diffusers AutoencoderKL folder")
        if not (sub / "config.json").is_file() and (sub / "vae" / "config.json").is_file():
            sub = sub / "vae"  # a whole pipeline folder given as --vae: take its VAE
        if not (sub / "config.json").is_file():
            raise UserError("no config.json — not a diffusers AutoencoderKL folder", where=str(sub))
    config = _read_json(sub / "config.json")
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL" or config.get("latent_channels", 4) != 4:
        raise UserError(
            f"{config.get('_class_name')} with {config.get('latent_channels')} latent channels is not an SDXL VAE",
            where=str(sub),
            fix="SDXL needs an AutoencoderKL with 4 latent channels",
        )
    kw = {"torch_dtype": resolve_dtype(dtype), "variant": _variant(sub, "vae")}
    return _loaded("VAE", sub, AutoencoderKL.from_pretrained, str(sub), **kw).to(device).eval()


def load_unet(model_dir: Path | str, *, dtype: DType = torch.float32, device: Device = "cpu"):
    """The SDXL ``UNet2DConditionModel`` (checked to take SDXL's text_time added conditioning)."""
    from diffusers import UNet2DConditionModel

    sub = part_dir(model_dir, "unet")
    config = _read_json(sub / "config.json")
    if config.get("addition_embed_type") != "text_time":
        raise UserError(
            f"unet/config.json has addition_embed_type={config.get('addition_embed_type')!r}, not 'text_time' "
            "— this is not an SDXL UNet",
            where=str(sub),
        )
    kw = {"torch_dtype": resolve_dtype(dtype), "variant": _variant(sub, "unet")}
    return _loaded("UNet", sub, UNet2DConditionModel.from_pretrained, str(sub), **kw).to(device).eval()


def load_scheduler_config(model_dir: Path | str) -> dict[str, Any]:
    """``scheduler/scheduler_config.json`` as a dict (the schedule the weights were trained with)."""
    return _read_json(part_dir(model_dir, "scheduler") / "scheduler_config.json")


@dataclass
class SDXLParts:
    """Everything of an SDXL folder except the scheduler object (see :func:`load_scheduler_config`)."""

    tokenizer: Any
    tokenizer_2: Any
    text_encoder: Any
    text_encoder_2: Any
    vae: Any
    unet: Any
    scheduler_config: dict[str, Any]


def load_pipeline_parts(
    model_dir: Path | str,
    *,
    vae: Path | str | None = None,
    dtype: DType = torch.float32,
    vae_dtype: DType | None = None,
    device: Device = "cpu",
) -> SDXLParts:
    """Load every part; ``vae_dtype`` defaults to ``dtype`` (pass fp32 for the original SDXL VAE under fp16)."""
    tok1, tok2 = load_tokenizers(model_dir)
    te1, te2 = load_text_encoders(model_dir, dtype=dtype, device=device)
    return SDXLParts(
        tokenizer=tok1,
        tokenizer_2=tok2,
        text_encoder=te1,
        text_encoder_2=te2,
        vae=load_vae(model_dir, vae=vae, dtype=vae_dtype or dtype, device=device),
        unet=load_unet(model_dir, dtype=dtype, device=device),
        scheduler_config=load_scheduler_config(model_dir),
    )


# ---- the full-size architecture, from the SDXL base 1.0 configs shipped as package data ----


def sdxl_config_dir() -> Path:
    """The shipped configs of stabilityai/stable-diffusion-xl-base-1.0 (no weights, no tokenizer files)."""
    return Path(__file__).resolve().parent / "configs" / "sdxl-base-1.0"


def read_part_config(part: str, config_dir: Path | str | None = None) -> dict[str, Any]:
    """One part's config (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``scheduler``) as a dict."""
    root = Path(config_dir) if config_dir is not None else sdxl_config_dir()
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    path = root / part / name
    if not path.is_file():
        raise UserError(f"no {part}/{name}", where=str(root))
    return _read_json(path)


def build_sdxl_part(
    part: str, *, config_dir: Path | str | None = None, device: Device = "meta", dtype: DType = torch.float32
):
    """The architecture of one SDXL part with fresh (random, or on ``meta`` unallocated) weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    builders = {
        "unet": lambda c: UNet2DConditionModel.from_config(c),
        "vae": lambda c: AutoencoderKL.from_config(c),
        "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig.from_dict(c)),
        "text_encoder_2": lambda c: CLIPTextModelWithProjection(CLIPTextConfig.from_dict(c)),
    }
    if part not in builders:
        raise UserError(f"unknown SDXL part {part!r}", fix=f"use one of {', '.join(builders)}")
    config = read_part_config(part, config_dir)
    with torch.device(device):
        return builders[part](config).to(resolve_dtype(dtype))

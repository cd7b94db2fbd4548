"""A VAE on its own: the original-layout single file (``vae.safetensors``) and ``--vae PATH`` loading.

The file holds the VAE under the key names of the original (ldm) ``AutoencoderKL`` with no prefix —
``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``, as Stability's
``sdxl_vae.safetensors`` does — which ComfyUI's "Load VAE" and A1111/Forge's VAE setting read. The
names come from the same map the whole-model single file uses (export_ldm.vae_module_table), read
in the other direction to load one back, so the two can never disagree.

:func:`load_vae_any` is what ``--vae`` takes: a diffusers ``AutoencoderKL`` folder (or a folder
with one in ``vae/``: a pipeline, a `sdxl train-vae` checkpoint), or a ``.safetensors`` file with the VAE in the original layout, bare or under
``first_stage_model.`` (a whole-model single file: its VAE). The VAE must have the architecture of
``like`` (the model it decodes for); anything else is a one-line UserError. (A `sdxl train-vae` run
folder is turned into its latest checkpoint by the caller: train/checkpoint_dir.latest_checkpoint.)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdxl_trainer.errors import UserError
from sdxl_trainer.models import export_ldm
from sdxl_trainer.models.loading import DType, load_vae, resolve_dtype

KIND = "vae"  # the header's sdxl_trainer.kind
ENCODER_SIDE = ("encoder.", "quant_conv.")  # what makes the latents; the rest decodes them


def vae_ldm_tensors(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The VAE's tensors under the original layout's names, without the whole-model prefix."""
    ldm = export_ldm.vae_to_ldm(vae.state_dict(), vae.config)
    return {k.removeprefix(export_ldm.VAE_PREFIX): v for k, v in ldm.items()}


def save_vae_file(path: Path | str, vae: torch.nn.Module, *, dtype: DType = "fp32",
                  metadata: Mapping[str, str] | None = None) -> Path:  # fmt: skip
    """Write ``vae`` as one original-layout ``.safetensors`` (new file, written beside it and renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a VAE file ends in .safetensors, got {path.name}")
    if path.exists():
        raise FileExistsError(f"{path} already exists; pick a new path")
    dt = resolve_dtype(dtype)
    tensors = {k: v.detach().to("cpu", dt).contiguous() for k, v in vae_ldm_tensors(vae).items()}
    header = {"format": "pt", "sdxl_trainer.kind": KIND, "sdxl_trainer.layout": "ldm AutoencoderKL",
              "sdxl_trainer.dtype": str(dt).removeprefix("torch.")}  # fmt: skip
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata must map str to str, got {key!r}: {value!r}")
        header[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged or foreign file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot read the safetensors file ({first})", where=str(path),
                        fix="--vae takes a VAE .safetensors or a diffusers AutoencoderKL folder") from e  # fmt: skip


def vae_state_from_file(path: Path | str, like: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The diffusers state dict of ``like``'s architecture read from an original-layout file.

    Every tensor ``like`` has must be there with its shape (attention matrices as 1×1 convs or
    plain); a file that lacks one, or is not a VAE at all, is refused in one line. A file with
    diffusers' own names (a ``vae/`` folder's weights file) is read as it is.
    """
    path = Path(path)
    tensors = _read(path)
    if any(k.startswith(export_ldm.VAE_PREFIX) for k in tensors):  # a whole-model file: its VAE
        tensors = {k.removeprefix(export_ldm.VAE_PREFIX): v for k, v in tensors.items()
                   if k.startswith(export_ldm.VAE_PREFIX)}  # fmt: skip
    target = like.state_dict()
    if set(target) <= set(tensors):  # a diffusers-layout file (vae/diffusion_pytorch_model.safetensors)
        names = {k: k for k in target}
    else:
        names = export_ldm.map_keys(target, export_ldm.vae_module_table(like.config), prefix="", what="VAE")
    missing = [names[k] for k in target if names[k] not in tensors]
    if missing:
        found = "no VAE tensors" if not any(k.startswith(("encoder.", "decoder.")) for k in tensors) else \
            f"{len(missing)} of its {len(target)} tensors missing, e.g. {missing[0]}"
        raise UserError(f"not a VAE of this model's architecture ({found})", where=str(path),
                        fix="pass an SDXL VAE: a vae.safetensors from `sdxl train-vae`, or a diffusers VAE folder")  # fmt: skip
    out = {}
    for key, value in target.items():
        got = tensors[names[key]]
        if got.ndim == 4 and value.ndim == 2 and got.shape[2:] == (1, 1):  # ldm's 1×1 conv attention
            got = got[:, :, 0, 0]
        if got.shape != value.shape:
            raise UserError(f"not a VAE of this model's architecture ({names[key]} is {tuple(got.shape)}, "
                            f"the model's is {tuple(value.shape)})", where=str(path),
                            fix="pass a VAE of the same architecture as the model's")  # fmt: skip
        out[key] = got.to(value.dtype)
    return out


def _check_fits(vae: Any, like: Any, where: Path) -> None:
    keys = ("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels")
    differ = [k for k in keys if list(_as_list(vae.config.get(k))) != list(_as_list(like.config.get(k)))]
    if differ:
        raise UserError(f"this VAE has another architecture than the model's ({', '.join(differ)} differ)",
                        where=str(where), fix="pass a VAE of the same architecture as the model's")  # fmt: skip


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def load_vae_any(path: Path | str, *, like: torch.nn.Module, dtype: DType = torch.float32) -> torch.nn.Module:
    """The VAE at ``path`` (folder, run, or single file; see the module doc), checked to fit ``like``."""
    given = Path(path).expanduser()
    if given.is_file():
        if given.suffix != ".safetensors":
            raise UserError("not a VAE file", where=str(given), fix="--vae takes a .safetensors file or a folder")
        state = vae_state_from_file(given, like)
        from diffusers import AutoencoderKL

        with torch.device("meta"):
            vae = AutoencoderKL.from_config(like.config)
        vae.load_state_dict(state, assign=True, strict=True)
        return vae.to(resolve_dtype(dtype)).eval()
    if not given.is_dir():
        raise UserError("VAE not found", where=str(given),
                        fix="--vae takes a diffusers AutoencoderKL folder or a VAE .safetensors file")  # fmt: skip
    vae = load_vae(None, vae=given, dtype=dtype)
    _check_fits(vae, like, given)
    return vae


def same_encoder(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two VAEs make the same latents: their encoder and quant_conv tensors equal bitwise (in fp32)."""
    sa, sb = ({k: v for k, v in m.state_dict().items() if k.startswith(ENCODER_SIDE)} for m in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)

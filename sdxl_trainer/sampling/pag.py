"""Perturbed-attention guidance's perturbed pass: the UNet with chosen self-attention maps set to the identity.

PAG (Ahn et al. 2024, §4) replaces a self-attention map softmax(QKᵀ/√d) by the identity matrix, so
each token attends only to itself and the layer's output is its value projection through the output
projection: to_out(to_v(h)). The guidance term (diffusion/guidance.py: ``pag``) pushes the sample
away from that structure-blind prediction.

Which layers: diffusers' PAG pipelines name them by a regular expression searched in the module path
of each self-attention (``attn1``) module of the UNet — ``"mid"`` (their SDXL default: every
transformer block of the middle block), ``"up_blocks.0"``, ``"down_blocks.2.attentions.1"``. We take
the same, and also the short form of diffusers' docstrings and of the PAG paper's code,
``"up.block_0"`` / ``"down.block_2.attentions_1"``, translated to those paths.

The swap is scoped to the perturbed pass: inside :func:`perturbed_attention` each chosen module's
processor is wrapped by one that answers the identity only for calls made in this thread (a
``ContextVar``) and delegates to the original otherwise; the last scope to leave puts the original
processor back. So another thread sampling with the same UNet meanwhile gets normal attention, and
the UNet keeps no trace — which matters for the UNet being trained (in-training samples). Under
torch.compile the thread check cannot be traced: there a compiled block whose processor is wrapped is
perturbed for every caller while the scope lasts (one thread at a time; recompiled once per variant).
"""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator

import torch

from sdxl_trainer.errors import UserError

PAG_DEFAULT_LAYERS = ("mid",)  # diffusers' StableDiffusionXLPAGPipeline default; ComfyUI's PAG node: the middle block
_SHORT = re.compile(r"^(down|up)\.block_(\d+)(?:\.attentions_(\d+))?$")
_PERTURBED: ContextVar[frozenset[int]] = ContextVar("sdxl_trainer_pag_perturbed", default=frozenset())
_LOCK = threading.Lock()


def layer_regex(layer: str) -> str:
    """The module-path regex of a layer name: the short form translated, anything else as given."""
    m = _SHORT.match(layer.strip())
    if m is None:
        return layer
    kind, block, attention = m.groups()
    return rf"{kind}_blocks\.{block}\." + ("" if attention is None else rf"attentions\.{attention}\.")


def self_attention_modules(unet: torch.nn.Module) -> list[tuple[str, Any]]:
    """(module path, module) of every self-attention of the UNet, as diffusers' PAG finds them."""
    from diffusers.models.attention_processor import Attention

    return [(n, m) for n, m in unet.named_modules() if isinstance(m, Attention) and not m.is_cross_attention]


def resolve_layers(unet: torch.nn.Module, layers: list[str] | tuple[str, ...]) -> list[Any]:
    """The self-attention modules the PAG layers name, each once (every layer must name at least one)."""
    found = self_attention_modules(unet)
    if not layers:
        raise UserError("pag_layers is empty while pag_scale > 0", fix='name at least one layer, e.g. "mid"')
    chosen: dict[int, Any] = {}
    for layer in layers:
        try:
            pattern = re.compile(layer_regex(layer))
        except re.error as exc:
            raise UserError(f"PAG layer {layer!r} is not a regular expression ({exc})", fix='e.g. "mid"') from None
        hits = [m for n, m in found if pattern.search(n)]
        if not hits:
            blocks = sorted({n.split(".attentions")[0] for n, _ in found})
            raise UserError(f"PAG layer {layer!r} names no self-attention of this UNet",
                            fix=f"name a block with attention: {', '.join(blocks) or 'none has any'}")  # fmt: skip
        chosen.update((id(m), m) for m in hits)
    return list(chosen.values())


def identity_attention(attn: Any, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
    """A diffusers Attention layer whose attention map is the identity: to_out(to_v(h)), with its norms and residual."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    spatial = hidden_states.ndim == 4
    if spatial:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.reshape(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    out = attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))  # to_out = (projection, dropout)
    if spatial:
        out = out.transpose(1, 2).reshape(b, c, h, w)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class _Perturbable:
    """A module's own processor, answering the identity when the calling context perturbs that module."""

    def __init__(self, inner: Any):
        self.inner, self.users = inner, 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        # torch.compile cannot trace ContextVar.get (the trainer compiles each transformer block with
        # fullgraph=True): inside a compiled block a wrapper that is installed means a perturbed pass, right
        # for one thread at a time (the trainer samples on its own thread, between updates)
        if torch.compiler.is_compiling() or id(attn) in _PERTURBED.get():
            return identity_attention(attn, hidden_states, temb)
        if temb is not None:
            kwargs["temb"] = temb
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask, **kwargs)  # fmt: skip


@contextmanager
def perturbed_attention(modules: list[Any]) -> Iterator[None]:
    """Within: these attention modules answer the identity to calls from this context only."""
    with _LOCK:
        for m in modules:
            if not isinstance(m.processor, _Perturbable):
                m.set_processor(_Perturbable(m.processor))
            m.processor.users += 1
    token = _PERTURBED.set(_PERTURBED.get() | {id(m) for m in modules})
    try:
        yield
    finally:
        _PERTURBED.reset(token)
        with _LOCK:
            for m in modules:
                wrapper = m.processor
                if isinstance(wrapper, _Perturbable):
                    wrapper.users -= 1
                    if wrapper.users == 0:
                        m.set_processor(wrapper.inner)


def perturbed_unet_fn(unet: torch.nn.Module, layers: list[str] | tuple[str, ...]):
    """(x, t, **conditioning) → the raw output of the UNet with the layers' self-attention as the identity."""
    modules = resolve_layers(unet, layers)

    def call(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        with perturbed_attention(modules):
            return unet(x, t, return_dict=False, **kwargs)[0]

    return call

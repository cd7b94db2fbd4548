"""fp8 storage for a LoRA's frozen UNet base: weights kept as float8 (e4m3), upcast per layer for the matmul.

A LoRA trains only its adapter, so the base weights are read, never updated; they can be stored at
1 byte a parameter instead of 2 (SDXL UNet: 2.6 GB instead of 5.1 GB), as kohya's ``--fp8_base`` and
OneTrainer's fp8 weights do. Weight-only: every matmul still runs in the autocast (compute) dtype —
bf16 on CUDA too — on a weight dequantised for that one layer and dropped right after.

* What is stored: every frozen ``nn.Linear`` / ``nn.Conv2d`` weight of the UNet — peft's ``base_layer``
  under a LoRA and the layers without one alike — as ``weight`` (float8_e4m3fn) and ``weight_scale``
  (fp32, one per output channel). Biases and normalisation weights (1-D, ~0.1% of SDXL's parameters)
  stay in the frozen dtype the UNet was loaded in; the adapter stays fp32.
* The scale is per output channel and a power of two, the smallest ≥ absmax/448 (448: e4m3's
  largest finite value). Per channel, because one row's range then does not push another row's small
  weights into the subnormals; a power of two, because q·scale is then exact in fp32, bf16 and (all
  but the tiniest rows) fp16: the fp8 base computes *exactly* what a 16-bit base holding the
  dequantised weights computes. The price is at most one binade of range (absmax maps to 224–448).
  e4m3 keeps 3 mantissa bits: a normal value's rounding error is at most 2⁻⁴ of it.
* Memory: a plain ``w.to(bf16) * scale`` in ``forward`` would have autograd save that 16-bit copy of
  every layer's weight for the input gradient — the base's 16-bit size back, in activations. The
  autograd Functions here save only the fp8 weight and its scale (resident anyway) and dequantise
  again in ``backward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdxl_trainer.errors import UserError

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


# ── quantisation ────────────────────────────────────────────────────────────────────────────────


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q in float8_e4m3fn, fp32 scale of shape (out, 1, …)): weight ≈ q·scale, scale a power of two."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True)
    # absmax/448 = m·2^e with m in [0.5, 1): 2^e is the smallest power of two ≥ absmax/448, unless
    # m = 0.5 exactly, when absmax/448 is itself one
    m, e = torch.frexp(absmax / FP8_MAX)
    scale = torch.ldexp(torch.ones_like(absmax), e - (m == 0.5).int())
    scale = torch.where(absmax > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale is exact
    return (w / scale).to(FP8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q·scale in ``dtype``. The product is formed in fp32 (exact: scale is a power of two), so a row
    whose scale is below fp16's range does not flush to zero on the way."""
    return (q.float() * scale).to(dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in here: the autocast dtype when autocast is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# ── the layers: forward and backward both dequantise, only the fp8 weight is saved ─────────────


class _LinearFp8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, scale, bias):
        ctx.save_for_backward(q, scale)
        return F.linear(x, dequantize(q, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        q, scale = ctx.saved_tensors  # weight and bias are frozen: only the input's gradient
        return grad.matmul(dequantize(q, scale, grad.dtype)), None, None, None


class _Conv2dFp8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, scale, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(q, scale)
        ctx.geometry = (x.shape, stride, padding, dilation, groups)  # the input's shape, not the input
        return F.conv2d(x, dequantize(q, scale, x.dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        q, scale = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.geometry
        w = dequantize(q, scale, grad.dtype)
        grad_x = torch.nn.grad.conv2d_input(shape, w, grad, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None, None


class _Fp8Layer(nn.Module):
    """Shared by both layers: the frozen fp8 weight, its scale, and the dtype cast of the input."""

    def _store(self, layer: nn.Linear | nn.Conv2d, where: str) -> None:
        w = layer.weight
        # e4m3fn has no inf, and a NaN row would hide in its scale; (a meta-device model has no values)
        if w.device.type != "meta" and not torch.isfinite(w).all():
            raise UserError(f"the UNet weight {where}.weight is not finite", where=where,
                            fix="check the model folder (a damaged or mis-converted file?)")  # fmt: skip
        q, scale = quantize(layer.weight)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.bias = layer.bias  # frozen, in the dtype the UNet was loaded in

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        dtype = compute_dtype(x)
        return x.to(dtype), None if self.bias is None else self.bias.to(dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, dtype)


class Fp8Linear(_Fp8Layer):
    """``nn.Linear`` with a frozen fp8 weight; same ``weight``/``bias`` names, plus ``weight_scale``."""

    def __init__(self, linear: nn.Linear, *, where: str = "?"):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._store(linear, where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, bias = self._inputs(x)
        return _LinearFp8.apply(x, self.weight, self.weight_scale, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Fp8Conv2d(_Fp8Layer):
    """``nn.Conv2d`` (zero padding given as numbers) with a frozen fp8 weight."""

    def __init__(self, conv: nn.Conv2d, *, where: str = "?"):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"{where}: fp8 storage supports zero padding given as numbers, "
                             f"not padding={conv.padding!r}, padding_mode={conv.padding_mode!r}")  # fmt: skip
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self._store(conv, where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, bias = self._inputs(x)
        return _Conv2dFp8.apply(x, self.weight, self.weight_scale, bias, self.stride, self.padding, self.dilation,
                                self.groups)  # fmt: skip

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")  # fmt: skip


# ── the UNet ────────────────────────────────────────────────────────────────────────────────────


def store_base_fp8(unet: nn.Module) -> nn.Module:
    """Replace every frozen Linear/Conv2d of ``unet`` (after ``add_lora``) by its fp8 twin, in place.

    Call it on the CPU, before moving the UNet to the device, so the device never holds the 16-bit
    base. Trainable layers (the adapter's ``lora_A``/``lora_B``) are left alone.
    """
    if not any(p.requires_grad for p in unet.parameters()):
        raise ValueError("store_base_fp8 is for a LoRA's frozen base: add the adapter first (add_lora)")
    # names, not modules: a list of the modules would keep every 16-bit weight alive until the end
    # (SDXL: the CPU would hold 5.1 + 2.6 GB at the peak instead of 5.1)
    names = [name for name, m in unet.named_modules()
             if type(m) in (nn.Linear, nn.Conv2d) and not m.weight.requires_grad]  # fmt: skip
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        module = getattr(parent, child)
        twin = Fp8Linear if isinstance(module, nn.Linear) else Fp8Conv2d
        setattr(parent, child, twin(module, where=name))
    # DDP broadcasts every parameter at wrap time, and gloo cannot send float8. The frozen base needs
    # no broadcast: every rank quantised the same file the same way.
    ignore = [f"{name}.{p}" for name, _ in fp8_layers(unet) for p in ("weight", "weight_scale")]
    unet._ddp_params_and_buffers_to_ignore = [*getattr(unet, "_ddp_params_and_buffers_to_ignore", []), *ignore]
    return unet


def fp8_layers(unet: nn.Module) -> list[tuple[str, _Fp8Layer]]:
    return [(name, m) for name, m in unet.named_modules() if isinstance(m, _Fp8Layer)]


def stored_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers by dtype name ('float8_e4m3fn', 'bfloat16', …), counted once each."""
    seen, out = set(), {}
    for t in (*module.parameters(), *module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        key = str(t.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out

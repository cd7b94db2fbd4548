"""The optional adversarial term of `sdxl train-vae` (``loss.gan_weight`` > 0; docs/vae.md).

A patch discriminator in the manner of the SD VAE recipe: a stack of 4×4 convolutions, the first
``layers`` of stride 2, channels doubling from ``channels`` up to 8×, GroupNorm and LeakyReLU(0.2)
between them, and a last convolution giving one score per overlapping patch (70 px square at 3
layers). GroupNorm rather than the recipe's BatchNorm: no running statistics, so the saved state is
the weights and the optimiser, and a score does not depend on the rest of its batch.

Hinge losses, on pixels in [−1, 1] (the VAE's range; the decoded image is not clamped):

- discriminator: ``½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂)))``, x̂ detached;
- generator term added to the decoder's pixel loss: ``w · (−mean D(x̂))``, with
  ``w = gan_weight · clamp(|∇ pixel loss| / (|∇ −D(x̂)| + 1e-4), 0, 1e4)`` taken at the decoder's
  last layer (``decoder.conv_out.weight``) when ``gan_adaptive``, else ``w = gan_weight``.

Both only after ``gan_start_step`` updates: before, the discriminator neither trains nor adds to
the loss (the decoder first learns the pixels; a discriminator judging a poor decoder learns little).
It trains in fp32 with Adam at a constant rate, once per decoder update, on the same crops.
Its initial weights come from a generator seeded by the run's seed (N(0, 0.02), the recipe's).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sdxl_trainer.train.checkpoint_dir import flatten_state

ADAPTIVE_MAX = 1e4


def min_crop(layers: int) -> int:
    """The smallest crop the discriminator scores at least one patch of: ``3 · 2^layers`` px."""
    return 3 * 2**layers


class PatchDiscriminator(nn.Module):
    """[B, 3, H, W] in [−1, 1] → [B, 1, h, w] patch scores (unbounded)."""

    def __init__(self, *, channels: int = 64, layers: int = 3):
        super().__init__()
        widths = [channels * min(2**i, 8) for i in range(layers + 1)]
        body: list[nn.Module] = [nn.Conv2d(3, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, layers + 1):
            stride = 2 if i < layers else 1  # the last widening conv keeps the size, as the recipe's
            body += [nn.Conv2d(widths[i - 1], widths[i], 4, stride=stride, padding=1, bias=False),
                     nn.GroupNorm(math.gcd(32, widths[i]), widths[i]), nn.LeakyReLU(0.2)]  # fmt: skip
        body.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.body = nn.Sequential(*body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.normal_(0.0, 0.02, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.GroupNorm):
                module.weight.normal_(1.0, 0.02, generator=generator)
                module.bias.zero_()


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.relu(1.0 - real).mean() + torch.relu(1.0 + fake).mean())


class Adversary:
    """The discriminator, its optimiser, and the two calls the update makes: :meth:`generator_term` while
    building the decoder's loss, :meth:`update` after the decoder stepped. ``None`` in the loop when off."""

    def __init__(self, cfg: Any, device: torch.device):
        d, loss = cfg.discriminator, cfg.loss
        self.weight, self.start, self.adaptive = loss.gan_weight, loss.gan_start_step, loss.gan_adaptive
        self.net = PatchDiscriminator(channels=d.channels, layers=d.layers)
        self.net.init_weights(torch.Generator().manual_seed(cfg.seed + 0x5EED))
        self.net.to(device).train()
        lr = d.learning_rate if d.learning_rate is not None else cfg.optimizer.learning_rate
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr, betas=tuple(d.betas))

    def active(self, step: int) -> bool:
        """Whether update number ``step + 1`` (``step`` updates done) has the adversarial term."""
        return step >= self.start

    def generator_term(self, decoded: torch.Tensor, pixel_loss: torch.Tensor,
                       last_layer: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
        """``w · (−mean D(x̂))`` for the decoder's loss (D's weights get no gradient from it) and what to log."""
        self.net.requires_grad_(False)
        try:
            g_loss = -self.net(decoded.float()).mean()
        finally:
            self.net.requires_grad_(True)
        weight = torch.tensor(self.weight, device=decoded.device)
        if self.adaptive:
            pixel_grad = torch.autograd.grad(pixel_loss, last_layer, retain_graph=True)[0]
            g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
            ratio = pixel_grad.norm() / (g_grad.norm() + 1e-4)
            weight = weight * ratio.clamp(0.0, ADAPTIVE_MAX).detach()
        return weight * g_loss, {"g_loss": float(g_loss.detach()), "gan_w": float(weight)}

    def update(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, Any]:
        """One hinge step on real crops and (detached) decoded ones, both in [−1, 1]; a non-finite loss skips it."""
        d_loss = hinge_d_loss(self.net(real), self.net(fake.detach().float()))
        self.optimizer.zero_grad(set_to_none=True)
        skipped = not bool(torch.isfinite(d_loss))
        if not skipped:
            d_loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"d_loss": float(d_loss.detach()), "d_skipped": skipped}

    # ── checkpoint ──────────────────────────────────────────────────────────────────────────────
    def state_dict(self) -> dict[str, Any]:
        return {"weights": {k: v.detach() for k, v in self.net.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])

    def checked(self) -> dict[str, dict[str, torch.Tensor]]:
        """What the finite-weights refusal checks before a checkpoint."""
        return {"discriminator weights": dict(self.net.state_dict()),
                "discriminator optimizer state": flatten_state(self.optimizer.state_dict())[0]}  # fmt: skip

"""Why the demo's baseline cannot reach black: who decides the image mean at the top noise level?

Run after `sdxl demo --out DIR`:  python scripts/demo_probe.py DIR  [--json OUT.json]

For each trained demo model, at its highest noise level (eps and v: σ = 14.6; v_ztsnr: σ = 20000;
flow: t = 1), it feeds a noised solid-white image while asking for black (and the reverse), and pure
noise with each prompt, and reads where the model's x0 estimate puts the image mean on a scale from
0 (the black image's latent mean) to 1 (the white one's), averaged over 8 noise draws. A model that
takes the mean from its input answers ≈1 to "fed white, asked black"; one that takes it from the
prompt answers ≈0. See docs/demo.md for the measured table and what it means.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from sdxl_trainer.evaluate.checkpoint import load_generator
from sdxl_trainer.sampling.black import DEFAULT_PROMPTS
from sdxl_trainer.sampling.generator import encode_text, unet_kwargs
from sdxl_trainer.sampling.sample import unet_fn
from sdxl_trainer.models.vae_fit import to_pixels

DRAWS = 8


@torch.no_grad()
def probe(run: Path) -> dict[str, float]:
    g = load_generator(run, device="cpu", dtype="fp32")
    denoise = g.objective.denoiser(unet_fn(g), dtype=g.dtype)
    flow = g.objective.prediction == "flow"
    top = 1.0 if flow else float(g.objective.sigma_max)
    side = g.base_resolution
    view = (1, -1, 1, 1)
    z = {}
    for kind, value in (("black", 0), ("white", 255)):
        px = to_pixels(Image.new("RGB", (side, side), (value,) * 3), area=side * side)[None]
        raw = g.vae.encode(px).latent_dist.mean
        z[kind] = (raw - g.latent_shift.view(view)) * g.latent_scale.view(view)
    gap = float((z["white"] - z["black"]).mean())

    def position(image: str | None, prompt: str) -> float:
        (hidden, pooled), _ = encode_text(g, [DEFAULT_PROMPTS[prompt]], [""])
        cond = unet_kwargs(hidden, pooled, height=side, width=side)
        out = []
        for seed in range(DRAWS):
            eps = torch.randn(z["black"].shape, generator=torch.Generator().manual_seed(seed))
            x0 = z[image] if image else torch.zeros_like(eps)
            x = (1 - top) * x0 + top * eps if flow else x0 + top * eps
            d = denoise(x, torch.tensor([top]), **cond)
            out.append(float((d - z["black"]).mean()) / gap)
        return sum(out) / len(out)

    return {
        "top_noise": top,
        "fed_white_asked_black": position("white", "black"),
        "fed_black_asked_white": position("black", "white"),
        "noise_asked_black": position(None, "black"),
        "noise_asked_white": position(None, "white"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_dir", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results = {}
    for run in sorted((args.demo_dir / "runs").iterdir()):
        results[run.name] = probe(run)
    cols = ("top_noise", "fed_white_asked_black", "fed_black_asked_white", "noise_asked_black", "noise_asked_white")
    print("position of the x0 estimate's mean: 0 = black image, 1 = white image (mean of %d draws)" % DRAWS)
    print(f"{'model':10s} " + " ".join(f"{c:>22s}" for c in cols))
    for name, r in results.items():
        print(f"{name:10s} " + " ".join(f"{r[c]:22.2f}" for c in cols))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

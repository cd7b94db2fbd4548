"""The sampling core: a model in memory → images and the numbers of the checks on them.

Both `evaluate` (a checkpoint loaded from disk: `sdxl generate`, `sdxl evaluate`) and `train` (the
UNet being trained, for in-training samples) render through this package, so an image rendered
during training and `sdxl generate` on the checkpoint saved at that step run the same code: the
same sampler, σ_max / flow shift, guidance and latent normalisation (GUIDE.md, "in-training samples
that look worse than the real model").

- ``generator``: :class:`Generator` (UNet, VAE, text, objective, latent normalisation), text
  encoding, SDXL's conditioning, decoding;
- ``sample``: sampler choice, sampling levels, one image's latents, generation parameters;
- ``images``: PNGs with their parameters, thumbnails, labelled grids;
- ``black``, ``coherence``, ``progressive``: the checks' computations (their report files — CSVs,
  plots — are written by `evaluate`).

Loading a checkpoint from disk is not here: it needs the training checkpoint layout, which lives
in `train` (evaluate/checkpoint.py does it). Imports: diffusion, models, console, errors.
"""

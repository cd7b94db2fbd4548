"""Sampling from a checkpoint on disk and the evaluation report (docs/evaluate.md).

Entry points: ``generate.run(GenerateConfig)`` (`sdxl generate`) and ``report.run(EvaluateConfig)``
(`sdxl evaluate`). For code: ``checkpoint.load_generator(path, …) -> Generator``; the sampling and
the checks' computations are the sampling core's (``sampling.sample.sample_latents`` /
``generate_images``, ``sampling.black.black_image_metrics(generator, …)``), shared with the trainer.
Nothing is imported here, so importing the package stays cheap.
"""

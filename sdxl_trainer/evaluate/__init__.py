"""Sampling from a checkpoint and the evaluation report (docs/evaluate.md).

Entry points: ``generate.run(GenerateConfig)`` (`sdxl generate`) and ``report.run(EvaluateConfig)``
(`sdxl evaluate`). For code: ``checkpoint.load_generator(path, …) -> Generator``,
``generate.sample_latents`` / ``generate_images``, ``black.black_image_metrics(generator, …)``.
Nothing is imported here, so importing the package stays cheap.
"""

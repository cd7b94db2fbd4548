"""Typed configs for every stage: a YAML/TOML file plus flag overrides, unknown keys rejected.

``base`` holds the machinery (Section, load_config, dump_config); one module per stage family holds
its configs. Everything is re-exported here, so callers write ``from sdxl_trainer.config import X``.
Every key, its default and its meaning: docs/configuration.md (``sdxl config STAGE`` prints them).
"""

from sdxl_trainer.config.base import Precision, Section, dump_config, load_config, load_section, read_config_file
from sdxl_trainer.config.evaluate import EvaluateConfig, GenerateConfig, SamplingSection
from sdxl_trainer.config.prep import (
    DEFAULT_IGNORE_PREFIXES,
    DEFAULT_IGNORE_TAGS,
    BucketConfig,
    CacheConfig,
    CaptionVariantsConfig,
    ScanConfig,
    StatsConfig,
    WeightsConfig,
)
from sdxl_trainer.config.samples import SampleChecksSection, SamplesSection
from sdxl_trainer.config.train import (
    CheckpointSection,
    EMASection,
    LatentSection,
    LoggingSection,
    LoraSection,
    LossSection,
    ObjectiveSection,
    OptimizerSection,
    ScheduleSection,
    TrainConfig,
    TrainDataSection,
    ValidationSection,
)
from sdxl_trainer.config.vae_train import VaeTrainConfig

__all__ = [
    "DEFAULT_IGNORE_PREFIXES", "DEFAULT_IGNORE_TAGS", "BucketConfig", "CacheConfig",
    "CaptionVariantsConfig", "CheckpointSection", "EMASection", "EvaluateConfig", "GenerateConfig", "LatentSection",
    "LoggingSection", "LoraSection", "LossSection", "ObjectiveSection", "OptimizerSection", "Precision",
    "SampleChecksSection", "SamplesSection", "SamplingSection", "ScanConfig", "ScheduleSection", "Section", "StatsConfig", "TrainConfig", "TrainDataSection",
    "ValidationSection", "VaeTrainConfig", "WeightsConfig", "dump_config", "load_config", "load_section", "read_config_file",
]  # fmt: skip

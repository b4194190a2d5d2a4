"""A run's configuration: typed dataclasses (`sections`), what they say about themselves (`fields`), their checks
(`checks`), and reading them from presets, the command line and saved runs (`loading`)."""

from loop.config.fields import (
    FIXED_ON_RESUME,
    NEVER_COMPARED,
    NOT_FIXED_ON_RESUME,
    config_differences,
    field_docs,
    field_types,
    flat_hparams,
    flatten,
    option_names,
    resolve_path,
    to_dict,
)
from loop.config.sections import (
    SECTIONS,
    AugmentConfig,
    DataConfig,
    EvalConfig,
    GuardSet,
    MixSource,
    ModelConfig,
    RunConfig,
    SourceConfig,
    TrainConfig,
    source_of,
)
from loop.config.types import (
    HUB_ID,
    MIXED_PRECISION,
    PRESETS_DIR,
    PROJECT_ROOT,
    ConfigError,
    MixedPrecision,
    Pattern,
    Range,
)

__all__ = [
    "FIXED_ON_RESUME", "HUB_ID", "MIXED_PRECISION", "NEVER_COMPARED", "NOT_FIXED_ON_RESUME", "PRESETS_DIR",
    "PROJECT_ROOT", "SECTIONS", "AugmentConfig", "ConfigError", "DataConfig", "EvalConfig", "GuardSet",
    "MixSource", "MixedPrecision", "ModelConfig", "Pattern", "Range", "RunConfig", "SourceConfig", "TrainConfig",
    "config_differences", "field_docs", "field_types", "flat_hparams", "flatten", "option_names", "resolve_path",
    "source_of", "to_dict",
]

"""Run configuration: typed sections (`schema`) and their CLI/YAML front end (`args`)."""
from .args import build_parser, load_yaml_overrides, parse_config, to_flat_dict
from .schema import (
    CheckpointArgs, ConfigError, DataArgs, DistillArgs, LoggingArgs, ModelArgs, ParallelArgs,
    RunConfig, TrainArgs,
)

__all__ = [
    "RunConfig", "ConfigError", "parse_config", "build_parser", "load_yaml_overrides", "to_flat_dict",
    "ModelArgs", "ParallelArgs", "TrainArgs", "CheckpointArgs", "LoggingArgs", "DistillArgs", "DataArgs",
]

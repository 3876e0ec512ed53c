"""Run configuration: typed sections (`schema`), the run and its checks (`run`, `checks`) and the
front end on Megatron-LM's parser (`args`)."""
from .args import ParsedRun, build_parser, load_yaml_overrides, parse_config, parse_run, to_flat_dict
from .run import RunConfig
from .schema import (
    CheckpointArgs, ConfigError, DataArgs, DistillArgs, EvalArgs, LoggingArgs, ModelArgs, ParallelArgs, TrainArgs,
)

__all__ = [
    "RunConfig", "ConfigError", "parse_run", "ParsedRun", "parse_config", "build_parser", "load_yaml_overrides",
    "to_flat_dict", "ModelArgs", "ParallelArgs", "TrainArgs", "CheckpointArgs", "LoggingArgs", "DistillArgs",
    "DataArgs", "EvalArgs",
]

"""The torch-free config layer: every setting's type, default and check, and the one function that turns
the composed Hydra config into a validated RunConfig.

- fields.py    ConfigError (one line naming the field) and the unknown-field check
- model.py     ModelConfig, parameter and FLOP counts, the model presets
- hf_model.py  Hugging Face's config.json <-> ModelConfig
- sections.py  the train / optim / parallel / data / fault / peft / task sections, the names each choice may take,
               the prompt templates by name
- layout.py    whether a parallel layout can shard a model over N processes (and what a pipeline needs of the batch)
- pipeline.py  the layers of every pipeline stage / model chunk, balanced with the embedding and head weights
- run.py       RunConfig and resolve()
- compose.py   the config train.py would see, for tools and tests
- mixtures.py  published data mixtures (LLaMA Table 1)
"""
from .compose import compose_config
from .fields import ConfigError, reject_unknown_fields
from .layout import validate_layout
from .model import PRESETS, ModelConfig, count_parameters, flops_per_token, get_preset
from .run import RunConfig, resolve
from .pipeline import describe_split, stage_layers
from .sections import (ACTIVATION_MODES, ATTENTION_BACKENDS, COMM_BACKENDS, PIPELINE_SCHEDULES, PRECISIONS, TASKS,
                       ZERO_STAGES, DataConfig,
                       FaultConfig, OptimConfig, ParallelConfig, PeftConfig, TaskConfig, TrainConfig, known_templates,
                       template_file)

__all__ = ["ACTIVATION_MODES", "ATTENTION_BACKENDS", "COMM_BACKENDS", "ConfigError", "DataConfig", "FaultConfig",
           "ModelConfig", "OptimConfig", "PIPELINE_SCHEDULES", "PRECISIONS", "PRESETS", "ParallelConfig", "PeftConfig",
           "RunConfig", "TASKS", "TaskConfig", "TrainConfig", "ZERO_STAGES", "compose_config", "count_parameters",
           "flops_per_token", "describe_split", "get_preset", "known_templates", "reject_unknown_fields", "resolve",
           "stage_layers", "template_file", "validate_layout"]

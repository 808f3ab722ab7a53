"""The config train.py sees, composed from configs/ and Hydra overrides without starting a run.

For the tools that check or plan a run before launching it (python -m llama_pt.train.check,
python -m llama_pt.plan) and for tests. Torch-free.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def compose_config(overrides: list[str], config_dir: Path = REPO_CONFIGS, name: str = "config") -> dict[str, Any]:
    """The composed config as a plain dict, every interpolation resolved (Hydra's run dir stands in for
    the output folder, as when train.py runs)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    cfg.hydra.runtime.output_dir = cfg.hydra.run.dir
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_container(cfg, resolve=True)

"""A Hydra app whose multirun is an Optuna sweep (hydra-optuna-sweeper) launched onto Slurm
(hydra-submitit-launcher): the sweeper asks and tells trials in the driver, each trial runs
as a Slurm job. Run as:

    python sweep.py --multirun "$(pgjob url --format hydra --wait 300)"
"""
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base=None, config_path="conf", config_name="config")
def train(cfg: DictConfig) -> float:
    # where the trial ran, for the test to see that Slurm ran it on a node
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "node.txt").write_text(os.environ.get("SLURMD_NODENAME", "no-slurm"))
    return (cfg.x - 1.0) ** 2 + cfg.layers


if __name__ == "__main__":
    train()

"""The training loop under Ray Train: TorchTrainer starts `num_workers` processes with a
torch process group (NCCL on GPUs, gloo on CPUs); inside each, the same `train()`
runs and Accelerate picks the group up from the environment Ray sets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import TrainConfig


def _worker(config: dict[str, Any]) -> None:
    import ray.train

    context = ray.train.get_context()
    # Accelerate reads the usual torchrun variables; Ray Train has already made the process group.
    os.environ.update(RANK=str(context.get_world_rank()), WORLD_SIZE=str(context.get_world_size()),
                      LOCAL_RANK=str(context.get_local_rank()), LOCAL_WORLD_SIZE=str(context.get_local_world_size()))
    from .trainer import train

    result = train(TrainConfig(**config))
    ray.train.report({"global_step": result["global_step"], "loss": result["losses"][-1] if result["losses"] else None})


def train_on_ray(cfg: TrainConfig, log=print):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from common.ray_session import init_ray

    init_ray()
    use_gpu = cfg.gpus_per_worker > 0
    scaling = ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                            resources_per_worker={"GPU": cfg.gpus_per_worker} if use_gpu else {"CPU": 1})
    trainer = TorchTrainer(_worker, train_loop_config={**cfg.model_dump(), "ray": False}, scaling_config=scaling,
                           torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                           run_config=RunConfig(storage_path=str(Path(cfg.output_dir).resolve() / "ray_train"),
                                                name="controlforge"))
    result = trainer.fit()
    if result.error:
        raise result.error
    log(f"Ray Train finished: {cfg.num_workers} workers, model in {cfg.output_dir}")
    return result

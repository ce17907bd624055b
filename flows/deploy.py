"""Scheduled retraining: serve `train-pipeline` as Prefect deployments, one per config.

Each config's `schedule.cron` (and timezone) becomes the deployment's schedule;
runs never overlap for one config. Needs a running Prefect server:

    prefect server start            # UI on http://127.0.0.1:4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deploy configs/breast_ultrasound.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import serve
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import RunnerDeployment

from configs import load_config
from flows.pipeline import train_pipeline


def build_deployment(config_path: Path) -> RunnerDeployment:
    """A deployment that retrains from `config_path` on the config's cron schedule."""
    config = load_config(config_path, check_paths=False)  # data may arrive before the first run
    return train_pipeline.to_deployment(
        name=f"{config.name}-scheduled",
        schedule=CronSchedule(cron=config.schedule.cron, timezone=config.schedule.timezone),
        parameters={"config_path": str(config_path)},
        concurrency_limit=1,
        tags=["medxfer", config.name],
        description=f"Retrain {config.registry.model_name} from {config_path}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=Path)
    args = parser.parse_args()
    serve(*(build_deployment(path) for path in args.configs))


if __name__ == "__main__":
    main()

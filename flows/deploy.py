"""Deploy-time steps that prefect.yaml runs (`prefect deploy`): what it reads from the configs.

The deployments themselves are in prefect.yaml; a training deployment's schedule is the
config's `schedule`, and a PACS scoring deployment's its `pacs.scoring` cron, read here at
deploy time, so each cron lives in one place.
"""

from __future__ import annotations

from configs import load_config


def config_schedule(config_path: str) -> dict[str, str]:
    """prefect.yaml build step: the config's `schedule` as {"cron", "timezone"}.

    The data need not exist yet (it may arrive before the first run), but the config
    must be valid: a typo fails the deploy, not the first scheduled run."""
    schedule = load_config(config_path, check_paths=False).schedule
    return {"cron": schedule.cron, "timezone": schedule.timezone}


def pacs_scoring_schedule(config_path: str) -> dict[str, str]:
    """prefect.yaml build step: the config's `pacs.scoring` scan schedule as {"cron", "timezone"}."""
    pacs = load_config(config_path, check_paths=False).pacs
    if pacs is None:
        raise ValueError(f"{config_path}: a PACS scoring deployment needs a pacs section")
    return {"cron": pacs.scoring.cron, "timezone": pacs.scoring.timezone}

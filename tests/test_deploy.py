from configs import CONFIG_DIR
from flows.deploy import build_deployment


def test_deployment_carries_the_config_schedule_and_parameters():
    config_path = CONFIG_DIR / "breast_ultrasound.yaml"
    deployment = build_deployment(config_path)
    assert deployment.name == "breast_ultrasound-scheduled"
    assert deployment.parameters == {"config_path": str(config_path)}
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 2 * * 0" and schedule.schedule.timezone == "UTC"
    assert deployment.concurrency_limit == 1

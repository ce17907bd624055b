"""What the ops team sees, in a real browser: Playwright drives Debian's chromium (headless)
over the Prefect UI of the real server and the MLflow UI of a real `mlflow server`, after the
runs of tests/ops_runs.py.

Each test saves a full-page screenshot of what it asserted on as `<name>.png` in its own
tmp_path (pytest keeps the folders of failed tests: /tmp/pytest-of-<user>/pytest-<n>/<test name>0/).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from flows.run_links import MLFLOW_RUN_URL_PREFIX
from tasks.register import CHAMPION

STAGES = ("ingest", "preprocess", "train", "domain", "evaluate", "explain", "export", "register", "model-card")
WAIT_MS = 60_000  # a single-page app on a busy 2-core machine


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser) -> Iterator[Page]:
    # Tall enough that a run's eight task runs fit in the screenshot (the UI scrolls inside the page).
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.set_default_timeout(WAIT_MS)
    yield page
    page.close()


def _screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def _open_tab(page: Page, name: str) -> None:
    page.get_by_text(name, exact=True).first.click()


def test_flow_run_page_lists_every_stage_as_a_named_task(deployed, ops_runs, page, tmp_path):
    run = ops_runs.champion
    page.goto(f"{deployed.server.url}/runs/flow-run/{run.id}")
    expect(page.get_by_text(run.name, exact=True).first).to_be_visible()  # config, date and version
    expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
    _open_tab(page, "Task Runs")
    expect(page.get_by_text(f"{len(STAGES)} Task runs", exact=True).first).to_be_visible()
    for stage in STAGES:
        expect(page.get_by_text(re.compile(rf"^{stage}-[0-9a-f]{{3}}$")).first).to_be_visible()
    _screenshot(page, tmp_path, "flow-run-task-runs")


def _open_artifact(page: Page, server_url: str, run, key: str) -> None:
    """The run's page, its Artifacts tab, then the artifact named `key`, as an operator clicks."""
    page.goto(f"{server_url}/runs/flow-run/{run.id}")
    _open_tab(page, "Artifacts")
    page.get_by_text(key, exact=True).first.click()
    expect(page).to_have_url(re.compile(r"/artifacts/artifact/"))


def test_artifacts_show_the_test_metrics_table_and_the_model_card(deployed, ops_runs, page, tmp_path):
    server, run = deployed.server.url, ops_runs.champion
    _open_artifact(page, server, run, "breast-ultrasound-champion-evaluation")
    table = page.locator("table").filter(has=page.get_by_role("columnheader", name="metric"))
    expect(table.first).to_be_visible()
    for metric in ("roc_auc", "accuracy", "sensitivity", "specificity"):
        expect(table.first.get_by_role("cell", name=metric, exact=True)).to_be_visible()
    expect(table.first.get_by_role("columnheader", name="95% CI (bootstrap)")).to_be_visible()
    _screenshot(page, tmp_path, "evaluation-artifact")

    _open_artifact(page, server, run, "breast-ultrasound-champion-model-card")
    name = ops_runs.config.registry.model_name
    expect(page.get_by_role("heading", name=f"Model card: {name} version 1 (champion)")).to_be_visible()
    expect(page.get_by_role("heading", name="Registry status")).to_be_visible()
    expect(page.get_by_text("This version is the one served (alias champion): no champion yet.")).to_be_visible()
    expect(page.get_by_role("heading", name="Limits")).to_be_visible()
    _screenshot(page, tmp_path, "model-card-artifact")

    # The challenger's card says so, under the run's own "latest" key.
    _open_artifact(page, server, ops_runs.challenger, "breast-ultrasound-latest-model-card")
    expect(page.get_by_role("heading", name=f"Model card: {name} version 2 (challenger)")).to_be_visible()
    expect(page.get_by_text("Challenger, not served.")).to_be_visible()
    _screenshot(page, tmp_path, "challenger-model-card-artifact")


def test_a_failed_run_page_states_its_reason(deployed, ops_runs, page, tmp_path):
    run = ops_runs.failed
    page.goto(f"{deployed.server.url}/runs/flow-run/{run.id}")
    expect(page.get_by_text("Failed", exact=True).first).to_be_visible()
    _open_tab(page, "Details")
    expect(page.get_by_text("State Message", exact=True)).to_be_visible()
    see_more = page.get_by_text("See More", exact=True)
    if see_more.count():  # long messages are folded
        see_more.first.click()
    reason = (f"Flow run encountered an exception: NotEnoughData: {ops_runs.failed_config.data.manifest}: fewer "
              "usable samples than data.min_usable_per_class (1000)")
    expect(page.get_by_text(re.compile(re.escape(reason))).first).to_be_visible()
    _screenshot(page, tmp_path, "failed-run-details")


def test_mlflow_registered_model_page_shows_the_champion_alias(deployed, ops_runs, page, tmp_path):
    name = ops_runs.config.registry.model_name
    page.goto(f"{deployed.mlflow.url}/#/models/{name}")
    expect(page.get_by_text(name, exact=True).first).to_be_visible()
    version_1 = page.get_by_role("row").filter(has=page.get_by_role("link", name="Version 1", exact=True))
    expect(version_1).to_be_visible()
    expect(version_1.get_by_text(f"@ {CHAMPION}")).to_be_visible()
    version_2 = page.get_by_role("row").filter(has=page.get_by_role("link", name="Version 2", exact=True))
    expect(version_2.get_by_text("@ challenger")).to_be_visible()
    _screenshot(page, tmp_path, "mlflow-registered-model")


def test_a_flow_runs_mlflow_link_opens_its_run_in_the_classic_view(deployed, ops_runs, page, tmp_path):
    run = ops_runs.champion
    (link,) = [tag.removeprefix(MLFLOW_RUN_URL_PREFIX) for tag in run.tags if tag.startswith(MLFLOW_RUN_URL_PREFIX)]
    page.goto(link)
    expect(page.get_by_role("heading", name=run.name)).to_be_visible()  # the same name as the flow run
    expect(page.get_by_text("Finished", exact=True).first).to_be_visible()
    expect(page.get_by_role("link", name=ops_runs.config.registry.model_name)).to_be_visible()  # registered as v1
    expect(page.get_by_text("v1", exact=True).first).to_be_visible()
    _screenshot(page, tmp_path, "mlflow-run")

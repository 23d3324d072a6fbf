"""What users browse, in a real browser: Debian's Chromium, driven by Playwright, on the MLflow UI
that `difforge ui` serves for the suite's store, looking at the session's quickstart run as a
user would. With DIFFORGE_SCREENSHOTS=DIR (`make docs-screenshots`) it also keeps the pages it
checked as PNGs for the docs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from difforge.platform.tracking import ui_page
from tests.conftest import BIN, free_port, wait_for

CHROMIUM = "/usr/bin/chromium"  # Debian's (the Makefile installs it); nothing downloaded
SHOTS = os.environ.get("DIFFORGE_SCREENSHOTS")
VIEW = "workflowType=machine_learning"


@pytest.fixture(scope="module")
def ui(quickstart):
    """`difforge ui` on the suite's store: (its address, the lines it printed)."""
    port = free_port()
    served = subprocess.Popen(
        [str(BIN / "difforge"), "ui", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        lines: list[str] = []  # all it and its server print, read as it goes (a full pipe blocks)

        def drain() -> None:
            for line in served.stdout:
                lines.append(line)

        threading.Thread(target=drain, daemon=True).start()
        wait_for(lambda: requests.get(f"{base}/health", timeout=1).ok, 60, "difforge ui")
        # what it printed before it started the server: the address, then experiments' pages
        printed = [x.strip() for x in lines if x.startswith("MLflow UI") or "/#/experiments" in x]
        yield base, printed
    finally:
        os.killpg(served.pid, signal.SIGTERM)
        served.wait(timeout=30)


@pytest.fixture(scope="module")
def page(ui):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(30_000)
        yield page
        browser.close()


def shot(page, name: str) -> None:
    """Keep the page as ui-NAME.png in DIFFORGE_SCREENSHOTS, MLflow's assistant panel closed."""
    if not SHOTS:
        return
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
    Path(SHOTS).mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(Path(SHOTS) / f"ui-{name}.png"))


def test_what_a_user_browses_in_mlflow(quickstart, ui, page):
    """The experiment's address that `difforge ui` prints opens on its runs; the pipeline run
    expands to its step runs; a step lists its input datasets, source file and commit; the
    training step has a logged model and its sample grid renders in Artifacts; the registered
    version's page links back to the run that made it."""
    base, printed = ui
    _, _, summary = quickstart
    client = MlflowClient(summary.tracking_uri)
    model_run = client.get_run(summary.step("model").run_id)
    assert printed[0].startswith("MLflow UI for sqlite:///") and base in printed[0]
    listed = dict(line.split() for line in printed[1:])  # the latest experiments' runs pages
    assert listed and all(
        re.fullmatch(rf"{base}/#/experiments/\d+\?{VIEW}", u) for u in listed.values()
    )
    experiment = model_run.info.experiment_id
    page.goto(listed.get("quickstart-test") or ui_page(base, f"experiments/{experiment}"))
    page.get_by_text("Run Name").wait_for()  # the runs table, not GenAI's overview
    assert "/runs" in page.url and "overview" not in page.url
    # oldest first: the session's first run of this experiment is this one (the table draws
    # only the rows in view)
    oldest = "&orderByKey=attributes.start_time&orderByAsc=true"
    page.goto(page.url.split("?")[0] + f"?{VIEW}{oldest}")
    parent = page.locator(".ag-pinned-left-cols-container [role=row]").filter(
        has=page.locator(f"a[href$='/runs/{summary.run_id}']")
    )
    parent.locator("button[data-component-id*=runnamecellrenderer]").click()  # expand it
    page.get_by_role("link", name="quality", exact=True).first.wait_for()
    shown = set(page.locator(".ag-pinned-left-cols-container a[href*='/runs/']").all_inner_texts())
    assert {s.step for s in summary.steps} <= shown
    shot(page, "runs")

    images = client.get_run(summary.step("images").run_id)
    page.goto(f"{base}/#/experiments/{images.info.experiment_id}/runs/{images.info.run_id}")
    unique = summary.step("unique").uri.rstrip("/").rsplit("/", 1)[1]  # its fingerprint
    page.get_by_text(f"unique ({unique})").first.wait_for()  # Datasets: what it read

    page.goto(
        f"{base}/#/experiments/{model_run.info.experiment_id}/runs/{model_run.info.run_id}"
        "?workflowType=machine_learning"
    )
    commit = model_run.data.tags["mlflow.source.git.commit"]
    page.get_by_text("quickstart.yaml").first.wait_for()  # Source: the file, and the commit
    assert page.get_by_text(commit[:7]).count() >= 1
    page.get_by_text("Logged models (1)").wait_for()
    page.get_by_text("latents (").first.wait_for()
    shot(page, "step-run")
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text("samples.png").first.click()
    from PIL import Image

    logged = Image.open(client.download_artifacts(model_run.info.run_id, "samples.png"))
    grid = page.locator("img[src^='blob:']").first  # the PNG, fetched and decoded
    grid.wait_for()
    decoded = "img => img.complete && img.naturalWidth"
    page.wait_for_function(f"{decoded} == {logged.width}", arg=grid.element_handle())
    shot(page, "sample-grid")

    ref = model_run.data.tags["difforge.registered_model"]
    name, version = ref.removeprefix("models:/").split("/")
    page.goto(f"{base}/#/models/{name}/versions/{version}?workflowType=machine_learning")
    page.get_by_text("Draw images").first.wait_for()  # the model card
    to_run = page.locator(f"a[href*='/runs/{model_run.info.run_id}']")
    to_run.first.wait_for()
    assert re.search(r"experiments/\d+/runs/", to_run.first.get_attribute("href"))
    shot(page, "model-version")

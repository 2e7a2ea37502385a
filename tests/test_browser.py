"""The MLflow UI in a real browser: two ``dataopt run`` executions compared side by side.

Starts ``mlflow server`` on 127.0.0.1, runs the pipeline twice against it (the second at half the data,
so the cost ratio differs), then drives headless Chromium (Debian's ``chromium``, through Playwright)
along the README's clicks and to the README's compare URL, and asserts that both runs' accuracy and
cost ratio are shown as the UI formats them. The screenshot goes to ``$DATAOPT_TEST_ARTIFACTS`` (else
``test-artifacts/`` at the repository root), which CI keeps.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from test_e2e import BIN, ROOT, make_project, project_env

sync_api = pytest.importorskip("playwright.sync_api",
                               reason='needs Playwright: pip install -e ".[test,browser]"')

pytestmark = [pytest.mark.browser, pytest.mark.slow]

QUICK = ["--set", "train.epochs=2", "--set", "perceive.epochs=2", "--set", "perceive.early_epochs=1"]
SHOWN = ("evaluate.accuracy", "evaluate.cost_ratio")  # MLflow metric key = <stage>.<metrics.json key>


@pytest.fixture
def chromium() -> str:
    """Debian's chromium (``.ci/run`` installs it with apt-get); skip, naming it, where it is absent."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("the browser test needs Debian's `chromium` on PATH (apt-get install chromium); "
                    "none found")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1 with a SQLite store in ``tmp_path``; yields its base URL."""
    port = free_port()
    log = tmp_path / "mlflow-server.log"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--artifacts-destination", str(tmp_path / "mlartifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "w") as out:
        # its own process group: the server forks workers, and teardown must stop them all
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"mlflow server exited:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no /health in 90 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)  # its store is a scratch SQLite file: no need to wait longer
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_pipeline(project: Path, tracking_uri: str, *args: str) -> dict:
    """``dataopt run`` against the server; the MLflow run's ids and the evaluate metrics it wrote."""
    env = {**project_env(project), "MLFLOW_TRACKING_URI": tracking_uri}
    proc = subprocess.run([str(BIN / "dataopt"), "run", *QUICK, *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    art = project / "artifacts"
    return {**json.loads((art / "track" / "run.json").read_text()),
            "metrics": json.loads((art / "evaluate" / "metrics.json").read_text())}


def ui_metric(value: float) -> str:
    """``value`` as the MLflow UI's compare table shows it (``Utils.formatMetric`` in its JavaScript)."""
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exponent):+d}"
    decimals = 3 if abs(value) < 10 else 2 if abs(value) < 100 else 1
    rounded = math.floor(value * 10 ** decimals + 0.5) / 10 ** decimals  # JS Math.round: half up
    return str(int(rounded)) if rounded == int(rounded) else repr(rounded)


def compare_url(base: str, run_ids: list[str], experiment_id: str) -> str:
    """The README's compare URL: URL-encoded JSON lists of run ids and experiment ids."""
    quote = lambda ids: urllib.parse.quote(json.dumps(ids, separators=(",", ":")), safe="")  # noqa: E731
    return f"{base}/#/compare-runs?runs={quote(run_ids)}&experiments={quote([experiment_id])}"


def metric_cells(page, key: str) -> tuple[list[str], int]:
    """The compare table's cells for metric ``key``, one per run in column order, and the row's top.

    The metrics table is two virtualised grids 300 px high (names, values): only rows scrolled into
    view exist in the DOM, so scroll both until ``key`` appears.
    """
    grids = page.locator(".ReactVirtualized__Grid")
    assert grids.count() == 2, "the compare page's metrics table is no longer two grids"
    names, values = grids.nth(0), grids.nth(1)
    link = names.locator("a", has_text=re.compile(rf"^{re.escape(key)}$"))
    height = values.evaluate("e => e.scrollHeight")
    for top in range(0, height, 180):
        scroll_grids(page, top)
        if link.count():
            break
    else:
        raise AssertionError(f"metric {key} is not in the compare table")
    row_top = link.evaluate("a => a.parentElement.style.top")  # absolute: row index x row height
    top = int(float(row_top.removesuffix("px")))
    scroll_grids(page, top)
    cells = page.wait_for_function(  # the row's value cells, once the grid has rendered them
        """top => {
             const grid = document.querySelectorAll('.ReactVirtualized__Grid')[1];
             const cells = [...grid.querySelectorAll('[role=rowgroup] > div')]
               .filter(d => d.style.top === top)
               .sort((a, b) => parseFloat(a.style.left) - parseFloat(b.style.left));
             return cells.length ? cells.map(d => d.innerText.trim()) : null;
           }""", arg=row_top)
    return cells.json_value(), top


def scroll_grids(page, top: int) -> None:
    """Scroll both grids of the metrics table to ``top`` px, as a user's wheel over them would.

    The values grid tells the names grid its position from React state that is not yet updated when
    its scroll event fires, so after one programmatic scroll the names lag behind: set both.
    """
    grids = page.locator(".ReactVirtualized__Grid")
    for i in (1, 0):  # values first: its scroll event moves the names grid
        grids.nth(i).evaluate("(e, top) => { e.scrollTop = top; }", top)
        page.wait_for_timeout(100)


def artifact_dir() -> Path:
    out = Path(os.environ.get("DATAOPT_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


# chromium before mlflow_server: without a browser the test skips before the server starts
def test_compare_two_runs_in_the_mlflow_ui(chromium, mlflow_server, tmp_path, shared_prefect):
    project = make_project(tmp_path / "proj")
    runs = [run_pipeline(project, mlflow_server),
            run_pipeline(project, mlflow_server, "--set", "optimize.ratio=0.5")]
    ids = [r["run_id"] for r in runs]
    (exp_id,) = {r["experiment_id"] for r in runs}
    assert runs[0]["metrics"]["cost_ratio"] != runs[1]["metrics"]["cost_ratio"]

    # the cheap check first: the REST API holds what each run's evaluate stage wrote
    names = []
    for r in runs:
        got = get_json(f"{mlflow_server}/api/2.0/mlflow/runs/get?run_id={r['run_id']}")["run"]
        logged = {m["key"]: m["value"] for m in got["data"]["metrics"]}
        for key in SHOWN:
            assert logged[key] == r["metrics"][key.split(".", 1)[1]], key
        names.append(got["info"]["run_name"])

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True)
        try:
            # tall enough that the heading, the run ids and the metrics table share one screenshot
            page = browser.new_page(viewport={"width": 1400, "height": 2000})
            page.set_default_timeout(60_000)
            heading = "Comparing 2 Runs from 1 Experiment"

            # the README's URL form, runs in execution order (the table's columns follow it)
            page.goto(compare_url(mlflow_server, ids, exp_id))
            page.get_by_text(heading, exact=True).wait_for()
            tops = []
            for key in SHOWN:
                cells, top = metric_cells(page, key)
                assert cells == [ui_metric(r["metrics"][key.split(".", 1)[1]]) for r in runs], key
                tops.append(top)
            # both rows in view for the screenshot
            scroll_grids(page, min(tops))
            page.screenshot(path=str(artifact_dir() / "mlflow-compare-runs.png"))

            # the README's clicks: Experiments, dataopt, Training runs, tick both runs, Compare
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(mlflow_server)
            page.get_by_role("link", name="Experiments", exact=True).click()
            page.get_by_role("link", name="dataopt", exact=True).click()
            page.get_by_text("Training runs", exact=True).click()
            for name in names:
                page.get_by_role("row").filter(has_text=name).get_by_role(
                    "checkbox", name="toggle row selection").check()
            page.get_by_role("button", name="Compare", exact=True).click()
            page.get_by_text(heading, exact=True).wait_for()
            route, _, query = urllib.parse.unquote(page.url.split("#", 1)[1]).partition("?")
            shown = urllib.parse.parse_qs(query)
            assert route == "/compare-runs"
            assert sorted(json.loads(shown["runs"][0])) == sorted(ids)
            assert json.loads(shown["experiments"][0]) == [exp_id]
        finally:
            browser.close()

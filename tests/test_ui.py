"""The MLflow UI answers the README's questions: a tracking server (`mlflow ui`, as `nox -s ui`
starts it) on a free port, asked through the REST API the UI itself calls, returns a tiny study's
estimator runs for each filter the README gives, in full, each with its condition's parameters and
the key metrics; and the README's filters select at most one page of runs on the default study."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import estimators
from suite.harness.runner import run_study
from suite.harness.study_spec import load_study
from suite.harness.tracking import EXPERIMENT_KIND

ROOT = Path(__file__).resolve().parent.parent
PAGE = 100  # runs the UI loads at a time (then "Load more")
KEY_METRICS = {"bias/rel", "variance/trajectory", "variance/ratio_vs_reinforce", "exact/rel_bias",
               "exact/variance", "exact/variance_ratio", "exact/J", "exact/grad_norm"}
CONDITION_PARAMS = {"env", "policy", "gamma", "horizon", "trajectories", "batch_size"}

# the values the README's filters name, at a tiny size
TINY = """
[study]
name = "ui"
sampler = "grid"
estimators = ["reinforce", "reward_to_go", "exact_value_baseline"]

[space]
env = ["Taxi-v4", "chain:n=4"]
horizon = [5, 50]

[fixed]
policy = "uniform"
gamma = 0.99
trajectories = 200
batch_size = 10
"""


def readme_filters() -> list[str]:
    """The search filters of the README's MLflow UI section (inline code with `params.`)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Comparing estimators in the MLflow UI", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"`((?:params|tags)\.[^`]+)`", section)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(base: str, path: str, body: dict | None = None) -> dict:
    """GET (body None) or POST a JSON body to the server, as the UI's fetches do."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


def search(base: str, experiment_id: str, filter_: str) -> dict:
    """The UI's runs query: newest first, active runs, one page of 100."""
    return _call(base, "ajax-api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment_id], "filter": filter_, "run_view_type": "ACTIVE_ONLY",
        "max_results": PAGE, "order_by": ["attributes.start_time DESC"]})


def check_estimator_runs(page: dict) -> list[dict]:
    """Every run is a top-level estimator run named by estimator and condition, with the
    condition's parameters and the key metrics, and the page holds all that matched."""
    runs = page.get("runs", [])
    assert runs, "the filter returned no runs"
    assert not page.get("next_page_token"), "more runs than the UI loads at once"
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
        params = {p["key"]: p["value"] for p in run["data"].get("params", [])}
        metrics = {m["key"] for m in run["data"].get("metrics", [])}
        assert tags.get("kind") == "estimator", run["info"]["run_name"]
        assert "mlflow.parentRunId" not in tags  # the UI would fetch and chart the parent too
        assert CONDITION_PARAMS | {"estimator", "condition"} <= params.keys(), params
        assert KEY_METRICS <= metrics, KEY_METRICS - metrics
        assert run["info"]["run_name"] == f"{params['estimator']} | {params['condition']}"
    return runs


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny study in a temporary store, and `mlflow ui` serving it on a free port."""
    tmp = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        (tmp / "ui.toml").write_text(textwrap.dedent(TINY))
        outcome = run_study(tmp / "ui.toml", storage=f"sqlite:///{tmp / 'optuna.db'}",
                            progress=False)
    port = _free_port()
    log = open(tmp / "server.log", "w")  # noqa: SIM115 (closed below)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: starts faster
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).close()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"mlflow ui did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield base, outcome.experiment_id
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_readme_filters_return_the_estimator_runs_in_full(server):
    base, experiment_id = server
    filters = readme_filters()
    assert len(filters) >= 3, filters
    for filter_ in filters:
        check_estimator_runs(search(base, experiment_id, filter_))
    one = search(base, experiment_id, "params.estimator = 'reward_to_go'")["runs"]
    assert len(one) == 4  # one per condition
    assert {r["info"]["run_name"] for r in one} == {
        "reward_to_go | Taxi-v4 | H=5", "reward_to_go | Taxi-v4 | H=50",
        "reward_to_go | chain:n=4 | H=5", "reward_to_go | chain:n=4 | H=50"}


def test_the_check_fails_on_runs_that_are_not_estimator_runs(server):
    base, experiment_id = server
    with pytest.raises(AssertionError):  # condition runs: nested, no estimator, no metrics
        check_estimator_runs(search(base, experiment_id, "tags.kind = 'condition'"))
    with pytest.raises(AssertionError):
        check_estimator_runs(search(base, experiment_id, "params.estimator = 'no_such_one'"))


def test_experiment_opens_in_the_model_training_view(server):
    base, experiment_id = server
    exp = _call(base, f"ajax-api/2.0/mlflow/experiments/get?experiment_id={experiment_id}")
    tags = {t["key"]: t["value"] for t in exp["experiment"]["tags"]}
    key, kind = EXPERIMENT_KIND
    assert tags[key] == kind
    page = urllib.request.urlopen(f"{base}/", timeout=30).read().decode()
    assert "<html" in page.lower()  # the UI itself is served


# -- the default study: each README filter selects at most one page of its runs --------------

def _matches(filter_: str, row: dict[str, str]) -> bool:
    """The README's filters: clauses `params.K = 'V'` or `tags.K = 'V'` joined by `and`."""
    for clause in re.split(r"\s+and\s+", filter_.strip(), flags=re.IGNORECASE):
        m = re.fullmatch(r"(?:params|tags)\.(\w+)\s*=\s*'([^']*)'", clause.strip())
        assert m, f"README filter clause not understood here: {clause}"
        if row.get(m.group(1)) != m.group(2):
            return False
    return True


def test_readme_filters_select_at_most_one_page_of_the_default_study():
    spec = load_study(ROOT / "studies" / "default.toml")
    names = [e.name for e in estimators.resolve(spec.estimator_names({}))]
    rows = [{**{k: str(v) for k, v in spec.condition(p).items()}, "estimator": n, "kind": "estimator"}
            for p in spec.grid() for n in names]
    for filter_ in readme_filters():
        count = sum(_matches(filter_, row) for row in rows)
        assert 0 < count <= PAGE, (filter_, count)
    assert not _matches("params.env = 'Taxi-v4'", {"env": "FrozenLake-v1"})
    assert len(rows) > PAGE  # why the README filters: the whole study is more than a page

"""Study shapes: [[cases]], a seed per trial, exact-only conditions, seeds pooled into one test."""

import textwrap

import pytest
from mlflow.tracking import MlflowClient

from suite.core.errors import InputError
from suite.harness.runner import run_study
from suite.harness.study_spec import load_study

CASES = """
[study]
name = "shapes"
estimators = ["reward_to_go", "batch_mean_baseline", "fitted_value_baseline"]

[space]
seed = [3, 4]

[[cases]]
env = "FrozenLake-v1"
horizon = 10
trajectories = 1000

[[cases]]
env = "chain:n=4"
horizon = 6
trajectories = 0

[fixed]
gamma = 0.9
batch_size = 10
"""


def _write(tmp_path, text):
    path = tmp_path / "study.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_cases_seeds_and_exact_only_conditions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    spec = load_study(_write(tmp_path, CASES))
    assert len(spec.grid()) == 4
    outcome = run_study(spec.path, storage=f"sqlite:///{tmp_path / 'o.db'}", progress=False)
    assert outcome.complete == 4 and outcome.failed_now == 0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("shapes")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    conditions = [r for r in runs if r.data.tags.get("kind") == "condition"]
    assert sorted((r.data.params["env"], r.data.params["seeds"]) for r in conditions) == [
        ("FrozenLake-v1", "[3]"), ("FrozenLake-v1", "[4]"), ("chain:n=4", "[3]"), ("chain:n=4", "[4]")]
    by_env = {}
    for r in runs:
        if r.data.tags.get("kind") == "estimator":
            by_env.setdefault(r.data.params["env"], []).append(r)
    for r in by_env["chain:n=4"]:  # exact only: no sampled metric, exact ones where they exist
        assert "variance/trajectory" not in r.data.metrics
        assert ("exact/variance" in r.data.metrics) == (r.data.params["estimator"]
                                                        != "fitted_value_baseline")
    for r in by_env["FrozenLake-v1"]:
        assert "variance/trajectory" in r.data.metrics


@pytest.mark.parametrize("edit, message", [
    ('[[cases]]\nenv = "Taxi-v4"\ngamma = 0.5\n', "'gamma' is both in [[cases]] and [fixed]"),
    ('[[cases]]\nenvv = "Taxi-v4"\n', "unknown key 'cases[2].envv'"),
    ("", None),
])
def test_cases_are_validated(tmp_path, edit, message):
    path = _write(tmp_path, CASES + edit)
    if message is None:
        assert len(load_study(path).cases) == 2
        return
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_study(path)


def test_negative_trajectories_are_refused(tmp_path):
    with pytest.raises(InputError, match="integer >= 0"):
        load_study(_write(tmp_path, CASES.replace("trajectories = 0", "trajectories = -5")))

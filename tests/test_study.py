"""The study harness end to end, into temporary Optuna and MLflow stores."""

import os
import signal
import textwrap
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from suite.cli import main
from suite.core.errors import InputError
from suite.harness.plan import frozen_params
from suite.harness.runner import run_study
from suite.harness.study_spec import load_study

TINY = """
[study]
name = "tiny"
sampler = "grid"
seeds = [0, 1]
estimators = ["reward_to_go", "gae:lambda={lam},critic=exact"]

[space]
env = ["FrozenLake-v1", "chain:n=4"]
lam = [0.0, 0.9]

[fixed]
gamma = 0.9
horizon = 8
trajectories = 1000
batch_size = 10
"""


def _write(tmp_path, text, name="study.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _runs(uri, name):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return client.search_runs([exp.experiment_id], max_results=5000)


def _trials(storage, name):
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def test_tiny_study_end_to_end_and_resume(stores):
    tmp, uri, storage = stores
    path = _write(tmp, TINY)
    outcome = run_study(path, storage=storage, progress=False)
    assert outcome.complete == 4 and outcome.failed_now == 0
    runs = _runs(uri, "tiny")
    kinds = Counter(r.data.tags.get("kind") for r in runs)
    assert kinds == {"invocation": 1, "condition": 4, "estimator": 4 * 3}
    estimator_runs = [r for r in runs if r.data.tags["kind"] == "estimator"]
    assert {r.data.params["estimator"] for r in estimator_runs} == {
        "reinforce", "reward_to_go", "gae:lambda=0,critic=exact", "gae:lambda=0.9,critic=exact"}
    conditions = {c.info.run_id: c for c in runs if c.data.tags["kind"] == "condition"}
    for r in estimator_runs:  # top level, named by estimator and condition, the condition's params
        assert {"bias/rel", "variance/trajectory", "test/inconclusive", "exact/variance",
                "exact/rel_bias", "agreement/z", "test/alpha", "exact/J"} <= set(r.data.metrics)
        assert ("test/p_value" in r.data.metrics) != bool(r.data.metrics["test/inconclusive"])
        assert r.info.status == "FINISHED"
        assert "mlflow.parentRunId" not in r.data.tags
        cond = conditions[r.data.tags["condition_run"]]
        assert {k: cond.data.params[k] for k in ("env", "gamma", "horizon", "lam")}.items() <= \
            r.data.params.items()
        assert r.info.run_name == f"{r.data.params['estimator']} | {r.data.params['condition']}"
        lam = float(cond.data.params["lam"])
        assert r.data.params["condition"] == f"{cond.data.params['env']} | lam={lam:g}"
    assert MlflowClient(uri).get_experiment_by_name("tiny").tags["mlflow.experimentKind"] == \
        "custom_model_development"
    parent = next(r for r in runs if r.data.tags["kind"] == "invocation")
    for tag in ("git_commit", "study_sha256", "device", "torch_version", "optuna_version",
                "mlflow_version"):
        assert parent.data.tags[tag]
    # resume: nothing is redone
    again = run_study(path, storage=storage, progress=False)
    assert again.complete == 4
    trials = _trials(storage, "tiny")
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert Counter(r.data.tags.get("kind") for r in _runs(uri, "tiny"))["condition"] == 4


def test_interrupted_study_resumes_without_losing_or_repeating(stores, monkeypatch):
    tmp, uri, storage = stores
    path = _write(tmp, TINY)
    import suite.harness.study as study_module

    real = study_module.measure
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # second trial, first seed: a real SIGTERM, as `kill` would send
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(study_module, "measure", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run_study(path, storage=storage, progress=False)
    states = Counter(t.state for t in _trials(storage, "tiny"))
    assert states[TrialState.COMPLETE] == 1 and states[TrialState.FAIL] == 1
    statuses = Counter((r.data.tags["kind"], r.info.status) for r in _runs(uri, "tiny"))
    assert statuses[("invocation", "KILLED")] == 1 and statuses[("condition", "KILLED")] == 1
    assert statuses[("condition", "FINISHED")] == 1

    monkeypatch.setattr(study_module, "measure", real)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    outcome = run_study(path, storage=storage, progress=False)
    complete = [t for t in _trials(storage, "tiny") if t.state == TrialState.COMPLETE]
    assert outcome.complete == 4 and len(complete) == 4
    assert len({tuple(sorted(frozen_params(t).items())) for t in complete}) == 4


def test_two_workers_run_every_trial_exactly_once(stores):
    tmp, uri, storage = stores
    path = _write(tmp, TINY)
    outcome = run_study(path, storage=storage, workers=2, progress=False)
    trials = _trials(storage, "tiny")
    assert outcome.complete == 4 and len(trials) == 4
    assert len({tuple(sorted(frozen_params(t).items())) for t in trials}) == 4
    conditions = [r for r in _runs(uri, "tiny") if r.data.tags["kind"] == "condition"]
    assert len(conditions) == 4 and all(r.info.status == "FINISHED" for r in conditions)


def test_search_study_records_its_objective(stores):
    tmp, uri, storage = stores
    path = _write(tmp, """
        [study]
        name = "search"
        sampler = "tpe"
        trials = 3
        estimators = ["reinforce", "reward_to_go"]

        [space]
        gamma = { low = 0.5, high = 1.0 }
        temperature = { low = 0.5, high = 2.0, log = true }

        [fixed]
        env = "garnet:S=5,A=2,branching=2,seed=0"
        policy = "random:temperature={temperature},seed=0"
        horizon = 6
        trajectories = 1000

        [[objectives]]
        metric = "variance_ratio"
        estimator = "reward_to_go"
        direction = "maximize"
        """)
    assert run_study(path, storage=storage, progress=False).complete == 3
    trials = _trials(storage, "search")
    assert all(0 < t.value < 1.5 for t in trials)
    conditions = [r for r in _runs(uri, "search") if r.data.tags["kind"] == "condition"]
    assert {r.data.params["policy"].split(",")[0] for r in conditions} != {"random:temperature={temperature}"}
    assert all("objective/0" in r.data.metrics for r in conditions)


MALFORMED = {
    "unknown top-level key": ("[study]\nname='x'\n[spcae]\n", "did you mean 'space'"),
    "missing name": ("[study]\nsampler='grid'\n", "study.name"),
    "unknown sampler": ("[study]\nname='x'\nsampler='tpee'\n", "did you mean 'tpe'"),
    "grid with a range": ("[study]\nname='x'\n[space]\ngamma={low=0.1,high=0.9}\n[fixed]\n"
                          "env='FrozenLake-v1'\nhorizon=5\n", "grid sampler needs a list"),
    "gamma out of range": ("[study]\nname='x'\n[space]\ngamma=[0.9,1.5]\n[fixed]\n"
                           "env='FrozenLake-v1'\nhorizon=5\n", "number in [0, 1]"),
    "missing horizon": ("[study]\nname='x'\n[fixed]\nenv='FrozenLake-v1'\ngamma=0.9\n",
                        "'horizon' is not given"),
    "unknown env": ("[study]\nname='x'\n[fixed]\nenv='FrozenLak-v1'\ngamma=0.9\nhorizon=5\n",
                    "did you mean 'FrozenLake-v1'"),
    "unknown estimator": ("[study]\nname='x'\nestimators=['reinfroce']\n[fixed]\nenv='FrozenLake-v1'\n"
                          "gamma=0.9\nhorizon=5\n", "did you mean 'reinforce'"),
    "search without objective": ("[study]\nname='x'\nsampler='tpe'\ntrials=3\n[space]\n"
                                 "gamma={low=0.1,high=0.9}\n[fixed]\nenv='FrozenLake-v1'\nhorizon=5\n",
                                 "needs at least one [[objectives]]"),
    "unknown metric": ("[study]\nname='x'\nsampler='tpe'\ntrials=3\n[space]\ngamma={low=0.1,high=0.9}\n"
                       "[fixed]\nenv='FrozenLake-v1'\nhorizon=5\n[[objectives]]\nmetric='varience'\n"
                       "estimator='reinforce'\ndirection='minimize'\n", "did you mean 'variance'"),
    "nsga2 with one objective": ("[study]\nname='x'\nsampler='nsga2'\ntrials=3\n[space]\n"
                                 "gamma={low=0.1,high=0.9}\n[fixed]\nenv='FrozenLake-v1'\nhorizon=5\n"
                                 "[[objectives]]\nmetric='variance'\nestimator='reinforce'\n"
                                 "direction='minimize'\n", "two or more"),
    "template of nothing": ("[study]\nname='x'\n[fixed]\nenv='FrozenLake-v1'\ngamma=0.9\nhorizon=5\n"
                            "policy='random:temperature={temp}'\n", "names no parameter"),
    "seeds not a list": ("[study]\nname='x'\nseeds=3\n[fixed]\nenv='FrozenLake-v1'\ngamma=0.9\n"
                         "horizon=5\n", "study.seeds"),
    "not toml": ("[study\nname='x'\n", "not valid TOML"),
    "batch size zero": ("[study]\nname='x'\n[fixed]\nenv='FrozenLake-v1'\ngamma=0.9\nhorizon=5\n"
                        "batch_size=0\n", "integer >= 1"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_study_files_fail_clearly_and_write_nothing(stores, capsys, case):
    tmp, uri, storage = stores
    text, message = MALFORMED[case]
    path = _write(tmp, text, "bad.toml")
    with pytest.raises(InputError, match="bad.toml"):
        load_study(path)
    assert main(["study", str(path), "--storage", storage]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp.iterdir()) == ["bad.toml"]


@pytest.mark.parametrize("name", ["default", "horizon_scaling", "discount", "training_progress",
                                  "gae_pareto", "worst_case"])
def test_shipped_studies_load(name):
    spec = load_study(Path(__file__).resolve().parent.parent / "studies" / f"{name}.toml")
    assert spec.name == name


def test_only_trials_whose_heartbeat_is_stale_are_failed_on_request(stores, monkeypatch):
    """A trial RUNNING with a stale heartbeat is failed by --fail-running and redone; one with
    no heartbeat at all (an older version's) is reported and left alone: nothing proves its
    worker gone."""
    tmp, uri, storage = stores
    monkeypatch.setenv("SUITE_HEARTBEAT", "interval=1,grace=2")
    path = _write(tmp, TINY)
    run_study(path, storage=storage, trials=1, progress=False)
    study = optuna.load_study(study_name="tiny", storage=storage)
    space = {"env": optuna.distributions.CategoricalDistribution(["FrozenLake-v1", "chain:n=4"]),
             "lam": optuna.distributions.CategoricalDistribution([0.0, 0.9])}
    dead = study.ask(space)  # a worker that died: its heartbeat stops
    study._storage.record_heartbeat(dead._trial_id)
    silent = study.ask(space)  # RUNNING without any heartbeat
    time.sleep(3)
    said = []
    run_study(path, storage=storage, progress=False, say=said.append)
    assert any("left RUNNING by a worker that is gone" in line for line in said), said
    states = {t.number: t.state for t in _trials(storage, "tiny")}
    assert states[dead.number] == states[silent.number] == TrialState.RUNNING
    said.clear()
    run_study(path, storage=storage, fail_running=True, progress=False, say=said.append)
    states = {t.number: t.state for t in _trials(storage, "tiny")}
    assert states[dead.number] == TrialState.FAIL
    assert states[silent.number] == TrialState.RUNNING
    assert any("without a heartbeat" in line for line in said), said
    complete = [t for t in _trials(storage, "tiny") if t.state == TrialState.COMPLETE]
    assert len({tuple(sorted(frozen_params(t).items())) for t in complete}) == len(complete)


def test_a_worker_whose_trial_was_failed_meanwhile_discards_it_and_moves_on(stores, monkeypatch):
    """Before: 'ValueError: Cannot tell a FAIL trial' ended the run. Now the worker learns at
    commit that another process failed its trial (as it would a stale one), marks its runs
    FAILED, goes on with the next trial, and a rerun redoes the trial once."""
    tmp, uri, storage = stores
    path = _write(tmp, TINY)
    import suite.harness.study as study_module

    real = study_module.measure
    calls = {"n": 0}

    def failed_elsewhere(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            study = optuna.load_study(study_name="tiny", storage=storage)
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            study._storage.set_trial_state_values(running[0]._trial_id, TrialState.FAIL)
        return real(*args, **kwargs)

    monkeypatch.setattr(study_module, "measure", failed_elsewhere)
    outcome = run_study(path, storage=storage, progress=False)
    assert outcome.failed_now == 0 and outcome.complete == 3
    statuses = Counter((r.data.tags["kind"], r.info.status) for r in _runs(uri, "tiny"))
    assert statuses[("condition", "FAILED")] == 1 and statuses[("condition", "FINISHED")] == 3
    monkeypatch.setattr(study_module, "measure", real)
    assert run_study(path, storage=storage, progress=False).complete == 4
    finished = Counter((r.data.params["env"], r.data.params["lam"], r.data.params["estimator"])
                       for r in _runs(uri, "tiny")
                       if r.data.tags["kind"] == "estimator" and r.info.status == "FINISHED")
    assert len(finished) == 4 * 3 and set(finished.values()) == {1}

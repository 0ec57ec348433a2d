"""Helpers of the study tests: study files, command-line runs in subprocesses, and a census of
what the stores hold (for the exactly-once checks)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from suite.harness.plan import frozen_params

RACE = """
[study]
name = "race"
sampler = "grid"
seeds = [0]
estimators = ["reward_to_go", "gae:lambda={lam},critic=exact"]

[space]
env = ["chain:n=4", "chain:n=5", "chain:n=6"]
lam = [0.0, 0.9]

[fixed]
gamma = 0.9
horizon = 6
trajectories = 200
batch_size = 10
"""
RACE_POINTS = 6
RACE_ESTIMATORS = 3  # reinforce comes along


def write(folder: Path, text: str, name: str = "study.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def env_for(uri: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, **extra}
    env.pop("PG_TEST_URL", None)  # the children must not see the server's password elsewhere
    return env


def suite_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "suite", *args]


def start(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(suite_cmd(*args), cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def together(n: int, args: list[str], cwd: Path, env: dict[str, str],
             timeout: float = 300) -> list[tuple[int, str, str]]:
    """Start n identical invocations at the same moment; (exit code, stdout, stderr) of each."""
    procs = [start(args, cwd, env) for _ in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


@dataclass
class Census:
    """What the stores hold for one study."""

    trials: Counter  # Optuna state name -> trials of the study
    complete_per_point: Counter  # grid point -> COMPLETE trials
    results: Counter  # (condition, estimator) -> FINISHED estimator runs
    statuses: Counter  # (run kind, status) -> MLflow runs
    runs: list  # every MLflow run of the experiment

    def exactly_once(self, points: int, estimators: int) -> bool:
        return (self.trials == Counter({"COMPLETE": points})
                and len(self.complete_per_point) == points
                and set(self.complete_per_point.values()) == {1}
                and len(self.results) == points * estimators
                and set(self.results.values()) == {1}
                and all(status == "FINISHED" for _, status in self.statuses))


def census(storage: str, uri: str, name: str) -> Census:
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=50_000) if exp else []
    key = lambda params: tuple(sorted(params.items()))  # noqa: E731
    results = Counter()
    for r in runs:
        if r.data.tags.get("kind") == "estimator" and r.info.status == "FINISHED":
            p = {k: v for k, v in r.data.params.items()
                 if k not in ("estimator", "claims_unbiased", "seeds")}
            results[(key(p), r.data.params["estimator"])] += 1
    return Census(
        trials=Counter(t.state.name for t in trials),
        complete_per_point=Counter(key({k: repr(v) for k, v in frozen_params(t).items()})
                                   for t in trials if t.state == TrialState.COMPLETE),
        results=results,
        statuses=Counter((r.data.tags.get("kind"), r.info.status) for r in runs),
        runs=runs)

"""Exactly once, whatever starts the work: invocations started together (fresh or started store,
SQLite or PostgreSQL, several workers each), ``--fail-running`` next to a live worker, SIGKILL,
SIGTERM. Each scenario runs the real command line in subprocesses and counts what the stores
hold: every condition complete once, every estimator result FINISHED once, no other run."""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from suite.harness.queue import Heartbeat, Pulse, claim, open_storage
from suite.harness.runner import run_study
from suite.harness.stores import parse_store_url

from .studyruns import RACE, RACE_ESTIMATORS, RACE_POINTS, census, env_for, start, suite_cmd, together, write

SLOW = """
[study]
name = "slow"
sampler = "grid"
seeds = [0]
estimators = ["reward_to_go"]

[space]
gamma = [0.9, 0.8]

[fixed]
env = "chain:n=10"
horizon = 60
trajectories = {trajectories}
batch_size = 10
"""
FAST_BEAT = {"SUITE_HEARTBEAT": "interval=1,grace=3"}


def _sqlite(tmp: Path) -> tuple[str, str]:
    return f"sqlite:///{tmp / 'optuna.db'}", f"sqlite:///{tmp / 'mlflow.db'}"


def _race(tmp: Path, storage: str, uri: str, started: bool) -> list[tuple[int, str, str]]:
    path = write(tmp, RACE)
    env = env_for(uri)
    if started:  # a store that already holds the study, one condition done
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            mp.chdir(tmp)
            assert run_study(path, storage=storage, trials=1, progress=False).complete == 1
    return together(2, ["study", str(path), "--storage", storage, "--workers", "2"], tmp, env)


@pytest.mark.parametrize("started", [False, True], ids=["fresh", "started"])
def test_two_invocations_with_two_workers_each_run_everything_once_on_sqlite(tmp_path, started):
    storage, uri = _sqlite(tmp_path)
    results = _race(tmp_path, storage, uri, started)
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    found = census(storage, uri, "race")
    assert found.exactly_once(RACE_POINTS, RACE_ESTIMATORS), found


def test_two_invocations_with_two_workers_each_run_everything_once_on_postgres(
        tmp_path, pg_database):
    """Optuna and MLflow both on a fresh PostgreSQL database, through the documented
    postgresql:// URL (both invocations create the schemas at once); the password appears in no
    output, no MLflow tag or parameter, and not in the report. (A started store is the SQLite
    case above: the plan lock is the same code, with an advisory lock here.)"""
    storage, uri = pg_database(), pg_database()
    password = storage.split(":")[2].split("@")[0]
    results = _race(tmp_path, storage, uri, started=False)
    assert [code for code, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    found = census(storage, uri, "race")
    assert found.exactly_once(RACE_POINTS, RACE_ESTIMATORS), found
    for _, out, err in results:
        assert password not in out + err
        assert "postgresql://suite:***@" in out
    for run in found.runs:
        assert password not in repr(run.data.tags) + repr(run.data.params)
    report = subprocess.run(suite_cmd("report", "race", "--out", "rep"),
                            cwd=tmp_path, env=env_for(uri), capture_output=True, timeout=300)
    assert report.returncode == 0, report.stderr.decode()[-2000:]
    assert password.encode() not in report.stdout + report.stderr
    for name in ("report.html", "report.pdf"):
        assert password.encode() not in (tmp_path / "rep" / name).read_bytes()


def _claim_all(storage_url: str, out: str) -> None:
    """Child process: claim trials until none waits; write the claimed trial numbers."""
    store = parse_store_url(storage_url, "Optuna storage", ("sqlite", "postgresql"))
    study = optuna.load_study(study_name="q", storage=open_storage(store, Heartbeat()))
    numbers = []
    while (trial := claim(study)) is not None:
        numbers.append(trial.number)
    Path(out).write_text(" ".join(map(str, numbers)))


def test_claims_are_atomic_when_processes_compete_on_sqlite(tmp_path):
    """Before: Optuna's pop on SQLite read WAITING and wrote RUNNING in two transactions; under
    contention 0.5-11% of the claims went to two processes."""
    url = f"sqlite:///{tmp_path / 'q.db'}"
    study = optuna.create_study(study_name="q", storage=url)
    for i in range(90):
        study.enqueue_trial({"i": i}, skip_if_exists=False)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_claim_all, args=(url, str(tmp_path / f"claims{k}")))
             for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    claimed = Counter(int(n) for k in range(3)
                      for n in (tmp_path / f"claims{k}").read_text().split())
    assert len(claimed) == 90 and set(claimed.values()) == {1}


def _wait_running(storage: str, name: str, n: int = 1, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
            if sum(t.state == TrialState.RUNNING for t in trials) >= n:
                return
        except KeyError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"no {n} RUNNING trial(s) of {name} within {timeout} s")


def test_fail_running_fails_only_trials_whose_heartbeat_stopped(tmp_path, monkeypatch):
    """Before: --fail-running failed every RUNNING trial, a live worker's too, which then
    crashed telling its result and was recomputed. Now a trial is failed only when its
    heartbeat is older than the grace period, however long ago it started."""
    storage, uri = _sqlite(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SUITE_HEARTBEAT", "interval=1,grace=3")
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, RACE)
    run_study(path, storage=storage, trials=1, progress=False)
    store = parse_store_url(storage, "Optuna storage", ("sqlite",))
    backend = open_storage(store, Heartbeat(1, 3))
    study = optuna.load_study(study_name="race", storage=backend)
    study.enqueue_trial({"env": "chain:n=6", "lam": 0.9})
    live = claim(study)
    with Pulse(lambda: backend.record_heartbeat(live._trial_id), 1):  # a live worker's beat
        time.sleep(4)  # longer than the grace period since it started
        said = []
        run_study(path, storage=storage, fail_running=True, progress=False, say=said.append)
        assert study._storage.get_trial(live._trial_id).state == TrialState.RUNNING
        assert any("running in another live process" in line for line in said), said
    time.sleep(4)  # the worker died: its heartbeat stopped
    run_study(path, storage=storage, fail_running=True, progress=False, say=said.append)
    assert study._storage.get_trial(live._trial_id).state == TrialState.FAIL
    found = census(storage, uri, "race")
    assert found.results and set(found.results.values()) == {1}
    assert len(found.complete_per_point) == RACE_POINTS


def test_a_sigkilled_invocation_is_reported_then_redone_with_fail_running(tmp_path):
    storage, uri = _sqlite(tmp_path)
    # long enough (a few seconds) that the kill lands while its one trial is RUNNING
    path = write(tmp_path, SLOW.format(trajectories=2_000_000))
    env = env_for(uri, **FAST_BEAT)
    victim = start(["study", str(path), "--storage", storage, "--trials", "1"], tmp_path, env)
    _wait_running(storage, "slow")
    time.sleep(1)
    victim.kill()
    victim.communicate()
    time.sleep(4)  # the heartbeat goes stale
    args = suite_cmd("study", str(path), "--storage", storage)
    report = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "left RUNNING by a worker that is gone" in report.stderr
    assert "--fail-running" in report.stderr
    assert "MLflow run(s) were left RUNNING" in report.stderr
    fixed = subprocess.run([*args, "--fail-running"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert "failed 1 trial(s) whose worker is gone" in fixed.stderr
    found = census(storage, uri, "slow")
    assert found.trials == Counter({"COMPLETE": 2, "FAIL": 1})
    assert set(found.results.values()) == {1} and len(found.results) == 4
    assert not any(status == "RUNNING" for _, status in found.statuses), found.statuses


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_to_the_main_process_stops_its_workers_and_marks_their_trials(tmp_path):
    """Before: SIGTERM with --workers 2 ended the main process only; the workers ran on and then
    hung forever."""
    storage, uri = _sqlite(tmp_path)
    path = write(tmp_path, SLOW.format(trajectories=300_000))
    env = env_for(uri, **FAST_BEAT)
    main = start(["study", str(path), "--storage", storage, "--workers", "2"], tmp_path, env)
    _wait_running(storage, "slow", n=2)
    workers = _children(main.pid)
    assert workers
    main.send_signal(signal.SIGTERM)
    out, err = main.communicate(timeout=120)
    assert main.returncode == 130, err[-2000:]
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers)
    found = census(storage, uri, "slow")
    assert found.trials == Counter({"FAIL": 2})
    assert found.statuses[("invocation", "KILLED")] == 1
    assert {status for kind, status in found.statuses if kind != "invocation"} <= {"KILLED"}
    again = subprocess.run(suite_cmd("study", str(path), "--storage", storage),
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert set(census(storage, uri, "slow").results.values()) == {1}

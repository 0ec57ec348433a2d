"""Bad input, everywhere: one line on stderr naming the rule and the value, exit code 2, nothing
written (no store, no queue, no run, no file), within seconds also when a server does not answer.
Valid corner cases (grad J = 0, zero variance) run and give defined results."""

from __future__ import annotations

import json
import socket
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from suite.cli import main
from suite.core.errors import InputError
from suite.core.limits import Limits, limits

GOOD = """
[study]
name = "good"
seeds = [0]
estimators = ["reward_to_go"]

[space]
lam = [0.5]

[fixed]
env = "chain:n=4"
policy = "random:temperature=1,seed={lam:.0f}"
gamma = 0.9
horizon = 5
trajectories = 200
batch_size = 10
"""


def _edit(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


def _policy(policy: str) -> str:
    """GOOD with another policy (and without the parameter only the policy used)."""
    return _edit('policy = "random:temperature=1,seed={lam:.0f}"',
                 f'policy = "{policy}"').replace("lam = [0.5]\n", "")


# study file text -> a fragment of the one-line error
BAD_STUDIES = {
    "name '..'": (_edit('name = "good"', 'name = ".."'), "study.name"),
    "absolute name": (_edit('name = "good"', 'name = "/tmp/x"'), "study.name"),
    "template fill width": (_edit("{lam:.0f}", "{lam:>800000000}"), "format ':>800000000'"),
    "template conversion": (_edit("{lam:.0f}", "{lam!r}"), "format '!r'"),
    "template positional": (_edit("{lam:.0f}", "{0}"), "must name a parameter"),
    "template spec for a string": (_edit('lam = [0.5]', 'lam = ["a"]'), "cannot be filled"),
    "batch size does not divide": (_edit("batch_size = 10", "batch_size = 7"), "must divide"),
    "too few batches": (_edit("trajectories = 200", "trajectories = 50"), "too few trajectories"),
    "batch of one for a batch estimator": (
        _edit('["reward_to_go"]', '["leave_one_out_baseline"]').replace("batch_size = 10",
                                                                         "batch_size = 1"),
        "batch size must be >= 2"),
    "templated env out of range": (
        _edit('env = "chain:n=4"', 'env = "chain:n={n}"').replace("lam = [0.5]",
                                                                  "lam = [0.5]\nn = [4, 1]"),
        "chain: need n >= 2"),
    "templated estimator out of range": (
        _edit('["reward_to_go"]', '["gae:lambda={lam},critic=exact"]').replace(
            "lam = [0.5]", "lam = [0.5, 2.0]"), "lambda must lie in [0, 1]"),
    "trained fraction": (_policy("trained:fraction=2"), "fraction must lie in [0, 1)"),
    "trained option": (_policy("trained:fractoin=0.5"), "unknown option"),
    "mlp too large": (_policy("mlp:hidden=1000000000"), "above the bound"),
    "trajectories bound": (_edit("trajectories = 200", "trajectories = 1000000000"),
                           "above the bound of 100,000,000 trajectories"),
    "horizon bound": (_edit("horizon = 5", "horizon = 1000000"), "above the bound"),
    "states x actions bound": (_edit('env = "chain:n=4"', 'env = "garnet:S=1000000,A=1000"'),
                               "above the bound"),
    "float state count": (_edit('env = "chain:n=4"', 'env = "garnet:S=1e3,A=2"'),
                          "must be a whole number"),
    "negative temperature": (_edit("temperature=1", "temperature=-1"), "temperature must be > 0"),
}


@pytest.fixture
def clean(tmp_path, monkeypatch):
    """A working directory and stores that must stay empty."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("SUITE_LIMITS", raising=False)
    return tmp_path


def _one_line_exit_2(capsys, argv, must_contain: str, secret: str | None = None) -> str:
    started = time.monotonic()
    code = main(argv)
    seconds = time.monotonic() - started
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and must_contain in err, err
    assert seconds < 10, f"{seconds:.1f} s"
    if secret:
        assert secret not in captured.out + captured.err
    return err


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", list(BAD_STUDIES))
def test_a_bad_study_is_one_line_and_writes_nothing(clean, capsys, case):
    text, fragment = BAD_STUDIES[case]
    (clean / "bad.toml").write_text(textwrap.dedent(text))
    _one_line_exit_2(capsys, ["study", "bad.toml"], fragment)
    assert _files(clean) == ["bad.toml"]


def test_the_good_study_runs(clean, capsys):
    (clean / "good.toml").write_text(GOOD)
    assert main(["study", "good.toml"]) == 0


@pytest.mark.parametrize("make, fragment", [
    (lambda d: d / "folder.toml", "is a folder"),
    (lambda d: d / "latin1.toml", "not UTF-8"),
    (lambda d: d / "missing.toml", "does not exist"),
])
def test_a_study_path_that_cannot_be_read_is_one_line(clean, capsys, make, fragment):
    (clean / "folder.toml").mkdir()
    (clean / "latin1.toml").write_bytes(GOOD.replace("good", "g\xe9od").encode("latin-1"))
    path = make(clean)
    _one_line_exit_2(capsys, ["study", str(path)], fragment)
    assert _files(clean) == ["folder.toml", "latin1.toml"]


class _Silent:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent():
    server = _Silent()
    yield server
    server.close()


@pytest.mark.parametrize("storage, tracking, fragment", [
    ("foo://x", None, "unsupported scheme 'foo'"),
    ("sqlite:///", None, "needs a file"),
    ("sqlite:///{tmp}", None, "is a directory"),
    ("sqlite:///{tmp}/notes.txt", None, "not a SQLite database"),
    ("postgresql+pg8000://u:hunter2@127.0.0.1/db", None, "driver 'postgresql+pg8000'"),
    ("postgresql://u:hunter2@127.0.0.1:{closed}/db", None, "cannot be reached"),
    ("postgresql://u:hunter2@127.0.0.1:{silent}/db", None, "cannot be reached"),
    (None, "ftp://u:hunter2@host/x", "unsupported scheme 'ftp'"),
    (None, "http://u:hunter2@127.0.0.1:{closed}", "cannot be reached"),
    (None, "http://u:hunter2@127.0.0.1:{silent}", "cannot be reached"),
    (None, "sqlite:///{tmp}", "is a directory"),
])
def test_a_bad_or_unreachable_store_fails_fast_in_one_line(clean, capsys, monkeypatch, silent,
                                                           storage, tracking, fragment):
    (clean / "good.toml").write_text(GOOD)
    (clean / "notes.txt").write_text("not a database")
    fill = lambda u: u.format(tmp=clean, closed=_closed_port(), silent=silent.port)  # noqa: E731
    argv = ["study", "good.toml"] + (["--storage", fill(storage)] if storage else [])
    if tracking:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", fill(tracking))
    err = _one_line_exit_2(capsys, argv, fragment, secret="hunter2")
    assert "***" in err or "hunter2" not in (storage or "") + (tracking or "")
    assert _files(clean) == ["good.toml", "notes.txt"]


@pytest.mark.parametrize("argv, fragment", [
    (["study", "good.toml", "--workers", "0"], "--workers"),
    (["study", "good.toml", "--workers", "100000"], "--workers"),
    (["study", "good.toml", "--trials", "0"], "--trials"),
    (["measure", "--env", "chain:n=4", "--gamma", "0.9", "--horizon", "5", "--trajectories",
      "200", "--seed", "-1"], "--seed"),
    (["measure", "--env", "chain:n=4", "--gamma", "0.9", "--horizon", "5", "--trajectories",
      "200", "--out", "good.toml"], "is a file"),
    (["exact", "--env", "chain:n=4", "--gamma", "0.9", "--horizon", "5", "--out",
      "good.toml/sub"], "is a file"),
    (["measure", "--env", "chain:n=4", "--gamma", "0.9", "--horizon", "5", "--trajectories",
      "1000000000"], "above the bound"),
    (["exact", "--env", "chain:n=4", "--gamma", "0.9", "--horizon", "100000000"],
     "above the bound"),
    (["exact", "--env", "garnet:S=1000000,A=1000", "--gamma", "0.9", "--horizon", "5"],
     "above the bound"),
    (["exact", "--env", "chain:n=4", "--gamma", "0.9", "--horizon", "5", "--policy",
      "complex.npy"], "finite real numbers"),
    (["measure", "--env", "chain:n=4", "--gamma", "0.9", "--horizon", "5", "--trajectories",
      "200", "--threads", "0"], "threads must be >= 1"),
    (["report", "/tmp/absolute"], "study name"),
    (["report", ".."], "is a folder"),
    (["report", "good.toml", "--out", "notes.txt"], "is a file"),
])
def test_bad_command_line_values_are_one_line(clean, capsys, argv, fragment):
    (clean / "good.toml").write_text(GOOD)
    (clean / "notes.txt").write_text("x")
    np.save(clean / "complex.npy", np.ones((4, 2), dtype=complex))
    _one_line_exit_2(capsys, argv, fragment)
    assert _files(clean) == ["complex.npy", "good.toml", "notes.txt"]


def test_bounds_can_be_raised_and_a_bad_override_is_one_line(clean, capsys, monkeypatch):
    monkeypatch.setenv("SUITE_LIMITS", "trajectories=2e9, horizon=20000")
    assert limits() == Limits(trajectories=2_000_000_000, horizon=20_000)
    monkeypatch.setenv("SUITE_LIMITS", "horizon=20000,trajectoires=5")
    with pytest.raises(InputError, match="did you mean 'trajectories'"):
        limits()
    monkeypatch.setenv("SUITE_LIMITS", "horizon=-5")
    _one_line_exit_2(capsys, ["exact", "--env", "chain:n=4", "--gamma", "0.9", "--horizon", "5"],
                     "SUITE_LIMITS: horizon must be a whole number")


def test_measure_where_grad_j_is_zero_gives_defined_results(clean, capsys):
    """FrozenLake's goal is 6 steps away: with H = 5 every return is 0, grad J = 0 and every
    estimator's variance is 0. Before: the interval code crashed on an empty tensor."""
    code = main(["measure", "--env", "FrozenLake-v1", "--gamma", "0.9", "--horizon", "5",
                 "--trajectories", "200", "--out", "out"])
    out = capsys.readouterr().out
    assert code == 0
    assert "undefined" in out and "grad J = 0" in out
    stats = json.loads((clean / "out" / "stats.json").read_text().replace("NaN", "null"))
    row = stats["estimators"]["reinforce"]
    assert row["variance"] == 0 and row["p_value"] == 1.0 and row["rel_bias"] is None


def test_a_study_where_grad_j_is_zero_completes(clean, capsys):
    (clean / "zero.toml").write_text(textwrap.dedent("""
        [study]
        name = "zero"
        estimators = ["reward_to_go", "leave_one_out_baseline"]
        [space]
        gamma = [0.9, 1.0]
        [fixed]
        env = "FrozenLake-v1"
        horizon = 5
        trajectories = 200
        """))
    assert main(["study", "zero.toml"]) == 0, capsys.readouterr().err
    assert "2 conditions complete" in capsys.readouterr().out


def test_a_search_whose_objective_is_undefined_completes(clean, capsys):
    """grad J = 0 makes a variance ratio 0/0: the trial is recorded (PRUNED, its objective
    undefined), not failed, and the command succeeds."""
    (clean / "zero.toml").write_text(textwrap.dedent("""
        [study]
        name = "zero_search"
        sampler = "random"
        trials = 2
        estimators = ["reward_to_go"]
        [space]
        gamma = { low = 0.5, high = 0.9 }
        [fixed]
        env = "FrozenLake-v1"
        horizon = 5
        trajectories = 200
        [[objectives]]
        metric = "variance_ratio"
        estimator = "reward_to_go"
        direction = "minimize"
        """))
    assert main(["study", "zero.toml"]) == 0, capsys.readouterr().err
    assert "2 conditions complete" in capsys.readouterr().out

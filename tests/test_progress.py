"""Progress of a study: a line per finished trial in a log, a bar on a terminal, a remaining time
from the work done, and a trial order that mixes the conditions from the start."""

import io
import re
import textwrap
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

from optuna.trial import TrialState

import suite.harness.progress as progress_module
from suite.harness.progress import Progress, clock
from suite.harness.runner import run_study
from suite.harness.study import condition_label
from suite.harness.study_spec import load_study

ROOT = Path(__file__).resolve().parent.parent


def _trial(number, work, state=TrialState.WAITING, seconds=1.0):
    start = datetime(2026, 1, 1)
    return SimpleNamespace(number=number, state=state, params={}, system_attrs={
        "fixed_params": {"work": work}}, datetime_start=start,
        datetime_complete=start + timedelta(seconds=seconds) if state.is_finished() else None)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _progress(monkeypatch, works, stream=None):
    fake = FakeClock()
    monkeypatch.setattr(progress_module.time, "perf_counter", fake)
    queue = [_trial(i, w) for i, w in enumerate(works)]
    p = Progress("s", queue, None, work=lambda params: params.get("work"),
                 label=lambda params: f"w={params.get('work')}", stream=stream or io.StringIO())
    return p, fake


def test_remaining_time_comes_from_the_work_done_not_the_trial_count(monkeypatch):
    p, fake = _progress(monkeypatch, [1, 1, 8])
    fake.now = 2.0  # the first trial, of work 1, took 2 s
    p.update([_trial(0, 1, TrialState.COMPLETE, 2.0)])
    assert p.remaining() == 2.0 * 9  # 9 units of work left at 2 s each; by count it would be 4 s
    fake.now = 4.0
    p.update([_trial(0, 1, TrialState.COMPLETE), _trial(1, 1, TrialState.COMPLETE, 2.0)])
    assert p.remaining() == 2.0 * 8 and p.done == 2  # trial 0 is not counted twice
    fake.now = 20.0
    p.update([_trial(2, 8, TrialState.FAIL, 16.0)])  # a failed trial is finished work too
    assert p.remaining() == 0.0 and p.done == 3


def test_a_line_per_trial_when_the_output_is_not_a_terminal(monkeypatch):
    out = io.StringIO()
    p, fake = _progress(monkeypatch, [1, 3], out)
    fake.now = 1.5
    p.update([_trial(0, 1, TrialState.COMPLETE, 1.5)])
    fake.now = 6.0
    p.update([_trial(1, 3, TrialState.FAIL, 4.5)])
    p.close()
    lines = out.getvalue().splitlines()
    assert lines == ["s: trial 0 (w=1) in 1.5 s; 1/2 done, 1 left, about 0:04 left (25% of the work done)",
                     "s: trial 1 failed (w=3) in 4.5 s; 2/2 done, 0 left",
                     "s: 2 trials in 0:06"]


def test_a_bar_and_no_lines_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    p, fake = _progress(monkeypatch, [1, 3], out)
    fake.now = 1.0
    p.update([_trial(0, 1, TrialState.COMPLETE)])
    p.close()
    text = out.getvalue()
    assert "s 1/2 trials: " in text and "% of the work|" in text and "done" not in text


def test_clock():
    assert [clock(s) for s in (0, 59.6, 125.3, 3725)] == ["0:00", "1:00", "2:05", "1:02:05"]


GRID = """
[study]
name = "grid"
[space]
env = ["FrozenLake-v1", "CliffWalking-v1", "Taxi-v4"]
policy = ["uniform", "trained:fraction=0.5"]
gamma = [0.9, 0.99]
horizon = [20, 50]
[fixed]
trajectories = 1000
"""


def test_grid_order_mixes_every_parameter_from_the_first_trials(tmp_path):
    (tmp_path / "g.toml").write_text(GRID)
    spec = load_study(tmp_path / "g.toml")
    grid = spec.grid()
    assert len({tuple(sorted(p.items())) for p in grid}) == len(grid) == 24
    for key, values in spec.space.items():  # each value once before any value twice
        first = [p[key] for p in grid[:len(values)]]
        assert sorted(first, key=str) == sorted(values, key=str), (key, first)
    for n in (6, 12, 18):  # and evenly spread after that
        for key, values in spec.space.items():
            counts = [sum(p[key] == v for p in grid[:n]) for v in values]
            assert max(counts) - min(counts) <= 1, (key, n, counts)


def test_a_study_prints_a_line_per_trial_in_a_log(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "p.toml").write_text(textwrap.dedent("""
        [study]
        name = "p"
        estimators = ["reinforce"]
        [space]
        env = ["chain:n=4", "chain:n=3"]
        horizon = [4, 12]
        [fixed]
        gamma = 0.9
        trajectories = 200
        """))
    run_study(tmp_path / "p.toml", storage=f"sqlite:///{tmp_path / 'o.db'}")
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("p: ")]
    pattern = (r"p: trial (\d) \((chain:n=4|chain:n=3) \| H=(4|12)\) in \d+\.\d s; (\d)/4 done, "
               r"(\d) left(, about \d+:\d\d left \(\d+% of the work done\))?")
    found = [re.fullmatch(pattern, x) for x in lines[:4]]
    assert all(found), lines
    assert [int(m.group(4)) for m in found] == [1, 2, 3, 4]
    assert all(bool(m.group(6)) == (m.group(5) != "0") for m in found)  # an estimate until the end
    assert [(m.group(2), m.group(3)) for m in found[:2]] == [("chain:n=4", "4"), ("chain:n=3", "12")]
    assert re.fullmatch(r"p: 4 trials in \d+:\d\d", lines[4])


def test_condition_labels_name_what_varies():
    default = load_study(ROOT / "studies" / "default.toml")  # an environment and a case
    assert condition_label(default, {"env": "Taxi-v4", "case": 2}) == \
        "Taxi-v4 | uniform | γ=0.99 | H=5 | N=0"
    calibration = load_study(ROOT / "studies" / "calibration.toml")  # cases and per-seed trials
    assert condition_label(calibration, {"seed": 3, "case": 1}) == \
        "Taxi-v4 | trained:fraction=0.5 | H=50 | seed=3"

"""Progress of a study: a line per finished trial in a log, a bar on a terminal, and a remaining
time estimated from the work the trials did, not from their number.

Trials differ in cost (a 50-step horizon samples 2.5 times the steps of a 20-step one; an
exact-only condition samples nothing), so the estimate weighs each trial by its work,
trajectories x horizon x seeds plus a fixed share per trial (``suite.harness.study.trial_work``),
known from its condition before it runs: remaining = elapsed / work done x work left. Work is a
proxy (a Taxi step costs more than a FrozenLake step), so the estimate is honest when the
finished trials are a fair sample of the rest: that is why a grid study's queue mixes every
parameter's values from the first trials on (``StudySpec.grid``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import TextIO

from optuna.trial import FrozenTrial, TrialState

__all__ = ["Progress", "clock"]


def clock(seconds: float) -> str:
    """125.3 -> '2:05'; 3725 -> '1:02:05'."""
    s = max(0, round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class Progress:
    """Follows the trials of one invocation through the Optuna storage.

    ``work(params)`` is a trial's work (None when its parameters are not known yet, as for a
    search trial before it is suggested: it then counts as the mean of the known ones);
    ``label(params)`` names its condition. ``update(trials)`` takes the study's trials and
    reports the ones that finished since the last call. Lines go to ``stream`` when it is not a
    terminal; on a terminal a tqdm bar counts the work, and shows the trials.
    """

    def __init__(self, name: str, waiting: Iterable[FrozenTrial], limit: int | None,
                 work: Callable[[dict], float | None], label: Callable[[dict], str],
                 stream: TextIO | None = None, enabled: bool = True):
        self.name, self.work, self.label = name, work, label
        self.stream = stream = sys.stderr if stream is None else stream
        queue = sorted(waiting, key=lambda t: t.number)[:limit]
        known = [w for w in (work(_params(t)) for t in queue) if w is not None]
        self.unit = sum(known) / len(known) if known else 1.0  # the work of a trial not known
        self.left = {t.number: self._work(_params(t)) for t in queue}
        self.total_work = sum(self.left.values())
        self.total = len(queue)
        self.done = 0
        self.work_done: float = 0
        self.start = time.perf_counter()
        self.enabled = enabled and self.total > 0
        self.bar = None
        if self.enabled and _isatty(stream):
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_work, desc=self._trials(), file=stream, smoothing=0,
                            bar_format="{desc}: {percentage:3.0f}% of the work|{bar}| "
                                       "[{elapsed}<{remaining}]")

    def _trials(self) -> str:
        return f"{self.name} {self.done}/{self.total} trials"

    def _work(self, params: dict) -> float:
        w = self.work(params)
        return self.unit if w is None else float(w)

    def remaining(self) -> float | None:
        """Seconds left: elapsed per unit of work done, times the work left (None before any)."""
        if self.work_done <= 0:
            return None
        left = max(self.total_work - self.work_done, 0.0)
        return (time.perf_counter() - self.start) / self.work_done * left

    def update(self, trials: Iterable[FrozenTrial]) -> None:
        """Report the queued trials that finished since the last call, in the order they did."""
        new = [t for t in trials if t.number in self.left and t.state.is_finished()]
        for t in sorted(new, key=lambda t: (t.datetime_complete is None, t.datetime_complete,
                                            t.number)):
            planned = self.left.pop(t.number)
            params = _params(t)
            work = self._work(params)  # a search trial's parameters are known only now
            self.total_work += work - planned
            self.done += 1
            self.work_done += work
            if self.enabled:
                self._show(t, params, work)

    def _show(self, t: FrozenTrial, params: dict, work: float) -> None:
        seconds = ((t.datetime_complete - t.datetime_start).total_seconds()
                   if t.datetime_complete and t.datetime_start else float("nan"))
        left, eta = self.total - self.done, self.remaining()
        if self.bar is not None:
            self.bar.total = self.total_work
            self.bar.set_description_str(self._trials(), refresh=False)
            self.bar.update(work)
            return
        state = {TrialState.COMPLETE: "", TrialState.FAIL: " failed"}.get(t.state, f" {t.state.name.lower()}")
        estimate = ("" if left == 0 or eta is None else
                    f", about {clock(eta)} left ({self.work_done / self.total_work:.0%} of the "
                    "work done)")
        print(f"{self.name}: trial {t.number}{state} ({self.label(params)}) in {seconds:.1f} s; "
              f"{self.done}/{self.total} done, {left} left{estimate}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(f"{self.name}: {self.done} trials in {clock(time.perf_counter() - self.start)}",
                  file=self.stream, flush=True)


def _params(t: FrozenTrial) -> dict:
    """A trial's parameters: suggested ones, or those it was enqueued with."""
    return t.params or t.system_attrs.get("fixed_params", {})


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

"""A study follows its estimator list and the registry: a rerun adds exactly the missing
estimators to the complete conditions (same seeds, same trajectories) and nothing else; an edit
that changes what existing results mean is refused in one line."""

from __future__ import annotations

from collections import Counter

import pytest
from mlflow.tracking import MlflowClient

import estimators
from estimators.registry import REGISTRY
from suite.cli import main
from suite.core.errors import InputError
from suite.harness.plan import Addition
from suite.harness.runner import run_study

from .studyruns import census, write

SMALL = """
[study]
name = "grow"
sampler = "grid"
seeds = [0, 1]
estimators = {estimators}

[space]
gamma = [0.9, 0.99]

[fixed]
env = "chain:n=4"
horizon = {horizon}
trajectories = 400
batch_size = 10
"""


def _study(tmp, estimators='["reward_to_go"]', horizon=6, name="grow", filename="study.toml"):
    text = SMALL.format(estimators=estimators, horizon=horizon).replace('"grow"', f'"{name}"')
    return write(tmp, text, filename)


def _finished(uri: str, name: str) -> dict[tuple[str, str], dict]:
    """(gamma, estimator) -> metrics of its FINISHED estimator run (asserting there is one)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=5000)
            if r.data.tags.get("kind") == "estimator" and r.info.status == "FINISHED"]
    keys = Counter((r.data.params["gamma"], r.data.params["estimator"]) for r in runs)
    assert set(keys.values()) == {1}, keys
    return {(r.data.params["gamma"], r.data.params["estimator"]): r for r in runs}


def test_a_rerun_after_the_estimator_list_grew_adds_exactly_the_new_estimator(stores):
    tmp, uri, storage = stores
    path = _study(tmp)
    run_study(path, storage=storage, progress=False)
    before = _finished(uri, "grow")
    assert {e for _, e in before} == {"reinforce", "reward_to_go"}
    _study(tmp, '["reward_to_go", "leave_one_out_baseline"]')
    said = []
    outcome = run_study(path, storage=storage, progress=False, say=said.append)
    assert sorted(outcome.added, key=lambda a: a.trial) == [Addition(0, ("leave_one_out_baseline",)),
                                     Addition(1, ("leave_one_out_baseline",))]
    assert any("adding leave_one_out_baseline to 2 complete condition(s)" in s for s in said), said
    after = _finished(uri, "grow")
    assert len(after) == 2 * 3  # one finished run per condition and estimator, the new included
    for key, run in before.items():  # nothing that had finished ran again
        assert after[key].info.run_id == run.info.run_id
    conditions = {r.info.run_id for r in census(storage, uri, "grow").runs
                  if r.data.tags.get("kind") == "condition"}
    for run in after.values():  # the added runs name their condition's run
        assert run.data.tags["condition_run"] in conditions
    # same seeds, hence the same trajectories: the numbers of a study that had it from the start
    _study(tmp, '["reward_to_go", "leave_one_out_baseline"]', name="fresh", filename="fresh.toml")
    run_study(tmp / "fresh.toml", storage=storage, progress=False)
    fresh = _finished(uri, "fresh")
    for key in after:
        for metric in ("variance/trajectory", "variance/ratio_vs_reinforce", "bias/rel"):
            assert after[key].data.metrics[metric] == pytest.approx(
                fresh[key].data.metrics[metric], rel=1e-12, abs=1e-15)
    # and once more: nothing is missing, nothing runs
    again = run_study(path, storage=storage, progress=False)
    assert again.added == () and len(_finished(uri, "grow")) == 6


def test_a_study_of_all_estimators_follows_the_registry(stores):
    tmp, uri, storage = stores
    path = write(tmp, SMALL.format(estimators='"all"', horizon=4).replace(
        "gamma = [0.9, 0.99]", "gamma = [0.9]"))
    run_study(path, storage=storage, progress=False)
    n = len(estimators.names())
    assert len(_finished(uri, "grow")) == n
    estimators.register("test_added_estimator", formula="sum_t gamma^t psi_t G_t", unbiased=True,
                        condition="unbiased", reference="a test", no_exact="a test")(
        lambda ctx: ctx.discount * ctx.reward_to_go)
    try:
        outcome = run_study(path, storage=storage, progress=False)
    finally:
        REGISTRY.pop("test_added_estimator")
    assert outcome.added == (Addition(0, ("test_added_estimator",)),)
    found = _finished(uri, "grow")
    assert len(found) == n + 1
    assert found[("0.9", "test_added_estimator")].data.metrics["variance/trajectory"] == \
        pytest.approx(found[("0.9", "reward_to_go")].data.metrics["variance/trajectory"], rel=1e-12)


EDITS = {  # an edit of the study file -> what the one-line refusal must name
    ("horizon = 6", "horizon = 8"): "fixed.horizon is 8",
    ("seeds = [0, 1]", "seeds = [0]"): "study.seeds is [0]",
    ("trajectories = 400", "trajectories = 800"): "fixed.trajectories is 800",
    ('env = "chain:n=4"', 'env = "chain:n=5"'): 'fixed.env is "chain:n=5"',
    ("gamma = [0.9, 0.99]", "gamma = [0.9, 0.99]\nlam = [1]"): "space.lam is",
}


def test_an_edit_that_changes_existing_results_is_refused_in_one_line(stores, capsys):
    tmp, uri, storage = stores
    path = _study(tmp)
    run_study(path, storage=storage, progress=False)
    before = census(storage, uri, "grow")
    original = path.read_text()
    for (old, new), named in EDITS.items():
        assert old in original
        path.write_text(original.replace(old, new).replace(
            '"reward_to_go"', '"reward_to_go", "gae:lambda={lam},critic=exact"'
            if "lam" in new else '"reward_to_go"'))
        with pytest.raises(InputError, match="changes what its results mean"):
            run_study(path, storage=storage, progress=False)
        capsys.readouterr()
        assert main(["study", str(path), "--storage", storage]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err, err
        assert "--start-over" in err and "study.name" in err
    after = census(storage, uri, "grow")  # nothing was written
    assert after.trials == before.trials and len(after.runs) == len(before.runs)


def test_extensions_are_accepted_and_start_over_discards(stores):
    tmp, uri, storage = stores
    path = _study(tmp)
    run_study(path, storage=storage, progress=False)
    path.write_text(path.read_text().replace("gamma = [0.9, 0.99]", "gamma = [0.9, 0.99, 0.5]"))
    assert run_study(path, storage=storage, progress=False).complete == 3  # a new grid value
    path.write_text(path.read_text().replace("gamma = [0.9, 0.99, 0.5]", "gamma = [0.9]"))
    assert run_study(path, storage=storage, progress=False).complete == 3  # results are kept
    _study(tmp, horizon=8)
    said = []
    outcome = run_study(path, storage=storage, start_over=True, progress=False, say=said.append)
    assert outcome.complete == 2
    assert any("started over: discarded 3 trial(s)" in s for s in said), said
    found = _finished(uri, "grow")
    assert len(found) == 2 * 2
    assert {r.data.params["horizon"] for r in found.values()} == {"8"}

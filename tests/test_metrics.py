"""The metric table is the one source: every key the statistics, the exact block, the agreement
block and MLflow hold is defined there, and docs/metrics.md describes every metric."""

import re
from pathlib import Path

import pytest

import estimators
from suite.core.metrics import METRICS, ROW_FIELDS, by_mlflow, flatten, verdict
from suite.harness.measure import measure
from suite.harness.problem import make_problem


@pytest.fixture(scope="module")
def stats():
    problem = make_problem("FrozenLake-v1", "uniform", 0.9, 20)
    result = measure(problem.mdp, problem.policy, problem.solution,
                     estimators.resolve("reward_to_go,fitted_value_baseline"), 2000, 10, device="cpu")
    return {name: s.to_json() for name, s in result.stats.items()}  # the stats.json rows


def _defined(block: str | None) -> set[str]:
    keys = set()
    for m in METRICS:
        if m.block == block or (block == "exact" and m.source == "exact"):
            keys.add(m.key)
            if m.interval:
                keys.add(f"{m.key}_ci")
            if m.per_batch_size and block == "exact":
                keys.add(f"{m.key}_at_batch_size")
    return keys


def test_every_key_of_a_stats_row_is_defined(stats):
    for name, row in stats.items():
        undefined = set(row) - _defined(None) - set(ROW_FIELDS)
        assert not undefined, f"{name}: keys the metric table does not define: {undefined}"
        for at in row["at_batch_size"].values():
            assert set(at) - _defined("at_batch_size") <= {"rel_mse_se", "cosine_se", "n_blocks"}
        exact = row["exact"]
        assert set(exact) - _defined("exact") <= {"exact", "reason"}, name
        assert set(row["agreement"]) <= _defined("agreement"), name


def test_every_mlflow_key_is_in_the_table(stats):
    for row in stats.values():
        for key in flatten(row):
            base = re.sub(r"(_ci_low|_ci_high|_at_\d+)$", "", key)
            by_mlflow(base)  # KeyError when undefined


def test_the_checks_fail_on_an_undefined_key(stats):
    row = dict(next(iter(stats.values())))
    row["made_up_metric"] = 1.0
    assert set(row) - _defined(None) - set(ROW_FIELDS) == {"made_up_metric"}
    with pytest.raises(KeyError):
        by_mlflow("bias/made_up")


def test_names_and_mlflow_keys_are_unique():
    assert len({m.name for m in METRICS}) == len(METRICS)
    assert len({m.mlflow for m in METRICS}) == len(METRICS)


def test_docs_describe_every_metric():
    text = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    missing = [m.name for m in METRICS if f"`{m.name}`" not in text]
    assert not missing, f"docs/metrics.md does not describe {missing}"


def test_verdicts_prefer_exact_moments():
    assert verdict(0.0, True) == ("unbiased", "exact")  # a sampled rejection does not overrule
    assert verdict(0.3, False) == ("biased", "exact")
    assert verdict(1e-15, None) == ("unbiased", "exact")  # round-off
    assert verdict(None, True) == ("biased", "sampled")
    assert verdict(None, None) == ("inconclusive", "sampled")


def test_docs_table_is_the_generated_one():
    from suite.core.metrics import markdown_table

    text = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()
    block = text.split("<!-- metrics:start -->\n")[1].split("\n<!-- metrics:end -->")[0]
    assert block == markdown_table(), "regenerate with: python -m suite metrics --markdown"

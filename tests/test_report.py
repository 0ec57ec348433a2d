"""Reports built from the MLflow runs of tiny studies run into temporary stores."""

import re
import textwrap

import numpy as np
import pypdfium2 as pdfium
import pytest
from mlflow.tracking import MlflowClient

from reports.derivation import fmt
from reports.load import load_runs
from suite.cli import main
from suite.harness.runner import run_study

ESTIMATORS = ["reinforce", "reward_to_go", "reward_to_go_missing_discount",
              "final_formula_single_step", "final_formula_rescaled", "pgt_state_sampling",
              "gae_lambda_0", "gae_lambda_1"]

TINY = f"""
[study]
name = "tiny_report"
sampler = "grid"
seeds = [0]
estimators = {ESTIMATORS!r}

[space]
gamma = [0.9, 1.0]
horizon = [4, 8]

[fixed]
env = "chain:n=4"
trajectories = 1000
batch_size = 10
"""

ONE_HORIZON = """
[study]
name = "one_horizon"
sampler = "grid"
seeds = [0]
estimators = ["reinforce", "reward_to_go"]

[space]
gamma = [0.9, 0.99]

[fixed]
env = "chain:n=4"
horizon = 6
trajectories = 1000
batch_size = 10
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Both tiny studies, run once into one temporary MLflow store (the working directory)."""
    tmp = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        for name, text in (("tiny.toml", TINY), ("one.toml", ONE_HORIZON)):
            (tmp / name).write_text(textwrap.dedent(text))
            run_study(tmp / name, storage=f"sqlite:///{tmp / 'optuna.db'}", progress=False)
        # the same conditions again (a fresh Optuna storage): MLflow holds each one twice
        run_study(tmp / "one.toml", storage=f"sqlite:///{tmp / 'again.db'}", progress=False)
        yield tmp


@pytest.fixture
def in_store(store, monkeypatch):
    monkeypatch.chdir(store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    return store


def _ink(page) -> float:
    """Fraction of non-white pixels of a rendered PDF page."""
    pixels = np.asarray(page.render(scale=0.5).to_pil().convert("L"))
    return float((pixels < 245).mean())


def test_report_from_a_study_file(in_store, capsys):
    assert main(["report", "tiny.toml", "--out", "rep"]) == 0
    assert "report.html" in capsys.readouterr().out
    html = (in_store / "rep" / "report.html").read_text()
    assert html.count("<img") >= 6 and "data:image/png;base64," in html
    for name in ESTIMATORS:
        assert name in html
    for step in ("D1", "D2", "D3", "D4", "D5", "D6"):
        assert f"{step}. " in html
    assert re.search(r"reward_to_go_missing_discount: claimed biased: the test rejects .* in \d+ of 2 "
                     r"conditions with γ &lt; 1", html)
    pdf = pdfium.PdfDocument(str(in_store / "rep" / "report.pdf"))
    assert len(pdf) >= 4
    assert all(_ink(pdf[i]) > 0.005 for i in range(len(pdf)))


def test_numbers_come_from_mlflow(in_store):
    data = load_runs("tiny_report")
    assert len(data.conditions) == 4 and set(data.estimator_names) == set(ESTIMATORS)
    client = MlflowClient(data.uri)
    row = data.estimators.iloc[0]
    metrics = client.get_run(row["estimator_run"]).data.metrics
    assert row["rel_bias"] == metrics["bias/rel"]
    assert row["var_ratio"] == metrics["variance/ratio_vs_reinforce"]
    html_default = in_store / "results" / "tiny_report" / "report"
    assert main(["report", "tiny_report"]) == 0  # a bare name; the default output directory
    html = (html_default / "report.html").read_text()
    assert fmt(row["variance"] / row["grad_norm"] ** 2) == fmt(row["noise_to_signal"])
    assert f"{fmt(row['rel_bias'])} [{fmt(row['rel_bias_lo'])}, {fmt(row['rel_bias_hi'])}]" in html


def test_a_study_missing_an_axis_still_reports(in_store):
    assert main(["report", "one.toml", "--out", "one"]) == 0
    html = (in_store / "one" / "report.html").read_text()
    assert "Left out: the study did not vary the horizon (one value: 6)." in html
    assert "not run" in html  # the derivation's steps without their estimators say so
    assert html.count("<img") >= 3
    assert len(pdfium.PdfDocument(str(in_store / "one" / "report.pdf"))) >= 4


def test_a_rerun_condition_counts_once_with_its_latest_finished_run(in_store):
    from suite.harness.tracking import Tracker

    tracker = Tracker("one_horizon")
    latest = tracker.client.search_runs([tracker.experiment_id], "tags.kind = 'invocation'",
                                        order_by=["attributes.start_time DESC"])[0]
    failed = tracker.start("a failed re-run", latest.info.run_id, tags={"kind": "condition"},
                           params={"env": "chain:n=4", "policy": "uniform", "gamma": 0.9,
                                   "horizon": 6, "trajectories": 1000, "batch_size": 10,
                                   "seeds": [0], "n_params": 8})
    tracker.end(failed, "FAILED")
    data = load_runs("one_horizon")
    assert len(data.conditions) == 2 and len(data.estimators) == 2 * 2
    assert set(data.conditions["invocation_run"]) == {latest.info.run_id}
    assert failed not in set(data.conditions["condition_run"])
    assert data.skipped["superseded condition runs (re-runs)"] == 2
    assert data.skipped["condition runs not FINISHED"] == 1


@pytest.mark.parametrize("arg", ["no_such_study", "missing.toml"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(in_store, capsys, arg):
    assert main(["report", arg, "--out", "bad"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (in_store / "bad").exists()


def test_a_missing_store_is_not_created(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")
    assert main(["report", "default"]) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


def test_estimator_runs_of_the_older_nested_layout_still_report(tmp_path, monkeypatch):
    """Stores written before estimator runs moved to the top level nested them under their
    condition run, without a condition_run tag; the report reads both."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "one.toml").write_text(textwrap.dedent(ONE_HORIZON))
    run_study(tmp_path / "one.toml", storage=f"sqlite:///{tmp_path / 'o.db'}", progress=False)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("one_horizon")
    for run in client.search_runs([exp.experiment_id], "tags.kind = 'estimator'"):
        client.set_tag(run.info.run_id, "mlflow.parentRunId", run.data.tags["condition_run"])
        client.delete_tag(run.info.run_id, "condition_run")
    data = load_runs("one_horizon")
    assert len(data.estimators) == 2 * 2
    assert set(data.estimators["condition_run"]) == set(data.conditions["condition_run"])

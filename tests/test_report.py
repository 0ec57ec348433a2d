"""Reports built from the MLflow runs of tiny studies run into temporary stores."""

import html
import re
import textwrap

import numpy as np
import pypdfium2 as pdfium
import pytest
from mlflow.tracking import MlflowClient
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import getSampleStyleSheet
from reportlab.platypus import PageBreak, Paragraph, SimpleDocTemplate
from scipy import stats as st

import suite.core.metrics as metrics
from reports.assemble import assemble
from reports.document import Para, Table, parse
from reports.load import column, load_runs
from reports.render_html import render_html
from reports.tables import SHOWN, metric_table
from reports.text import fmt
from reports.verdicts import clopper_pearson, holm, judge
from suite.cli import main
from suite.core.metrics import METRICS
from suite.harness.runner import run_study

ESTIMATORS = ["reinforce", "reward_to_go", "reward_to_go_missing_discount",
              "final_formula_single_step", "final_formula_rescaled", "pgt_state_sampling",
              "batch_mean_baseline", "fitted_value_baseline", "gae_lambda_0"]

# two sampled conditions and exact-only ones around them (horizon and discount, one at a time)
TINY = f"""
[study]
name = "tiny_report"
sampler = "grid"
seeds = [0]
estimators = {ESTIMATORS!r}

[fixed]
env = "chain:n=4"
batch_size = 10

[[cases]]
gamma = 0.9
horizon = 6
trajectories = 2000

[[cases]]
gamma = 1.0
horizon = 6
trajectories = 2000

[[cases]]
gamma = 0.9
horizon = 3
trajectories = 0

[[cases]]
gamma = 0.9
horizon = 9
trajectories = 0

[[cases]]
gamma = 0.95
horizon = 6
trajectories = 0
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

# the calibration study's shape: one trial per seed
PER_SEED = """
[study]
name = "per_seed"
sampler = "grid"
estimators = ["reinforce", "reward_to_go_missing_discount", "fitted_value_baseline"]

[space]
seed = [0, 1, 2, 3, 4, 5]

[fixed]
env = "chain:n=4"
gamma = 0.9
horizon = 6
trajectories = 400
batch_size = 10
"""

# the LLM study's shape: group estimators on one-prompt token MDPs, groups that share the prompt
GROUPS = """
[study]
name = "groups"
sampler = "grid"
estimators = ["grpo:agg={agg}", "dr_grpo:agg={agg}", "rloo:agg={agg}"]

[space]
env = ["tokens:vocab=2,max_len=3,prompts=1,pass_first=0.8",
       "tokens:vocab=2,max_len=3,prompts=1,pass_first=0.3"]
batch_size = [2, 4]
agg = ["token-sum", "seq-mean-token-mean"]

[fixed]
gamma = 1.0
horizon = 3
shared_start = true
trajectories = 400
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The tiny studies, run once into one temporary MLflow store (the working directory)."""
    tmp = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        for name, text in (("tiny.toml", TINY), ("one.toml", ONE_HORIZON),
                           ("seeds.toml", PER_SEED), ("groups.toml", GROUPS)):
            (tmp / name).write_text(textwrap.dedent(text))
            run_study(tmp / name, storage=f"sqlite:///{tmp / 'optuna.db'}", progress=False)
        # the same conditions again (a fresh Optuna storage): MLflow holds each one twice
        run_study(tmp / "one.toml", storage=f"sqlite:///{tmp / 'again.db'}", progress=False)
        yield tmp


@pytest.fixture(scope="module")
def tiny_report(store):
    """The tiny study's report, built once through the command line (HTML and PDF)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(store)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
        assert main(["report", "tiny.toml", "--out", "rep"]) == 0
    return store / "rep"


@pytest.fixture
def in_store(store, monkeypatch):
    monkeypatch.chdir(store)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    return store


def fill(page) -> float:
    """How far down the page's text frame the ink reaches (0: empty, 1: full), footer excluded."""
    pixels = np.asarray(page.render(scale=0.5).to_pil().convert("L"))
    height = pixels.shape[0]
    top, bottom = int(15 / 297 * height), int((297 - 23) / 297 * height)
    rows = np.nonzero((pixels[top:bottom] < 245).any(axis=1))[0]
    return 0.0 if rows.size == 0 else float((rows.max() + 1) / (bottom - top))


def _text(page: str) -> str:
    """The page's visible text (no styles, no table of contents), entities resolved."""
    page = re.sub(r"<(style|nav)>.*?</\1>", "", page, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", "", page)))


def test_report_of_a_tiny_study_states_exact_verdicts(tiny_report):
    page = (tiny_report / "report.html").read_text()
    assert page.count("<img") >= 6 and "data:image/png;base64," in page
    text = _text(page)
    for name in ESTIMATORS:
        assert name in text
    for step in ("D1", "D2", "D3", "D4", "D5", "D6"):
        assert f"{step}. " in text
    assert re.search(r"reward_to_go_missing_discount: claimed biased \(γ < 1\), 4 conditions: exact: "
                     r"biased in all 4 \(relative bias", text)
    assert re.search(r"reward_to_go_missing_discount: .*claimed unbiased \(γ = 1\), 1 condition: exact: "
                     r"unbiased in the one", text)
    assert "reward_to_go: claimed unbiased, 5 conditions: exact: unbiased in all 5" in text
    assert "batch_mean_baseline scaled by 0.9" in text  # scale-free: (B-1)/B at B = 10
    # the first page answers the question before anything else
    assert text.index("At a glance") < text.index("1. Summary per environment")
    assert "every one of the 6 estimators that claim to be unbiased and have exact moments is " \
           "exactly unbiased" in text
    # fitted_value_baseline has no exact moments: the sampled test is its verdict, Holm-corrected
    assert re.search(r"for fitted_value_baseline, which has no exact moments and claims to be "
                     r"unbiased, the sampled test is the verdict: it rejects .* in \d of 2 "
                     r"estimator-conditions after Holm's correction", text)


def test_no_pdf_page_is_less_than_a_third_full(tiny_report):
    pdf = pdfium.PdfDocument(str(tiny_report / "report.pdf"))
    fills = [fill(pdf[i]) for i in range(len(pdf))]
    assert len(fills) >= 4 and min(fills[:-1]) >= 1 / 3, fills


def test_the_fill_measure_sees_a_near_empty_page(tmp_path):
    """The check above must fail on a page that holds one line."""
    path = tmp_path / "x.pdf"
    doc = SimpleDocTemplate(str(path), pagesize=A4)
    body = getSampleStyleSheet()["BodyText"]
    doc.build([Paragraph("one line", body), PageBreak(), Paragraph("x " * 3000, body)])
    pdf = pdfium.PdfDocument(str(path))
    assert fill(pdf[0]) < 1 / 3 < fill(pdf[1])


def test_claimed_unbiased_with_exact_moments_is_never_reported_biased(in_store):
    data = load_runs("tiny_report")
    judged = judge(data)
    exact = judged[judged["source"] == "exact"]
    assert len(exact) and not (exact["claims_unbiased"] & (exact["verdict"] == "biased")).any()
    assert not judged["contradicts"].any()
    # the rule that would report it: an exact bias above round-off in a claimed-unbiased run
    i = judged.index[(judged["estimator"] == "reward_to_go") & (judged["source"] == "exact")][0]
    data.estimators.loc[i, column("exact_rel_bias")] = 0.2
    judged = judge(data)
    assert judged.loc[i, "verdict"] == "biased" and judged.loc[i, "contradicts"]
    text = _text(render_html(assemble(data, figures=False)))
    assert "reward_to_go, claimed unbiased, is biased too" in text


def test_an_inconclusive_test_shows_as_such_with_the_trajectories_it_needs(in_store):
    data = load_runs("tiny_report")
    rows = (data.estimators["estimator"] == "fitted_value_baseline") & \
        (data.estimators["trajectories"] > 0)
    data.estimators.loc[rows, [column("p_value"), column("rejects_unbiased")]] = np.nan
    data.estimators.loc[rows, column("test_inconclusive")] = 1.0
    data.estimators.loc[rows, column("trajectories_needed")] = 52_000
    judged = judge(data)
    assert set(judged.loc[rows, "verdict"]) == {"inconclusive"}
    text = _text(render_html(assemble(data, figures=False)))
    assert "inconclusive in 2/2 (needs N ≈ 52,000) (sampled)" in text  # the first page
    assert "inconclusive in 2, needs N ≈ 52,000" in text  # the summary's sampled check


def test_the_sampled_verdict_counts_with_holm_over_conditions():
    assert holm([0.01, 0.04, 0.03], 0.05) == [True, False, False]  # 0.03 > 0.05 / 2
    assert holm([0.01, 0.02, 0.03], 0.05) == [True, True, True]  # step-down: 0.03 <= 0.05 / 1
    assert holm([0.2, 0.01], 0.05) == [False, True]
    assert holm([], 0.05) == []


def test_clopper_pearson_is_the_exact_binomial_interval():
    lo, hi = clopper_pearson(2, 40)
    assert st.binom.sf(1, 40, lo) == pytest.approx(0.025) and st.binom.cdf(2, 40, hi) == \
        pytest.approx(0.025)
    assert clopper_pearson(0, 40)[0] == 0 and clopper_pearson(40, 40)[1] == 1
    assert f"{clopper_pearson(2, 40)[0]:.3f}, {clopper_pearson(2, 40)[1]:.3f}" == "0.006, 0.169"


def test_metric_columns_come_from_the_metric_table(in_store, monkeypatch):
    data = load_runs("tiny_report")
    names = {m.name for m in METRICS}
    shown = [c for c in data.estimators.columns if c.removesuffix("_ci_low").removesuffix("_ci_high")
             in names]
    assert len(shown) > 20
    row = data.estimators.iloc[0]
    logged = MlflowClient(data.uri).get_run(row["estimator_run"]).data.metrics
    for m in METRICS:  # every column holds what the table's MLflow key logged
        if not m.per_batch_size and m.mlflow in logged:
            assert row[m.name] == logged[m.mlflow]
    assert set(metric_table().rows[i][1].removesuffix("_at_B") for i in range(len(SHOWN))) <= \
        {m.mlflow for m in METRICS}
    with pytest.raises(KeyError):
        column("rel_bais")
    # a metric the report reads, taken out of the table: the report cannot be built
    monkeypatch.setattr(metrics, "_BY_NAME", {k: v for k, v in metrics._BY_NAME.items()
                                              if k != "exact_cosine"})
    with pytest.raises(KeyError, match="exact_cosine"):
        assemble(data, figures=False)


def test_the_test_level_is_read_from_the_runs(in_store):
    data = load_runs("tiny_report")
    sampled = data.estimators["trajectories"] > 0
    data.estimators.loc[sampled, column("alpha")] = 0.01  # as if the runs had been made at 0.01
    text = _text(render_html(assemble(data, figures=False)))
    assert "at level 0.01 (each run's test/alpha)" in text


def test_numbers_come_from_mlflow(in_store, tiny_report):
    data = load_runs("tiny_report")
    assert len(data.conditions) == 5 and set(data.estimator_names) == set(ESTIMATORS)
    assert (data.conditions["trajectories"] == 0).sum() == 3
    judged = judge(data)
    row = judged[(judged["estimator"] == "reward_to_go_missing_discount")
                 & (judged["trajectories"] > 0) & (judged["gamma"] == 0.9)].iloc[0]
    metrics_ = MlflowClient(data.uri).get_run(row["estimator_run"]).data.metrics
    assert row["bias"] == metrics_["exact/rel_bias"] and row["source"] == "exact"
    assert fmt(metrics_["exact/rel_bias"]) in (tiny_report / "report.html").read_text()
    # an estimator without exact moments says why (from the condition run's stats.json)
    fitted = data.estimators[data.estimators["estimator"] == "fitted_value_baseline"]
    assert (fitted["no_exact"].str.contains("cross-fitted")).all()


def test_calibration_section_counts_rejections_per_seed(in_store):
    data = load_runs("per_seed")
    assert data.per_seed and len(data.conditions) == 6
    report = assemble(data, figures=False)
    table = next(b for b in report.blocks if isinstance(b, Table) and
                 b.head[-1] == "inconclusive" and "rejected / tested" in b.head)
    client = MlflowClient(data.uri)
    rows = [r for r in table.rows if not isinstance(r, str)]
    assert [r[0] for r in rows] == ["reinforce", "reward_to_go_missing_discount",
                                    "fitted_value_baseline"]
    for r in rows:
        runs = data.estimators[data.estimators["estimator"] == r[0]]
        logged = [client.get_run(i).data.metrics for i in runs["estimator_run"]]
        tested = [m for m in logged if "test/p_value" in m]
        k = sum(m["test/rejects_unbiased"] == 1 for m in tested)
        assert r[3] == f"{k} / {len(tested)}"
        assert r[5] == str(sum(m.get("test/inconclusive") == 1 for m in logged))
        lo, hi = clopper_pearson(k, len(tested))
        assert r[4] == f"{k / len(tested):.3f} [{lo:.3f}, {hi:.3f}]"
    html = _text(render_html(report))
    assert "Calibration of the sampled test" in html
    # a study with pooled seeds has no such section
    other = assemble(load_runs("tiny_report"), figures=False)
    assert "Calibration of the sampled test" not in _text(render_html(other))


def test_group_estimators_section(in_store):
    data = load_runs("groups")
    report = assemble(data, figures=False)
    text = _text(render_html(report))
    for title in ("Group estimators", "The difficulty bias", "The length bias",
                  "Variance against RLOO", "The length bias is step D6 again"):
        assert title in text
    table = next(b for b in report.blocks if isinstance(b, Table) and b.head[-1] == "largest / smallest")
    rows = {r[0]: r for r in table.rows[1:] if not isinstance(r, str)}
    # binary reward, one prompt, G = 2: GRPO's mean is omega_2 = 1/sqrt(2) times grad J, every p
    g2 = table.rows[1:table.rows.index("group size G = 4")]
    grpo = next(r for r in g2 if r[0] == "grpo:agg=token-sum")
    assert grpo[1:3] == ["×0.707", "×0.707"] and grpo[3] == "1"
    assert next(r for r in g2 if r[0] == "dr_grpo:agg=token-sum")[1:3] == ["×0.5", "×0.5"]
    assert rows["rloo:agg=token-sum"][1:3] == ["×1", "×1"]
    assert "seq-mean-token-mean" in text and "step D6" in text


def test_a_study_missing_an_axis_still_reports(in_store, capsys):
    assert main(["report", "one_horizon"]) == 0  # a bare name; the default output directory
    assert "report.html" in capsys.readouterr().out
    html = (in_store / "results" / "one_horizon" / "report" / "report.html").read_text()
    assert "Left out: the study did not vary the horizon alone (values: 6)." in html
    assert "did not run" in html  # the derivation's steps without their estimators say so
    assert html.count("<img") >= 3
    pdf = pdfium.PdfDocument(str(in_store / "results" / "one_horizon" / "report" / "report.pdf"))
    assert len(pdf) >= 3 and min(fill(pdf[i]) for i in range(len(pdf) - 1)) >= 1 / 3


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


def test_the_template_markup_becomes_blocks():
    tables = {"t": Table(["a", "b"], [["1", "2"]])}
    blocks = parse("# Title @top\n\n{.meta} some\ntext\n\n- one\n- two\n  more\n\n"
                   "::: box Box\n- x\n\n::: table t\n", tables, {})
    assert [type(b).__name__ for b in blocks] == ["Heading", "Para", "Bullets", "Box", "Table"]
    assert blocks[0].anchor == "top" and blocks[1] == Para("some text", "meta")
    assert blocks[2].items == ("one", "two more")
    with pytest.raises(KeyError):
        parse("::: table missing\n", tables, {})
    with pytest.raises(ValueError, match="unknown directive"):
        parse("::: tabel t\n", tables, {})


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

"""Users' estimator files: the framework signature, the decorator, the errors, the docs page."""

import re
import shlex
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import estimators
import suite.harness.estimator_files as estimator_files
from estimators.registry import FAMILIES, REGISTRY
from suite.cli import main
from suite.core.envs import make_mdp
from suite.core.errors import InputError
from suite.core.exact import solve
from suite.core.policies import random_policy
from suite.harness.measure import measure
from suite.harness.study_spec import load_study

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_registry():
    """Each test starts and ends with the built-in registry only."""
    registry, families = dict(REGISTRY), dict(FAMILIES)
    loaded = dict(estimator_files._LOADED)
    yield
    for table, saved in ((REGISTRY, registry), (FAMILIES, families),
                         (estimator_files._LOADED, loaded)):
        table.clear()
        table.update(saved)


def _file(tmp_path, body: str, name: str = "mine.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def _problem():
    mdp = make_mdp("tokens:vocab=2,max_len=3,prompts=2")
    policy = random_policy(mdp.n_states, mdp.n_actions, seed=2)
    return mdp, policy, solve(mdp, policy, 1.0, 3)


def test_the_examples_reproduce_the_builtin_estimators():
    names = estimator_files.load_estimator_files([ROOT / "examples" / "grpo_advantage.py",
                                                  ROOT / "examples" / "rloo_advantage.py"])
    assert names == ["grpo_advantage", "rloo_advantage"]
    mdp, policy, sol = _problem()
    pairs = [("grpo_advantage:agg=seq-mean-token-mean", "grpo"),
             ("grpo_advantage:agg=token-sum", "grpo:agg=token-sum"),
             ("rloo_advantage:agg=token-sum", "rloo"), ("rloo_advantage", "rloo:agg=token-mean")]
    chosen = estimators.resolve([n for pair in pairs for n in pair])
    # float64 arithmetic, as the framework functions get (measure's default on the CPU is
    # float32 for the built-in estimators: the two would then agree to 1e-6 only)
    result = measure(mdp, policy, sol, chosen, 2000, 4, seed=0, device="cpu", shared_start=True,
                     dtype=torch.float64)
    for mine, builtin in pairs:
        np.testing.assert_allclose(result.means[mine], result.means[builtin], rtol=1e-12,
                                   atol=1e-15)
        assert result.stats[mine].sampled.variance == pytest.approx(
            result.stats[builtin].sampled.variance, rel=1e-12)
    assert estimators.get("rloo_advantage:agg=token-sum").claims_unbiased(1.0)
    assert not estimators.get("rloo_advantage").claims_unbiased(1.0)  # token-mean by default
    assert estimators.get("grpo_advantage").params == {"agg": "token-mean"}


def test_loading_twice_registers_once_and_the_decorator_works(tmp_path):
    path = _file(tmp_path, """
        import torch
        from estimators import register

        @register("user_reward_to_go", formula="sum_t gamma^t psi_t G_t", unbiased=True,
                  condition="unbiased", reference="a user", no_exact="not declared")
        def user_reward_to_go(ctx):
            return ctx.discount * ctx.reward_to_go

        def helper(x):  # not an estimator: another signature
            return x
        """)
    assert estimator_files.load_estimator_file(path) == ["user_reward_to_go"]
    assert estimator_files.load_estimator_file(str(path)) == ["user_reward_to_go"]
    mdp, policy, sol = _problem()
    res = measure(mdp, policy, sol, estimators.resolve("reward_to_go,user_reward_to_go"), 400, 4,
                  device="cpu")
    np.testing.assert_array_equal(res.means["user_reward_to_go"], res.means["reward_to_go"])


@pytest.mark.parametrize("body, message", [
    ("import numpy as np\nx = 1 / 0\n", "failed to import: ZeroDivisionError: division by zero (line 2)"),
    ("def f(:\n", "failed to import: SyntaxError"),
    ("def f(x):\n    return x\n", "defines no estimator"),
    ("def bad(token_level_rewards, response_mask, group_index):\n"
     "    return token_level_rewards.sum(-1)\n",
     "bad returned advantages of shape [4]; they must have the shape of token_level_rewards [4, 3]"),
    ("def boom(token_level_rewards, response_mask, group_index):\n"
     "    raise KeyError('uid')\n", "boom raised KeyError"),
    ("def grpo(token_level_rewards, response_mask, group_index):\n"
     "    return token_level_rewards\n", "registered twice; rename"),
    ("from estimators import register\n"
     "@register('rloo', formula='f', unbiased=True, condition='c', reference='r', no_exact='-')\n"
     "def f(ctx):\n    return ctx.ones\n", "registered twice; rename"),
])
def test_bad_files_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, body, message):
    path = _file(tmp_path, body)
    before = set(REGISTRY)
    out = tmp_path / "out"
    code = main(["measure", "--env", "tokens:vocab=2,max_len=3,prompts=2", "--gamma", "1",
                 "--horizon", "3", "--trajectories", "400", "--batch-size", "4",
                 "--estimator-file", str(path), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert str(path) in err
    assert not out.exists() and set(REGISTRY) == before and not set(FAMILIES) - {*before}


def test_missing_file(capsys):
    assert main(["estimators", "--estimator-file", "nope.py"]) == 2
    assert "estimator file 'nope.py' does not exist" in capsys.readouterr().err


def test_a_wrong_shape_later_in_the_run_is_one_line_too(tmp_path):
    path = _file(tmp_path, """
        def late(token_level_rewards, response_mask, group_index):
            if token_level_rewards.shape[0] > 4:  # passes the probe, fails on the rollout
                return token_level_rewards[:, :1]
            return token_level_rewards
        """)
    estimator_files.load_estimator_file(path)
    mdp, policy, sol = _problem()
    with pytest.raises(InputError, match=r"late returned advantages of shape \[400, 1\]"):
        measure(mdp, policy, sol, estimators.resolve("late"), 400, 4, device="cpu")


def test_study_key_registers_the_file(tmp_path):
    study = _file(tmp_path, f"""
        [study]
        name = "mine"
        estimator_file = "{ROOT / 'examples' / 'rloo_advantage.py'}"
        estimators = ["rloo_advantage:agg={{agg}}"]
        [space]
        agg = ["token-sum", "token-mean"]
        [fixed]
        env = "tokens:vocab=2,max_len=3,prompts=2"
        gamma = 1.0
        horizon = 3
        """, "study.toml")
    spec = load_study(study)
    assert spec.estimator_files and "rloo_advantage" in estimators.names()
    bad = _file(tmp_path, study.read_text().replace("rloo_advantage.py", "nope.py"), "bad.toml")
    with pytest.raises(InputError, match="study.estimator_file: estimator file .* does not exist"):
        load_study(bad)


def _doc_commands() -> list[str]:
    text = (ROOT / "docs" / "your_estimator.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [c for b in blocks for c in b.replace("\\\n", " ").splitlines() if c.strip()]


def _columns(output: str) -> dict[str, dict[str, str]]:
    """The rows of a printed table, by estimator and column header (fixed-width columns)."""
    lines = output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("estimator "))
    head, rule = lines[at], lines[at + 1]
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", rule)]
    names = [head[a:b].strip() for a, b in spans]
    rows = {}
    for line in lines[at + 2:]:
        if not line.strip():
            break
        cells = [line[a:b].strip() for a, b in spans]
        rows[cells[0]] = dict(zip(names, cells, strict=True))
    return rows


def test_docs_page_commands_run_as_printed(monkeypatch, capsys):
    commands = _doc_commands()
    assert len(commands) == 3 and all(c.startswith("python -m suite ") for c in commands)
    monkeypatch.chdir(ROOT)
    outputs = []
    for command in commands:
        assert main(shlex.split(command)[3:]) == 0, command
        outputs.append(capsys.readouterr().out)
    assert "grpo_advantage:agg=seq-mean-token-mean" in outputs[0]
    assert "rloo_advantage:agg=token-sum" in outputs[1]
    assert "rloo_advantage\n" in outputs[2] and "claimed by its author" in outputs[2]
    # what the page says of the first command: the example prints the same sampled numbers as
    # grpo (grpo also has exact moments; a user's function has none)
    table = _columns(outputs[0])
    sampled = ("scale sampled [95% CI]", "p-value", "var/reinforce", "cos@B=8")
    assert [table["grpo_advantage:agg=seq-mean-token-mean"][c] for c in sampled] == [
        table["grpo"][c] for c in sampled]
    assert table["grpo"]["rel. bias exact"] != "n/a"
    assert table["grpo_advantage:agg=seq-mean-token-mean"]["rel. bias exact"] == "n/a"
    # and of the second: rloo_advantage:agg=token-sum claims and keeps unbiasedness (a row's
    # only '*' flags a rejection of "mean = grad J")
    rows = {line.split()[0]: line.split()[1:] for line in outputs[1].splitlines() if line.strip()}
    assert rows["rloo_advantage:agg=token-sum"][0] == "unbiased"
    assert "*" not in rows["rloo_advantage:agg=token-sum"]
    assert rows["rloo_advantage"][0] == "biased" and "*" in rows["rloo_advantage"]


def test_docs_page_title():
    assert (ROOT / "docs" / "your_estimator.md").read_text().startswith(
        "# Score your framework's advantage estimator\n")


def test_probe_batch_is_what_the_docs_say():
    """group_index is NumPy int64 (dictionaries group by value), the tensors float64."""
    seen = {}

    def spy(token_level_rewards, response_mask, group_index):
        seen.update(r=token_level_rewards.dtype, m=response_mask.dtype, g=type(group_index),
                    gd=group_index.dtype, keys=len({k for k in group_index}))
        return torch.zeros_like(token_level_rewards)

    from estimators.frameworks import register_framework_function

    register_framework_function(spy, "test")
    assert seen == {"r": torch.float64, "m": torch.float64, "g": np.ndarray, "gd": np.int64,
                    "keys": 2}

"""The token-level MDP: its tree, its verifier, its difficulties and its size limit."""

import numpy as np
import pytest
import torch

from suite.cli import main
from suite.core.envs import make_mdp
from suite.core.errors import InputError
from suite.core.exact import objective, solve
from suite.core.policies import random_policy, uniform
from suite.core.sampler import sample
from suite.core.tokens import MAX_ENTRIES, token_task


def test_tree_shape_and_rho0_over_prompts():
    mdp = make_mdp("tokens:vocab=2,max_len=3,prompts=3,seed=1")
    per_prompt = 1 + 2 + 4  # prefixes of length 0, 1, 2
    assert (mdp.n_states, mdp.n_actions) == (3 * per_prompt, 3)
    assert torch.equal(torch.nonzero(mdp.rho0).squeeze(1), torch.tensor([0, 7, 14]))
    assert torch.allclose(mdp.rho0[mdp.rho0 > 0], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert (mdp.P.sum(-1) == 1).all() and set(mdp.P.unique().tolist()) == {0.0, 1.0}
    assert mdp.terminated[:, 2].any(-1).all()  # EOS ends every response
    # a reward is paid only on an ending transition, and is 0 or 1
    assert (mdp.R[~mdp.terminated] == 0).all()
    assert set(mdp.R[mdp.terminated].unique().tolist()) <= {0.0, 1.0}


def _verdict(task, q, tokens):
    return float(sum(task.values[q][x] for x in tokens) >= task.bars[q])


def test_every_response_gets_the_documented_verdict():
    """Walk every response of every prompt: the reward is the verifier's verdict on all of it."""
    spec = dict(vocab=2, max_len=3, prompts=2, pass_first=0.8, pass_last=0.3, seed=4)
    mdp = make_mdp("tokens:" + ",".join(f"{k}={v}" for k, v in spec.items()))
    task = token_task(**spec)
    EOS = task.vocab
    for q in range(2):
        for length in range(1, 4):
            for body in np.ndindex(*(2,) * (length if length == 3 else length - 1)):
                actions = list(body) + ([] if length == 3 else [EOS])
                s, reward = q * task.prefixes, 0.0
                for t, a in enumerate(actions):
                    nxt = int(mdp.P[s, a].argmax())
                    assert bool(mdp.terminated[s, a, nxt]) == (t == len(actions) - 1)
                    reward += float(mdp.R[s, a, nxt])
                    s = nxt
                assert reward == _verdict(task, q, list(body)), (q, actions)


def test_difficulties_run_from_nearly_always_to_rarely():
    task = token_task()  # the defaults: vocab 3, max_len 6, 4 prompts, 0.9 .. 0.05
    assert task.pass_rates[0] > 0.85 and task.pass_rates[-1] < 0.1
    assert (np.diff(task.pass_rates) < 0).all()
    assert np.abs(task.pass_rates - task.aims).max() < 0.05
    # exact: J of the uniform policy (gamma 1, horizon max_len) is the mean pass rate
    mdp = make_mdp("tokens")
    sol = solve(mdp, uniform(mdp.n_states, mdp.n_actions), 1.0, 6)
    assert sol.J == pytest.approx(task.pass_rates.mean(), rel=1e-12)
    # sampled: each prompt's success frequency matches its pass rate
    batch = sample(mdp, sol.pi, 6, 20_000, seed=0, device="cpu")
    prompt = batch.states[:, 0] // task.prefixes
    correct = batch.rewards.sum(1)
    for q in range(task.prompts):
        freq = float(correct[prompt == q].mean())
        se = (task.pass_rates[q] * (1 - task.pass_rates[q]) / int((prompt == q).sum())) ** 0.5
        assert abs(freq - task.pass_rates[q]) < 4 * se + 1e-12


def test_one_prompt_aims_at_pass_first_and_the_seed_changes_the_verifier():
    assert token_task(prompts=1, pass_first=0.3).pass_rates[0] == pytest.approx(0.3, abs=0.03)
    a, b = token_task(seed=0), token_task(seed=1)
    assert not (np.array_equal(a.values, b.values) and np.array_equal(a.bars, b.bars))
    assert np.array_equal(token_task(seed=1).values, b.values)  # reproducible


def test_gradient_is_exact_for_a_random_policy():
    mdp = make_mdp("tokens:vocab=2,max_len=3,prompts=2")
    policy = random_policy(mdp.n_states, mdp.n_actions, seed=0)
    sol = solve(mdp, policy, 1.0, 3)
    eps = 1e-6
    theta = policy.params.clone()
    k = int(sol.grad.abs().argmax())
    theta[k] += eps
    J_plus = float(objective(mdp, policy, 1.0, 3, theta))
    assert (J_plus - sol.J) / eps == pytest.approx(float(sol.grad[k]), rel=1e-4)


@pytest.mark.parametrize("spec, message", [
    ("tokens:vocab=4,max_len=9", "lower vocab, max_len or prompts"),
    ("tokens:vocab=0", "vocab must be an integer >= 1"),
    ("tokens:pass_first=1.2", "strictly between 0 and 1"),
    ("tokens:prompt=2", "did you mean 'prompts'"),
])
def test_bad_options_name_the_rule(spec, message):
    with pytest.raises(InputError, match=message):
        make_mdp(spec)


def test_the_limit_is_on_the_dense_table():
    big = "tokens:vocab=4,max_len=9"
    with pytest.raises(InputError) as info:
        make_mdp(big)
    assert f"{MAX_ENTRIES:,}" in str(info.value) and "states x 5 actions" in str(info.value)


def test_listed_by_envs(capsys):
    assert main(["envs"]) == 0
    assert "tokens:vocab=3,max_len=6,prompts=4" in capsys.readouterr().out

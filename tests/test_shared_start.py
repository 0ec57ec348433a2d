"""Groups that share a start state: the sampler, measure, the exact facts that stay and change."""

import json
import textwrap

import numpy as np
import pytest
import torch

import estimators
from estimators import Context
from suite.cli import main
from suite.core.contraction import Contraction
from suite.core.envs import make_mdp
from suite.core.errors import InputError
from suite.core.exact import solve
from suite.core.policies import random_policy, uniform
from suite.core.sampler import sample
from suite.harness.measure import measure
from suite.harness.study_spec import load_study

from .conftest import tiny_mdp
from .enumerate import all_groups, all_trajectories


def test_members_of_a_group_share_one_start_drawn_from_rho0():
    mdp = make_mdp("tokens:vocab=2,max_len=2,prompts=4")
    pi = uniform(mdp.n_states, mdp.n_actions).probs().detach()
    G = 8
    batch = sample(mdp, pi, 2, 8000, seed=0, device="cpu", chunk_size=800, group_size=G)
    starts = batch.states[:, 0].reshape(-1, G)
    assert (starts == starts[:, :1]).all()
    freq = torch.bincount(starts[:, 0], minlength=mdp.n_states).double() / starts.shape[0]
    assert (freq - mdp.rho0).abs().max() < 4 * (0.25 * 0.75 / starts.shape[0]) ** 0.5
    # the responses within a group still differ (independent given the start)
    assert (batch.actions.reshape(-1, G, batch.actions.shape[1]) != batch.actions[::G, None]).any()
    # group size 1 is the ordinary sampler, draw for draw
    plain = sample(mdp, pi, 2, 800, seed=3, device="cpu")
    one = sample(mdp, pi, 2, 800, seed=3, device="cpu", group_size=1)
    assert torch.equal(plain.states, one.states) and torch.equal(plain.actions, one.actions)


def test_group_size_must_divide_the_chunks():
    mdp = tiny_mdp(seed=0)
    pi = random_policy(3, 2, seed=0).probs().detach()
    with pytest.raises(InputError, match="must divide"):
        sample(mdp, pi, 3, 1000, device="cpu", chunk_size=100, group_size=3)


def test_measure_with_a_shared_start_is_reproducible_and_thread_independent(monkeypatch):
    import suite.harness.measure as measure_module

    monkeypatch.setattr(measure_module, "default_chunk_size", lambda horizon, device=None: 480)
    monkeypatch.setattr(measure_module, "STEPS_PER_PIECE", 960)
    mdp = make_mdp("tokens:vocab=2,max_len=3,prompts=3")
    policy = random_policy(mdp.n_states, mdp.n_actions, seed=1)
    sol = solve(mdp, policy, 1.0, 3)
    chosen = estimators.resolve("grpo,rloo,leave_one_out_baseline,remax")
    runs = [measure(mdp, policy, sol, chosen, 4800, 4, seed=2, device="cpu", threads=k,
                    shared_start=True) for k in (1, 3, 1)]
    for other in runs[1:]:
        assert other.stats == runs[0].stats
        for name in runs[0].means:
            np.testing.assert_array_equal(other.means[name], runs[0].means[name])
    independent = measure(mdp, policy, sol, chosen, 4800, 4, seed=2, device="cpu")
    assert independent.stats["grpo"].sampled.variance != runs[0].stats["grpo"].sampled.variance
    # under a shared start the exact moments are those given each start, averaged over rho0;
    # the sampled batch moments agree with them
    for name in ("leave_one_out_baseline", "grpo", "rloo", "remax"):
        assert runs[0].stats[name].exact.exact is True, name
    assert abs(runs[0].stats["leave_one_out_baseline"].agreement.z) < 4
    assert independent.stats["leave_one_out_baseline"].exact.exact is True


def _every_group(B: int, shared: bool, name: str):
    mdp = tiny_mdp(seed=1, S=2, terminating=True)
    policy = random_policy(2, 2, seed=1)
    sol = solve(mdp, policy, 0.8, 2)
    batch, prob = all_groups(*all_trajectories(mdp, sol.pi, 2), B, mdp.rho0 if shared else None)
    ctx = Context(batch, 0.8, sol, Contraction(policy, torch.device("cpu")).for_batch(batch), B)
    g = estimators.get(name).gradients(ctx).dense().reshape(-1, B, sol.grad.shape[0]).mean(1)
    return prob @ g, float(prob @ (g**2).sum(1)), sol


@pytest.mark.parametrize("B", [2, 3])
def test_batch_baselines_keep_their_means_and_change_their_batch_moments(B):
    """E[psi | s_0] = 0: a member's start-dependent baseline leaves the mean alone, but the
    members are correlated through their start, so E|g_B|^2 moves."""
    for name, scale in (("batch_mean_baseline", (B - 1) / B), ("leave_one_out_baseline", 1.0)):
        mean, second, sol = _every_group(B, True, name)
        mean_ind, second_ind, _ = _every_group(B, False, name)
        assert torch.allclose(mean, scale * sol.grad, rtol=1e-10, atol=1e-14)
        assert torch.allclose(mean_ind, scale * sol.grad, rtol=1e-10, atol=1e-14)
        assert abs(second - second_ind) > 1e-6 * second_ind


def test_cli_flag_and_record(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["measure", "--env", "tokens:vocab=2,max_len=3,prompts=2", "--gamma", "1",
                 "--horizon", "3", "--trajectories", "800", "--batch-size", "4",
                 "--estimators", "rloo", "--shared-start", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert "sharing a start state" in capsys.readouterr().out
    assert json.loads((out / "stats.json").read_text())["condition"]["shared_start"] is True


def test_study_key(tmp_path):
    text = textwrap.dedent("""
        [study]
        name = "s"
        estimators = ["rloo"]
        [space]
        shared_start = [true, false]
        [fixed]
        env = "tokens:vocab=2,max_len=3,prompts=2"
        gamma = 1.0
        horizon = 3
        """)
    path = tmp_path / "s.toml"
    path.write_text(text)
    spec = load_study(path)
    assert [spec.condition(p)["shared_start"] for p in spec.grid()] == [True, False]
    path.write_text(text.replace("shared_start = [true, false]", "shared_start = [1]"))
    with pytest.raises(InputError, match="shared_start: must be true or false"):
        load_study(path)

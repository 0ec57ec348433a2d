import numpy as np
import pytest
import torch

from suite.core.envs import TOY_TEXT_IDS, chain, garnet, load_npz, make_mdp
from suite.core.errors import InputError
from suite.core.mdp import MDP


@pytest.mark.parametrize("env_id", TOY_TEXT_IDS)
def test_toy_text_tables_are_valid_mdps(env_id):
    mdp = make_mdp(env_id)
    assert torch.allclose(mdp.P.sum(-1), torch.ones(mdp.n_states, mdp.n_actions, dtype=torch.float64),
                          atol=1e-12)
    assert mdp.rho0.sum().item() == pytest.approx(1.0)
    assert mdp.terminated.any() or env_id.startswith("Cliff")


def test_frozenlake_slippery_duplicates_add_up():
    # In the corner, "left" slips left, left (wall) or down: P = 2/3 stay, 1/3 down.
    mdp = make_mdp("FrozenLake-v1")
    assert mdp.P[0, 0, 0].item() == pytest.approx(2 / 3)
    assert mdp.P[0, 0, 4].item() == pytest.approx(1 / 3)
    goal = 15
    assert mdp.R[14, 2, goal].item() == 1.0 and mdp.terminated[14, 2, goal]


def test_gym_keyword_arguments_change_the_model():
    det = make_mdp("FrozenLake-v1:map_name=8x8,is_slippery=false")
    assert det.n_states == 64 and set(det.P.unique().tolist()) == {0.0, 1.0}
    rainy = make_mdp("Taxi-v4:is_rainy=true")
    assert (rainy.P > 0).sum(-1).max() == 3
    assert "is_rainy=True" in rainy.name


@pytest.mark.parametrize("spec, message", [
    ("FrozenLak-v1", "did you mean 'FrozenLake-v1'"),
    ("CartPole-v1", "exact gradients need a tabular model"),
    ("Taxi-v4:is_raining=true", "did you mean 'is_rainy'"),
    ("Taxi-v4:fickle_passenger=true", "not in its transition table"),
    ("garnet:S=4,sed=1", "did you mean 'seed'"),
    ("garnet:S=4,branching=9", "branching <= S"),
    ("chain:n=1", "n >= 2"),
    ("garnet:S", "key=value"),
])
def test_bad_environment_specs(spec, message):
    with pytest.raises(InputError, match=message):
        make_mdp(spec)


def test_garnet_is_deterministic_and_has_the_branching():
    a, b = garnet(S=12, A=3, branching=4, seed=5), garnet(S=12, A=3, branching=4, seed=5)
    assert torch.equal(a.P, b.P) and torch.equal(a.R, b.R)
    assert ((a.P > 0).sum(-1) == 4).all()
    assert not torch.equal(a.P, garnet(S=12, A=3, branching=4, seed=6).P)


def test_chain_pays_only_at_the_end():
    mdp = chain(n=5, slip=0.2)
    assert mdp.terminated[:, :, 4].all() and not mdp.terminated[:, :, :4].any()
    assert (mdp.R[:, :, :4] == 0).all() and (mdp.R[:, :, 4] == 1).all()
    assert mdp.P[3, 1, 4].item() == pytest.approx(0.8)


def _save(tmp_path, **arrays):
    path = tmp_path / "m.npz"
    np.savez(path, **arrays)
    return str(path)


def test_npz_roundtrip_with_state_action_rewards(tmp_path):
    g = garnet(S=6, A=2, branching=2, seed=0)
    path = _save(tmp_path, P=g.P.numpy(), R=g.R[:, :, 0].numpy(), rho0=g.rho0.numpy())
    mdp = load_npz(path)
    assert torch.equal(mdp.P, g.P) and torch.equal(mdp.R, g.R)
    assert isinstance(make_mdp(path), MDP)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("rho0"), "missing array"),
    (lambda a: a.update(P=a["P"][:, :, :-1]), "shape"),
    (lambda a: a.update(P=a["P"] * 1.01), "sum to 1"),
    (lambda a: a["P"].__setitem__((0, 0), np.r_[1.5, -0.5, 0, 0]), "negative"),
    (lambda a: a["R"].__setitem__((0, 0, 0), np.nan), "non-finite"),
    (lambda a: a.update(rho0=np.ones(4)), "rho0 must sum to 1"),
    (lambda a: a.update(terminated=np.zeros((4, 2, 4))), "bool"),
    (lambda a: a.update(extra=np.zeros(1)), "unknown array"),
])
def test_malformed_npz_is_rejected(tmp_path, change, message):
    g = garnet(S=4, A=2, branching=2, seed=0)
    arrays = {"P": g.P.numpy().copy(), "R": g.R.numpy().copy(), "rho0": g.rho0.numpy().copy()}
    change(arrays)
    with pytest.raises(InputError, match=message):
        load_npz(_save(tmp_path, **arrays))

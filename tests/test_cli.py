import json

import numpy as np
import pytest

from suite.cli import main
from suite.core.envs import make_mdp
from suite.core.exact import solve
from suite.core.policies import uniform


def test_exact_prints_and_writes(tmp_path, capsys):
    code = main(["exact", "--env", "FrozenLake-v1", "--gamma", "0.9", "--horizon", "20",
                 "--out", str(tmp_path)])
    assert code == 0
    text = capsys.readouterr().out
    assert "J " in text and "|grad J|" in text
    record = json.loads((tmp_path / "exact.json").read_text())
    assert {"J", "grad_norm", "n_states", "n_actions", "gamma", "horizon"} <= set(record)
    grad = np.load(tmp_path / "exact_grad.npy")
    assert grad.shape == (16, 4) and grad.dtype == np.float64
    sol = solve(make_mdp("FrozenLake-v1"), uniform(16, 4), 0.9, 20)
    assert record["J"] == sol.J and np.allclose(grad.reshape(-1), sol.grad.numpy(), rtol=0)
    assert record["grad_norm"] == pytest.approx(np.linalg.norm(grad))


def test_envs_lists_everything(capsys):
    assert main(["envs"]) == 0
    out = capsys.readouterr().out
    for name in ["FrozenLake8x8-v1", "CliffWalkingSlippery-v1", "Taxi-v4", "garnet", "chain", ".npz"]:
        assert name in out


@pytest.mark.parametrize("args, message", [
    (["--env", "FrozenLak-v1"], "did you mean 'FrozenLake-v1'"),
    (["--env", "CartPole-v1"], "tabular model"),
    (["--env", "Taxi-v4", "--gamma", "1.5"], "gamma must lie in [0, 1]"),
    (["--env", "Taxi-v4", "--horizon", "0"], "horizon must be an integer >= 1"),
    (["--env", "FrozenLake-v1", "--policy", "BADSHAPE"], "shape [S, A]"),
    (["--env", "BADNPZ"], "missing array"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    np.save(tmp_path / "bad.npy", np.zeros((3, 3)))
    np.savez(tmp_path / "bad.npz", P=np.ones((2, 2, 2)) / 2)
    args = [a.replace("BADSHAPE", str(tmp_path / "bad.npy"))
            .replace("BADNPZ", str(tmp_path / "bad.npz")) for a in args]
    defaults = {"--gamma": "0.9", "--horizon": "5"}
    for key, value in defaults.items():
        if key not in args:
            args += [key, value]
    out = tmp_path / "out"
    assert main(["exact", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_module_entry_point_exit_code():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "suite", "exact", "--env", "Nope-v0",
                           "--gamma", "0.9", "--horizon", "3"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown environment")


def test_measure_prints_table_and_writes_stats(tmp_path, capsys):
    out = tmp_path / "m"
    code = main(["measure", "--env", "FrozenLake-v1", "--gamma", "0.9", "--horizon", "20",
                 "--policy", "trained:fraction=0.3", "--trajectories", "2000", "--batch-size", "10",
                 "--estimators", "reward_to_go,final_formula_single_step", "--seed", "3",
                 "--device", "cpu", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    for word in ["reinforce", "reward_to_go", "final_formula_single_step", "p-value", "cos@B=10"]:
        assert word in text
    stats = json.loads((out / "stats.json").read_text())["estimators"]
    assert set(stats) == {"reinforce", "reward_to_go", "final_formula_single_step"}
    for row in stats.values():
        assert {"variance", "rel_bias", "rel_bias_ci", "p_value", "claims_unbiased"} <= set(row)
    assert stats["reinforce"]["claims_unbiased"] and not stats["final_formula_single_step"]["claims_unbiased"]
    for row in stats.values():  # exact moments beside the sampled statistics, and their agreement
        assert row["exact"]["exact"] and {"variance", "rel_bias"} <= set(row["exact"])
        assert {"z", "p_value", "variance_ratio", "variance_ratio_ci"} <= set(row["agreement"])
    assert stats["final_formula_single_step"]["exact"]["rel_bias"] > 0.1
    means = np.load(out / "means.npz")
    assert set(means.files) == set(stats) and means["reinforce"].shape == (16, 4)
    assert (out / "exact.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--estimators", "reinfroce"], "did you mean 'reinforce'"),
    (["--batch-size", "7"], "must divide"),
    (["--batch-size", "1"], "batch size must be >= 2"),
    (["--trajectories", "50"], "too few trajectories"),
])
def test_measure_bad_input(tmp_path, capsys, args, message):
    base = {"--env": "FrozenLake-v1", "--gamma": "0.9", "--horizon": "5", "--trajectories": "1000"}
    for key, value in base.items():
        if key not in args:
            args = args + [key, value]
    out = tmp_path / "out"
    assert main(["measure", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_moments_prints_the_exact_table_and_writes_moments_json(tmp_path, capsys):
    code = main(["moments", "--env", "FrozenLake-v1", "--gamma", "0.9", "--horizon", "20",
                 "--estimators", "reinforce,batch_mean_baseline,fitted_value_baseline",
                 "--batch-size", "4", "--out", str(tmp_path)])
    assert code == 0
    text = capsys.readouterr().out
    assert "no sampling" in text and "no exact moments for fitted_value_baseline" in text
    record = json.loads((tmp_path / "moments.json").read_text())
    assert {"J", "grad_norm", "estimators"} <= set(record)
    bm = record["estimators"]["batch_mean_baseline"]
    assert bm["exact"] is True and bm["rel_bias"] == pytest.approx(0.25, rel=1e-10)
    assert {"variance", "second_moment", "rel_bias", "noise_to_signal", "batch_variance",
            "rel_mse", "batch_size_for_rel_mse_0.1", "batch_size_for_rel_mse_0.01",
            "variance_ratio"} <= set(bm)
    assert record["estimators"]["fitted_value_baseline"] == {
        "exact": False, "reason": record["estimators"]["fitted_value_baseline"]["reason"]}
    means = np.load(tmp_path / "moments_means.npz")
    assert set(means.files) == {"reinforce", "batch_mean_baseline"}
    assert means["reinforce"].shape == (16, 4)
    grad = np.load(tmp_path / "exact_grad.npy")
    assert np.allclose(means["batch_mean_baseline"], 0.75 * grad, rtol=1e-10, atol=1e-15)


def test_moments_bad_batch_size_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["moments", "--env", "FrozenLake-v1", "--gamma", "0.9", "--horizon", "5",
                 "--estimators", "leave_one_out_baseline", "--batch-size", "1",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "batch size must be >= 2" in err and len(err.splitlines()) == 1
    assert not out.exists()

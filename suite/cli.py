"""Command line: ``python -m suite {envs,exact,...}``.

Bad input prints one line on stderr and exits with code 2 before anything is written.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .errors import InputError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _add_problem_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", required=True,
                   help="gymnasium id (FrozenLake-v1, Taxi-v4, ...), generator spec "
                        "(garnet:S=20,A=4,branching=3,seed=0; chain:n=10) or a .npz path")
    p.add_argument("--gamma", type=float, required=True, help="discount in [0, 1]")
    p.add_argument("--horizon", type=int, required=True, help="episode length H >= 1")
    p.add_argument("--policy", default="uniform",
                   help="uniform (default) | random:temperature=1,seed=0 | trained:fraction=0.5 | "
                        "mlp:hidden=16,seed=0 | path to an .npy of logits [S, A]")
    p.add_argument("--out", help="directory for exact.json and exact_grad.npy")


def _problem(args):
    from .envs import make_mdp
    from .exact import check_gamma_horizon, solve
    from .policies import make_policy

    check_gamma_horizon(args.gamma, args.horizon)
    mdp = make_mdp(args.env)
    policy = make_policy(args.policy, mdp, args.gamma, args.horizon)
    return mdp, policy, solve(mdp, policy, args.gamma, args.horizon)


def exact_record(mdp, policy, sol) -> dict:
    return {
        "env": mdp.name, "policy": policy.name, "policy_kind": policy.kind,
        "n_states": mdp.n_states, "n_actions": mdp.n_actions, "n_params": policy.n_params,
        "gamma": sol.gamma, "horizon": sol.horizon, "J": sol.J, "grad_norm": sol.grad_norm,
    }


def exact_files(mdp, policy, sol) -> dict[str, bytes]:
    """exact.json and exact_grad.npy ([S, A] for a tabular policy, [P] otherwise)."""
    from .io import json_bytes, npy_bytes

    grad = sol.grad.numpy()
    if policy.tabular:
        grad = grad.reshape(mdp.n_states, mdp.n_actions)
    return {"exact.json": json_bytes(exact_record(mdp, policy, sol)),
            "exact_grad.npy": npy_bytes(grad.astype(np.float64))}


def cmd_exact(args) -> int:
    from .io import write_files

    mdp, policy, sol = _problem(args)
    print(f"environment  {mdp.name} ({mdp.n_states} states, {mdp.n_actions} actions)")
    print(f"policy       {policy.name} ({policy.kind}, {policy.n_params} parameters)")
    print(f"gamma        {sol.gamma:g}")
    print(f"horizon      {sol.horizon}")
    print(f"J            {sol.J:.12g}")
    print(f"|grad J|     {sol.grad_norm:.12g}")
    if args.out:
        for path in write_files(args.out, exact_files(mdp, policy, sol)):
            print(f"wrote        {path}")
    return 0


def cmd_envs(args) -> int:
    from .envs import available_envs

    rows = available_envs()
    width = max(len(spec) for spec, _ in rows)
    print("environments (--env):")
    for spec, text in rows:
        print(f"  {spec:<{width}}  {text}")
    print("policies (--policy): uniform | random:temperature=1.0,seed=0 | trained:fraction=0.5 |"
          " mlp:hidden=16,seed=0 | PATH.npy (logits [S, A])")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m suite",
                     description="Bias and variance of policy-gradient estimators against exact "
                                 "gradients.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("envs", help="list the environments and policy specs")
    p.set_defaults(func=cmd_envs)
    p = sub.add_parser("exact", help="exact J and grad J of one environment and policy")
    _add_problem_args(p)
    p.set_defaults(func=cmd_exact)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

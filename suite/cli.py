"""Command line: ``python -m suite {envs,exact,...}``.

Bad input prints one line on stderr and exits with code 2 before anything is written.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import NoReturn

import numpy as np
from tqdm import tqdm

import estimators
from reports.cli import add_report_parser

from .core.envs import available_envs
from .core.errors import InputError
from .core.io import check_out_dir, json_bytes, npy_bytes, npz_bytes, write_files
from .core.metrics import METRICS, markdown_table
from .core.sampler import resolve_device
from .core.stats import Summary
from .harness.estimator_files import load_estimator_files
from .harness.estimator_stats import EstimatorStats
from .harness.exact_table import exact_rows
from .harness.measure import check_sizes, measure
from .harness.problem import make_problem
from .harness.runner import run_study
from .harness.tracking import ui_link

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit code 2
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
    p.add_argument("--out", help="directory for the results (exact.json, exact_grad.npy, ...)")


def _add_estimator_file_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--estimator-file", action="append", metavar="PATH",
                   help="a Python file whose estimators to register: @estimators.register "
                        "functions, or advantage functions (token_level_rewards, response_mask, "
                        "group_index) -> advantages (docs/your_estimator.md); repeatable")


def _problem(args):
    problem = make_problem(args.env, args.policy, args.gamma, args.horizon)
    return problem.mdp, problem.policy, problem.solution


def exact_record(mdp, policy, sol) -> dict:
    return {
        "env": mdp.name, "policy": policy.name, "policy_kind": policy.kind,
        "n_states": mdp.n_states, "n_actions": mdp.n_actions, "n_params": policy.n_params,
        "gamma": sol.gamma, "horizon": sol.horizon, "J": sol.J, "grad_norm": sol.grad_norm,
    }


def exact_files(mdp, policy, sol) -> dict[str, bytes]:
    """exact.json and exact_grad.npy ([S, A] for a tabular policy, [P] otherwise)."""
    grad = sol.grad.numpy()
    if policy.tabular:
        grad = grad.reshape(mdp.n_states, mdp.n_actions)
    return {"exact.json": json_bytes(exact_record(mdp, policy, sol)),
            "exact_grad.npy": npy_bytes(grad.astype(np.float64))}


def _check_common(args) -> None:
    """Checks of the options every problem command shares, before any work."""
    if args.out:
        check_out_dir(args.out)


def cmd_exact(args) -> int:
    _check_common(args)
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


def _fmt(value: float, spec: str = ".3g") -> str:
    """A number, or 'undefined' for NaN (a relative metric when grad J = 0, a ratio 0/0)."""
    return "undefined" if value is None or math.isnan(value) else format(value, spec)


def _fmt_ci(value: float, ci: list[float]) -> str:
    if math.isnan(value):
        return "undefined"
    return f"{value:.3g} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=True)) for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _num(x, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _needed(n) -> str:
    """An inconclusive test: '-', with the trajectories it would need when more would help."""
    return f"- (need {n:,})" if n else "-"


def _rel(x) -> str:
    """An exact relative bias: 0 when it is float64 round-off."""
    return "-" if x is None else ("0" if abs(x) < 1e-12 else format(x, ".3g"))


def stats_table(stats: dict[str, EstimatorStats], batch_size: int) -> str:
    """The readable table `measure` prints: exact figures where they exist, sampled beside."""
    head = ["estimator", "claim", "verdict", "rel. bias exact", "scale sampled [95% CI]",
            "p-value", "variance exact", "sampled/exact [95% CI]", "z", "var/reinforce",
            f"cos@B={batch_size}"]
    rows = []
    for name, est in stats.items():
        row, ex, agree = _sampled(name, est), est.exact, est.agreement
        at_b = row.at_batch_size.get(batch_size)
        found, source = est.verdict()
        rows.append([
            name, "unbiased" if est.claims_unbiased else "biased", f"{found} ({source})",
            _rel(ex.get("rel_bias")) if ex.exact else "n/a",
            _fmt_ci(row.scale, row.scale_ci),
            (f"{row.p_value:.4f}" + (" *" if row.rejects_unbiased else "")
             if row.p_value is not None else _needed(row.trajectories_needed)),
            _num(ex.get("variance")) if ex.exact else "n/a",
            _fmt_ci(agree.variance_ratio, agree.variance_ratio_ci) if agree else "-",
            f"{agree.z:+.2f}" if agree else "-",
            ("-" if row.variance_ratio is None or row.variance_ratio_ci is None
             else _fmt_ci(row.variance_ratio, row.variance_ratio_ci)),
            _fmt(at_b.cosine, ".3f") if at_b else "-",
        ])
    return _table(head, rows)


def _sampled(name: str, stats: EstimatorStats) -> Summary:
    if stats.sampled is None:
        raise ValueError(f"{name}: no sampled statistics (no trajectories)")
    return stats.sampled


def moments_table(rows: dict, batch_size: int) -> str:
    """The readable table `moments` prints (every figure exact)."""
    head = ["estimator", "claim", "rel. bias", "cosine", "|E g|/|grad J|", "variance",
            f"batch var (B={batch_size})", "noise/signal", "var/reinforce", f"rel MSE@B={batch_size}",
            "B for rel MSE 0.1"]
    out = []
    for name, (claim, row) in rows.items():
        if not row.exact:
            out.append([name, claim, "none (see below)", *["-"] * (len(head) - 3)])
            continue
        m = row.metrics
        out.append([name, claim, _rel(m["rel_bias"]), _num(m["cosine"], ".4f"),
                    _num(m["norm_ratio"], ".4f"), _num(m["variance"]), _num(m["batch_variance"]),
                    _num(m["noise_to_signal"]), _num(m["variance_ratio"], ".3g"),
                    _num(m["rel_mse"]), _num(m["batch_size_for_rel_mse_0.1"], ".4g")])
    return _table(head, out)


def cmd_measure(args) -> int:
    _check_common(args)
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0 (a seed of numpy's SeedSequence), got {args.seed}")
    load_estimator_files(args.estimator_file)
    chosen = estimators.resolve(args.estimators)
    check_sizes(args.trajectories, args.batch_size, chosen)
    device = resolve_device(args.device)
    mdp, policy, sol = _problem(args)
    with tqdm(total=args.trajectories, unit="traj", unit_scale=True, disable=None,
              desc="measure", file=sys.stderr) as bar:
        result = measure(mdp, policy, sol, chosen, args.trajectories, args.batch_size,
                         args.seed, device, progress=bar.update, threads=args.threads,
                         shared_start=args.shared_start)
    print(f"environment  {mdp.name} ({mdp.n_states} states, {mdp.n_actions} actions), "
          f"policy {policy.name}, gamma {sol.gamma:g}, horizon {sol.horizon}")
    print(f"J = {sol.J:.6g}, |grad J| = {sol.grad_norm:.6g}; {args.trajectories:,} trajectories "
          f"({result.n_steps:,} steps) in batches of {args.batch_size}"
          f"{' sharing a start state' if args.shared_start else ''}, seed {args.seed}, "
          f"{device}, {result.seconds:.1f} s")
    print()
    print(stats_table(result.stats, args.batch_size))
    name, first_stats = next(iter(result.stats.items()))
    first = _sampled(name, first_stats)
    print(f"\nverdict: exact where the estimator has exact moments, else the sampled test. "
          f"* rejects 'mean = grad J' at level {first.alpha} ({first.test_method}; '-': "
          "inconclusive, with the trajectories it would need); scale = the mean's component "
          "along grad J / |grad J| (1 when unbiased), t-interval; other intervals: bootstrap over "
          f"{first.n_groups} groups of batches; variance = trace of the per-trajectory "
          "covariance; exact = by recursion, no sampling; z = the sampled mean's distance from "
          "the exact mean along the bias (or gradient) direction, in standard errors.")
    if sol.grad_norm == 0:
        print("grad J = 0: relative bias and cosine are undefined (they divide by |grad J|).")
    if args.out:
        meta = {"env": mdp.name, "policy": policy.name, "gamma": sol.gamma, "horizon": sol.horizon,
                "trajectories": args.trajectories, "batch_size": args.batch_size,
                "seed": args.seed, "device": str(device), "J": sol.J, "grad_norm": sol.grad_norm,
                "shared_start": args.shared_start}
        shape = (mdp.n_states, mdp.n_actions) if policy.tabular else (policy.n_params,)
        files = exact_files(mdp, policy, sol)
        files["stats.json"] = json_bytes({"condition": meta, "estimators": {
            n: s.to_json() for n, s in result.stats.items()}})
        files["means.npz"] = npz_bytes({k: v.reshape(shape) for k, v in result.means.items()})
        for path in write_files(args.out, files):
            print(f"wrote {path}")
    return 0


def cmd_moments(args) -> int:
    load_estimator_files(args.estimator_file)
    chosen = estimators.resolve(args.estimators)
    if args.batch_size < 1 or (args.batch_size < 2 and any(e.needs_batch for e in chosen)):
        raise InputError(f"batch size must be >= 2 for estimators that use their batch "
                         f"({', '.join(e.name for e in chosen if e.needs_batch)}), got "
                         f"{args.batch_size}; pass --batch-size 2 or more")
    mdp, policy, sol = _problem(args)
    started = time.perf_counter()
    rows = exact_rows(mdp, policy, sol, chosen, args.batch_size, directions=False,
                      shared_start=args.shared_start)
    seconds = time.perf_counter() - started
    print(f"environment  {mdp.name} ({mdp.n_states} states, {mdp.n_actions} actions), "
          f"policy {policy.name}, gamma {sol.gamma:g}, horizon {sol.horizon}")
    print(f"J = {sol.J:.6g}, |grad J| = {sol.grad_norm:.6g}; exact moments at batch size "
          f"{args.batch_size} in {seconds:.2f} s (no sampling)")
    print()
    claims = {e.name: "unbiased" if e.claims_unbiased(sol.gamma) else "biased" for e in chosen}
    print(moments_table({n: (claims[n], r) for n, r in rows.items()}, args.batch_size))
    print("\nvariance = trace of the covariance of one trajectory's estimate (one member's, for "
          "estimators that use their batch); batch var = of the batch's mean estimate.")
    for name, row in rows.items():
        if not row.exact:
            print(f"no exact moments for {name}: {row.reason}")
    if args.out:
        shape = (mdp.n_states, mdp.n_actions) if policy.tabular else (policy.n_params,)
        files = exact_files(mdp, policy, sol)
        files["moments.json"] = json_bytes({
            "J": sol.J, "grad_norm": sol.grad_norm, "batch_size": args.batch_size,
            "shared_start": args.shared_start,
            "estimators": {n: r.to_json() for n, r in rows.items()}})
        files["moments_means.npz"] = npz_bytes({n: r.moments.mean.numpy().reshape(shape)
                                                for n, r in rows.items() if r.moments is not None})
        for path in write_files(args.out, files):
            print(f"wrote {path}")
    return 0


def cmd_metrics(args) -> int:
    if args.markdown:
        print(markdown_table())
        return 0
    width = max(len(m.name) for m in METRICS)
    for m in METRICS:
        print(f"{m.name:<{width}}  {m.source:<9}  {m.mlflow:<40}  {m.definition}")
    return 0


def cmd_estimators(args) -> int:
    load_estimator_files(args.estimator_file)
    for name in estimators.names():
        est = estimators.get(name)
        print(f"{name}\n    formula:   {est.formula}\n    claim:     {est.condition}\n"
              f"    reference: {est.reference}")
    print("\nAlso: gae:lambda=L,critic=exact|perturbed|timeless[,sigma=X][,seed=K]; NAME:agg=MODE "
          "for the group estimators, MODE one of token-sum, seq-mean-token-mean, token-mean, "
          "seq-mean-token-sum-norm")
    return 0


def cmd_study(args) -> int:
    try:
        outcome = run_study(args.study_file, storage=args.storage, workers=args.workers,
                            trials=args.trials, fail_running=args.fail_running,
                            start_over=args.start_over)
    except KeyboardInterrupt:
        print("interrupted: the running trials are marked failed and their MLflow runs killed; "
              "run the same command again to resume", file=sys.stderr)
        return 130
    print(f"study {outcome.name}: {outcome.complete} conditions complete"
          + (f", {outcome.failed_now} trial(s) failed in this run" if outcome.failed_now else ""))
    for a in outcome.added:
        print(f"  added           {', '.join(a.estimators)} to trial {a.trial}")
    print(f"  Optuna storage  {outcome.storage}")
    print(f"  MLflow          {outcome.tracking_uri} (experiment '{outcome.name}', "
          f"run {outcome.parent_run_id})")
    print(f"  MLflow UI       `nox -s ui`, then {ui_link(outcome.experiment_id)}")
    return 1 if outcome.failed_now else 0


def cmd_envs(args) -> int:
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
    p = sub.add_parser("measure", help="bias and variance of the estimators on one rollout")
    _add_problem_args(p)
    p.add_argument("--trajectories", type=int, required=True, help="N trajectories")
    p.add_argument("--batch-size", type=int, default=10, help="B (default 10); must divide N")
    p.add_argument("--estimators", default="all", help="comma-separated names, or all (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda")
    p.add_argument("--threads", type=int,
                   help="threads, each reducing its own chunks of trajectories (default: torch's "
                        "thread count on CPU, 1 on CUDA); results do not depend on it")
    _add_estimator_file_arg(p)
    p.add_argument("--shared-start", action="store_true",
                   help="the B trajectories of each batch start from one start state drawn once "
                        "per batch (a group of responses to one prompt)")
    p.set_defaults(func=cmd_measure)
    p = sub.add_parser("moments", help="exact bias and variance of the estimators (no sampling)")
    _add_problem_args(p)
    p.add_argument("--batch-size", type=int, default=10, help="B (default 10)")
    p.add_argument("--estimators", default="all", help="comma-separated names, or all (default)")
    p.add_argument("--shared-start", action="store_true",
                   help="the B trajectories of a batch share one start state (G responses to one "
                        "prompt): the batch's moments given each start, averaged over rho0")
    _add_estimator_file_arg(p)
    p.set_defaults(func=cmd_moments)
    p = sub.add_parser("study", help="run (or resume) a study file with Optuna, logging to MLflow")
    p.add_argument("study_file", help="a study file, e.g. studies/default.toml")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite in results/NAME/)")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the storage")
    p.add_argument("--trials", type=int, help="run at most this many trials now")
    p.add_argument("--fail-running", action="store_true",
                   help="fail the trials left running by a worker that is provably gone (no "
                        "heartbeat within the grace period) so that they are redone, and close "
                        "the MLflow runs killed invocations left open")
    p.add_argument("--start-over", action="store_true",
                   help="discard the study's trials and MLflow runs and run it anew (needed after "
                        "an edit that changes what its results mean)")
    p.set_defaults(func=cmd_study)
    p = sub.add_parser("metrics", help="list every metric: name, source, MLflow key, definition")
    p.add_argument("--markdown", action="store_true", help="as the table of docs/metrics.md")
    p.set_defaults(func=cmd_metrics)
    p = sub.add_parser("estimators", help="list the registered estimators and their claims")
    _add_estimator_file_arg(p)
    p.set_defaults(func=cmd_estimators)
    add_report_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

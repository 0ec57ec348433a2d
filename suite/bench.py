"""Benchmarks (``nox -s bench``). Each writes its own section of docs/benchmarks.md.

    python -m suite.bench [--only sampler] [--quick] [--device auto|cpu|cuda] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import torch

import estimators

from .core.envs import make_mdp
from .core.exact import solve
from .core.sampler import default_chunk_size, resolve_device, sample_chunks
from .core.stats import block_factors
from .harness.measure import chunk_sizes, measure
from .harness.problem import make_policy

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
ENV, GAMMA, H = "FrozenLake8x8-v1", 0.99, 100


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (f"{cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads; "
            f"Python {platform.python_version()}, torch {torch.__version__}; device {device}")
    if device.type == "cuda":
        text += f" ({torch.cuda.get_device_name(device)})"
    return text


def loop_reinforce(env_id: str, logits: torch.Tensor, gamma: float, horizon: int, n: int,
                   seed: int = 0) -> tuple[float, int]:
    """REINFORCE the way most users write it, made as fast as such a loop gets: step gymnasium's
    environment, torch.distributions.Categorical per step on float32 logits (argument
    validation off: it costs a fifth of the loop), one backward per trajectory.

    Returns (seconds, transitions).
    """
    env = gym.make(env_id)
    theta = logits.to(torch.float32).clone().requires_grad_(True)
    torch.manual_seed(seed)
    steps = 0
    start = time.perf_counter()
    for i in range(n):
        state, _ = env.reset(seed=seed + i)
        log_probs, rewards = [], []
        for _ in range(horizon):
            dist = torch.distributions.Categorical(logits=theta[state], validate_args=False)
            action = dist.sample()
            log_probs.append(dist.log_prob(action))
            state, reward, terminated, _, _ = env.step(int(action))
            rewards.append(float(reward))
            steps += 1
            if terminated:
                break
        ret = sum(gamma**t * r for t, r in enumerate(rewards))
        theta.grad = None
        (-(torch.stack(log_probs).sum() * ret)).backward()
    return time.perf_counter() - start, steps


def _rate(label: str, n: int, seconds: float, steps: int) -> dict:
    return {"label": label, "n": n, "seconds": seconds, "traj_s": n / seconds,
            "steps_s": steps / seconds}


def bench_sampler(device: torch.device, quick: bool) -> str:
    mdp = make_mdp(ENV)
    n_vec, n_loop = (200_000, 50) if quick else (1_000_000, 300)
    rows, ratios = [], []
    for spec in ["uniform", "trained:fraction=0.5"]:
        policy = make_policy(spec, mdp, GAMMA, H)
        pi = solve(mdp, policy, GAMMA, H).pi
        list(sample_chunks(mdp, pi, H, 20_000, seed=1, device=device))  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, steps = time.perf_counter(), 0
        for batch in sample_chunks(mdp, pi, H, n_vec, seed=0, device=device):
            steps += int(batch.lengths.sum())
        if device.type == "cuda":
            torch.cuda.synchronize()
        vec = _rate(f"vectorised sampler, {spec}", n_vec, time.perf_counter() - start, steps)
        loop_logits = policy.logits_fn(policy.params).detach()
        seconds, loop_steps = loop_reinforce(ENV, loop_logits, GAMMA, H, n_loop)
        loop = _rate(f"per-trajectory loop, {spec}", n_loop, seconds, loop_steps)
        rows += [vec, loop]
        ratios.append((spec, vec["traj_s"] / loop["traj_s"]))
    table = ["| what | trajectories | seconds | trajectories/s | transitions/s |",
             "|---|---:|---:|---:|---:|"]
    table += [f"| {r['label']} | {r['n']:,} | {r['seconds']:.2f} | {r['traj_s']:,.0f} | "
              f"{r['steps_s']:,.0f} |" for r in rows]
    ratio_text = "; ".join(f"{spec}: **{ratio:,.0f}x**" for spec, ratio in ratios)
    return "\n".join([
        f"{ENV}, gamma {GAMMA}, H {H}. The loop steps gymnasium's environment and calls "
        "backward once per trajectory (torch.distributions.Categorical per step, float32 logits, "
        "validation off); the sampler draws every trajectory of a chunk in parallel.", "", *table, "",
        f"Sampler speed-up over the loop (trajectories/s): {ratio_text}.",
    ])


def bench_measure(device: torch.device, quick: bool) -> str:
    """`measure` end to end, every estimator, mid-training policy, against the loop."""
    mdp = make_mdp(ENV)
    spec = "trained:fraction=0.5"
    policy = make_policy(spec, mdp, GAMMA, H)
    sol = solve(mdp, policy, GAMMA, H)
    chosen = estimators.resolve("all")
    n_vec, n_loop = (100_000, 50) if quick else (1_000_000, 300)
    result = measure(mdp, policy, sol, chosen, n_vec, 10, seed=0, device=device)
    vec = _rate(f"measure, {len(chosen)} estimators", n_vec, result.seconds, result.n_steps)
    seconds, loop_steps = loop_reinforce(ENV, policy.logits_fn(policy.params).detach(), GAMMA, H,
                                         n_loop)
    loop = _rate("per-trajectory loop (REINFORCE only)", n_loop, seconds, loop_steps)
    ratio = vec["traj_s"] / loop["traj_s"]
    table = ["| what | trajectories | seconds | trajectories/s | transitions/s |",
             "|---|---:|---:|---:|---:|"]
    table += [f"| {r['label']} | {r['n']:,} | {r['seconds']:.2f} | {r['traj_s']:,.0f} | "
              f"{r['steps_s']:,.0f} |" for r in (vec, loop)]
    return "\n".join([
        f"{ENV}, gamma {GAMMA}, H {H}, policy {spec}, batch size 10: one rollout, then every "
        f"registered estimator ({len(chosen)}) and all statistics on the same trajectories, "
        "against the per-trajectory loop that computes REINFORCE alone.", "", *table, "",
        f"`measure` speed-up over the loop (trajectories/s): **{ratio:,.0f}x**.",
    ])


def bench_taxi_memory(device: torch.device, quick: bool) -> str:
    """Peak memory of `measure` on Taxi-v4 (3000 parameters), every estimator, in a subprocess."""
    n = 100_000 if quick else 1_000_000
    code = (
        "import json, resource, time, estimators\n"
        "from suite import make_mdp, make_policy, solve\n"
        "from suite.harness.measure import measure\n"
        "mdp = make_mdp('Taxi-v4'); pol = make_policy('trained:fraction=0.5', mdp, 0.99, 100)\n"
        "sol = solve(mdp, pol, 0.99, 100)\n"
        f"r = measure(mdp, pol, sol, estimators.resolve('all'), {n}, 10, device='{device}')\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20\n"
        "print(json.dumps({'seconds': r.seconds, 'steps': r.n_steps, 'peak_gib': peak}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    return (f"Taxi-v4 (500 states x 6 actions = 3000 parameters), gamma 0.99, H 100, policy "
            f"trained:fraction=0.5, every estimator, {n:,} trajectories ({rec['steps']:,} steps): "
            f"{rec['seconds']:.1f} s, peak resident memory **{rec['peak_gib']:.2f} GiB** "
            "(whole process, Python and libraries included).")


MOMENTS_CODE = """
import json, resource, sys, time, torch, estimators
from suite import make_problem
from suite.core.moments import MomentModel, NoExact, exact_moments
env = sys.argv[1]
problem = make_problem(env, 'trained:fraction=0.5', 0.99, 100)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
started = time.perf_counter()
model = MomentModel(problem.mdp, problem.policy, problem.solution)
forms = {n: estimators.get(n).exact_form(model) for n in estimators.names()}
done = [n for n, f in forms.items() if not isinstance(f, NoExact)]
for n in done:
    exact_moments(model, forms[n], 10)
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({'seconds': seconds, 'n': len(done), 'peak_gib': peak, 'before_gib': before,
                  'S': problem.mdp.n_states, 'A': problem.mdp.n_actions}))
"""


def bench_moments(device: torch.device, quick: bool) -> str:
    """Exact moments of every estimator that has them, FrozenLake8x8 and Taxi, H 100, each in a
    fresh process (time from the problem built to the last estimator; peak resident memory)."""
    rows = ["| environment | states x actions | estimators | seconds | peak memory (GiB) |",
            "|---|---:|---:|---:|---:|"]
    for env in ("FrozenLake8x8-v1", "Taxi-v4"):
        out = subprocess.run([sys.executable, "-c", MOMENTS_CODE, env], capture_output=True,
                             text=True, check=True)
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(f"| {env} | {rec['S']} x {rec['A']} | {rec['n']} | {rec['seconds']:.2f} | "
                    f"{rec['peak_gib']:.2f} (before: {rec['before_gib']:.2f}) |")
    return "\n".join([
        "gamma 0.99, H 100, policy trained:fraction=0.5, batch size 10: E g and E|g|^2 of one "
        "trajectory's estimate and of the batch's, for every registered estimator with exact "
        "moments, by recursion (no sampling). Targets: FrozenLake8x8 under 1 s, Taxi under 5 s.",
        "", *rows, "",
        "Peak memory is the whole process (Python, torch and the problem included); 'before' is "
        "the peak before the exact engine started."])


def _synced(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def bench_throughput(device: torch.device, quick: bool) -> str:
    """Transitions/s of the sampler and of `measure` (every estimator) on FrozenLake8x8 and Taxi,
    with the chunk sizes the suite picks for the device."""
    cuda = device.type == "cuda"
    n_sample = (2_000_000 if quick else 20_000_000) if cuda else (200_000 if quick else 1_000_000)
    n_measure = (200_000 if quick else 2_000_000) if cuda else (20_000 if quick else 200_000)
    rows = ["| environment | what | trajectories | transitions | seconds | transitions/s | "
            "chunk (trajectories) |", "|---|---|---:|---:|---:|---:|---:|"]
    chosen = estimators.resolve("all")
    for env in ("FrozenLake8x8-v1", "Taxi-v4"):
        mdp = make_mdp(env)
        policy = make_policy("trained:fraction=0.5", mdp, GAMMA, H)
        sol = solve(mdp, policy, GAMMA, H)
        sampler_chunk = default_chunk_size(H, device)
        list(sample_chunks(mdp, sol.pi, H, min(n_sample, sampler_chunk), seed=1, device=device))
        start, steps = _synced(device), 0
        for batch in sample_chunks(mdp, sol.pi, H, n_sample, seed=0, device=device):
            steps += int(batch.lengths.sum())
        seconds = _synced(device) - start
        rows.append(f"| {env} | sampler | {n_sample:,} | {steps:,} | {seconds:.2f} | "
                    f"{steps / seconds:,.0f} | {min(sampler_chunk, n_sample):,} |")
        measure(mdp, policy, sol, chosen, 100 * 10, 10, seed=1, device=device)  # warm-up
        start = _synced(device)
        result = measure(mdp, policy, sol, chosen, n_measure, 10, seed=0, device=device)
        seconds = _synced(device) - start
        chunk, _ = chunk_sizes(n_measure, H, max(block_factors(n_measure // 10, 10)) * 10,
                                device)
        rows.append(f"| {env} | measure, {len(chosen)} estimators | {n_measure:,} | "
                    f"{result.n_steps:,} | {seconds:.2f} | {result.n_steps / seconds:,.0f} | "
                    f"{chunk:,} |")
    return "\n".join([
        f"gamma {GAMMA}, H {H}, policy trained:fraction=0.5; `measure` computes the exact moments, "
        "samples, runs every registered estimator and all statistics (batch size 10). Transitions "
        "are the steps that happened (an episode that terminates stops counting). Chunk: the "
        "trajectories sampled at once, as the suite sizes them for this device.", "", *rows])


BENCHMARKS: dict[str, Callable[[torch.device, bool], str]] = {
    "sampler": bench_sampler, "measure": bench_measure, "taxi-memory": bench_taxi_memory,
    "moments": bench_moments, "throughput": bench_throughput}


def write_section(name: str, body: str, header: str) -> None:
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    block = f"{start}\n{header}\n\n{body}\n{end}"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\nWritten by `nox -s bench`.\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text + "\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m suite.bench", description=__doc__)
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append",
                        help="run only this benchmark (repeatable)")
    parser.add_argument("--quick", action="store_true", help="smaller runs, for a smoke test")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda (default cpu)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    for name in args.only or list(BENCHMARKS):
        body = BENCHMARKS[name](device, args.quick)
        header = (f"## {name} ({'quick' if args.quick else 'full'} run, "
                  f"{time.strftime('%Y-%m-%d')})\n\nMachine: {machine(device)}.")
        print(header + "\n\n" + body + "\n")
        if not args.no_write:
            write_section(f"{name}-{device.type}", body, header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

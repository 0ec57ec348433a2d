"""One measurement: one rollout, every chosen estimator on the same trajectories, statistics."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .contraction import Contraction
from .errors import InputError
from .exact import ExactSolution
from .mdp import MDP
from .policies import Policy
from .sampler import default_chunk_size, resolve_device, sample_chunks
from .stats import ChunkIndex, Moments, block_factors, summarize

__all__ = ["MIN_BATCHES", "Measurement", "check_sizes", "measure"]

MIN_BATCHES = 10  # the sign-flip test needs enough independent groups to reach small p-values


@dataclass(frozen=True)
class Measurement:
    """The statistics of every estimator on one rollout."""

    stats: dict[str, dict]  # estimator name -> metrics (suite.stats.summarize)
    means: dict[str, np.ndarray]  # estimator name -> mean estimate, [P] float64
    n_steps: int  # transitions sampled
    seconds: float


def check_sizes(n: int, batch_size: int, estimators) -> None:
    """Raise InputError unless N, B suit the estimators (one line, with the fix)."""
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    needy = [e.name for e in estimators if e.needs_batch]
    if needy and batch_size < 2:
        raise InputError(f"batch size must be >= 2 for {', '.join(needy)} (they use the other "
                         f"trajectories of their batch), got {batch_size}")
    if n % batch_size:
        raise InputError(f"the batch size must divide the number of trajectories: {n} is not a "
                         f"multiple of {batch_size}; try --trajectories "
                         f"{(n // batch_size + 1) * batch_size}")
    if n // batch_size < MIN_BATCHES:
        raise InputError(f"too few trajectories: {n} make {n // batch_size} batches of "
                         f"{batch_size}, need at least {MIN_BATCHES}; use --trajectories "
                         f">= {MIN_BATCHES * batch_size}")


STEPS_PER_PIECE = 512_000  # trajectories x horizon handled by the estimators at once (cache-sized)


def _chunk_sizes(n: int, horizon: int, block: int) -> tuple[int, int]:
    """(sampler chunk, estimator piece): the piece a multiple of the largest block, small enough
    to stay in cache; the chunk a multiple of the piece, near the sampler's memory budget."""
    piece = min(n, max(block, (STEPS_PER_PIECE // horizon // block) * block))
    chunk = min(n, max(piece, (default_chunk_size(horizon) // piece) * piece))
    return chunk, piece


def measure(mdp: MDP, policy: Policy, sol: ExactSolution, estimators, n: int, batch_size: int,
            seed: int = 0, device: str | torch.device = "auto",
            progress: Callable[[int], None] | None = None) -> Measurement:
    """Sample n trajectories once and evaluate every estimator on them."""
    import time

    check_sizes(n, batch_size, estimators)
    dev = resolve_device(device)
    started = time.perf_counter()
    from estimators import Context  # local: estimators imports suite

    exact = sol.to(dev)
    g = exact.grad
    M = n // batch_size
    factors = block_factors(M, batch_size)
    chunk, piece = _chunk_sizes(n, sol.horizon, max(factors) * batch_size)
    moments = {e.name: Moments(policy.n_params, batch_size, M, factors, dev) for e in estimators}
    contraction = Contraction(policy, dev)
    first, steps = 0, 0
    for c, chunk_batch in enumerate(sample_chunks(mdp, sol.pi, sol.horizon, n, seed, dev, chunk)):
        # each estimator's own randomness: a generator per (seed, chunk, estimator name), so its
        # draws do not depend on which other estimators run, nor on their order
        gens = {e.name: _generator(dev, seed, c, e.name) for e in estimators}
        for start in range(0, chunk_batch.n, piece):
            batch = chunk_batch.rows(start, start + piece)
            ctx = Context(batch, sol.gamma, exact, contraction.for_batch(batch), batch_size)
            index = ChunkIndex.build(first, batch.n, batch_size, M, factors, dev)
            for est in estimators:
                grads = est.gradients(ctx, generator=gens[est.name])
                moments[est.name].add(grads, first, g, index)
            first += batch.n
            steps += int(batch.lengths.sum())
            if progress:
                progress(batch.n)
    stats = summarize({k: _to_cpu(m) for k, m in moments.items()}, g.cpu(), seed=seed)
    for est in estimators:
        stats[est.name]["claims_unbiased"] = est.claims_unbiased(sol.gamma)
        stats[est.name]["condition"] = est.condition
    means = {k: (m.gsum.sum(0) / m.gn.sum()).cpu().numpy() for k, m in moments.items()}
    return Measurement(stats, means, steps, time.perf_counter() - started)


def _generator(device: torch.device, seed: int, chunk: int, name: str) -> torch.Generator:
    gen = torch.Generator(device=device)
    key = zlib.crc32(name.encode())
    gen.manual_seed(int(np.random.SeedSequence([int(seed), chunk, 1, key]).generate_state(1)[0]))
    return gen


def _to_cpu(m: Moments) -> Moments:
    if m.device.type == "cpu":
        return m
    for name in ("gsum", "gsq", "gbsq", "gn", "gm", "blocks"):
        setattr(m, name, getattr(m, name).cpu())
    m.device = torch.device("cpu")
    return m

"""One measurement: one rollout, every chosen estimator on the same trajectories, statistics."""

from __future__ import annotations

import collections
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from estimators import Context

from ..core.contraction import Contraction, Grads, SingleSteps
from ..core.errors import InputError
from ..core.exact import ExactSolution
from ..core.fused import FusedMoments
from ..core.limits import check_limit
from ..core.mdp import MDP
from ..core.policies import Policy
from ..core.sampler import ChunkSampler, default_chunk_size, resolve_device
from ..core.stats import SUMS, ChunkIndex, Moments, block_factors, summarize
from ..core.threads import gil_switch_interval, intra_op_threads
from .estimator_stats import EstimatorStats
from .exact_table import ExactRow, agreement, exact_rows

__all__ = ["MIN_BATCHES", "Measurement", "check_sizes", "chunk_sizes", "measure", "statistics"]

MIN_BATCHES = 10  # the t-test and the bootstrap need enough independent batches and groups
@dataclass(frozen=True)
class Measurement:
    """The statistics of every estimator on one rollout."""

    stats: dict[str, EstimatorStats]  # estimator name -> its statistics, exact block, agreement
    means: dict[str, np.ndarray]  # estimator name -> mean estimate, [P] float64
    n_steps: int  # transitions sampled
    seconds: float
    exact: dict[str, ExactRow]  # estimator name -> exact moments and metrics
    totals: dict[str, Moments]  # estimator name -> the accumulated sums (on the CPU)


def check_sizes(n: int, batch_size: int, estimators) -> None:
    """Raise InputError unless N, B suit the estimators (one line, with the fix)."""
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    check_limit("trajectories", n, "the number of trajectories")
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
CUDA_STEPS_PER_PIECE = 32_000_000  # the same on a GPU: large, so each operation fills the device
FUSED_STEPS_PER_PIECE = 256_000  # the same when the compiled kernels fold the sums (any whole
#                                  number of batches will do; 128k and 512k measured slower)


def chunk_sizes(n: int, horizon: int, block: int,
                device: torch.device | None = None) -> tuple[int, int]:
    """(sampler chunk, estimator piece): the piece a multiple of the largest block, small enough
    to stay in cache; the chunk a multiple of the piece, near the sampler's memory budget."""
    cuda = device is not None and device.type == "cuda"
    steps = CUDA_STEPS_PER_PIECE if cuda else STEPS_PER_PIECE
    piece = min(n, max(block, (steps // horizon // block) * block))
    chunk = min(n, max(piece, (default_chunk_size(horizon, device) // piece) * piece))
    return chunk, piece


def measure(mdp: MDP, policy: Policy, sol: ExactSolution, estimators, n: int, batch_size: int,
            seed: int = 0, device: str | torch.device = "auto",
            progress: Callable[[int], None] | None = None, threads: int | None = None,
            exact: dict[str, ExactRow] | None = None, shared_start: bool = False,
            fused: bool = True, stream: str = "device",
            dtype: torch.dtype | None = None) -> Measurement:
    """Sample n trajectories once and evaluate every estimator on them; meanwhile, as the thread
    pool's first task, compute the exact moments of every estimator (unless given in ``exact``).

    The trajectories come in numbered chunks, each drawn from its own seed and reduced to sums by
    one of ``threads`` threads (default on CPU: torch.get_num_threads(); on CUDA: 1); the chunks'
    sums are added in chunk order, so every number is the same for any thread count.
    ``shared_start``: the B trajectories of each batch start from one start state, drawn once per
    batch (a group of responses to one prompt); chunks hold whole batches. ``fused``: on the CPU
    with a tabular policy, fold the sums with the compiled kernels of suite.core.fused (False:
    contraction and Moments.add for every estimator, the torch reference they agree with).
    ``stream``: where the sampler's uniforms are drawn (suite.core.sampler.ChunkSampler).
    ``dtype``: of the estimators' own arithmetic on the trajectories (weights, advantages);
    default float32 on the CPU, float64 on CUDA. Their rounding (relative 1e-7) is far below
    the sampling error of any reported figure; the gradients, every sum and statistic and the
    exact moments are float64 (docs/benchmarks.md)."""
    check_sizes(n, batch_size, estimators)
    if threads is not None and threads < 1:
        raise InputError(f"threads must be >= 1, got {threads}")
    dev = resolve_device(device)
    started = time.perf_counter()
    M = n // batch_size
    factors = block_factors(M, batch_size)
    chunk, piece = chunk_sizes(n, sol.horizon, max(factors) * batch_size, dev)
    fuse = fused and dev.type == "cpu" and policy.tabular
    if fuse:  # the kernels carry blocks across pieces: any whole number of batches will do
        piece = min(chunk, max(batch_size, FUSED_STEPS_PER_PIECE // sol.horizon // batch_size
                               * batch_size))
    sampler = ChunkSampler(mdp, sol.pi, sol.horizon, n, seed, dev, chunk,
                           batch_size if shared_start else 1, stream)
    if dtype is None:
        dtype = torch.float32 if dev.type == "cpu" else torch.float64
    if dtype not in (torch.float32, torch.float64):
        raise InputError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    run = _Run(sampler, Contraction(policy, dev), sol.to(dev), list(estimators), piece,
               Moments(policy.n_params, batch_size, M, factors, dev), mdp, fuse, {}, dtype)
    totals = {e.name: run.template.empty_like() for e in estimators}
    steps = 0
    n_threads = max(1, min(threads or _default_threads(dev), len(sampler)))
    with intra_op_threads(1 if n_threads > 1 else torch.get_num_threads()), \
            gil_switch_interval(), \
            ThreadPoolExecutor(n_threads, thread_name_prefix="measure") as pool:
        # the exact moments are the pool's first task: single-threaded Python-heavy work, done
        # while the other threads sample (their numbers do not depend on the thread count)
        exact_future = None if exact is not None else pool.submit(
            exact_rows, mdp, policy, sol, estimators, batch_size, tuple(factors),
            shared_start=shared_start)
        # a window of 2 chunks per thread in flight: a chunk's sums are dropped once merged
        pending = collections.deque(pool.submit(run.chunk, c)
                                    for c in range(min(2 * n_threads, len(sampler))))
        try:
            for c in range(len(sampler)):  # in chunk order: the same sums for any thread count
                partial, chunk_steps = pending.popleft().result()
                if c + len(pending) + 1 < len(sampler):
                    pending.append(pool.submit(run.chunk, c + len(pending) + 1))
                for name, m in partial.items():
                    totals[name].merge(m)
                steps += chunk_steps
                if progress:
                    progress(min(chunk, n - sampler.first(c)))
                if exact_future is not None and exact_future.done():
                    exact_future.result()  # an error of the exact engine stops the sampling
            if exact_future is not None:
                exact = exact_future.result()  # raises here if the exact engine failed
        finally:
            for future in pending:
                future.cancel()
            if exact_future is not None:
                exact_future.cancel()
    totals = {k: _to_cpu(m) for k, m in totals.items()}
    assert exact is not None  # given, or computed by the pool
    stats, means = statistics(totals, estimators, sol, exact, seed)
    return Measurement(stats, means, steps, time.perf_counter() - started, exact, totals)


def statistics(totals: dict[str, Moments], estimators, sol: ExactSolution,
               exact: dict[str, ExactRow], seed: int = 0,
               n_seeds: int | None = None) -> tuple[dict[str, EstimatorStats], dict[str, np.ndarray]]:
    """The statistics of accumulated sums (one rollout, or ``n_seeds`` seeds' sums merged), with
    each estimator's claim, its exact block and the agreement of the two; and the mean
    estimates [P]."""
    g = sol.grad.detach().to(torch.float64).cpu()
    summaries = summarize(totals, g, seed=seed)
    means = {k: (m.gsum.sum(0) / m.gn.sum()).numpy() for k, m in totals.items()}
    by_name = {est.name: est for est in estimators}
    stats = {}
    for name, s in summaries.items():
        est, row = by_name[name], exact[name]
        stats[name] = EstimatorStats(
            est.claims_unbiased(sol.gamma), est.condition, row, s,
            agreement(row, means[name], s.n_batches, s.variance, s.variance_ci), n_seeds)
    return stats, means


@dataclass(frozen=True)
class _Run:
    """What every chunk of one measurement shares (read-only, so threads can share it)."""

    sampler: ChunkSampler
    contraction: Contraction  # not indexed: for_batch gives each piece its own copy
    exact: ExactSolution  # on the device
    estimators: list
    piece: int  # trajectories handled by the estimators at once
    template: Moments  # empty sums of the right shape (batch size, batches, block factors)
    mdp: MDP  # for estimators that roll out more than the batch (remax's greedy baseline)
    fuse: bool  # fold the sums with suite.core.fused (CPU, tabular policy)
    problem_cache: dict  # estimators' quantities of the problem alone, shared by every piece
    dtype: torch.dtype  # of the estimators' arithmetic

    def chunk(self, c: int) -> tuple[dict[str, Moments], int]:
        """Sums of chunk c for every estimator, and its number of steps.

        With ``fuse``, the compiled kernels fold every estimator's sums (the weightings of all
        of them in one pass per piece); otherwise the contraction and Moments.add do, on pieces
        that hold whole blocks."""
        batch_all = self.sampler.chunk(c)
        first, steps = self.sampler.first(c), 0
        B = self.template.batch_size
        fused = (FusedMoments(self.template, self.contraction.pi, self.exact.grad)
                 if self.fuse else None)
        partial = {} if fused is not None else \
            {e.name: self.template.empty_like() for e in self.estimators}
        # each estimator's own randomness: a generator per (seed, chunk, estimator name), so its
        # draws do not depend on which other estimators run, nor on their order
        gens = {e.name: _generator(self.sampler.device, self.sampler.seed, c, e.name)
                for e in self.estimators}
        for start in range(0, batch_all.n, self.piece):
            batch = batch_all.rows(start, start + self.piece)
            ctx = Context(batch, self.exact.gamma, self.exact, self.contraction.for_batch(batch), B,
                          mdp=self.mdp, problem_cache=self.problem_cache, dtype=self.dtype)
            index, weights = None, []
            for est in self.estimators:
                out = est.output(ctx, generator=gens[est.name], sparse=fused is not None)
                if fused is not None:
                    if isinstance(out, Grads):
                        fused.add_grads(est.name, out, first)
                    else:
                        weights.append((est.name, out))
                    continue
                index = index or ChunkIndex.build(first, batch.n, B, self.template.n_batches,
                                                  self.sampler.device)
                assert not isinstance(out, SingleSteps)  # only with sparse=True
                grads = out if isinstance(out, Grads) else ctx.score(out)
                partial[est.name].add(grads, first, self.exact.grad, index)
            if fused is not None and weights:
                fused.add_weights(weights, batch, first)
            first += batch.n
            steps += int(batch.lengths.sum())
        if fused is not None:
            partial.update(fused.finish(self.sampler.first(c), batch_all.n))
        return partial, steps


def _default_threads(device: torch.device) -> int:
    """On CPU as many as torch would use; on CUDA one (the device is the parallel part)."""
    return torch.get_num_threads() if device.type == "cpu" else 1


def _generator(device: torch.device, seed: int, chunk: int, name: str) -> torch.Generator:
    gen = torch.Generator(device=device)
    key = zlib.crc32(name.encode())
    gen.manual_seed(int(np.random.SeedSequence([int(seed), chunk, 1, key]).generate_state(1)[0]))
    return gen


def _to_cpu(m: Moments) -> Moments:
    if m.device.type == "cpu":
        return m
    for name in SUMS:
        setattr(m, name, getattr(m, name).cpu())
    m.device = torch.device("cpu")
    return m

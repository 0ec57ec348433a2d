"""Statistics of per-trajectory gradient estimates against the exact gradient.

Array convention: N trajectories in M = N / B consecutive batches of B; the batches are split
into K contiguous *groups* (K = min(64, M)). Only sums are kept, chunk by chunk, so N x P never
sits in memory:

    gsum [K, P]  sum of X_i over the group        gsq  [K]  sum of |X_i|^2
    gbsq [K]     sum over its batches of |g_B|^2  gn, gm [K] trajectories, batches
    blocks       for each batch size B' = k B: sums of |g_B' - g|^2/|g|^2, cos(g_B', g), sign

Groups are independent (whole batches), so they are the resampling unit of every interval
(bootstrap over groups) and of the unbiasedness test (sign-flip test over groups).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .contraction import Grads

__all__ = ["ChunkIndex", "Moments", "block_factors", "n_groups", "summarize", "unbiasedness_test"]

BLOCK_FACTORS = (1, 4, 16, 64, 256)  # batch sizes B' = k B at which relMSE/cosine are measured
MAX_GROUPS = 64
N_FLIPS = 1999
N_BOOT = 1000
ALPHA = 0.05


def n_groups(n_batches: int) -> int:
    return min(MAX_GROUPS, n_batches)


def block_factors(n_batches: int, batch_size: int, max_block: int = 65536) -> list[int]:
    """Factors k with at least 8 blocks of k batches and k B <= max_block."""
    return [k for k in BLOCK_FACTORS if n_batches // k >= 8 and k * batch_size <= max_block] or [1]


@dataclass(frozen=True)
class ChunkIndex:
    """Where a chunk's trajectories fall: shared by every estimator's Moments.add."""

    local: Tensor  # [n] batch of each trajectory within the chunk (i // B)
    group: Tensor  # [Mc] group of each of the chunk's batches
    traj_group: Tensor  # [n] group of each trajectory
    dn: Tensor  # [K] trajectories added to each group
    dm: Tensor  # [K] batches added to each group

    @staticmethod
    def build(first_traj: int, n: int, batch_size: int, n_batches: int,
              device: torch.device) -> ChunkIndex:
        K = n_groups(n_batches)
        Mc = n // batch_size
        local = torch.arange(n, device=device) // batch_size
        group = (first_traj // batch_size + torch.arange(Mc, device=device)) * K // n_batches
        ones = torch.ones(Mc, dtype=torch.float64, device=device)
        dm = torch.zeros(K, dtype=torch.float64, device=device).index_add_(0, group, ones)
        return ChunkIndex(local, group, group[local], dm * batch_size, dm)


SUMS = ("gsum", "gsq", "gbsq", "gn", "gm", "blocks")  # the fields of Moments that are sums


@dataclass
class Moments:
    """Running sums for one estimator (see module doc)."""

    n_params: int
    batch_size: int
    n_batches: int  # M over the whole run
    factors: list[int]  # each a multiple of the one before (a prefix of BLOCK_FACTORS)
    device: torch.device
    gsum: Tensor = field(init=False)
    gsq: Tensor = field(init=False)
    gbsq: Tensor = field(init=False)
    gn: Tensor = field(init=False)
    gm: Tensor = field(init=False)
    blocks: Tensor = field(init=False)  # [F, 6]: count, relsq, relsq^2, cos, cos^2, sign

    def __post_init__(self) -> None:
        if any(k % j for j, k in zip([1, *self.factors], self.factors, strict=False)):
            raise ValueError(f"block factors must each divide the next, got {self.factors}")
        K = n_groups(self.n_batches)
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.device)  # noqa: E731
        self.gsum, self.gsq, self.gbsq, self.gn, self.gm = z(K, self.n_params), z(K), z(K), z(K), z(K)
        self.blocks = z(len(self.factors), 6)

    def empty_like(self) -> Moments:
        return Moments(self.n_params, self.batch_size, self.n_batches, self.factors, self.device)

    def merge(self, other: Moments) -> Moments:
        """Add the sums of other (disjoint trajectories of the same run) into these."""
        for name in SUMS:
            getattr(self, name).add_(getattr(other, name).to(self.device))
        return self

    def add(self, grads: Grads, first_traj: int, g: Tensor, index: ChunkIndex | None = None) -> None:
        """Accumulate the gradients of trajectories first_traj .. first_traj + n - 1.

        Pass the chunk's ChunkIndex to share its index work between estimators. Blocks of k
        batches are formed from the first batch of the call on (a trailing partial block is
        left out), so calls should start at multiples of the largest block."""
        B = self.batch_size
        idx = index or ChunkIndex.build(first_traj, grads.n, B, self.n_batches, self.device)
        sums = grads.group_sum(idx.local, grads.n // B)  # [Mc, P]
        sums_sq = (sums**2).sum(1)
        self.gsum.index_add_(0, idx.group, sums)
        self.gsq.index_add_(0, idx.traj_group, grads.sq_norms())
        self.gbsq.index_add_(0, idx.group, sums_sq / B**2)
        self.gn += idx.dn
        self.gm += idx.dm
        self._add_blocks(sums, g)

    def _add_blocks(self, sums: Tensor, g: Tensor) -> None:
        """relMSE, cosine and sign of the mean of every block of k consecutive batches, for each
        factor k: the block sums of factor k are sums of r = k / k_prev blocks of the factor
        before."""
        levels, factor_of, level, prev = [], [], sums, 1
        for f, k in enumerate(self.factors):
            if k != prev:
                rows = level.shape[0] // (k // prev)
                level = level[: rows * (k // prev)].reshape(rows, k // prev, level.shape[1]).sum(1)
                prev = k
            levels.append(level / (k * self.batch_size))  # block means
            factor_of.append(torch.full((level.shape[0],), f, device=sums.device))
        est = torch.cat(levels)  # [R, P]: every block of every factor
        g_sq = float(g @ g) or math.nan
        dot = est @ g
        est_sq = est.square() @ torch.ones_like(g)
        relsq = (est_sq - 2 * dot + g_sq) / g_sq
        cos = dot / (est_sq * g_sq).sqrt().clamp(min=1e-300)
        parts = torch.stack([torch.ones_like(relsq), relsq, relsq**2, cos, cos**2,
                             (dot > 0).to(torch.float64)], 1)
        self.blocks.index_add_(0, torch.cat(factor_of), parts)


def _totals(m: Moments, w: Tensor | None = None):
    """N, M, sum X, sum |X|^2, sum |g_B|^2, optionally under bootstrap weights w [R, K]."""
    if w is None:
        return m.gn.sum(), m.gm.sum(), m.gsum.sum(0), m.gsq.sum(), m.gbsq.sum()
    return w @ m.gn, w @ m.gm, w @ m.gsum, w @ m.gsq, w @ m.gbsq


def _core(m: Moments, g: Tensor, w: Tensor | None = None) -> dict[str, Tensor]:
    N, M, sx, sq, sb = _totals(m, w)
    mean = sx / (N[..., None] if w is not None else N)
    msq = (mean**2).sum(-1)
    g_sq = g @ g
    var = (sq - N * msq) / (N - 1)  # tr Cov of one trajectory's estimate
    var_b = (sb - M * msq) / (M - 1)  # tr Cov of one batch's estimate
    bias_sq = ((mean - g) ** 2).sum(-1)
    return {"mean": mean, "var": var, "var_b": var_b, "bias_sq": bias_sq,
            "bias_sq_debiased": bias_sq - var_b / M, "g_sq": g_sq, "N": N, "M": M}


def unbiasedness_test(m: Moments, g: Tensor, seed: int = 0) -> tuple[float, float]:
    """Sign-flip test of H0: E[X] = g over the K independent groups.

    D_kp = sum over group k of (X_ip - g_p). Statistic: sum over coordinates p of
    (sum_k D_kp)^2 / (sum_k D_kp^2 + floor), floor = the mean of sum_k D_kp^2 over coordinates.
    Under H0 each group's D_k is symmetric about 0 (a sum of many centred terms), so flipping
    the signs of whole groups leaves its distribution unchanged; the denominators do not change
    under flips, so the p-value is exact up to that symmetry and the Monte Carlo error of N_FLIPS
    flips. The floor keeps coordinates of (near-)zero variance from dominating: a coordinate
    that no trajectory touched (mean 0 while grad J has a tiny entry there) weighs nothing,
    while a zero-variance coordinate with an offset as large as the typical noise is caught.
    Returns (statistic, p-value).
    """
    D = m.gsum - m.gn[:, None] * g  # [K, P]
    energy = (D**2).sum(0)
    floor = energy.mean()
    if not bool(floor > 0):
        return 0.0, 1.0
    weight = 1.0 / (energy + floor)
    stat = float((D.sum(0) ** 2 * weight).sum())
    gen = torch.Generator().manual_seed(seed)
    signs = (torch.randint(0, 2, (N_FLIPS, D.shape[0]), generator=gen) * 2 - 1).to(D)
    flipped = ((signs @ D) ** 2 * weight).sum(1)
    p = (1 + int((flipped >= stat * (1 - 1e-12)).sum())) / (N_FLIPS + 1)
    return stat, p


def _se(total: float, total_sq: float, n: float) -> float:
    """Standard error of a mean from its sum and sum of squares over n blocks."""
    return math.sqrt(max(total_sq / n - (total / n) ** 2, 0.0) / n)


def _ci(x: Tensor) -> list[float]:
    q = torch.quantile(x[torch.isfinite(x)], torch.tensor([0.025, 0.975], dtype=x.dtype))
    return [float(q[0]), float(q[1])]


def summarize(moments: dict[str, Moments], g: Tensor, reference: str = "reinforce",
              seed: int = 0, alpha: float = ALPHA) -> dict[str, dict]:
    """Metrics per estimator (see docs/metrics.md). Intervals: percentile bootstrap over groups,
    the same resampled groups for every estimator (so the variance ratio is paired)."""
    g = g.to(torch.float64)
    any_m = next(iter(moments.values()))
    K = any_m.gsum.shape[0]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, K, (N_BOOT, K), generator=gen)
    w = torch.zeros(N_BOOT, K, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(N_BOOT, K, dtype=torch.float64)).to(any_m.device)
    boot = {name: _core(m, g, w) for name, m in moments.items()}
    ref, ref_boot = (_core(moments[reference], g), boot[reference]) if reference in moments else (None, None)
    out = {}
    for name, m in moments.items():
        c, b = _core(m, g), boot[name]
        stat, p = unbiasedness_test(m, g, seed)
        g_sq = float(c["g_sq"]) or math.nan  # relative metrics are undefined when grad J = 0
        sq_bias_debiased = float(c["bias_sq_debiased"])
        # bias-corrected percentile interval for the debiased squared bias: its replicates sit
        # about tr Cov / M above the estimate (resampling adds noise once more), so the
        # interval is shifted by the bootstrap's own bias, widened to hold the estimate, clipped
        # at 0, and then square-rooted
        reps = b["bias_sq_debiased"]
        shift = float(reps[torch.isfinite(reps)].mean()) - sq_bias_debiased
        lo, hi = _ci(reps)
        sq_ci = [max(min(lo - shift, sq_bias_debiased), 0.0),
                 max(hi - shift, sq_bias_debiased, 0.0)]
        row = {
            "n_trajectories": int(c["N"]), "batch_size": m.batch_size, "n_batches": int(c["M"]),
            "n_groups": K,
            "grad_norm": math.sqrt(g_sq),
            "mean_norm": float(c["mean"].norm()),
            "bias_norm": float(c["bias_sq"].sqrt()),
            "rel_bias": math.sqrt(max(sq_bias_debiased, 0.0) / g_sq),
            "rel_bias_ci": [math.sqrt(x / g_sq) for x in sq_ci],
            "rel_bias_plugin": math.sqrt(float(c["bias_sq"]) / g_sq),
            "rel_bias_noise_floor": math.sqrt(max(float(c["var_b"] / c["M"]), 0.0) / g_sq),
            "sq_bias_debiased": sq_bias_debiased,
            "rel_sq_bias_debiased": sq_bias_debiased / g_sq,
            "variance": float(c["var"]), "variance_ci": _ci(b["var"]),
            "batch_variance": float(c["var_b"]), "batch_variance_ci": _ci(b["var_b"]),
            "noise_to_signal": float(c["var"]) / g_sq,
            "test_statistic": stat, "p_value": p, "alpha": alpha, "rejects_unbiased": p < alpha,
        }
        if ref is not None:
            row["variance_ratio"] = float(c["var"] / ref["var"])
            row["variance_ratio_ci"] = _ci(b["var"] / ref_boot["var"])
            row["batch_variance_ratio"] = float(c["var_b"] / ref["var_b"])
        eff_var = m.batch_size * float(c["var_b"])  # per-trajectory-equivalent variance
        for target in (0.1, 0.01):
            room = target - max(sq_bias_debiased, 0.0) / g_sq
            need = eff_var / g_sq / room if room > 0 else (math.nan if math.isnan(room) else math.inf)
            row[f"batch_size_for_rel_mse_{target:g}"] = need
        per_b = {}
        for k, acc in zip(m.factors, m.blocks, strict=True):
            n, relsq, relsq2, cos, cos2, sign = acc.tolist()
            if n == 0:
                continue
            per_b[k * m.batch_size] = {"rel_mse": relsq / n, "rel_mse_se": _se(relsq, relsq2, n),
                                       "cosine": cos / n, "cosine_se": _se(cos, cos2, n),
                                       "sign_agreement": sign / n, "n_blocks": int(n)}
        row["at_batch_size"] = per_b
        out[name] = row
    return out

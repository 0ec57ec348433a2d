"""Statistics of per-trajectory gradient estimates against the exact gradient.

Array convention: N trajectories in M = N / B consecutive batches of B; the batches are split
into K contiguous *groups* (K = min(64, M)). Only sums are kept, chunk by chunk, so N x P never
sits in memory:

    gsum [K, P]  sum of X_i over the group        gsq  [K]  sum of |X_i|^2
    gbsq [K]     sum over its batches of |g_B|^2  gn, gm [K] trajectories, batches
    gu2, gu3, gu4 [K]  sums over its batches of y^2, y^3, y^4, y = u . g_B, u = grad J / |grad J|
    blocks       for each batch size B' = k B: sums of |g_B' - g|^2/|g|^2, cos(g_B', g), sign

Groups are independent (whole batches), so they are the resampling unit of the bootstrap
intervals. The unbiasedness test is a t-test of the batch estimates' component along grad J
(``scale_test``); runs of one condition with several seeds pool their sums (``Moments.merge``)
into one test and one interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from scipy import stats as st
from torch import Tensor

from .contraction import Grads

__all__ = ["AtBatchSize", "ChunkIndex", "Moments", "ScaleTest", "Summary", "block_factors",
           "bootstrap_interval", "n_groups", "scale_test", "summarize"]

BLOCK_FACTORS = (1, 4, 16, 64, 256)  # batch sizes B' = k B at which relMSE/cosine are measured
MAX_GROUPS = 64
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


SUMS = ("gsum", "gsq", "gbsq", "gn", "gm", "gu2", "gu3", "gu4", "blocks")  # the sums of Moments


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
    gu2: Tensor = field(init=False)
    gu3: Tensor = field(init=False)
    gu4: Tensor = field(init=False)
    blocks: Tensor = field(init=False)  # [F, 6]: count, relsq, relsq^2, cos, cos^2, sign

    def __post_init__(self) -> None:
        if any(k % j for j, k in zip([1, *self.factors], self.factors, strict=False)):
            raise ValueError(f"block factors must each divide the next, got {self.factors}")
        K = n_groups(self.n_batches)
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.device)  # noqa: E731
        self.gsum, self.gsq, self.gbsq, self.gn, self.gm = z(K, self.n_params), z(K), z(K), z(K), z(K)
        self.gu2, self.gu3, self.gu4 = z(K), z(K), z(K)
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
        g_norm = float(g.norm())
        y = (sums @ g) / (B * g_norm) if g_norm > 0 else torch.zeros_like(sums_sq)  # u . g_B
        y2 = y * y
        self.gu2.index_add_(0, idx.group, y2)
        self.gu3.index_add_(0, idx.group, y2 * y)
        self.gu4.index_add_(0, idx.group, y2 * y2)
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
    if w is not None:
        return _core_replicates(m, g, w)
    N, M, sx, sq, sb = _totals(m, w)
    mean = sx / (N[..., None] if w is not None else N)
    msq = (mean**2).sum(-1)
    g_sq = g @ g
    var = (sq - N * msq) / (N - 1)  # tr Cov of one trajectory's estimate
    var_b = (sb - M * msq) / (M - 1)  # tr Cov of one batch's estimate
    bias_sq = ((mean - g) ** 2).sum(-1)
    return {"mean": mean, "var": var, "var_b": var_b, "bias_sq": bias_sq,
            "bias_sq_debiased": bias_sq - var_b / M, "g_sq": g_sq, "N": N, "M": M}


def _core_replicates(m: Moments, g: Tensor, w: Tensor) -> dict[str, Tensor]:
    """_core's statistics under bootstrap weights w [R, K], each [R], without the replicates'
    means [R, P]: |mean_r|^2 and mean_r . g from the groups' K x K Gram matrix (for Taxi's 3000
    parameters and 29 estimators the means took 2 GB)."""
    N, M, sq, sb = w @ m.gn, w @ m.gm, w @ m.gsq, w @ m.gbsq
    msq = ((w @ (m.gsum @ m.gsum.T)) * w).sum(-1) / N**2
    g_sq = g @ g
    bias_sq = msq - 2 * (w @ (m.gsum @ g)) / N + g_sq
    var = (sq - N * msq) / (N - 1)
    var_b = (sb - M * msq) / (M - 1)
    return {"var": var, "var_b": var_b, "bias_sq": bias_sq,
            "bias_sq_debiased": bias_sq - var_b / M, "g_sq": g_sq, "N": N, "M": M}


@dataclass(frozen=True)
class ScaleTest:
    """The t-test of H0: E[X] = g along u = g / |g| (see ``scale_test``)."""

    scale: float  # u . mean / |g|: 1 for an unbiased estimator, (B-1)/B for the batch mean's
    scale_ci: tuple[float, float]  # t-interval at level 1 - alpha (excludes 1 iff the test rejects)
    statistic: float  # t
    p_value: float | None  # None: inconclusive
    level_error: float  # predicted error of the test's level from the skewness and kurtosis
    inconclusive: str | None  # why the test cannot be trusted here, or None
    trajectories_needed: int | None  # with this many the predicted level error would be <= TOL


LEVEL_TOL = 0.02  # the test is trusted when its level is predicted within alpha +- LEVEL_TOL


def scale_test(m: Moments, g: Tensor, alpha: float = ALPHA) -> ScaleTest:
    """t-test of H0: E[X] = g along u = g / |g|, over the M batch estimates y_b = u . g_B.

    t = (mean(y) - |g|) / (sd(y) / sqrt(M)), p from Student's t with M - 1 degrees of freedom.
    Batches are independent for every estimator (also those that use their batch), so the test
    needs no symmetry; it detects every bias that changes the mean's component along grad J
    (a rescaled gradient, a wrong discount), not a bias orthogonal to it. Its level rests on the
    normal approximation of mean(y); Hall's (1992) expansion of the studentised mean puts the
    two-sided level error at (0.2466 skew^2 - 0.0160 kurt) / M at alpha = 0.05, from the skewness
    and excess kurtosis of y. When that exceeds LEVEL_TOL the test says "inconclusive" and how
    many trajectories would bring it within (about 13 independent events along grad J are
    needed when the estimate is driven by rare events). Batch estimates that do not vary: p = 1
    if they equal g, else inconclusive (rare events and a deterministic error look the same).
    """
    g = g.to(torch.float64)
    g_norm = float(g.norm())
    M = float(m.gm.sum())
    B = m.batch_size
    if g_norm == 0:
        if float(m.gsq.sum()) == 0:  # every estimate is exactly 0 = grad J
            return ScaleTest(1.0, (1.0, 1.0), 0.0, 1.0, 0.0, None, None)
        return ScaleTest(math.nan, (math.nan, math.nan), math.nan, None, math.nan,
                         "grad J = 0: no direction to test along", None)
    u = g / g_norm
    S1 = float(u @ m.gsum.sum(0)) / B
    S2, S3, S4 = float(m.gu2.sum()), float(m.gu3.sum()), float(m.gu4.sum())
    mean = S1 / M
    c2 = max(S2 / M - mean**2, 0.0)
    var = c2 * M / (M - 1)
    scale = mean / g_norm
    if var <= 1e-24 * max(mean**2, g_norm**2):
        if abs(mean - g_norm) <= 1e-12 * max(abs(mean), g_norm):  # every estimate right
            return ScaleTest(scale, (scale, scale), 0.0, 1.0, 0.0, None, None)
        # no variation seen: events rarer than one per batch, or a deterministic error; the
        # samples cannot tell which
        return ScaleTest(scale, (math.nan, math.nan), math.nan, None, math.nan,
                         f"the {int(M):,} batch estimates do not vary along grad J (events rarer "
                         "than one per batch?)", int(10 * M * B))
    c3 = S3 / M - 3 * mean * S2 / M + 2 * mean**3
    c4 = S4 / M - 4 * mean * S3 / M + 6 * mean**2 * S2 / M - 3 * mean**4
    skew, kurt = c3 / c2**1.5, c4 / c2**2 - 3
    level_error = (0.2466 * skew**2 - 0.0160 * kurt) / M
    se = math.sqrt(var / M)
    t = (mean - g_norm) / se
    half = st.t.ppf(1 - alpha / 2, M - 1) * se / g_norm
    ci = (scale - half, scale + half)
    if abs(level_error) > LEVEL_TOL:
        need = math.ceil(M * abs(level_error) / LEVEL_TOL) * B
        return ScaleTest(scale, ci, t, None, level_error,
                         f"skewed batch estimates (skewness {skew:.3g}, excess kurtosis "
                         f"{kurt:.3g}): the level of the test is off by up to "
                         f"{abs(level_error):.3f} at {int(M * B):,} trajectories", need)
    return ScaleTest(scale, ci, t, float(2 * st.t.sf(abs(t), M - 1)), level_error, None, None)


def _se(total: float, total_sq: float, n: float) -> float:
    """Standard error of a mean from its sum and sum of squares over n blocks."""
    return math.sqrt(max(total_sq / n - (total / n) ** 2, 0.0) / n)


def bootstrap_interval(replicates: Tensor, level: float = 1 - ALPHA) -> list[float]:
    """Percentile interval of bootstrap replicates (non-finite ones dropped; [nan, nan] if none
    is finite): the one interval of every resampled statistic."""
    finite = replicates[torch.isfinite(replicates)]
    if finite.numel() == 0:
        return [math.nan, math.nan]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=replicates.dtype)
    lo, hi = torch.quantile(finite, q)
    return [float(lo), float(hi)]


def _bootstrap_weights(K: int, seed: int, device: torch.device) -> Tensor:
    """[N_BOOT, K] multiplicities of K groups resampled with replacement (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, K, (N_BOOT, K), generator=gen)
    w = torch.zeros(N_BOOT, K, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(N_BOOT, K, dtype=torch.float64))
    return w.to(device)


def _debiased_bias_interval(estimate: float, replicates: Tensor) -> list[float]:
    """Interval for the debiased squared bias: its bootstrap replicates sit about tr Cov / M
    above the estimate (resampling adds the noise once more), so the interval is shifted by the
    bootstrap's own bias, widened to hold the estimate and clipped at 0."""
    finite = replicates[torch.isfinite(replicates)]
    if finite.numel() == 0 or not math.isfinite(estimate):
        return [math.nan, math.nan]
    shift = float(finite.mean()) - estimate
    lo, hi = bootstrap_interval(replicates)
    return [max(min(lo - shift, estimate), 0.0), max(hi - shift, estimate, 0.0)]


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and math.isfinite(b) else math.nan


@dataclass(frozen=True)
class AtBatchSize:
    """The statistics of the blocks of B' = k B consecutive trajectories (k batches) of a rollout."""

    rel_mse: float  # mean |g_B' - g|^2 / |g|^2 over the blocks
    rel_mse_se: float  # its standard error
    cosine: float  # mean cos(g_B', g)
    cosine_se: float
    sign_agreement: float  # fraction of blocks with g_B' . g > 0
    n_blocks: int

    def to_json(self) -> dict[str, float]:
        return {"rel_mse": self.rel_mse, "rel_mse_se": self.rel_mse_se, "cosine": self.cosine,
                "cosine_se": self.cosine_se, "sign_agreement": self.sign_agreement,
                "n_blocks": self.n_blocks}


@dataclass(frozen=True)
class Summary:
    """One estimator's sampled statistics (``summarize``; ``suite.core.metrics.METRICS`` defines
    each, docs/metrics.md explains them). Intervals are [low, high]; ``to_json`` gives the
    estimator's row of stats.json."""

    n_trajectories: int
    batch_size: int
    n_batches: int
    n_groups: int  # the bootstrap's resampling units (groups of batches)
    grad_norm: float
    mean_norm: float
    bias_norm: float
    rel_bias: float
    rel_bias_ci: list[float]
    rel_bias_plugin: float
    rel_bias_noise_floor: float
    sq_bias_debiased: float
    rel_sq_bias_debiased: float
    cosine: float
    norm_ratio: float
    scale: float
    scale_ci: list[float]
    variance: float
    variance_ci: list[float]
    batch_variance: float
    batch_variance_ci: list[float]
    noise_to_signal: float
    test_statistic: float
    p_value: float | None  # None: the test is inconclusive
    alpha: float
    rejects_unbiased: bool | None  # None: inconclusive
    inconclusive: str | None  # why the test cannot be trusted here
    test_inconclusive: bool
    trajectories_needed: int | None  # where an inconclusive test would hold its level
    test_level_error: float
    test_method: str
    batch_size_for_rel_mse: dict[float, float]  # target relative MSE (0.1, 0.01) -> batch size
    at_batch_size: dict[int, AtBatchSize]  # B' = k B -> its blocks' statistics
    # against the reference estimator on the same trajectories (None: it was not measured)
    variance_ratio: float | None = None
    variance_ratio_ci: list[float] | None = None
    batch_variance_ratio: float | None = None

    def to_json(self) -> dict[str, object]:
        row: dict[str, object] = {
            "n_trajectories": self.n_trajectories, "batch_size": self.batch_size,
            "n_batches": self.n_batches, "n_groups": self.n_groups, "grad_norm": self.grad_norm,
            "mean_norm": self.mean_norm, "bias_norm": self.bias_norm, "rel_bias": self.rel_bias,
            "rel_bias_ci": self.rel_bias_ci, "rel_bias_plugin": self.rel_bias_plugin,
            "rel_bias_noise_floor": self.rel_bias_noise_floor,
            "sq_bias_debiased": self.sq_bias_debiased,
            "rel_sq_bias_debiased": self.rel_sq_bias_debiased, "cosine": self.cosine,
            "norm_ratio": self.norm_ratio, "scale": self.scale, "scale_ci": self.scale_ci,
            "variance": self.variance, "variance_ci": self.variance_ci,
            "batch_variance": self.batch_variance, "batch_variance_ci": self.batch_variance_ci,
            "noise_to_signal": self.noise_to_signal, "test_statistic": self.test_statistic,
            "p_value": self.p_value, "alpha": self.alpha, "rejects_unbiased": self.rejects_unbiased,
            "inconclusive": self.inconclusive, "test_inconclusive": self.test_inconclusive,
            "trajectories_needed": self.trajectories_needed,
            "test_level_error": self.test_level_error, "test_method": self.test_method,
        }
        if self.variance_ratio is not None:
            row["variance_ratio"] = self.variance_ratio
            row["variance_ratio_ci"] = self.variance_ratio_ci
            row["batch_variance_ratio"] = self.batch_variance_ratio
        for target, need in self.batch_size_for_rel_mse.items():
            row[f"batch_size_for_rel_mse_{target:g}"] = need
        row["at_batch_size"] = {b: at.to_json() for b, at in self.at_batch_size.items()}
        return row


def summarize(moments: dict[str, Moments], g: Tensor, reference: str = "reinforce",
              seed: int = 0, alpha: float = ALPHA) -> dict[str, Summary]:
    """Metrics per estimator (docs/metrics.md). Intervals: percentile bootstrap over groups,
    the same resampled groups for every estimator (so the variance ratio is paired); the test
    and the scale interval: ``scale_test``."""
    g = g.to(torch.float64)
    any_m = next(iter(moments.values()))
    K = any_m.gsum.shape[0]
    w = _bootstrap_weights(K, seed, any_m.device)
    boot = {name: _core(m, g, w) for name, m in moments.items()}
    ref, ref_boot = (_core(moments[reference], g), boot[reference]) if reference in moments else (None, None)
    g_sq = float(g @ g)
    rel = (lambda x: x / g_sq) if g_sq > 0 else (lambda x: math.nan)  # undefined when grad J = 0
    out = {}
    for name, m in moments.items():
        c, b = _core(m, g), boot[name]
        test = scale_test(m, g, alpha)
        sq_bias_debiased = float(c["bias_sq_debiased"])
        sq_ci = _debiased_bias_interval(sq_bias_debiased, b["bias_sq_debiased"])
        mean_norm = float(c["mean"].norm())
        ratio: float | None = None
        ratio_ci: list[float] | None = None
        batch_ratio: float | None = None
        if ref is not None and ref_boot is not None:
            ratio = _ratio(float(c["var"]), float(ref["var"]))
            ratio_ci = bootstrap_interval(b["var"] / ref_boot["var"])
            batch_ratio = _ratio(float(c["var_b"]), float(ref["var_b"]))
        eff_var = m.batch_size * float(c["var_b"])  # per-trajectory-equivalent variance
        need = {}
        for target in (0.1, 0.01):
            room = target - max(rel(sq_bias_debiased), 0.0)
            need[target] = (rel(eff_var) / room if room > 0
                            else (math.nan if math.isnan(room) else math.inf))
        per_b = {}
        for k, acc in zip(m.factors, m.blocks, strict=True):
            n, relsq, relsq2, cos, cos2, sign = acc.tolist()
            if n == 0:
                continue
            per_b[k * m.batch_size] = AtBatchSize(relsq / n, _se(relsq, relsq2, n), cos / n,
                                                  _se(cos, cos2, n), sign / n, int(n))
        out[name] = Summary(
            n_trajectories=int(c["N"]), batch_size=m.batch_size, n_batches=int(c["M"]),
            n_groups=K,
            grad_norm=math.sqrt(g_sq),
            mean_norm=mean_norm,
            bias_norm=float(c["bias_sq"].sqrt()),
            rel_bias=math.sqrt(max(rel(sq_bias_debiased), 0.0)),
            rel_bias_ci=[math.sqrt(max(rel(x), 0.0)) for x in sq_ci],
            rel_bias_plugin=math.sqrt(rel(float(c["bias_sq"]))),
            rel_bias_noise_floor=math.sqrt(max(rel(float(c["var_b"] / c["M"])), 0.0)),
            sq_bias_debiased=sq_bias_debiased,
            rel_sq_bias_debiased=rel(sq_bias_debiased),
            cosine=_ratio(float(c["mean"] @ g), mean_norm * math.sqrt(g_sq)),
            norm_ratio=_ratio(mean_norm, math.sqrt(g_sq)),
            scale=test.scale, scale_ci=list(test.scale_ci),
            variance=float(c["var"]), variance_ci=bootstrap_interval(b["var"]),
            batch_variance=float(c["var_b"]), batch_variance_ci=bootstrap_interval(b["var_b"]),
            noise_to_signal=rel(float(c["var"])),
            test_statistic=test.statistic, p_value=test.p_value, alpha=alpha,
            rejects_unbiased=None if test.p_value is None else test.p_value < alpha,
            inconclusive=test.inconclusive, test_inconclusive=test.p_value is None,
            trajectories_needed=test.trajectories_needed,
            test_level_error=test.level_error,
            test_method="t-test of the batch estimates along grad J",
            batch_size_for_rel_mse=need, at_batch_size=per_b,
            variance_ratio=ratio, variance_ratio_ci=ratio_ci, batch_variance_ratio=batch_ratio)
    return out

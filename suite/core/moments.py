"""Exact first and second moments of gradient estimators, by backward recursion over (t, s).

No trajectory is sampled or enumerated. For an estimator written g = sum_{t<T} psi_t X_t (psi_t =
grad log pi(a_t|s_t), T the realised length), E[g] and E|g|^2 obey recursions like the value
function's; "Sum[...]" at (t, s) below means sum_a pi(a|s) sum_s' P(s'|s,a) [...], primed
quantities are taken at (t+1, s') and are 0 after a terminating transition (the sink) and at H.

**Weighting** X_t = o^t (y_t - b_t(s_t) + beta Y_{t+1}), Y_t = sum_{k>=t} beta^(k-t) y_k, with
y_t = y(t, s_t, a_t, s_{t+1}) and c = y - b_t(s):

    mY (t,s) = Sum[ y + beta mY' ]              mY2(t,s) = Sum[ y^2 + 2 beta y mY' + beta^2 mY2' ]
    h1 (t,s) = Sum[ o^t psi (c + beta mY') + h1' ]                                  E g    = rho0 . h1(0)
    h2 (t,s) = Sum[ o^t psi (c y + beta (c + y) mY' + beta^2 mY2') + y h1' + beta h2' ]
    h0 (t,s) = Sum[ |psi|^2 o^2t (c^2 + 2 c beta mY' + beta^2 mY2') + 2 o^t psi.(c h1' + beta h2') + h0' ]
                                                                                    E|g|^2 = rho0 . h0(0)

h1 = E[g_{>=t}], h2 = E[Y_t g_{>=t}], h0 = E|g_{>=t}|^2 given s_t = s. **Reinforce** (X_t = G_0)
carries the return's past part (``_reinforce``); **all-action** (sum_t gamma^t sum_a grad pi Q_t)
and **single-step** estimators (one step t* ~ q, averaged over t* exactly) are smaller instances;
**batch baselines** (a baseline from the other trajectories of the batch, linear in them) follow
from single-trajectory moments in closed form (``_batch_baseline``). The derivations are in
docs/metrics.md; tests/test_moments.py proves every case against enumeration of all trajectories.

Vectors over the parameters (h1, h2, ...) are [S, m] tables: for a tabular policy psi(s, a) lives
in row s of theta, so its dot products cost O(A) (``TabularScore``); any other policy goes through
the Jacobian of its log-probability table (``DenseScore``). A ``Score`` may also be projected on
a few directions (``project``), which gives exact variances along those directions at the cost
of m = their number.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .exact import ExactSolution, occupancy
from .mdp import MDP
from .policies import Policy
from .threads import intra_op_threads

# torch marks sparse CSR tensors as beta; the products used here are plain and tested
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

__all__ = ["AllAction", "BatchBaseline", "DenseScore", "ExactMoments", "Form", "MomentModel",
           "NoExact", "Reinforce", "Score", "SingleStep", "TabularScore", "Weighting",
           "exact_moments"]


# ---------------------------------------------------------------------------------------------
# The forms an estimator can declare
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Weighting:
    """g = sum_t psi_t o^t (y_t - b_t(s_t) + beta Y_{t+1}), Y_t = sum_{k>=t} beta^(k-t) y_k."""

    y: Tensor  # [H or 1, S, A, K] y(t, s, a, s'_k) on the model's successor grid
    beta: float
    o: float
    baseline: Tensor | None = None  # [H, S] b_t(s), or None for 0


@dataclass(frozen=True)
class Reinforce:
    """g = G_0 sum_t psi_t (the full discounted return at every step)."""


@dataclass(frozen=True)
class AllAction:
    """g = sum_t gamma^t sum_a grad pi(a|s_t) critic_t(s_t, a)."""

    critic: Tensor  # [H, S, A]


@dataclass(frozen=True)
class SingleStep:
    """One step t* ~ q drawn per trajectory, g = c_t* psi_t*, with
    q_t = q_time[t] q_len[T] and c_t = c_time[t] c_len[T] Y_t (Y as in Weighting, o = 1):
    E g = E[sum_t q_t c_t psi_t], E|g|^2 = E[sum_t q_t c_t^2 |psi_t|^2]."""

    y: Tensor  # [H or 1, S, A, K]
    beta: float
    q_time: Tensor  # [H]
    q_len: Tensor  # [H+1], indexed by the realised length T
    c_time: Tensor  # [H]
    c_len: Tensor  # [H+1]


@dataclass(frozen=True)
class BatchBaseline:
    """Member i of a batch of B: sum_t gamma^t psi_t^i (k1 G_t^i - kappa sum_{j != i} G_t^j),
    G^j = 0 once trajectory j ended; k1 and kappa are functions of B."""

    self_weight: Callable[[int], float]  # k1(B)
    others_weight: Callable[[int], float]  # kappa(B)


@dataclass(frozen=True)
class NoExact:
    """The estimator has no exact moments here; ``reason`` says why (sampled statistics only)."""

    reason: str


Form = Weighting | Reinforce | AllAction | SingleStep | BatchBaseline | NoExact


@dataclass(frozen=True)
class ExactMoments:
    """Exact moments of one estimator (float64). For an estimator that uses the other members of
    its batch, the per-trajectory figures are those of one member (its marginal)."""

    mean: Tensor  # [P] E[g] of one trajectory's estimate
    second_moment: float  # E|g|^2 of one trajectory's estimate
    batch_size: int  # B of the batch figures
    batch_mean: Tensor  # [P] E[g_B], g_B = the batch's mean estimate
    batch_second_moment: float  # E|g_B|^2

    @property
    def variance(self) -> float:
        """tr Cov of one trajectory's estimate."""
        return self.second_moment - float(self.mean @ self.mean)

    @property
    def batch_variance(self) -> float:
        """tr Cov of the batch estimate."""
        return self.batch_second_moment - float(self.batch_mean @ self.batch_mean)


# ---------------------------------------------------------------------------------------------
# Scores: psi(s, a) and the few operations the recursions need
# ---------------------------------------------------------------------------------------------

class Score:
    """psi(s, a) = grad log pi(a|s) in R^m, through four operations."""

    @property
    def m(self) -> int:  # the dimension of psi
        raise NotImplementedError

    def sq_norm(self) -> Tensor:  # [S, A] |psi(s,a)|^2
        raise NotImplementedError

    def combine(self, c: Tensor) -> Tensor:  # c [S, A] -> [S, m]: row s = sum_a c[s,a] psi(s,a)
        raise NotImplementedError

    def dot_next(self, X: Tensor, next_state: Tensor) -> Tensor:
        """X [S', m] -> [S, A, K]: psi(s, a) . X[next_state[s, a, k]]."""
        raise NotImplementedError

    def to_params(self, v: Tensor) -> Tensor:  # [m] -> [P] (identity unless projected)
        return v


@dataclass(frozen=True)
class TabularScore(Score):
    """psi(s, a) = onehot(a) - pi(.|s) in row s of theta [S, A] (m = S*A)."""

    pi: Tensor  # [S, A]

    @property
    def m(self) -> int:
        return self.pi.numel()

    def sq_norm(self) -> Tensor:
        return 1.0 - 2.0 * self.pi + (self.pi**2).sum(1, keepdim=True)

    def combine(self, c: Tensor) -> Tensor:
        S, A = self.pi.shape
        out = torch.zeros(S, S, A, dtype=c.dtype, device=c.device)
        rows = torch.arange(S, device=c.device)
        out[rows, rows] = c - self.pi * c.sum(1, keepdim=True)
        return out.reshape(S, S * A)

    def dot_next(self, X: Tensor, next_state: Tensor) -> Tensor:
        S, A = self.pi.shape
        rows = torch.arange(S, device=X.device)[:, None, None]
        blocks = X.reshape(-1, S, A)[next_state, rows]  # [S, A, K, A]: row s of X at s'
        own = blocks.gather(-1, torch.arange(A, device=X.device)[None, :, None, None]
                            .expand(S, A, blocks.shape[2], 1)).squeeze(-1)
        return own - (blocks * self.pi[:, None, None, :]).sum(-1)


@dataclass(frozen=True)
class DenseScore(Score):
    """psi(s, a) = J[s, a] for a Jacobian table J [S, A, m] (any policy, or any projection)."""

    J: Tensor  # [S, A, m]
    basis: Tensor | None = None  # [P, m] when projected: the directions (to_params maps back)

    @property
    def m(self) -> int:
        return self.J.shape[-1]

    def sq_norm(self) -> Tensor:
        return (self.J**2).sum(-1)

    def combine(self, c: Tensor) -> Tensor:
        return torch.einsum("sa,sam->sm", c, self.J)

    def dot_next(self, X: Tensor, next_state: Tensor) -> Tensor:
        S, A, K = next_state.shape
        out = torch.empty(S, A, K, dtype=X.dtype, device=X.device)
        step = max(1, (1 << 22) // max(1, A * K * self.m))  # bounded [rows, A, K, m] buffers
        for lo in range(0, S, step):
            hi = min(S, lo + step)
            out[lo:hi] = (X[next_state[lo:hi]] * self.J[lo:hi, :, None, :]).sum(-1)
        return out

    def to_params(self, v: Tensor) -> Tensor:
        return v if self.basis is None else self.basis @ v


def score_of(policy: Policy, pi: Tensor) -> Score:
    """The score of ``policy`` (tabular rows, or the Jacobian of its log-probability table)."""
    if policy.tabular:
        return TabularScore(pi)
    theta = policy.params.detach()
    J = torch.func.jacrev(lambda p: policy.log_probs(p))(theta)  # [S, A, P]
    return DenseScore(J.to(pi.device))


def project(score: Score, directions: Tensor) -> DenseScore:
    """The score along directions D [P, k] (columns): psi . D, so moments come out in R^k."""
    D = directions.to(torch.float64)
    if isinstance(score, TabularScore):
        S, A = score.pi.shape
        Dt = D.reshape(S, A, -1)
        J = Dt - (score.pi[:, :, None] * Dt).sum(1, keepdim=True)  # (onehot(a) - pi) . D[s]
    elif isinstance(score, DenseScore):
        J = score.J @ D if score.basis is None else score.J @ (score.basis.T @ D)
    else:
        raise TypeError(f"cannot project a {type(score).__name__}")
    return DenseScore(J, D)


# ---------------------------------------------------------------------------------------------
# The model every recursion runs on
# ---------------------------------------------------------------------------------------------

class MomentModel:
    """One (MDP, policy, gamma, H): transitions on the successor grid [S, A, K], the score, and
    the propagation X [S', ...] -> sum_{a,k} w[s,a,k] X[s'_k] as a sparse matrix product."""

    def __init__(self, mdp: MDP, policy: Policy, sol: ExactSolution, score: Score | None = None,
                 dense: bool = False):
        succ = mdp.successors
        self.dense = dense  # force the generic [S, m] recursions (tests compare both paths)
        self._d: Tensor | None = None  # occupancies from another rho0 (for_start)
        self.mdp, self.policy, self.sol = mdp, policy, sol
        self.gamma, self.H = sol.gamma, sol.horizon
        self.pi = sol.pi.to(torch.float64)  # [S, A]
        self.next_state = succ.next_state  # [S, A, K]
        self.alive = (~succ.terminated).to(torch.float64) * (succ.prob > 0)  # [S, A, K] n'
        self.prob = succ.prob  # [S, A, K] P(s'_k | s, a)
        self.w = self.pi[:, :, None] * succ.prob  # [S, A, K] pi(a|s) P(s'_k|s,a)
        self.wn = self.w * self.alive
        self.reward = succ.reward[None]  # [1, S, A, K]
        self.rho0 = mdp.rho0
        self.score = score or score_of(policy, self.pi)
        S, A, K = self.next_state.shape
        self.S = S
        # CSR structure of the (s -> s') edges; each (s, a, k) adds into one slot
        key = torch.arange(S)[:, None, None] * S + self.next_state
        edges, self._slot = torch.unique(key.reshape(-1), return_inverse=True)
        rows = edges // S
        self._crow = torch.zeros(S + 1, dtype=torch.int64).index_add_(
            0, rows + 1, torch.ones_like(rows)).cumsum(0)
        self._col = edges % S
        self._n_edges = edges.numel()

    @property
    def d(self) -> Tensor:
        """[H, S] occupancies from the model's rho0: P(s_t = s, episode still running)."""
        return self.sol.d if self._d is None else self._d

    def for_start(self, s: int) -> MomentModel:
        """The same model with every trajectory starting in s (its lag matrices shared)."""
        rho0 = torch.zeros_like(self.rho0)
        rho0[s] = 1.0
        out = copy.copy(self)
        out.__dict__ = {k: v for k, v in self.__dict__.items() if k != "batch_parts"}
        out.rho0, out._d = rho0, occupancy(self.mdp, self.pi, self.H, rho0)
        return out

    @cached_property
    def components(self) -> list[Tensor]:
        """States grouped by the weakly connected components of the transition graph (each
        state takes the smallest label among its neighbours until nothing changes)."""
        keep = (self.prob > 0).reshape(-1)
        src = torch.arange(self.S)[:, None, None].expand_as(self.next_state).reshape(-1)[keep]
        dst = self.next_state.reshape(-1)[keep]
        a, b = torch.cat([src, dst]), torch.cat([dst, src])  # both directions
        labels = torch.arange(self.S)
        while True:
            new = labels.scatter_reduce(0, a, labels[b], reduce="amin")
            if torch.equal(new, labels):
                break
            labels = new
        return [torch.nonzero(labels == c).squeeze(1) for c in torch.unique(labels)]

    @cached_property
    def batch_parts(self) -> tuple[Tensor, float, float, float, float, float]:
        """What the batch-baseline moments need from one trajectory (shared by all of them)."""
        return _batch_parts(self)

    @cached_property
    def lags(self) -> _Lags | None:
        """Lag matrices of the tabular fast path (None for other scores, or when dense)."""
        return None if self.dense or not isinstance(self.score, TabularScore) else _Lags(self)

    def prop(self, weights: Tensor, X: Tensor) -> Tensor:
        """sum_{a,k} weights[s, a, k] X[next_state[s, a, k]] for X [S, ...] -> [S, ...]."""
        if X.dim() == 1 or X[0].numel() <= 4:
            Xn = X[self.next_state]  # [S, A, K, ...]
            w = weights.reshape(*weights.shape, *([1] * (X.dim() - 1)))
            return (w * Xn).sum((1, 2))
        values = torch.zeros(self._n_edges, dtype=X.dtype).index_add_(
            0, self._slot, weights.reshape(-1))
        M = torch.sparse_csr_tensor(self._crow, self._col, values, (self.S, self.S),
                                    check_invariants=False)
        return (M @ X.reshape(self.S, -1)).reshape(X.shape)

    def expect(self, table: Tensor) -> Tensor:
        """Sum over (a, k) with weights pi P: [S, A, K] -> [S]."""
        return (self.w * table).sum((1, 2))

    def nxt(self, values: Tensor) -> Tensor:
        """values[s'_k] after a non-terminating transition, 0 after a terminating one: [S,A,K]."""
        return self.alive * values[self.next_state]

    # tables on the successor grid, for estimators declaring their forms
    def successor(self, table: Tensor) -> Tensor:
        """table [H+1, S] -> [H, S, A, K]: table[t+1, s'_k], 0 after termination."""
        return self.alive[None] * table[1:, self.next_state]

    @staticmethod
    def state(table: Tensor) -> Tensor:
        """table [H, S] -> [H, S, 1, 1]."""
        return table[:, :, None, None]

    @staticmethod
    def action(table: Tensor) -> Tensor:
        """table [H, S, A] -> [H, S, A, 1]."""
        return table[..., None]

    def discount(self, base: float) -> Tensor:
        """base^t for t = 0..H-1, float64 (0^0 = 1)."""
        return torch.tensor(float(base), dtype=torch.float64) ** torch.arange(self.H,
                                                                              dtype=torch.float64)


def _at(y: Tensor, t: int) -> Tensor:
    """y at time t for a table with a leading time axis of length H or 1."""
    return y[t if y.shape[0] > 1 else 0]


# ---------------------------------------------------------------------------------------------
# The recursions
# ---------------------------------------------------------------------------------------------

def _weighting_dense(model: MomentModel, form: Weighting) -> tuple[Tensor, float]:
    """(E g [m], E|g|^2) of a Weighting with h1, h2 as [S, m] tables (module doc)."""
    S, m, beta = model.S, model.score.m, float(form.beta)
    sq = model.score.sq_norm()[:, :, None]  # [S, A, 1]
    mY = torch.zeros(S, dtype=torch.float64)
    mY2 = torch.zeros(S, dtype=torch.float64)
    h1 = torch.zeros(S, m, dtype=torch.float64)
    h2 = torch.zeros(S, m, dtype=torch.float64)
    h0 = torch.zeros(S, dtype=torch.float64)
    for t in reversed(range(model.H)):
        ot = float(form.o) ** t
        y = _at(form.y, t).expand_as(model.w)
        b = 0.0 if form.baseline is None else form.baseline[t][:, None, None]
        c = y - b
        mYn, mY2n = model.nxt(mY), model.nxt(mY2)
        d1 = model.score.dot_next(h1, model.next_state) * model.alive
        first = c + beta * mYn  # E[X_t / o^t | s, a, s']
        second = c * c + 2 * beta * c * mYn + beta**2 * mY2n
        cross = c * d1
        if beta:
            d2 = model.score.dot_next(h2, model.next_state) * model.alive
            cross = cross + beta * d2
            h2 = (ot * model.score.combine(
                    (model.w * (c * y + beta * (c + y) * mYn + beta**2 * mY2n)).sum(-1))
                  + model.prop(model.wn * y, h1) + beta * model.prop(model.wn, h2))
        h0 = model.expect(sq * ot * ot * second + 2 * ot * cross) + model.expect(model.nxt(h0))
        h1 = ot * model.score.combine((model.w * first).sum(-1)) + model.prop(model.wn, h1)
        if beta:
            mY, mY2 = (model.expect(y + beta * mYn),
                       model.expect(y * y + 2 * beta * y * mYn + beta**2 * mY2n))
    return model.rho0 @ h1, float(model.rho0 @ h0)


def _weighting_rows(model: MomentModel, form: Weighting) -> tuple[Tensor, float]:
    """The [S, m] recursion of a Weighting for a tabular policy (used when y changes with t and
    beta > 0), one connected component of the transition graph at a time: a trajectory never
    leaves its component, so h1 and h2 of a state have blocks only in its own component."""
    A = model.pi.shape[1]
    mean = torch.zeros(model.S, A, dtype=torch.float64)
    second = 0.0
    for idx in model.components:
        part_mean, part_second = _weighting_rows_part(model, form, idx)
        mean[idx] = part_mean
        second += part_second
    return mean.reshape(-1), second


def _weighting_rows_part(model: MomentModel, form: Weighting, idx: Tensor) -> tuple[Tensor, float]:
    """The recursion on the states idx (a component), with h1 and h2 stacked in one [2n, n*A]
    table so that one sparse product per step propagates both, and each step's sources added in
    place to the diagonal blocks. Returns the row blocks of E g [n, A] and its E|g|^2 share."""
    n, H, beta, o = idx.numel(), model.H, float(form.beta), float(form.o)
    A = model.pi.shape[1]
    local = torch.zeros(model.S, dtype=torch.int64)
    local[idx] = torch.arange(n)
    ns = local[model.next_state[idx]]  # [n, A, K] (padding entries have weight 0)
    pi, w, alive = model.pi[idx], model.w[idx], model.alive[idx]
    wn, score = w * alive, TabularScore(pi)
    sq = score.sq_norm()[:, :, None]
    y_all = form.y[:, idx]
    base = None if form.baseline is None else form.baseline[:, idx]
    rows = torch.arange(n)
    src = rows[:, None, None].expand_as(ns).reshape(-1)
    dst = ns.reshape(-1)
    index = torch.cat([torch.stack([src, dst]), torch.stack([src + n, dst]),
                       torch.stack([src + n, dst + n])], 1)
    expect = lambda x: (w * x).sum((1, 2))  # noqa: E731
    nxt = lambda v: alive * v[ns]  # noqa: E731
    h12 = torch.zeros(2 * n, n * A, dtype=torch.float64)
    mY = torch.zeros(n, dtype=torch.float64)
    mY2 = torch.zeros(n, dtype=torch.float64)
    h0 = torch.zeros(n, dtype=torch.float64)
    for t in reversed(range(H)):
        ot = o**t
        y = _at(y_all, t).expand_as(w)
        c = y - (0.0 if base is None else base[t][:, None, None])
        mYn, mY2n = nxt(mY), nxt(mY2)
        d1 = score.dot_next(h12[:n], ns) * alive
        d2 = score.dot_next(h12[n:], ns) * alive
        second = c * c + 2 * beta * c * mYn + beta**2 * mY2n
        h0 = expect(sq * ot * ot * second + 2 * ot * (c * d1 + beta * d2)) + expect(nxt(h0))
        values = torch.cat([wn.reshape(-1), (wn * y).reshape(-1), beta * wn.reshape(-1)])
        step = torch.sparse_coo_tensor(index, values, (2 * n, 2 * n),
                                       check_invariants=False).coalesce().to_sparse_csr()
        h12 = step @ h12
        blocks = h12.reshape(2 * n, n, A)
        q1 = (w * (c + beta * mYn)).sum(-1)
        q2 = (w * (c * y + beta * (c + y) * mYn + beta**2 * mY2n)).sum(-1)
        blocks[rows, rows] += ot * (q1 - pi * q1.sum(1, keepdim=True))
        blocks[rows + n, rows] += ot * (q2 - pi * q2.sum(1, keepdim=True))
        mY, mY2 = expect(y + beta * mYn), expect(y * y + 2 * beta * y * mYn + beta**2 * mY2n)
    rho0 = model.rho0[idx]
    return (rho0 @ h12[:n]).reshape(n, A), float(rho0 @ h0)


def _reinforce_dense(model: MomentModel) -> tuple[Tensor, float]:
    """g = G_0 Psi, Psi = sum_t psi_t:
    m0 = E G_t, m1 = E G_t^2, v2 = E[G_t Psi_{>=t}], v3 = E[G_t^2 Psi_{>=t}], n0 = E|Psi_{>=t}|^2,
    n1 = E[G_t |Psi_{>=t}|^2], n2 = E[G_t^2 |Psi_{>=t}|^2]; E g = rho0 . v2(0), E|g|^2 = rho0 . n2(0)."""
    S, m, gamma = model.S, model.score.m, model.gamma
    sq = model.score.sq_norm()[:, :, None]
    r = model.reward[0]
    z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
    m0, m1, n0, n1, n2, v2, v3 = z(S), z(S), z(S), z(S), z(S), z(S, m), z(S, m)
    for _ in reversed(range(model.H)):
        m0n, m1n = model.nxt(m0), model.nxt(m1)
        g1 = r + gamma * m0n  # E[G_t | s, a, s']
        g2 = r * r + 2 * gamma * r * m0n + gamma**2 * m1n  # E[G_t^2 | s, a, s']
        dv2 = model.score.dot_next(v2, model.next_state) * model.alive
        dv3 = model.score.dot_next(v3, model.next_state) * model.alive
        n0n, n1n, n2n = model.nxt(n0), model.nxt(n1), model.nxt(n2)
        n2 = model.expect(sq * g2 + 2 * (2 * gamma * r * dv2 + gamma**2 * dv3) + r * r * n0n
                          + 2 * gamma * r * n1n + gamma**2 * n2n)
        n1 = model.expect(sq * g1 + 2 * gamma * dv2 + r * n0n + gamma * n1n)
        n0 = model.expect(sq + n0n)
        v3 = (model.score.combine((model.w * g2).sum(-1)) + 2 * gamma * model.prop(model.wn * r, v2)
              + gamma**2 * model.prop(model.wn, v3))
        v2 = model.score.combine((model.w * g1).sum(-1)) + gamma * model.prop(model.wn, v2)
        m0, m1 = model.expect(g1), model.expect(g2)
    return model.rho0 @ v2, float(model.rho0 @ n2)


def _all_action_dense(model: MomentModel, form: AllAction) -> tuple[Tensor, float]:
    """g = sum_t gamma^t phi_t(s_t), phi_t(s) = sum_a pi(a|s) psi(s,a) critic_t(s,a):
    F1 = E[g_{>=t}], F0 = E|g_{>=t}|^2 = |gamma^t phi|^2 + 2 gamma^t phi . E[F1'] + E[F0']."""
    S, m = model.S, model.score.m
    F1 = torch.zeros(S, m, dtype=torch.float64)
    F0 = torch.zeros(S, dtype=torch.float64)
    for t in reversed(range(model.H)):
        gt = model.gamma**t
        phi = gt * model.score.combine(model.pi * form.critic[t])  # [S, m]
        ahead = model.prop(model.wn, F1)  # E[F1(t+1, s') | s]
        F0 = (phi**2).sum(1) + 2 * (phi * ahead).sum(1) + model.expect(model.nxt(F0))
        F1 = phi + ahead
    return model.rho0 @ F1, float(model.rho0 @ F0)


def _single_step(model: MomentModel, form: SingleStep) -> tuple[Tensor, float]:
    """(E g [m], E|g|^2) resolved by the realised length L: pL = P(T = L), mYL = E[Y_t 1{T=L}],
    mY2L = E[Y_t^2 1{T=L}] given s_t = s, each a vector over L = 0..H."""
    S, H, beta = model.S, model.H, float(form.beta)
    sq = model.score.sq_norm()
    fm = form.q_len * form.c_len  # [H+1] length factor of E g
    fs = form.q_len * form.c_len**2  # of E|g|^2
    if bool((fm[1:] == fm[1]).all() and (fs[1:] == fs[1]).all()):
        fm, fs = fm[1:2], fs[1:2]  # no dependence on the length: one slot for every L >= 1
    slot = (lambda L: L) if fm.numel() > 1 else (lambda L: 0)
    z = lambda: torch.zeros(S, fm.numel(), dtype=torch.float64)  # noqa: E731
    pL, mYL, mY2L = z(), z(), z()
    pL[:, slot(H)] = 1.0  # alive at t = H: the episode had length H
    alive = model.alive[..., None]
    weights = torch.zeros(S, model.pi.shape[1], dtype=torch.float64)
    second = torch.zeros((), dtype=torch.float64)
    wl = model.w[..., None]
    for t in reversed(range(H)):
        lo = slot(t + 1)  # alive at t: the length is at least t + 1 (a window on the L axis)
        ended = torch.zeros(fm.numel() - lo, dtype=torch.float64)
        ended[0] = 1.0  # a terminating transition at t: length t + 1
        y = _at(form.y, t).expand_as(model.w)[..., None]
        pLn = alive * pL[:, lo:][model.next_state] + (1 - alive) * ended
        mYLn, mY2Ln = alive * mYL[:, lo:][model.next_state], alive * mY2L[:, lo:][model.next_state]
        eY = y * pLn + beta * mYLn  # E[Y_t 1{T=L} | s, a, s']
        eY2 = y * y * pLn + 2 * beta * y * mYLn + beta**2 * mY2Ln
        at_t = model.d[t][:, None] * model.pi  # [S, A]: P(s_t = s, a_t = a, alive)
        weights += at_t * form.q_time[t] * form.c_time[t] * (model.prob * (eY @ fm[lo:])).sum(-1)
        second += (at_t * sq * form.q_time[t] * form.c_time[t]**2
                   * (model.prob * (eY2 @ fs[lo:])).sum(-1)).sum()
        pL, mYL, mY2L = z(), z(), z()
        pL[:, lo:], mYL[:, lo:], mY2L[:, lo:] = ((wl * pLn).sum((1, 2)), (wl * eY).sum((1, 2)),
                                                 (wl * eY2).sum((1, 2)))
    return model.score.combine(weights).sum(0), float(second)


# ---------------------------------------------------------------------------------------------
# Tabular fast path: blocks of the future-score vectors from lag matrices
# ---------------------------------------------------------------------------------------------
# For a tabular policy psi(s, a) lives in row s, so h1, h2, v2, v3, F1 enter the recursions only
# through their row-s block at the successors of s, i.e. through the return of the trajectory to
# s. Transitions do not depend on t, so with M_l(x, s) = P(s_l = s, alive | s_0 = x) and, for a
# reward-like y that does not depend on t before H - 1,
#     N_l(x, s) = E[sum_{k<l} beta^k y_k [s_l = s, alive] | s_0 = x]
# (both [S, S] per lag l, shared by every estimator), the blocks are sums over later times u:
#     h1(t+1, x)[s] = sum_u M_{u-t-1}(x, s) e1_u(s)
#     h2(t+1, x)[s] = sum_u N_{u-t-1}(x, s) e1_u(s) + beta^(u-t-1) M_{u-t-1}(x, s) e2_u(s)
# with e1_u(s), e2_u(s) the row-s sources of h1, h2 at u. Cost: O(H S^2 + H^2 S A K), no [S, P]
# table per step.

class _Lags:
    """M_l and N_l gathered at the successor grid: [H, S, A, K] tables of X_l(s'_{sak}, s) (0
    after a terminating transition)."""

    def __init__(self, model: MomentModel):
        self.model = model
        self._rows = torch.arange(model.S)[:, None, None].expand_as(model.next_state)
        self.M = self._gather(m for m, _ in self._walk())
        self._paths: list[tuple[Tensor, float, Tensor]] = []

    def _walk(self, y0: Tensor | None = None, beta: float = 0.0):
        """(M_l, N_l) for l = 0..H-1 as [S, S] matrices, one lag at a time (N_l only with y0)."""
        m = self.model
        M = torch.eye(m.S, dtype=torch.float64)
        N = torch.zeros(m.S, m.S, dtype=torch.float64) if y0 is not None else None
        for _ in range(m.H):
            yield M, N
            if N is not None and y0 is not None:
                N = m.prop(m.wn * y0, M) + beta * m.prop(m.wn, N)
            M = m.prop(m.wn, M)

    def _gather(self, mats) -> Tensor:
        m = self.model
        return torch.stack([X[m.next_state, self._rows] for X in mats]) * m.alive

    def path(self, y0: Tensor, beta: float) -> Tensor:
        """N_l for the homogeneous y0 [S, A, K] and beta, gathered: [H, S, A, K] (cached)."""
        for known, b, N in self._paths:
            if b == beta and torch.equal(known, y0):
                return N
        N = self._gather(n for _, n in self._walk(y0, beta))
        self._paths.append((y0, float(beta), N))
        return N


def _ahead(lag: Tensor, E: Tensor, weights: Tensor | None = None) -> Tensor:
    """For every t at once: sum_{u=t+1}^{H-1} w_{u-t-1} lag[u-t-1] E[u], for lag [H, S, A, K]
    and E [H, S, A] -> [H, S, A, K] (one vectorised pass per lag)."""
    H = E.shape[0]
    out = torch.zeros((H, *lag.shape[1:]), dtype=lag.dtype)
    for l in range(H - 1):  # measured faster than a grouped conv1d or an unfolded product
        term = lag[l] * E[l + 1:, :, :, None]
        out[: H - 1 - l] += term if weights is None else weights[l] * term
    return out


def _backward_scalar(model: MomentModel, local: Tensor) -> Tensor:
    """v(t, s) = local[t, s] + E[v(t+1, s') | s] (0 after termination and at H): v(0) [S]."""
    v = torch.zeros(model.S, dtype=torch.float64)
    for t in reversed(range(model.H)):
        v = local[t] + model.expect(model.nxt(v))
    return v


def _block(model: MomentModel, q: Tensor) -> Tensor:
    """Row-s block of sum_a q[s, a] psi(s, a): q - pi sum_a q, [S, A]."""
    return q - model.pi * q.sum(1, keepdim=True)


def _dot(model: MomentModel, block: Tensor) -> Tensor:
    """psi(s, a) . block[s] for blocks [..., S, A]: block[a] - pi . block, [..., S, A]."""
    return block - (model.pi * block).sum(-1, keepdim=True)


def _homogeneous(y: Tensor) -> Tensor | None:
    """y's table when it does not depend on t before H - 1 (the steps a path between two visits
    can take), else None."""
    if y.shape[0] == 1:
        return y[0]
    return y[0] if bool((y[:-1] == y[0]).all()) else None


def _weighting_lag(model: MomentModel, form: Weighting, lags: _Lags) -> tuple[Tensor, float]:
    """Three passes: the local tables backward (mY, mY2 and the row-s sources e1, e2), the
    blocks of h1, h2 at the successors for every t at once (lags), then h0 backward."""
    H, S, beta, o = model.H, model.S, float(form.beta), float(form.o)
    A, K = model.pi.shape[1], model.next_state.shape[2]
    sq = model.score.sq_norm()[:, :, None]
    mY = torch.zeros(S, dtype=torch.float64)
    mY2 = torch.zeros(S, dtype=torch.float64)
    E1 = torch.zeros(H, S, A, dtype=torch.float64)
    E2 = torch.zeros(H, S, A, dtype=torch.float64)
    c_all = torch.zeros(H, S, A, K, dtype=torch.float64)
    local = torch.zeros(H, S, dtype=torch.float64)  # sum_{a,k} w |psi|^2 o^2t E[(X/o^t)^2]
    mean = torch.zeros(S, A, dtype=torch.float64)
    for t in reversed(range(H)):
        ot = o**t
        y = _at(form.y, t).expand_as(model.w)
        c = y - (0.0 if form.baseline is None else form.baseline[t][:, None, None])
        c_all[t] = c
        mYn, mY2n = model.nxt(mY), model.nxt(mY2)
        local[t] = model.expect(sq * ot * ot * (c * c + 2 * beta * c * mYn + beta**2 * mY2n))
        blk1 = ot * _block(model, (model.w * (c + beta * mYn)).sum(-1))
        E1[t] = _dot(model, blk1)
        mean += model.d[t][:, None] * blk1
        if beta:
            E2[t] = _dot(model, ot * _block(model, (model.w * (
                c * y + beta * (c + y) * mYn + beta**2 * mY2n)).sum(-1)))
            mY, mY2 = (model.expect(y + beta * mYn),
                       model.expect(y * y + 2 * beta * y * mYn + beta**2 * mY2n))
    cross = c_all * _ahead(lags.M, E1)  # c psi . h1(t+1, s')
    y0 = _homogeneous(form.y)
    if beta and y0 is not None:  # (_moments sends a y that changes with t elsewhere)
        N = lags.path(y0.expand_as(model.w).contiguous(), beta)
        powers = beta ** torch.arange(H, dtype=torch.float64)
        cross += beta * (_ahead(N, E1) + _ahead(lags.M, E2, powers))  # beta psi . h2(t+1, s')
    steps = o ** torch.arange(H, dtype=torch.float64)
    local += 2 * steps[:, None] * (model.w * cross).sum((2, 3))
    return mean.reshape(-1), float(model.rho0 @ _backward_scalar(model, local))


def _reinforce_lag(model: MomentModel, lags: _Lags) -> tuple[Tensor, float]:
    """Passes as in _weighting_lag: m0, m1 and the row-s sources of v2, v3 backward; psi . v2,
    psi . v3 at the successors for every t (lags); then n0, n1, n2 backward."""
    H, S, gamma = model.H, model.S, model.gamma
    A, K = model.pi.shape[1], model.next_state.shape[2]
    sq = model.score.sq_norm()[:, :, None]
    r = model.reward[0].expand_as(model.w).contiguous()
    pw = gamma ** torch.arange(H, dtype=torch.float64)
    m0 = torch.zeros(S, dtype=torch.float64)
    m1 = torch.zeros(S, dtype=torch.float64)
    EV2 = torch.zeros(H, S, A, dtype=torch.float64)
    EV3 = torch.zeros(H, S, A, dtype=torch.float64)
    G1 = torch.zeros(H, S, A, K, dtype=torch.float64)
    G2 = torch.zeros(H, S, A, K, dtype=torch.float64)
    mean = torch.zeros(S, A, dtype=torch.float64)
    for t in reversed(range(H)):
        m0n, m1n = model.nxt(m0), model.nxt(m1)
        G1[t] = g1 = r + gamma * m0n
        G2[t] = g2 = r * r + 2 * gamma * r * m0n + gamma**2 * m1n
        blk2 = _block(model, (model.w * g1).sum(-1))
        EV2[t] = _dot(model, blk2)
        EV3[t] = _dot(model, _block(model, (model.w * g2).sum(-1)))
        mean += pw[t] * model.d[t][:, None] * blk2
        m0, m1 = model.expect(g1), model.expect(g2)
    dv2 = _ahead(lags.M, EV2, pw)  # psi . v2(t+1, s')
    dv3 = 2 * _ahead(lags.path(r, gamma), EV2, pw) + _ahead(lags.M, EV3, pw**2)
    z = lambda: torch.zeros(S, dtype=torch.float64)  # noqa: E731
    n0, n1, n2 = z(), z(), z()
    for t in reversed(range(H)):
        n0n, n1n, n2n = model.nxt(n0), model.nxt(n1), model.nxt(n2)
        n2 = model.expect(sq * G2[t] + 2 * (2 * gamma * r * dv2[t] + gamma**2 * dv3[t])
                          + r * r * n0n + 2 * gamma * r * n1n + gamma**2 * n2n)
        n1 = model.expect(sq * G1[t] + 2 * gamma * dv2[t] + r * n0n + gamma * n1n)
        n0 = model.expect(sq + n0n)
    return mean.reshape(-1), float(model.rho0 @ n2)


def _all_action_lag(model: MomentModel, form: AllAction, lags: _Lags) -> tuple[Tensor, float]:
    H = model.H
    pw = model.gamma ** torch.arange(H, dtype=torch.float64)
    phi = torch.stack([pw[t] * _block(model, model.pi * form.critic[t]) for t in range(H)])
    local = (phi**2).sum(-1)  # [H, S]
    for t in range(H - 1):  # 2 phi_t . E[F1(t+1, s') | s], F1's row-s block from the lags
        dots = (phi[t] * phi[t + 1:]).sum(-1)  # [H-t-1, S]: phi_t(s) . phi_u(s)
        ahead = (lags.M[: H - t - 1] * dots[:, :, None, None]).sum(0)  # [S, A, K]
        local[t] += 2 * model.expect(ahead)
    mean = (model.d[:, :, None] * phi).sum(0)
    return mean.reshape(-1), float(model.rho0 @ _backward_scalar(model, local))


def _cross_lag(model: MomentModel, blocks: Tensor) -> float:
    """sum_{t<u} gamma^u E[(psi_t . v_u) G_u [u < T]] for v_u with row blocks [H, S, A], by a
    forward pass: nu_j[u](z) = E[[s_j = z, alive] sum_{t<j} psi_t . v_u] for every u at once."""
    H, S, sol = model.H, model.S, model.sol
    f = _dot(model, blocks)  # [H(u), S, A] psi(s, a) . v_u[s]
    nu = torch.zeros(H, S, dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    for j in range(H):
        total += model.gamma**j * (nu[j] @ sol.V[j])
        if j == H - 1:
            break
        mass = model.wn[None] * (nu[:, :, None, None] + model.d[j][None, :, None, None]
                                 * f[:, :, :, None])  # [H, S, A, K]
        nu = torch.zeros(H, S, dtype=torch.float64).index_add_(
            1, model.next_state.reshape(-1), mass.reshape(H, -1))
    return float(total)


def _cross_dense(model: MomentModel, v: Tensor) -> float:
    """The same sum for any score, with Omega_t = E[sum_{u>=t} gamma^u G_u [u<T] v_u] as [S, m]."""
    sol = model.sol
    omega = torch.zeros(model.S, model.score.m, dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    for t in reversed(range(model.H)):
        if t < model.H - 1:  # omega holds Omega_{t+1}
            dots = model.score.dot_next(omega, model.next_state) * model.alive
            total += model.d[t] @ model.expect(dots)
        omega = model.gamma**t * sol.V[t][:, None] * v[t][None, :] + model.prop(model.wn, omega)
    return float(total)


def _batch_parts(model: MomentModel) -> tuple[Tensor, float, float, float, float, float]:
    """The single-trajectory quantities of ``_batch_baseline`` (they do not depend on B):
    grad J, E|X|^2, E[X.Z], sum_t k_t e_t, sum_t k_t beta_t^2, sum_{t,u} v_tu.v_ut."""
    gamma, H, sol = model.gamma, model.H, model.sol
    disc = model.discount(gamma)
    g, X2 = _moments(model, Weighting(model.reward, gamma, gamma))
    beta_t = (model.d * sol.V[:-1]).sum(1)  # [H] E[G_t [t < T]]
    shift = beta_t[:, None].expand(H, model.S)
    plus = _moments(model, Weighting(model.reward, gamma, gamma, -shift))[1]
    minus = _moments(model, Weighting(model.reward, gamma, gamma, shift))[1]
    XZ = (plus - minus) / 4  # polarisation: E[X.Z]
    k_t = disc**2 * (model.d * (model.pi * model.score.sq_norm()).sum(1)).sum(1)  # [H]
    m0 = torch.zeros(model.S, dtype=torch.float64)
    m1 = torch.zeros(model.S, dtype=torch.float64)
    e_t = torch.zeros(H, dtype=torch.float64)  # E[G_t^2 [t < T]]
    r = model.reward[0]
    for t in reversed(range(H)):
        m0n, m1n = model.nxt(m0), model.nxt(m1)
        m1 = model.expect(r * r + 2 * gamma * r * m0n + gamma**2 * m1n)
        m0 = model.expect(r + gamma * m0n)
        e_t[t] = model.d[t] @ m1
    # v_tt = gamma^t E[psi_t G_t [t < T]] = gamma^t sum_s d_t(s) sum_a pi psi(s, a) Q_t(s, a)
    local = disc[:, None, None] * model.d[:, :, None] * model.pi * sol.Q  # [H, S, A]
    if model.lags is not None:
        blocks = torch.stack([_block(model, q) for q in local])  # [H, S, A]
        vv_diag = float((blocks**2).sum())
        cross = _cross_lag(model, blocks)
    else:
        v_tt = torch.stack([model.score.combine(q).sum(0) for q in local])  # [H, m]
        vv_diag = float((v_tt**2).sum())
        cross = _cross_dense(model, v_tt)
    vv = vv_diag + 2 * cross
    return g, X2, XZ, float(k_t @ e_t), float(k_t @ beta_t**2), vv


def _batch_baseline(model: MomentModel, form: BatchBaseline,
                    B: int) -> tuple[Tensor, float, Tensor, float]:
    """Moments of one member and of the batch estimate g_B = (1/B) (k1 S1 - kappa S2), with
    S1 = sum_i X_i (X = reward-to-go estimate) and S2 = sum_{i != j} sum_t a_t^i b_t^j,
    a_t = gamma^t psi_t [t < T], b_t = G_t [t < T]. Mean: k1 grad J (E a_t = 0). With
    k_t = E|a_t|^2, beta_t = E b_t, e_t = E b_t^2, Z = sum_t a_t beta_t, v_tu = E[a_t b_u]:
        E|S1|^2 = B E|X|^2 + B(B-1)|g|^2,  E[S1.S2] = B(B-1) E[X.Z]
        E|S2|^2 = B(B-1) (sum_t k_t e_t + sum_{t,u} v_tu.v_ut) + B(B-1)(B-2) sum_t k_t beta_t^2
    (E[a_t.a_u] = 0 for t != u; v_tu = gamma^(t-u) v_tt for u <= t, so sum_{t,u} v_tu.v_ut =
    sum_t |v_tt|^2 + 2 sum_{t<u} gamma^(u-t) v_tu.v_uu)."""
    if B < 2:
        raise ValueError(f"a batch baseline needs B >= 2, got {B}")
    k1, kappa = float(form.self_weight(B)), float(form.others_weight(B))
    g, X2, XZ, ke, kb, vv = model.batch_parts
    gg = float(g @ g)
    S1 = B * X2 + B * (B - 1) * gg
    S12 = B * (B - 1) * XZ
    S2 = B * (B - 1) * (ke + vv) + B * (B - 1) * (B - 2) * kb
    batch_second = (k1**2 * S1 - 2 * k1 * kappa * S12 + kappa**2 * S2) / B**2
    member_second = (k1**2 * X2 - 2 * k1 * kappa * (B - 1) * XZ
                     + kappa**2 * ((B - 1) * ke + (B - 1) * (B - 2) * kb))
    return k1 * g, member_second, k1 * g, batch_second


def _moments(model: MomentModel, form: Weighting | Reinforce | AllAction) -> tuple[Tensor, float]:
    """(E g [m], E|g|^2) of one trajectory's estimate: the tabular lag path where it applies,
    the [S, m] recursions otherwise (any policy; a y that changes with t, with beta > 0)."""
    lags = model.lags
    if isinstance(form, Weighting):
        if lags is not None and (not form.beta or _homogeneous(form.y) is not None):
            return _weighting_lag(model, form, lags)
        if isinstance(model.score, TabularScore) and not model.dense:
            return _weighting_rows(model, form)
        return _weighting_dense(model, form)
    if isinstance(form, Reinforce):
        return _reinforce_lag(model, lags) if lags is not None else _reinforce_dense(model)
    if isinstance(form, AllAction):
        return (_all_action_lag(model, form, lags) if lags is not None
                else _all_action_dense(model, form))
    raise TypeError(f"unknown form {type(form).__name__}")


def exact_moments(model: MomentModel, form: Form, batch_size: int) -> ExactMoments:
    """Exact moments of the estimator of ``form`` at batch size B (NoExact: ValueError). Runs
    with torch single-threaded (many small operations; see suite.core.threads)."""
    with intra_op_threads(1):
        return _exact_moments(model, form, int(batch_size))


def _exact_moments(model: MomentModel, form: Form, B: int) -> ExactMoments:
    to_p = model.score.to_params
    if isinstance(form, NoExact):
        raise ValueError(f"no exact moments: {form.reason}")
    if isinstance(form, BatchBaseline):
        mean, second, bmean, bsecond = _batch_baseline(model, form, B)
        return ExactMoments(to_p(mean), second, B, to_p(bmean), bsecond)
    if isinstance(form, SingleStep):
        mean, second = _single_step(model, form)
    else:
        mean, second = _moments(model, form)
    mean_p = to_p(mean)
    mm = float(mean @ mean)
    # B independent trajectories: E|g_B|^2 = |E g|^2 + (E|g|^2 - |E g|^2) / B
    return ExactMoments(mean_p, float(second), B, mean_p, mm + (second - mm) / B)


def relative_metrics(mom: ExactMoments, grad: Tensor, reference_variance: float | None = None,
                     block_factors: tuple[int, ...] = (1,)) -> dict[str, float | dict[int, float]]:
    """The exact metrics of one estimator (docs/metrics.md): relative bias, variances,
    noise-to-signal, relative MSE at k B, batch sizes for a relative MSE of 0.1 and 0.01,
    variance ratio against the reference. Undefined ratios (grad J = 0) are NaN."""
    g = grad.to(torch.float64)
    g_sq = float(g @ g)
    nan = math.nan
    bias_sq = float(((mom.batch_mean - g) ** 2).sum())
    rel_bias_sq = bias_sq / g_sq if g_sq > 0 else nan
    bvar = mom.batch_variance
    out: dict[str, float | dict[int, float]] = {
        "mean_norm": float(mom.batch_mean.norm()),
        # grad J = 0: relative bias 0 when the mean is 0 too (no bias), else infinite
        "rel_bias": (math.sqrt(rel_bias_sq) if g_sq > 0
                     else (0.0 if bias_sq <= 1e-30 else math.inf)),
        "second_moment": mom.second_moment,
        "variance": mom.variance,
        "batch_variance": bvar,
        "noise_to_signal": mom.variance / g_sq if g_sq > 0 else nan,
        "cosine": (float(mom.batch_mean @ g) / math.sqrt(g_sq) / float(mom.batch_mean.norm())
                   if g_sq > 0 and float(mom.batch_mean.norm()) > 0 else nan),
        "norm_ratio": float(mom.batch_mean.norm()) / math.sqrt(g_sq) if g_sq > 0 else nan,
        "variance_ratio": (mom.variance / reference_variance
                           if reference_variance and reference_variance > 0 else nan),
    }
    B = mom.batch_size
    out["rel_mse"] = {k * B: (rel_bias_sq + bvar / (k * g_sq) if g_sq > 0 else nan)
                      for k in block_factors}
    for target in (0.1, 0.01):
        room = target - rel_bias_sq
        eff = B * bvar / g_sq if g_sq > 0 else nan
        out[f"batch_size_for_rel_mse_{target:g}"] = (
            nan if math.isnan(room) else (eff / room if room > 0 else math.inf))
    return out

"""Exact moments of the group estimators of LLM fine-tuning, by conditioning on the outcomes.

A group estimator (GRPO, Dr. GRPO, RLOO, OPO, ReMax, REINFORCE++-baseline) gives member i of a
group of G the estimate X_i = c_i Psi_i, Psi_i = sum_t grad log pi(a_t|s_t) (the score of its
trajectory), where the coefficient c_i = A_i x (aggregation factor) is a function of the members'
*outcomes* o_j = (start, return R_j, length L_j) only. The group estimate is g = (1/G) sum_i X_i.
Where returns and lengths take few values (a binary verdict, lengths up to the length limit) the
first two moments of g are exact finite sums:

* members are independent given their start state, and so is Psi_i of every other member's
  outcome given o_i: E[Psi_i | o_1..o_G] = u(o_i) / p(o_i) with p(o) = P(outcome o) and
  u(o) = E[Psi 1{o}] = grad p(o); E[|Psi_i|^2 | o_i] = n(o_i) / p(o_i), n(o) = E[|Psi|^2 1{o}];
* by exchangeability, with w1(k) = E[c_1 | o_1 = k], w2(k) = E[c_1^2 | o_1 = k] and
  W(k, l) = E[c_1 c_2 | o_1 = k, o_2 = l] (expectations over the other members' outcomes):

      E[g]   = sum_k w1(k) u(k)
      E|X_i|^2 = sum_k w2(k) n(k)
      E|g|^2 = (1/G) E|X_i|^2 + ((G-1)/G) sum_{k,l} W(k, l) u(k).u(l)

* c_1 reads the other members only through sums of a few features (sum R, sum R^2, sum L, ...),
  whose distribution over G - 1 (or G - 2) independent members is a repeated convolution on a
  small lattice.

With a shared start (``measure --shared-start``) the members are independent given one start s
drawn from rho0: the sums above run with the conditional tables p(.|s), u(.|s), n(.|s) and are
averaged over s with rho0 (rho0 has no parameters, so u(.|s) = u(s, .) / rho0(s)). Without it each
member draws its own start, and the tables are pooled over starts.

p, u and n come from the tree of trajectories: every trajectory of the MDP is enumerated (on an
MDP small enough: the token MDP's response tree, a tiny test MDP), its score Psi contracted once.
The outcome-level advantage formulas live here (``RULES``), so the core does not import the
estimators; tests prove them against the estimators by brute-force enumeration of every group.
Results are the exact engine's ``ExactMoments`` (per member: mean, second_moment; per group:
batch_mean, batch_second_moment), so ``suite.core.moments.relative_metrics`` applies, or its
``NoExact(reason)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .contraction import Contraction
from .errors import InputError, did_you_mean
from .exact import ExactSolution
from .mdp import MDP
from .moments import ExactMoments, NoExact
from .policies import Policy
from .sampler import Batch

__all__ = ["AGG_MODES", "GRPO_EPS", "MAX_PATHS", "NO_EXACT", "RULES", "WHITEN_EPS", "GroupRule",
           "Outcomes", "enumerate_paths", "greedy_return", "group_moments", "group_moments_by_start",
           "grpo_binary_scale", "outcome_table"]

AGG_MODES = ("token-sum", "seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
GRPO_EPS = 1e-6  # GRPO's (R - mean) / (std + eps)
WHITEN_EPS = 1e-8  # the variance floor of verl's masked_whiten: (x - m) / sqrt(v + 1e-8)
MAX_PATHS = 1_000_000  # trajectories enumerated at most
MAX_LATTICE = 4_000_000  # (sums of the other members) x (outcomes) held at once, at most
MAX_PAIR_WORK = 50_000_000  # (pairs of outcomes) x (sums of the others) for E|g|^2, at most


class _TooLarge(Exception):
    """The lattice of the other members' sums would not fit (returns take too many values)."""


def greedy_return(mdp: MDP, pi: Tensor, gamma: float, horizon: int) -> Tensor:
    """Expected return of the greedy policy (argmax_a pi(a|s), the first action on ties) from
    each start state, [S]: the return of one greedy rollout where transitions are deterministic."""
    succ = mdp.successors
    S = mdp.n_states
    rows = torch.arange(S)
    a = pi.detach().to(torch.float64).cpu().argmax(1)
    r = mdp.expected_reward()[rows, a]
    V = torch.zeros(S, dtype=torch.float64)
    for _ in range(horizon):
        V = r + gamma * succ.expect(V)[rows, a]
    return V


# ---------------------------------------------------------------------------------------------
# The tables: every trajectory, grouped by its outcome
# ---------------------------------------------------------------------------------------------

def count_paths(mdp: MDP, pi: Tensor, horizon: int) -> float:
    """The number of distinct trajectories (of positive probability) under policy table pi:
    prefixes per state, pushed forward over the support of pi(a|s) P(s'|s,a), O(H transitions)."""
    succ = mdp.successors
    edge = (pi[:, :, None] > 0) & (succ.prob > 0)  # [S, A, K]
    going = (edge & ~succ.terminated).to(torch.float64)
    ending = (edge & succ.terminated).to(torch.float64).sum((1, 2))  # [S]
    prefixes = (mdp.rho0 > 0).to(torch.float64)  # paths alive at t, by state
    total = 0.0
    for t in range(horizon):
        if t == horizon - 1:
            return total + float(prefixes @ edge.to(torch.float64).sum((1, 2)))
        total += float(prefixes @ ending)
        prefixes = torch.zeros_like(prefixes).index_add_(
            0, succ.next_state.reshape(-1), (prefixes[:, None, None] * going).reshape(-1))
    return total


def enumerate_paths(mdp: MDP, pi: Tensor, horizon: int,
                    max_paths: int = MAX_PATHS) -> tuple[Batch, Tensor]:
    """Every trajectory of the MDP under policy table pi as a Batch padded to the horizon, and
    its probability [N] (rho0 included); InputError when there are more than max_paths (counted
    first, by a forward pass over the support, before anything is built)."""
    succ = mdp.successors
    pi = pi.detach().to(torch.float64).cpu()
    total = count_paths(mdp, pi, horizon)
    if total > max_paths:
        raise InputError(f"exact group moments enumerate every trajectory: {mdp.name} has "
                         f"{total:.3g} at horizon {horizon}, more than {max_paths:,}; use a "
                         "smaller MDP or horizon")
    start = torch.nonzero(mdp.rho0 > 0).squeeze(1)
    prob = mdp.rho0[start]
    cols = {k: torch.zeros(len(start), 0, dtype=d) for k, d in
            (("states", torch.int64), ("actions", torch.int64), ("rewards", torch.float64))}
    s = start
    done: list[dict[str, Tensor]] = []
    count = 0
    for t in range(horizon):
        q = pi[s][:, :, None] * succ.prob[s]  # [n, A, K]
        path, a, k = torch.nonzero(q > 0, as_tuple=True)
        prob = prob[path] * q[path, a, k]
        cols = {"states": torch.cat([cols["states"][path], s[path, None]], 1),
                "actions": torch.cat([cols["actions"][path], a[:, None]], 1),
                "rewards": torch.cat([cols["rewards"][path],
                                      succ.reward[s[path], a, k][:, None]], 1)}
        ended = succ.terminated[s[path], a, k] | (t == horizon - 1)
        s = succ.next_state[s[path], a, k]
        count += int(ended.sum())
        if count + int((~ended).sum()) > max_paths:
            raise InputError(f"exact group moments enumerate every trajectory: {mdp.name} has more "
                             f"than {max_paths:,} at horizon {horizon}; use a smaller MDP or horizon")
        done.append({"prob": prob[ended], **{key: c[ended] for key, c in cols.items()}})
        prob, s = prob[~ended], s[~ended]
        cols = {key: c[~ended] for key, c in cols.items()}

    def padded(key: str, dtype: torch.dtype) -> Tensor:
        return torch.cat([torch.nn.functional.pad(d[key], (0, horizon - d[key].shape[1]))
                          for d in done]).to(dtype)

    lengths = torch.cat([torch.full((len(d["prob"]),), d["states"].shape[1]) for d in done])
    mask = torch.arange(horizon)[None, :] < lengths[:, None]
    batch = Batch(padded("states", torch.int64), padded("actions", torch.int64),
                  padded("rewards", torch.float64), mask, lengths, int(horizon))
    return batch, torch.cat([d["prob"] for d in done])


@dataclass(frozen=True)
class Outcomes:
    """The outcome classes (start, return, length) of one trajectory; K classes, P parameters."""

    start: Tensor  # [K] int64, s_0
    ret: Tensor  # [K] float64, R = G_0 = sum_t gamma^t r_t
    length: Tensor  # [K] int64, L, the realised length
    greedy: Tensor  # [K] float64, greedy_return of the start (ReMax's baseline)
    prob: Tensor  # [K] P(outcome)
    u: Tensor  # [K, P] E[Psi 1{outcome}] = grad P(outcome)
    n: Tensor  # [K] E[|Psi|^2 1{outcome}]
    rho0: Tensor  # [S] the start distribution
    horizon: int  # H, the length limit of seq-mean-token-sum-norm

    def start_gradient(self, s: int) -> Tensor:
        """grad E[R | s_0 = s], [P]: the gradient a group answering start (prompt) s estimates
        (with a 0/1 reward, grad of the prompt's pass rate p_s)."""
        at = self.start == s
        return (self.ret[at] @ self.u[at]) / self.rho0[s]

    def start_return(self, s: int) -> float:
        """E[R | s_0 = s] (with a 0/1 reward, the prompt's pass rate p_s)."""
        at = self.start == s
        return float(self.ret[at] @ self.prob[at] / self.rho0[s])


def outcome_table(mdp: MDP, policy: Policy, sol: ExactSolution,
                  max_paths: int = MAX_PATHS) -> Outcomes:
    """p, u and n of every (start, return, length) by enumerating the tree of trajectories."""
    batch, prob = enumerate_paths(mdp, sol.pi, sol.horizon, max_paths)
    H = sol.horizon
    discount = sol.gamma ** torch.arange(H, dtype=torch.float64)
    ret = (batch.rewards * discount).flip(1).cumsum(1)[:, -1]  # summed from the end, as G_0 is
    psi = Contraction(policy, torch.device("cpu")).for_batch(batch).score(
        torch.ones_like(batch.rewards))
    keys = np.stack([batch.states[:, 0].numpy(), ret.numpy(), batch.lengths.numpy()], 1)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    cls = torch.as_tensor(inverse.reshape(-1))
    K = len(uniq)
    start = torch.as_tensor(uniq[:, 0]).long()
    return Outcomes(
        start=start, ret=torch.as_tensor(uniq[:, 1]), length=torch.as_tensor(uniq[:, 2]).long(),
        greedy=greedy_return(mdp, sol.pi, sol.gamma, H)[start],
        prob=torch.zeros(K, dtype=torch.float64).index_add_(0, cls, prob),
        u=psi.times_traj(prob).group_sum(cls, K),
        n=torch.zeros(K, dtype=torch.float64).index_add_(0, cls, prob * psi.sq_norms()),
        rho0=mdp.rho0.clone(), horizon=H)


# ---------------------------------------------------------------------------------------------
# The advantages as functions of the outcomes
# ---------------------------------------------------------------------------------------------

Own = dict  # feature -> array: "R" return, "L" length, "b" greedy return of the start
Totals = dict  # group sum -> array: "R", "R2" (R^2), "L", "LR" (L R), "LR2" (L R^2)


@dataclass(frozen=True)
class GroupRule:
    """An advantage A_i as a function of member i's features and the group's sums (own included)."""

    advantage: Callable[[Own, Totals, int], np.ndarray]  # (own, totals, G) -> A_i
    own: tuple[str, ...]  # features of member i it reads
    sums: tuple[str, ...]  # group sums it reads


def _grpo(o: Own, s: Totals, G: int) -> np.ndarray:
    mean = s["R"] / G
    var = np.maximum(s["R2"] - s["R"] * mean, 0.0) / (G - 1)
    return (o["R"] - mean) / (np.sqrt(var) + GRPO_EPS)


def _reinforce_pp_baseline(o: Own, s: Totals, G: int) -> np.ndarray:
    mu = s["R"] / G  # A_j = R_j - mu at each of member j's L_j steps, whitened over all steps
    n = s["L"]
    m = (s["LR"] - mu * n) / n
    sq = s["LR2"] - 2 * mu * s["LR"] + mu**2 * n  # sum_j L_j A_j^2
    var = np.maximum(sq - n * m**2, 0.0) / (n - 1)
    return (o["R"] - mu - m) / np.sqrt(var + WHITEN_EPS)


RULES: dict[str, GroupRule] = {
    "grpo": GroupRule(_grpo, ("R",), ("R", "R2")),
    "dr_grpo": GroupRule(lambda o, s, G: o["R"] - s["R"] / G, ("R",), ("R",)),
    "rloo": GroupRule(lambda o, s, G: o["R"] - (s["R"] - o["R"]) / (G - 1), ("R",), ("R",)),
    "opo": GroupRule(lambda o, s, G: o["R"] - s["LR"] / s["L"], ("R",), ("L", "LR")),
    "remax": GroupRule(lambda o, s, G: o["R"] - o["b"], ("R", "b"), ()),
    "reinforce_pp_baseline": GroupRule(_reinforce_pp_baseline, ("R",), ("R", "L", "LR", "LR2")),
}
NO_EXACT: dict[str, str] = {
    "reinforce_pp": "its advantage whitens the reward-to-go over every step of the batch, which "
                    "is not a function of the members' (return, length) outcomes",
    "ppo_advantage_normalization": "its GAE advantages, standardised over every step of the "
                                   "batch, are not a function of the members' outcomes",
}
# aggregation factor of member i: (features, sums, factor(own, totals, G, H))
AGG_RULES: dict[str, tuple[tuple[str, ...], tuple[str, ...], Callable]] = {
    "token-sum": ((), (), lambda o, s, G, H: 1.0),
    "seq-mean-token-mean": (("L",), (), lambda o, s, G, H: 1.0 / o["L"]),
    "token-mean": ((), ("L",), lambda o, s, G, H: G / s["L"]),
    "seq-mean-token-sum-norm": ((), (), lambda o, s, G, H: 1.0 / H),
}
_SUM_FEATURES = {"R": ("R",), "R2": ("R",), "L": ("L",), "LR": ("L", "R"), "LR2": ("L", "R")}


def _sum_values(name: str, R: np.ndarray, L: np.ndarray) -> np.ndarray:
    return {"R": R, "R2": R**2, "L": L, "LR": L * R, "LR2": L * R**2}[name]


# ---------------------------------------------------------------------------------------------
# The moments
# ---------------------------------------------------------------------------------------------

def _convolve(keys: np.ndarray, probs: np.ndarray, phi: np.ndarray,
              p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distribution of T + phi_k (k ~ p, independent of T ~ (keys, probs)), equal keys merged."""
    if len(probs) * len(p) > MAX_LATTICE:
        raise _TooLarge(f"{len(probs):,} values of the others' sums x {len(p):,} outcomes")
    new_probs = (probs[:, None] * p[None, :]).reshape(-1)
    if keys.shape[1] == 0:  # no sums read: one key
        return keys[:1], np.array([new_probs.sum()])
    new_keys = (keys[:, None, :] + phi[None, :, :]).reshape(-1, keys.shape[1])
    order = np.lexsort(new_keys.T[::-1])  # rows sorted; equal rows adjacent
    ordered = new_keys[order]
    first = np.ones(len(ordered), dtype=bool)
    first[1:] = (ordered[1:] != ordered[:-1]).any(1)
    return ordered[first], np.bincount(np.cumsum(first) - 1, new_probs[order])


def _sums_of_others(phi: np.ndarray, p: np.ndarray, m: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The distributions of the sums of phi over 0, 1, ..., m independent members."""
    out = [(np.zeros((1, phi.shape[1])), np.ones(1))]
    for _ in range(m):
        out.append(_convolve(*out[-1], phi, p))
    return out


def _population(feats: dict[str, np.ndarray], prob: Tensor, u: Tensor, n: Tensor, G: int, H: int,
                rule: GroupRule, agg: str) -> tuple[Tensor, float, float]:
    """(E[g], E|g|^2, E|X_i|^2) for members drawn independently from one outcome table."""
    agg_own, agg_sums, factor = AGG_RULES[agg]
    sums = tuple(dict.fromkeys(rule.sums + agg_sums))
    phi = np.stack([_sum_values(k, feats["R"], feats["L"]) for k in sums], 1) if sums \
        else np.zeros((len(prob), 0))
    p = prob.numpy()

    def coef(k: np.ndarray, total: np.ndarray) -> np.ndarray:
        """c of members of classes k ([...]) given the group sums total [..., d]."""
        own = {f: feats[f][k] for f in ("R", "L", "b")}
        tot = {name: total[..., j] for j, name in enumerate(sums)}
        return rule.advantage(own, tot, G) * factor(own, tot, G, H)

    K = len(p)
    ks = np.arange(K)
    others = _sums_of_others(phi, p, G - 1)
    keys, probs = others[G - 1]
    c = coef(ks[:, None], keys[None, :, :] + phi[:, None, :])  # [K, |T|]
    w1, w2 = c @ probs, (c**2) @ probs
    mean = torch.as_tensor(w1) @ u
    member_second = float(torch.as_tensor(w2) @ n)
    second = member_second / G
    if G >= 2:
        keys, probs = others[G - 2]
        if K * K * len(probs) > MAX_PAIR_WORK:
            raise _TooLarge(f"{K:,} x {K:,} pairs of outcomes x {len(probs):,} values of the "
                            f"others' sums")
        W = np.empty((K, K))
        for k in range(K):
            total = keys[None, :, :] + phi[k][None, None, :] + phi[:, None, :]  # [K(l), |T|, d]
            W[k] = (coef(np.full((K, 1), k), total) * coef(ks[:, None], total)) @ probs
        second += (G - 1) / G * float((torch.as_tensor(W) * (u @ u.T)).sum())
    return mean, second, member_second


def _merge(o: Outcomes, select: Tensor, features: tuple[str, ...], weight: float):
    """The classes of ``select`` merged where the features agree, probabilities / weight."""
    cols = {"R": o.ret[select].numpy(), "L": o.length[select].double().numpy(),
            "b": o.greedy[select].numpy()}
    key = np.stack([cols[f] for f in features], 1) if features else np.zeros((int(select.sum()), 1))
    uniq, inverse = np.unique(key, axis=0, return_inverse=True)
    inv = torch.as_tensor(inverse.reshape(-1))
    K = len(uniq)

    def add(x: Tensor) -> Tensor:
        return torch.zeros(K, *x.shape[1:], dtype=x.dtype).index_add_(0, inv, x) / weight

    first = np.zeros(K, dtype=np.int64)
    first[inv.numpy()[::-1]] = np.arange(len(inv))[::-1]  # one member of each merged class
    feats = {f: v[first] for f, v in cols.items()}
    return feats, add(o.prob[select]), add(o.u[select]), add(o.n[select])


def _check(estimator: str, agg: str, batch_size: int) -> NoExact | None:
    if estimator in NO_EXACT:
        return NoExact(NO_EXACT[estimator])
    if estimator not in RULES:
        return NoExact(f"'{estimator}' has no outcome-level formula here (known: "
                       f"{', '.join(RULES)})")
    if agg not in AGG_MODES:
        raise InputError(f"unknown aggregation mode '{agg}'{did_you_mean(agg, AGG_MODES)} known: "
                         f"{', '.join(AGG_MODES)}")
    if int(batch_size) < 1 or (int(batch_size) < 2 and estimator != "remax"):
        raise InputError(f"{estimator}: the group size must be >= 2, got {batch_size}")
    return None


def _moments(outcomes: Outcomes, select: Tensor, weight: float, estimator: str, agg: str,
             G: int) -> ExactMoments:
    rule = RULES[estimator]
    features = tuple(dict.fromkeys(rule.own + AGG_RULES[agg][0] + tuple(
        f for s in rule.sums + AGG_RULES[agg][1] for f in _SUM_FEATURES[s])))
    feats, prob, u, n = _merge(outcomes, select, features, weight)
    mean, second, member = _population(feats, prob, u, n, G, outcomes.horizon, rule, agg)
    return ExactMoments(mean, member, G, mean, second)


def group_moments_by_start(outcomes: Outcomes, estimator: str, agg: str,
                           batch_size: int) -> dict[int, ExactMoments] | NoExact:
    """The exact moments of a group whose members all start (answer prompt) s, for each start s
    of rho0: compare ``mean`` with ``outcomes.start_gradient(s)``."""
    missing = _check(estimator, agg, batch_size)
    if missing is not None:
        return missing
    starts = torch.nonzero(outcomes.rho0 > 0).squeeze(1).tolist()
    return {s: _moments(outcomes, outcomes.start == s, float(outcomes.rho0[s]), estimator, agg,
                        int(batch_size)) for s in starts}


def group_moments(outcomes: Outcomes, estimator: str, agg: str, batch_size: int,
                  shared_start: bool = False) -> ExactMoments | NoExact:
    """Exact moments of a group estimator (a name of ``RULES``) with aggregation mode ``agg`` at
    group size G = batch_size, as the engine's ExactMoments: ``batch_mean``/``batch_second_moment``
    of the group's estimate g, ``mean``/``second_moment`` of one member's X_i (E[X_i] = E[g]);
    NoExact(reason) where there is none."""
    missing = _check(estimator, agg, batch_size)
    if missing is not None:
        return missing
    G = int(batch_size)
    try:
        if not shared_start:
            everyone = torch.ones_like(outcomes.prob, dtype=torch.bool)
            return _moments(outcomes, everyone, 1.0, estimator, agg, G)
        by_start = group_moments_by_start(outcomes, estimator, agg, G)
    except _TooLarge as exc:
        return NoExact(f"returns and lengths take too many values to condition on ({exc}); the "
                       f"exact group moments need few (a 0/1 verdict, lengths up to the limit)")
    if isinstance(by_start, NoExact):
        return by_start
    parts = [(float(outcomes.rho0[s]), m) for s, m in by_start.items()]
    mean = torch.stack([w * m.mean for w, m in parts]).sum(0)
    return ExactMoments(mean, float(sum(w * m.second_moment for w, m in parts)), G, mean,
                        float(sum(w * m.batch_second_moment for w, m in parts)))


def grpo_binary_scale(G: int, p: float, eps: float = GRPO_EPS) -> float:
    """omega_G(p) = E[A_i | R_i = 1] - E[A_i | R_i = 0] for GRPO with a 0/1 reward of success
    probability p (one prompt): E[g_grpo] = omega_G(p) grad p with agg=token-sum."""
    def adv(r: int, m: int) -> float:  # member with reward r in a group with m successes
        if m in (0, G):  # every member alike: advantage 0
            return 0.0
        std = math.sqrt(m * (G - m) / (G * (G - 1)))
        return (r - m / G) / (std + eps)

    def binom(k: int) -> float:  # P(k successes among the G - 1 others)
        if p in (0.0, 1.0):
            return float(k == (G - 1) * p)
        return math.exp(math.lgamma(G) - math.lgamma(k + 1) - math.lgamma(G - k)
                        + k * math.log(p) + (G - 1 - k) * math.log1p(-p))

    return sum(binom(k) * (adv(1, k + 1) - adv(0, k)) for k in range(G))

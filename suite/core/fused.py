"""Estimates reduced to their statistics in one compiled pass (tabular policy, CPU).

For a tabular softmax policy, ``contraction.score`` followed by ``stats.Moments.add`` turns each
estimator's step weights w [N, T] into the sums of ``Moments``: per trajectory
X_i[s, a] = C_i[s, a] - pi(a|s) sum_a' C_i[s, a'] with C_i[s, a] = sum of w_it over the steps of
trajectory i at (s, a); then per batch, per group and per block of k batches the sums listed in
``stats``. Done with torch, that is a scatter and a dozen passes over [trajectories x states x
actions] tables per estimator. ``FusedMoments`` does it in numba-compiled loops: the weightings
of every estimator together (each read from its own [N, T] tensor), and an estimator that returns
its gradients (``Grads``) from their rows; it keeps only the states a trajectory, a batch or a
block visited.
The sums are the same, added in a different order: they agree with the torch path to float64
rounding (tests/test_fused.py). Blocks of k batches are counted from the chunk's first batch, so
a chunk may be fed in pieces of any whole number of batches.

The torch path stays the reference, and the path for a policy that is not tabular and on CUDA.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from torch import Tensor

from .contraction import Grads, RowGrads, SingleSteps
from .sampler import Batch
from .stats import ChunkIndex, Moments

__all__ = ["FusedMoments"]


class _Sums:
    """The running sums of E estimators over one chunk, estimators innermost, with the scratch
    the kernels keep between pieces (the batch's and each block level's running sum, and the
    states each visited)."""

    def __init__(self, names: list[str], S: int, A: int, K: int, F: int):
        E, P = len(names), S * A
        self.names = names
        self.gsum = np.zeros((K, P, E))
        self.gsq, self.gbsq = np.zeros((K, E)), np.zeros((K, E))
        self.gu = np.zeros((3, K, E))  # sums of y^2, y^3, y^4
        self.blocks = np.zeros((F, 6, E))
        self.count = np.zeros((P, E + 1))  # one trajectory's counts C_i (weightings only: the
        #                                    columns of _fold_weights)
        self.batch = np.zeros((P, E))  # the batch's sum of X_i
        self.level = np.zeros((F, P, E))  # the running block sum of each level
        self.touched = np.zeros((F + 2, S), dtype=np.bool_)  # rows: trajectory, batch, levels
        self.states = np.zeros((F + 2, S), dtype=np.int64)
        self.sizes = np.zeros(F + 2, dtype=np.int64)
        self.batches_done = 0  # batches of this chunk already folded in

    def outputs(self) -> tuple:
        return self.gsum, self.gsq, self.gbsq, self.gu, self.blocks

    def scratch(self) -> tuple:
        return self.batch, self.level, self.touched, self.states, self.sizes


_KINDS = {"varying": "varying", "steps": "single steps",
          "constant": "constant along each trajectory"}


def _kind(w: Tensor | SingleSteps) -> str:
    """How the kernel takes a weighting: SingleSteps; one value per trajectory repeated along
    time (a column expanded: stride 0); or varying."""
    if isinstance(w, SingleSteps):
        return "steps"
    return "constant" if w.shape[1] == 1 or w.stride(1) == 0 else "varying"


def _dense(w: Tensor | SingleSteps, T: int) -> np.ndarray:
    """Weights [n, T] as a contiguous NumPy array, float32 kept (the kernel counts in float64),
    any other dtype as float64."""
    if isinstance(w, SingleSteps):
        w = w.weights(T)
    if w.dtype != torch.float32:
        w = w.to(torch.float64)
    return w.contiguous().numpy()


class FusedMoments:
    """Accumulates the Moments of the estimators of one chunk, piece after piece.

    Each piece passes the weightings of the same estimators in the same order
    (``add_weights``), and the gradients of the others (``add_grads``)."""

    def __init__(self, template: Moments, pi: Tensor, g: Tensor):
        self.template = template
        self._pi = pi.detach().to(torch.float64).cpu().numpy()
        g64 = g.detach().to(torch.float64).cpu().numpy().reshape(-1)
        g_norm = float(np.linalg.norm(g64))
        self._consts = (g64, g_norm, g_norm**2 if g_norm > 0 else math.nan,
                        template.batch_size, template.n_batches, template.gsum.shape[0],
                        np.asarray(template.factors, dtype=np.int64))
        self._weights: _Sums | None = None
        self._grads: dict[str, _Sums] = {}

    def _new(self, names: list[str]) -> _Sums:
        S, A = self._pi.shape
        return _Sums(names, S, A, self.template.gsum.shape[0], len(self.template.factors))

    def _check(self, n: int) -> None:
        if n % self.template.batch_size:
            raise ValueError(f"a piece must hold whole batches of {self.template.batch_size}, "
                             f"got {n} trajectories")

    def add_weights(self, weights: list[tuple[str, Tensor | SingleSteps]], batch: Batch,
                    first_traj: int) -> None:
        """Fold one piece of weightings: each estimator's w [n, T] (entries past an episode's
        end are ignored) or SingleSteps on trajectories first_traj .. first_traj + n - 1, in
        order after the previous piece. A weighting that is constant along each trajectory (a
        [n, 1] column expanded, stride 0) is folded as that constant times the score
        sum_t psi_t, which the kernel counts once for all of them."""
        kinds = {name: _kind(w) for name, w in weights}
        if self._weights is None:  # the layout: varying weightings, single steps, constants
            self._weights = self._new([n for k in _KINDS for n, _ in weights if kinds[n] == k])
            self._layout = {k: [n for n in self._weights.names if kinds[n] == k] for k in _KINDS}
        sums = self._weights
        by_name = dict(weights)
        if len(by_name) != len(weights) or set(by_name) != set(sums.names):
            raise ValueError(f"each piece must hold the weights of {sums.names}, "
                             f"got {[name for name, _ in weights]}")
        self._check(batch.n)
        for kind in ("steps", "constant"):  # a varying one may come as any kind
            bad = [n for n in self._layout[kind] if kinds[n] != kind]
            if bad:
                raise ValueError(f"{bad[0]}: its weights were {_KINDS[kind]} in an earlier "
                                 f"piece but not in this one")
        T = batch.states.shape[1]
        dense = [_dense(by_name[n], T) for n in self._layout["varying"]]
        if dense and any(w.dtype != np.float32 for w in dense):  # one dtype for the kernel
            dense = [w.astype(np.float64, copy=False) for w in dense]
        W = numba.typed.List(dense) if dense else numba.typed.List.empty_list(numba.float64[:, ::1])
        steps = [by_name[n] for n in self._layout["steps"]]
        Ts, Cs = np.empty((batch.n, len(steps)), dtype=np.int64), np.empty((batch.n, len(steps)))
        for k, st in enumerate(steps):
            assert isinstance(st, SingleSteps)  # checked above
            Ts[:, k] = st.t.numpy()
            Cs[:, k] = st.c.to(torch.float64).numpy()
        Cw = np.empty((batch.n, len(self._layout["constant"])))
        for k, n in enumerate(self._layout["constant"]):
            w = by_name[n]
            assert isinstance(w, Tensor)  # checked above
            Cw[:, k] = w[:, 0].to(torch.float64).numpy()
        B = self.template.batch_size
        _fold_weights(W, Ts, Cs, Cw, batch.states.numpy(), batch.actions.numpy(),
                      batch.lengths.numpy(), self._pi, sums.count, first_traj // B,
                      sums.batches_done, self._consts, sums.scratch(), sums.outputs())
        sums.batches_done += batch.n // B

    def add_grads(self, name: str, grads: Grads, first_traj: int) -> None:
        """Fold one piece of an estimator's gradients X [n, P] (RowGrads, or any Grads through
        its dense form)."""
        sums = self._grads.get(name) or self._grads.setdefault(name, self._new([name]))
        self._check(grads.n)
        S, A = self._pi.shape
        if isinstance(grads, RowGrads):
            values, traj, state = grads.values, grads.rows.row_traj, grads.rows.row_state
        else:  # every (trajectory, state) a row
            values = grads.dense().reshape(grads.n * S, A)
            traj = torch.arange(grads.n).repeat_interleave(S)
            state = torch.arange(S).repeat(grads.n)
        B = self.template.batch_size
        _fold_rows(values.to(torch.float64).contiguous().numpy(), traj.numpy(), state.numpy(),
                   grads.n, first_traj // B, sums.batches_done, self._consts, sums.scratch(),
                   sums.outputs())
        sums.batches_done += grads.n // B

    def finish(self, first_traj: int, n: int) -> dict[str, Moments]:
        """Each estimator's Moments of the chunk's trajectories first_traj .. first_traj + n - 1."""
        t = self.template
        idx = ChunkIndex.build(first_traj, n, t.batch_size, t.n_batches, t.device)
        out = {}
        for sums in [*([self._weights] if self._weights else []), *self._grads.values()]:
            for e, name in enumerate(sums.names):
                m = out[name] = t.empty_like()
                m.gsum += torch.from_numpy(sums.gsum[:, :, e])
                m.gsq += torch.from_numpy(sums.gsq[:, e])
                m.gbsq += torch.from_numpy(sums.gbsq[:, e])
                m.gu2 += torch.from_numpy(sums.gu[0, :, e])
                m.gu3 += torch.from_numpy(sums.gu[1, :, e])
                m.gu4 += torch.from_numpy(sums.gu[2, :, e])
                m.blocks += torch.from_numpy(sums.blocks[:, :, e])
                m.gn += idx.dn
                m.gm += idx.dm
        return out


# The kernels. Tables keep the E estimators innermost: count, batch [P, E], level [F, P, E],
# gsum [K, P, E], gsq, gbsq [K, E], gu [3, K, E], blocks [F, 6, E].
# Row 0 of touched / states / sizes lists the states of the current trajectory, row 1 those of
# the batch, row 2 + f those of level f's running block.
_TRAJ, _BATCH = 0, 1
# Let LLVM reorder sums (and fuse multiply-adds) so the loops over estimators run in vector
# registers: a quarter of the kernels' time. NaN and infinity keep their meaning (no "nnan",
# "ninf"); the order of additions may change, within the float64 rounding the tests allow.
_FASTMATH = {"reassoc", "contract"}
_BLOCK = 16  # trajectories whose weights _fold_weights copies at a time


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _fold_weights(W, Ts, Cs, Cw, states, actions, lengths, pi, count, batch0, done0, consts,
                  scratch, out):  # pragma: no cover - compiled
    """X_i of every weighting, added to the batch's running sum; estimators in the order: E
    varying ones, Es single steps, Ec constant ones. C_i[s, a] = the sum of w_it over the steps
    at (s, a), X_i[s, .] = C_i[s, .] - pi(.|s) sum_a C_i[s, a]. Count columns: W[e] [n, T]
    for e < E; at E the unit weights (the score); at E + 1 + k the single step Ts[i, k] with
    weight Cs[i, k] (Ts = -1: none). A constant weighting Cw[i, k] is that times the score."""
    B = consts[3]
    batch, _, touched, lists, sizes = scratch
    gsq = out[1]
    E, N = len(W), states.shape[0]
    Es, Ec = Ts.shape[1], Cw.shape[1]
    C = E + 1 + Es  # count columns
    A = pi.shape[1]
    sq, row, x = np.zeros(E + Es + Ec), np.zeros(C), np.zeros(C)
    cell = np.zeros(states.shape[1], dtype=np.int64)
    T = states.shape[1]
    step_w = np.empty((_BLOCK * T, E))  # weights of a block of trajectories, estimators innermost
    for m in range(N // B):
        grp = (batch0 + m) * consts[5] // consts[4]
        for i in range(m * B, m * B + B):
            slot = (i - m * B) % _BLOCK  # trajectory i's place in its block
            if slot == 0:  # copy the next block's weights: each W[e] read in one stretch
                for e in range(E):
                    w = W[e]
                    for kk in range(min(_BLOCK, m * B + B - i)):
                        for t in range(lengths[i + kk]):
                            step_w[kk * T + t, e] = w[i + kk, t]
            L = lengths[i]
            for t in range(L):
                s = states[i, t]
                _note(touched, lists, sizes, _TRAJ, s)
                cell[t] = s * A + actions[i, t]
                count[cell[t], E] += 1.0
            for t in range(L):  # C_i[s, a] = sum of w_it over the steps at (s, a)
                c = cell[t]
                for e in range(E):
                    count[c, e] += step_w[slot * T + t, e]
            for k in range(Es):
                t = Ts[i, k]
                if 0 <= t < L:
                    count[cell[t], E + 1 + k] += Cs[i, k]
            sq[:] = 0.0
            for q in range(sizes[_TRAJ]):  # X_i[s, .] = C_i[s, .] - pi(.|s) sum_a C_i[s, a]
                s = lists[_TRAJ, q]
                touched[_TRAJ, s] = False
                _note(touched, lists, sizes, _BATCH, s)
                row[:] = 0.0
                for a in range(A):
                    for c in range(C):
                        row[c] += count[s * A + a, c]
                for a in range(A):
                    j = s * A + a
                    p = pi[s, a]
                    for c in range(C):
                        x[c] = count[j, c] - p * row[c]
                        count[j, c] = 0.0
                    for e in range(E):
                        sq[e] += x[e] * x[e]
                        batch[j, e] += x[e]
                    for k in range(Es):
                        v = x[E + 1 + k]
                        sq[E + k] += v * v
                        batch[j, E + k] += v
                    for k in range(Ec):
                        v = Cw[i, k] * x[E]
                        sq[E + Es + k] += v * v
                        batch[j, E + Es + k] += v
            sizes[_TRAJ] = 0
            for e in range(E + Es + Ec):
                gsq[grp, e] += sq[e]
        _close_batch(grp, done0 + m, consts, scratch, out)


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _fold_rows(values, row_traj, row_state, N, batch0, done0, consts, scratch,
               out):  # pragma: no cover - compiled
    """X_i of one estimator from its rows (values [V, A] at (row_traj, row_state), rows in
    trajectory order), added to the batch's running sum."""
    B = consts[3]
    batch, _, touched, lists, sizes = scratch
    gsq = out[1]
    V, A = values.shape
    r = 0
    for m in range(N // B):
        grp = (batch0 + m) * consts[5] // consts[4]
        for i in range(m * B, m * B + B):
            sq = 0.0
            while r < V and row_traj[r] == i:
                s = row_state[r]
                _note(touched, lists, sizes, _BATCH, s)
                for a in range(A):
                    x = values[r, a]
                    sq += x * x
                    batch[s * A + a, 0] += x
                r += 1
            gsq[grp, 0] += sq
        _close_batch(grp, done0 + m, consts, scratch, out)


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _close_batch(grp, mc, consts, scratch, out):  # pragma: no cover - compiled
    """The batch's statistics (|sum|^2, the component along g, the group sums) and its place in
    the blocks: level f sums factors[f] / factors[f-1] complete blocks of the level below (the
    batch, below the first); a complete block adds its statistics, is passed up, and is cleared
    once the level above has taken it. mc: batches of the chunk before this one."""
    g, g_norm, g_sq, B, _, _, factors = consts
    batch, level, touched, lists, sizes = scratch
    gsum, _, gbsq, gu, blocks = out
    A = batch.shape[0] // touched.shape[1]
    E = batch.shape[1]
    F = factors.shape[0]
    ssq, dot = np.zeros(E), np.zeros(E)
    # the first level above the batch takes it in the same pass (the batch is then cleared)
    up = 0
    while up < F and factors[up] == 1:
        up += 1
    for q in range(sizes[_BATCH]):
        s = lists[_BATCH, q]
        touched[_BATCH, s] = False
        if up < F:
            _note(touched, lists, sizes, 2 + up, s)
        for j in range(s * A, s * A + A):
            for e in range(E):
                x = batch[j, e]
                ssq[e] += x * x
                dot[e] += x * g[j]
                gsum[grp, j, e] += x
                if up < F:
                    level[up, j, e] += x
                batch[j, e] = 0.0
    sizes[_BATCH] = 0
    for e in range(E):
        gbsq[grp, e] += ssq[e] / (B * B)
        y = dot[e] / (B * g_norm) if g_norm > 0 else 0.0
        gu[0, grp, e] += y * y
        gu[1, grp, e] += y * y * y
        gu[2, grp, e] += y * y * y * y
    for f in range(F):
        if factors[f] == 1:
            _add_blocks(blocks, f, ssq, dot, 1.0 / B, g_sq)
    src_row, src_done = _BATCH, True  # the level below f, and whether it completed a block
    for f in range(up, F):
        k = factors[f]
        row_f = 2 + f
        if src_done and src_row != _BATCH:  # take the completed block of the level below
            for q in range(sizes[src_row]):
                s = lists[src_row, q]
                _note(touched, lists, sizes, row_f, s)
                for j in range(s * A, s * A + A):
                    for e in range(E):
                        level[f, j, e] += level[f - 1, j, e]
            _clear(level[f - 1], touched, lists, sizes, src_row, A)
        if (mc + 1) % k == 0:
            ssq[:] = 0.0
            dot[:] = 0.0
            for q in range(sizes[row_f]):
                s = lists[row_f, q]
                for j in range(s * A, s * A + A):
                    for e in range(E):
                        x = level[f, j, e]
                        ssq[e] += x * x
                        dot[e] += x * g[j]
            _add_blocks(blocks, f, ssq, dot, 1.0 / (k * B), g_sq)
            src_row, src_done = row_f, True
        else:
            src_done = False
    if src_done and src_row != _BATCH:  # the top level's complete block: nobody takes it
        _clear(level[F - 1], touched, lists, sizes, src_row, A)


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _add_blocks(blocks, f, ssq, dot, scale, g_sq):  # pragma: no cover - compiled
    """Add one block of every estimator to blocks [F, 6, E] (count, relsq, relsq^2, cos, cos^2,
    sign, as in stats.Moments): ssq [E] and dot [E] are |sum|^2 and sum . g of the block's sum,
    scale = 1 / (trajectories in the block)."""
    for e in range(ssq.shape[0]):
        est_sq = ssq[e] * scale * scale
        d = dot[e] * scale
        relsq = (est_sq - 2.0 * d + g_sq) / g_sq
        den = math.sqrt(est_sq * g_sq)
        if den < 1e-300:
            den = 1e-300
        cos = d / den
        blocks[f, 0, e] += 1.0
        blocks[f, 1, e] += relsq
        blocks[f, 2, e] += relsq * relsq
        blocks[f, 3, e] += cos
        blocks[f, 4, e] += cos * cos
        if d > 0:
            blocks[f, 5, e] += 1.0


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _note(touched, lists, sizes, row, s):  # pragma: no cover - compiled
    """Add state s to the list of row (once)."""
    if not touched[row, s]:
        touched[row, s] = True
        lists[row, sizes[row]] = s
        sizes[row] += 1


@numba.njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _clear(table, touched, lists, sizes, row, A):  # pragma: no cover - compiled
    """Zero the entries of table [P, E] at the states listed in row, and empty the list."""
    for q in range(sizes[row]):
        s = lists[row, q]
        touched[row, s] = False
        for j in range(s * A, s * A + A):
            for e in range(table.shape[1]):
                table[j, e] = 0.0
    sizes[row] = 0

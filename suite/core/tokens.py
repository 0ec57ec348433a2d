"""A token-level MDP: prompts, responses written one token at a time, an outcome verdict at the end.

``tokens:vocab=3,max_len=6,prompts=4,pass_first=0.9,pass_last=0.05,seed=0`` is the smallest model
of reinforcement learning on language: a state is (prompt, response so far), an action is one of
``vocab`` tokens or end-of-sequence (EOS, the last action), and an episode ends with EOS or when
the response reaches ``max_len`` actions (EOS counted, as frameworks count it in the response
length). Only the last transition pays: the verifier's verdict on the whole response, 1 (correct)
or 0. rho0 is uniform over the prompts. Use ``horizon = max_len`` (a larger horizon changes
no response, though seq-mean-token-sum-norm divides by the horizon; a smaller one cuts responses
before their verdict) and ``gamma = 1``.

**The verifier.** Prompt q gives every vocabulary token a value v_q(x) in {-1, 0, +1} and sets a
bar b_q: a response (x_1, ..., x_T) is correct iff score = sum_t v_q(x_t) >= b_q (EOS adds
nothing; a response cut at the length limit is judged as it stands). The verdict depends on every
token of the response, and through the score on its length. **Difficulty**: prompt q aims at a pass
rate under the uniform policy, logit-spaced from ``pass_first`` (prompt 0) to ``pass_last`` (the
last prompt; a single prompt aims at ``pass_first``); among all value vectors (at most
``MAX_CANDIDATES``, drawn by the seed when 3^vocab is larger) and bars, the generator takes the
verifier whose exact uniform pass rate is nearest to the aim and strictly between 0 and 1 (ties
broken by the seed). ``token_task`` returns the verifiers and their exact pass rates.

The tree of responses is the state space: prompts x (vocab^max_len - 1) / (vocab - 1) states
(every prefix shorter than max_len), stored densely as P [S, A, S]; builders refuse trees whose
table would exceed ``MAX_ENTRIES``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .mdp import MDP

__all__ = ["MAX_CANDIDATES", "MAX_ENTRIES", "TokenTask", "token_task", "tokens"]

MAX_ENTRIES = 2**24  # S * A * S of the dense transition table (134 MB per float64 table)
MAX_CANDIDATES = 729  # value vectors searched per prompt (all of {-1,0,1}^vocab up to vocab 6)


@dataclass(frozen=True)
class TokenTask:
    """The verifiers of a ``tokens:`` MDP and their exact pass rates under the uniform policy."""

    vocab: int
    max_len: int
    values: np.ndarray  # [prompts, vocab] int, v_q(x) in {-1, 0, 1}
    bars: np.ndarray  # [prompts] int, b_q
    aims: np.ndarray  # [prompts] float, the pass rate each prompt aimed at
    pass_rates: np.ndarray  # [prompts] float, exact P(correct) under the uniform policy

    @property
    def prompts(self) -> int:
        return len(self.bars)

    @property
    def prefixes(self) -> int:
        """States per prompt: the prefixes of length 0 .. max_len - 1."""
        return sum(self.vocab**k for k in range(self.max_len))


def _score_distribution(values: np.ndarray, max_len: int) -> np.ndarray:
    """P(final score = s - max_len) for s in 0 .. 2 max_len, under the uniform policy."""
    A = len(values) + 1
    live = np.zeros(2 * max_len + 1)
    live[max_len] = 1.0
    final = np.zeros_like(live)
    for k in range(max_len):
        final += live / A  # EOS now
        moved = np.sum([np.roll(live, int(v)) for v in values], axis=0) / A  # one more token
        if k + 1 == max_len:
            final += moved
        else:
            live = moved
    return final


def _candidates(vocab: int, rng: np.random.Generator) -> np.ndarray:
    if 3**vocab <= MAX_CANDIDATES:
        return np.array(list(itertools.product((-1, 0, 1), repeat=vocab)), dtype=np.int64)
    return rng.integers(-1, 2, size=(MAX_CANDIDATES, vocab))


def token_task(vocab: int = 3, max_len: int = 6, prompts: int = 4, pass_first: float = 0.9,
               pass_last: float = 0.05, seed: int = 0) -> TokenTask:
    """The verifiers of ``tokens(...)`` (see the module doc); InputError for bad options."""
    _check(vocab, max_len, prompts, pass_first, pass_last)
    rng = np.random.default_rng(seed)
    cands = _candidates(vocab, rng)
    order = rng.permutation(len(cands))  # the seed's tie-break: earlier in this order wins
    # rates[c, b]: P(score >= b - max_len) for candidate c, bar index b in 0 .. 2 max_len + 1
    dist = np.stack([_score_distribution(v, max_len) for v in cands[order]])
    rates = np.concatenate([dist[:, ::-1].cumsum(1)[:, ::-1], np.zeros((len(cands), 1))], 1)
    rates = np.where((rates > 1e-12) & (rates < 1 - 1e-12), rates, np.inf)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    steps = np.linspace(logit(pass_first), logit(pass_last), prompts) if prompts > 1 \
        else np.array([logit(pass_first)])
    aims = 1 / (1 + np.exp(-steps))
    values, bars, achieved = [], [], []
    for aim in aims:
        flat = int(np.argmin(np.abs(rates - aim)))  # first minimum: the seed's order breaks ties
        c, b = divmod(flat, rates.shape[1])
        values.append(cands[order][c])
        bars.append(b - max_len)
        achieved.append(rates[c, b])
    return TokenTask(vocab, max_len, np.array(values), np.array(bars), aims, np.array(achieved))


def _check(vocab, max_len, prompts, pass_first, pass_last) -> None:
    for key, value in (("vocab", vocab), ("max_len", max_len), ("prompts", prompts)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"tokens: {key} must be an integer >= 1, got {value}")
    for key, value in (("pass_first", pass_first), ("pass_last", pass_last)):
        if not 0.0 < value < 1.0:
            raise InputError(f"tokens: {key} is a pass rate and must lie strictly between 0 and 1, "
                             f"got {value}")
    per_prompt = sum(vocab**k for k in range(max_len))
    S, A = prompts * per_prompt, vocab + 1
    if S * A * S > MAX_ENTRIES:
        raise InputError(f"tokens: the response tree has {S:,} states x {A} actions, a dense model "
                         f"of {S * A * S:,} entries, more than {MAX_ENTRIES:,}; lower vocab, "
                         f"max_len or prompts")


def tokens(vocab: int = 3, max_len: int = 6, prompts: int = 4, pass_first: float = 0.9,
           pass_last: float = 0.05, seed: int = 0) -> MDP:
    """Token-level LLM task: prompts, responses of tokens + EOS, a 0/1 verdict at the end.

    State q * prefixes + (offset of length k) + code of the prefix (base vocab); action x < vocab
    appends token x, action vocab is EOS. See the module doc for the verifier.
    """
    task = token_task(vocab, max_len, prompts, pass_first, pass_last, seed)
    V, L, n_pre = vocab, max_len, task.prefixes
    S, A = prompts * n_pre, V + 1
    P = np.zeros((S, A, S))
    R = np.zeros((S, A, S))
    term = np.zeros((S, A, S), dtype=bool)
    offsets = np.concatenate([[0], np.cumsum([V**k for k in range(L)])])
    for q in range(prompts):
        score = np.zeros(1, dtype=np.int64)  # score of each prefix of the current length
        for k in range(L):
            codes = np.arange(V**k)
            s = q * n_pre + offsets[k] + codes
            P[s, V, s] = 1.0  # EOS: the verdict on the prefix, then the sink
            R[s, V, s] = score >= task.bars[q]
            term[s, V, s] = True
            for x in range(V):
                if k + 1 < L:
                    P[s, x, q * n_pre + offsets[k + 1] + codes * V + x] = 1.0
                else:  # the length limit: this token ends the response
                    P[s, x, s] = 1.0
                    R[s, x, s] = score + task.values[q, x] >= task.bars[q]
                    term[s, x, s] = True
            score = (score[:, None] + task.values[q][None, :]).reshape(-1)  # children, base V
    rho0 = np.zeros(S)
    rho0[np.arange(prompts) * n_pre] = 1.0 / prompts
    name = (f"tokens:vocab={vocab},max_len={max_len},prompts={prompts},pass_first={pass_first:g},"
            f"pass_last={pass_last:g},seed={seed}")
    t = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    return MDP(t(P), t(R), torch.as_tensor(term), t(rho0), name=name)

"""Advantage functions written for an LLM framework, scored as estimators.

verl, TRL and OpenRLHF compute advantages with a function of the batch's token tensors; the
suite calls such a function on its own batch and aggregates the result like its group estimators
(``estimators.groups``). The signature, as verl's advantage estimators take it:

    fn(token_level_rewards [bs, L], response_mask [bs, L], group_index [bs], **defaults)
        -> advantages [bs, L]    (or a tuple whose first element is that, as verl returns)

and the suite passes, for the bs = N trajectories of a piece of the rollout (T = L its longest
length):

* ``token_level_rewards``: torch float64 [N, T], r_t, the reward of step t (0 after the end: on
  the token MDP the verdict sits at the last step, as a framework's outcome reward does);
* ``response_mask``: torch float64 [N, T], 1.0 on the steps that happened, 0.0 after the end;
* ``group_index``: NumPy int64 [N], the batch (group) of each trajectory, i // B; members of a
  group are consecutive. It is NumPy, as verl's ``index``, so that dictionaries keyed by its
  entries group by value.

The advantages are masked with ``response_mask`` and aggregated with the mode of ``agg``
(default ``token-mean``, verl's default ``loss_agg_mode``; ``NAME:agg=MODE`` selects another).
The claim: unbiased under the modes listed in the function's optional attribute
``unbiased_with`` (a tuple of modes), biased otherwise.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np
import torch

from suite.core.errors import InputError

from .context import Context
from .groups import AGG_MODES, advantage

__all__ = ["SIGNATURE", "register_framework_function", "takes_framework_signature"]

SIGNATURE = ("token_level_rewards", "response_mask", "group_index")
DEFAULT_AGG = "token-mean"


def takes_framework_signature(fn: Callable) -> bool:
    """True if fn's first three parameters are SIGNATURE and any others have defaults."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    names = tuple(p.name for p in params[:3])
    rest_ok = all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                  for p in params[3:])
    return names == SIGNATURE and rest_ok


def _call(fn: Callable, where: str, rewards: torch.Tensor, mask: torch.Tensor,
          group_index: np.ndarray) -> torch.Tensor:
    """fn's advantages [N, T] (masked), or InputError naming what went wrong."""
    try:
        out = fn(rewards.clone(), mask.clone(), group_index.copy())
    except Exception as exc:  # the user's code: any error becomes one line
        raise InputError(f"{where} raised {type(exc).__name__}: {exc}") from None
    if isinstance(out, tuple | list) and out:
        out = out[0]  # verl returns (advantages, returns)
    try:
        adv = torch.as_tensor(out, dtype=torch.float64, device=rewards.device)
    except Exception:
        raise InputError(f"{where} returned {type(out).__name__}, not a tensor [bs, L] of "
                         f"advantages") from None
    if tuple(adv.shape) != tuple(rewards.shape):
        raise InputError(f"{where} returned advantages of shape {list(adv.shape)}; they must "
                         f"have the shape of token_level_rewards {list(rewards.shape)} [bs, L]")
    if not torch.isfinite(adv[mask > 0]).all():
        raise InputError(f"{where} returned non-finite advantages on valid steps")
    return adv * mask


def _probe(fn: Callable, where: str) -> None:
    """Call fn once on a small batch (2 groups of 2, lengths 3, 2, 1, 3) to check its shape."""
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float64)
    rewards = torch.zeros_like(mask)
    rewards[[0, 1, 3], [2, 1, 2]] = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    _call(fn, where, rewards, mask, np.array([0, 0, 1, 1]))


def register_framework_function(fn: Callable, source: str) -> list[str]:
    """Register fn (the framework signature) as ``fn.__name__`` and its family NAME:agg=MODE;
    returns the names. InputError if it fails on a probe batch or the name is taken."""
    name = fn.__name__
    where = f"{source}: {name}"
    unbiased_with = tuple(getattr(fn, "unbiased_with", ()))
    bad = [m for m in unbiased_with if m not in AGG_MODES]
    if bad:
        raise InputError(f"{where}: unbiased_with lists unknown aggregation mode '{bad[0]}'; "
                         f"known: {', '.join(AGG_MODES)}")
    _probe(fn, where)

    def adv(ctx: Context) -> torch.Tensor:
        group = (torch.arange(ctx.batch.n) // ctx.batch_size).numpy()
        return _call(fn, where, ctx.batch.rewards, ctx.mask, group)

    adv.__name__, adv.__doc__ = name, inspect.getdoc(fn) or f"{name}, from {source}"

    claim = (f"claimed by its author: unbiased with agg={', '.join(unbiased_with)}"
             if unbiased_with else "no claim of unbiasedness declared")
    summary = (inspect.getdoc(fn) or "").split("\n")[0] or "user advantage function"
    try:
        advantage(name, agg=DEFAULT_AGG, formula=f"{summary} (framework signature)",
                  reference=source, unbiased_with=unbiased_with,
                  condition=f"{'unbiased' if 'token-sum' in unbiased_with else 'biased'}: {claim}",
                  needs_batch=True)(adv)
    except ValueError as exc:  # the registry: a name registered twice
        raise InputError(f"{where}: {exc}; rename the function") from None
    return [name]

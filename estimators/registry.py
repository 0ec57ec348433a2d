"""The estimator registry: a decorator, a lookup with a did-you-mean, and the contract.

An estimator is a short function of a ``Context`` (the batch, the exact solution, helpers) whose
return type says what it computed:

* a tensor of step weights w [N, T]: the estimate is g_i = sum_t w_it grad log pi(a_it|s_it) over
  the steps that happened (entries past the end of an episode are ignored: no masking needed)
* a ``StepDraw(q [N, T], c [N, T])``: one step t* ~ q_i (rows may sum to < 1: the rest is "no
  step", estimate 0) and g_i = c_it* grad log pi(a_it*|s_it*). The exact expectation over t* is
  the weighting q * c, which the enumeration tests use.
* a ``suite.core.contraction.Grads``: the per-trajectory gradients directly

Next to its claim, an entry declares how its exact moments are obtained (``exact=``): a function
of a ``suite.core.moments.MomentModel`` returning a form the exact engine knows (``Weighting`` with
its y, beta, o and baseline; ``Reinforce``; ``AllAction``; ``SingleStep``; ``BatchBaseline``), or
``no_exact="reason"`` when it has none (its statistics are then sampled only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from suite.core.contraction import Grads, SingleSteps
from suite.core.errors import InputError, unknown_name
from suite.core.moments import Form, MomentModel, NoExact
from suite.core.scan import inverse_cdf
from suite.core.specs import parse_spec

from .context import Context

__all__ = ["FAMILIES", "REGISTRY", "Estimator", "Result", "StepDraw", "get", "names", "register",
           "register_family", "resolve"]

class StepDraw(NamedTuple):
    """One step t* ~ q per trajectory, weighted by c there (see the module doc)."""

    q: torch.Tensor  # [N, T] probability that t* = t (rows sum to <= 1)
    c: torch.Tensor  # [N, T] the weight of step t when it is drawn


Result = torch.Tensor | StepDraw | Grads  # what an estimator's function returns


@dataclass(frozen=True)
class Estimator:
    """A registered estimator and its claim."""

    name: str
    fn: Callable[[Context], Result]
    formula: str  # one line
    reference: str
    unbiased_if: Callable[[float], bool]  # gamma -> is it claimed unbiased for grad J?
    condition: str  # the claim in words
    needs_batch: bool = False  # uses the other trajectories of its batch (needs B >= 2)
    params: dict = field(default_factory=dict)
    exact: Callable[[MomentModel], Form] | None = None  # how its exact moments are obtained
    no_exact: str = ""  # why it has none (when exact is None)

    def exact_form(self, model: MomentModel) -> Form:
        """The form of this estimator for the exact engine, or NoExact with the reason."""
        if self.exact is None:
            return NoExact(self.no_exact or "no exact moments declared")
        return self.exact(model)

    def claims_unbiased(self, gamma: float) -> bool:
        return bool(self.unbiased_if(gamma))

    def weights(self, ctx: Context, expectation: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Step weights w [N, T] of a weights or single_step estimator; ``expectation`` averages
        over the estimator's own randomness exactly instead of sampling it, which otherwise
        comes from ``generator`` (default ctx.generator)."""
        out = self.fn(ctx)
        if isinstance(out, Grads):
            raise TypeError(f"{self.name} returns gradients, not weights")
        return _as_weights(out, expectation, generator or ctx.generator)

    def output(self, ctx: Context, expectation: bool = False,
               generator: torch.Generator | None = None,
               sparse: bool = False) -> torch.Tensor | SingleSteps | Grads:
        """Step weights w [N, T] (of a weighting or a drawn single step), or the gradients of an
        estimator that returns them (see ``weights``); with ``sparse``, a drawn single step as
        SingleSteps (the same draw)."""
        out = self.fn(ctx)
        if isinstance(out, Grads):
            return out
        if sparse and isinstance(out, StepDraw) and not expectation:
            return _draw_steps(out.q, out.c, generator or ctx.generator)
        return _as_weights(out, expectation, generator or ctx.generator)

    def gradients(self, ctx: Context, expectation: bool = False,
                  generator: torch.Generator | None = None) -> Grads:
        """Per-trajectory gradients on ctx's batch (see ``weights``)."""
        out = self.output(ctx, expectation, generator)
        assert not isinstance(out, SingleSteps)  # only with sparse=True
        return out if isinstance(out, Grads) else ctx.score(out)


def _as_weights(out: torch.Tensor | StepDraw, expectation: bool,
                gen: torch.Generator | None) -> torch.Tensor:
    """Weights [N, T] of a weighting, or of a step draw (drawn, or its expectation q * c)."""
    if not isinstance(out, StepDraw):
        return out
    if expectation:
        return out.q * out.c
    return _draw_single_step(out.q, out.c, gen)


def _draw_single_step(q: torch.Tensor, c: torch.Tensor,
                      gen: torch.Generator | None) -> torch.Tensor:
    """Weights that are c_it* at one t* ~ q_i and 0 elsewhere (0 everywhere w.p. 1 - sum q_i)."""
    return _draw_steps(q, c, gen).weights(q.shape[1])


def _draw_steps(q: torch.Tensor, c: torch.Tensor, gen: torch.Generator | None) -> SingleSteps:
    """One t* ~ q_i per trajectory and its weight c_it* (none w.p. 1 - sum q_i)."""
    u = torch.rand(q.shape[0], 1, generator=gen, dtype=q.dtype, device=q.device)
    t_star = inverse_cdf(q, u)  # [N, 1]: number of cdf values <= u
    drawn = t_star < q.shape[1]  # False when u falls in the "no step" mass
    t_star = t_star.clamp(max=q.shape[1] - 1)
    return SingleSteps(torch.where(drawn, t_star, -1)[:, 0], (c.gather(1, t_star) * drawn)[:, 0])


REGISTRY: dict[str, Estimator] = {}
# parametrised families: "gae:lambda=0.7,critic=perturbed" -> FAMILIES["gae"](spec, **options)
FAMILIES: dict[str, Callable[..., Estimator]] = {}


def register(name: str, *, formula: str, reference: str, unbiased: bool | Callable[[float], bool],
             condition: str, needs_batch: bool = False,
             exact: Callable[[MomentModel], Form] | None = None, no_exact: str = "", **params):
    """Decorator: ``@register("reinforce", formula=..., reference=..., unbiased=True,
    exact=lambda m: Reinforce())``.

    Extra keyword arguments are bound to the function (one function, several entries). Give
    ``exact`` (a MomentModel -> form function) or ``no_exact`` (the reason there is none).
    """
    if (exact is None) == (not no_exact):
        raise ValueError(f"estimator {name!r}: give exactly one of exact= and no_exact=")
    predicate = unbiased if callable(unbiased) else (lambda gamma, _u=bool(unbiased): _u)

    def deco(fn):
        if name in REGISTRY:
            raise ValueError(f"estimator {name!r} is registered twice")
        bound = fn
        if params:
            def bound(ctx, _fn=fn, _p=params):
                return _fn(ctx, **_p)
            bound.__doc__ = fn.__doc__  # its docs are the function's
            bound.__wrapped__ = fn  # type: ignore[attr-defined]  # functions take any attribute
        REGISTRY[name] = Estimator(name, bound, formula, reference, predicate, condition,
                                   needs_batch, dict(params), exact, no_exact)
        return fn

    return deco


def register_family(base: str, factory: Callable[..., Estimator]) -> None:
    """Let ``get("BASE:key=value,...")`` build an unregistered variant with ``factory``."""
    if base in FAMILIES:
        raise ValueError(f"estimator family {base!r} is registered twice")
    FAMILIES[base] = factory


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> Estimator:
    """The registered estimator, or a variant of a registered family from a spec such as
    ``gae:lambda=0.7,critic=perturbed,sigma=0.5`` (critic: exact | perturbed | timeless)."""
    if name in REGISTRY:
        return REGISTRY[name]
    base, kwargs = parse_spec(name)
    if base in FAMILIES and kwargs:
        return FAMILIES[base](name, **kwargs)
    raise unknown_name("estimator", name, [*REGISTRY, *(f"{f}:..." for f in FAMILIES)])


def resolve(spec: str | list[str]) -> list[Estimator]:
    """'all', a comma-separated list, or a list of names -> estimators (reinforce first)."""
    items = spec if isinstance(spec, list) else _split(spec)
    if items == ["all"]:
        items = names()
    if not items:
        raise InputError("no estimator given; pass names separated by commas, or 'all'")
    chosen = [get(n) for n in items]
    if "reinforce" not in items:  # the reference of the paired variance ratio
        chosen.insert(0, REGISTRY["reinforce"])
    seen: dict[str, Estimator] = {}
    for est in chosen:
        seen.setdefault(est.name, est)
    return list(seen.values())


def _split(spec: str) -> list[str]:
    """Split on commas that are not inside a gae:... spec (gae:lambda=0.5,critic=exact)."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if out and "=" in part and ":" not in part and ":" in out[-1]:
            out[-1] += "," + part
        elif part:
            out.append(part)
    return out

"""Everything a report shows, assembled from a study's MLflow records (``reports.load``)."""

from __future__ import annotations

import base64
import tomllib
from dataclasses import dataclass

from . import derivation as d
from .figures import make_figures
from .load import StudyData

__all__ = ["Report", "assemble"]


@dataclass
class Report:
    """Everything a renderer shows; built by ``assemble`` from a ``reports.load.StudyData``."""

    name: str
    description: str
    overview: str
    summary_note: str
    summary: dict
    summary_head_one: list[str]
    summary_head_many: list[str]
    steps: list
    conclusions: list[str]
    figures: list  # reports.figures.Figure, with b64 added for the HTML
    methodology: list[tuple[str, str]]
    estimators: list[dict]
    conditions: dict
    condition_head: list[str]
    provenance: dict
    alpha: float


@dataclass(frozen=True)
class _Shown:
    """A figure as the templates see it (PNG also as base64)."""

    key: str
    title: str
    caption: str
    png: bytes | None
    note: str | None
    b64: str


def _description(files: dict[str, str]) -> str:
    for text in files.values():
        try:
            return str(tomllib.loads(text).get("study", {}).get("description", ""))
        except tomllib.TOMLDecodeError:
            continue
    return ""


def assemble(data: StudyData) -> Report:
    """Tables, derivation, figures, methodology and provenance of one study's runs."""
    c = data.conditions
    varying = [k.removeprefix("free:") for k in data.varying]
    seeds = sorted(set(c["seeds"].astype(str)))
    overview = (f"{len(c)} condition{'s' if len(c) != 1 else ''} on {len(data.envs)} "
                f"environment{'s' if len(data.envs) != 1 else ''}, "
                f"{len(data.estimator_names)} estimators, sampler {data.sampler}, seeds "
                f"{', '.join(seeds)}; varied: {', '.join(varying) or 'nothing'}.")
    many = c.groupby("env").size().max() > 1
    note = ("Relative bias: |mean − ∇J| / |∇J|, debiased by the noise floor. Test: t-test along ∇J "
            f"of 'mean = ∇J' at level {d.ALPHA:g}; a row is red when its verdict contradicts the "
            "estimator's claim in some condition. Variance ratio: paired, on the same "
            "trajectories as reinforce. Noise / signal: variance / |∇J|². B: trajectories per "
            "gradient step for a relative MSE of 0.1 (∞: the bias alone exceeds it).")
    if many:
        note += (" With several conditions per environment, numbers are medians over them with "
                 "the range of the point estimates in parentheses, and verdicts are counted (an "
                 "estimator run in one condition only shows its 95% interval in square brackets); "
                 "section 6 lists every condition with its intervals.")
    steps, conclusions = d.derivation(data)
    figures = [_Shown(f.key, f.title, f.caption, f.png, f.note,
                      base64.b64encode(f.png).decode() if f.png else "")
               for f in make_figures(data)]
    return Report(
        name=data.name, description=_description(data.study_files), overview=overview,
        summary_note=note, summary=d.summary_rows(data), summary_head_one=d.SUMMARY_HEAD["one"],
        summary_head_many=d.SUMMARY_HEAD["many"], steps=steps, conclusions=conclusions,
        figures=figures, methodology=d.methodology(data), estimators=d.estimator_rows(data),
        conditions=d.condition_rows(data), condition_head=d.CONDITION_HEAD,
        provenance=d.provenance(data), alpha=d.ALPHA)

"""Coarse to fine: a new study with the search space narrowed around the best trials."""

from __future__ import annotations

import math
from typing import Any

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from sqlalchemy import select

from caviar.service.db import Database
from caviar.service.definition import StudyDefinition, decode_params, search_scale
from caviar.service.store import complete_trials, create_study, pareto_front, parse_definition, ranked
from caviar.storage import StudyRecord

MAX_BASE = 128 - len("-refined-") - 3
"""How much of a study's name a refined study's name keeps (room for up to 999 refinements)."""


def refine(
    db: Database,
    name: str,
    *,
    top_fraction: float = 0.2,
    min_top: int = 3,
    margin: float = 0.25,
    n_trials: int | None = None,
    data_files: bool = True,
) -> StudyRecord:
    """Create ``<name>-refined-N``: the space narrowed around the best trials, in each parameter's scale.

    The new study warm-starts from ``name`` (``warm_start: {from: name, top_k: <the top trials>}``):
    the top trials that fit the narrowed space are its first waiting trials.
    ``data_files``: whether the caller may create a study that reads a ``file:`` dataset.
    """
    _, definition, complete = complete_trials(db, name)
    if definition.multi_objective:
        top = pareto_front(complete, definition.study_directions)
    else:
        top = ranked(definition, complete)[: max(min_top, math.ceil(top_fraction * len(complete)))]
    decoded = [decode_params(definition.search_space, t.params) for t in top]
    space = narrow_space(definition, decoded, margin)
    data = definition.model_dump(mode="json")
    data["search_space"] = space
    # the refined study starts from the top trials (those that fit the narrowed space)
    data["warm_start"] = {"from": name, "top_k": len(top)}
    if n_trials is not None:
        data["budget"]["n_trials"] = n_trials
    base = f"{name[:MAX_BASE]}-refined-"  # a long name is shortened so the new one fits 128
    with db.session() as session:
        existing = session.scalars(select(StudyRecord.name).where(StudyRecord.name.startswith(base))).all()
    taken = {int(n[len(base) :]) for n in existing if n[len(base) :].isdigit()}
    index = next(i for i in range(1, len(taken) + 2) if i not in taken)
    data["name"] = f"{base}{index}"
    data["tags"] = {**data.get("tags", {}), "refined_from": name}
    return create_study(db, parse_definition(data), data_files=data_files)


def narrow_space(definition: StudyDefinition, top: list[dict[str, Any]], margin: float) -> dict[str, Any]:
    """The search space (as JSON) narrowed to the envelope of ``top`` widened by ``margin``."""
    space: dict[str, Any] = {}
    for key, param in definition.search_space.items():
        spec = param.model_dump(mode="json", exclude_none=True)
        seen = [p[key] for p in top if key in p]
        dist = param.distribution()
        if not seen:
            space[key] = spec
            continue
        if isinstance(dist, CategoricalDistribution):
            spec["choices"] = [c for c in dist.choices if c in seen]
        elif isinstance(dist, FloatDistribution | IntDistribution):
            lo, hi = _envelope(param, [float(v) for v in seen], margin)
            step = getattr(param, "step", None)
            if step is not None:  # stay on the original grid: low + k * step
                lo, hi = _on_grid(float(param.low), float(param.high), float(step), lo, hi)  # type: ignore[union-attr]
            if isinstance(dist, IntDistribution):
                lo, hi = int(lo), int(hi)
            spec["low"], spec["high"] = lo, hi
        space[key] = spec
    # conditions must still name surviving parent choices
    for key, spec in list(space.items()):
        when = spec.get("when")
        if not when:
            continue
        for parent, allowed in list(when.items()):
            kept = [v for v in allowed if v in space.get(parent, {}).get("choices", [])]
            when[parent] = kept
        if any(not allowed for allowed in when.values()):
            del space[key]
    return space


def _on_grid(low: float, high: float, step: float, lo: float, hi: float) -> tuple[float, float]:
    """``[lo, hi]`` widened to points of the grid ``low + k * step`` (at least two of them)."""
    last = math.floor((high - low) / step + 1e-9)
    first_k = max(0, min(last - 1, math.floor((lo - low) / step + 1e-9)))
    last_k = min(last, max(first_k + 1, math.ceil((hi - low) / step - 1e-9)))
    return low + first_k * step, low + last_k * step


def _envelope(param: Any, seen: list[float], margin: float) -> tuple[float, float]:
    """Widened envelope of ``seen`` in the parameter's own scale, clipped to its bounds."""
    low, high = float(param.low), float(param.high)
    scale = getattr(param, "scale", "linear")
    fwd, inv = search_scale(scale)
    points = [fwd(v) for v in seen]
    bounds = sorted((fwd(low), fwd(high)))
    lo, hi = min(points), max(points)
    width = hi - lo if hi > lo else 0.1 * (bounds[1] - bounds[0])
    lo, hi = max(bounds[0], lo - margin * width), min(bounds[1], hi + margin * width)
    a, b = sorted((inv(lo), inv(hi)))
    a, b = max(low, a), min(high, b)
    if scale == "reverse_log":
        b = min(b, math.nextafter(1.0, 0.0))
    if a >= b:
        a, b = low, high
    return a, b

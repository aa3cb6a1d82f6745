"""``objective.shared`` (which parameters a fused python group shares): only for kind python with fuse."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from caviar.service.definition import StudyDefinition


def definition(**objective: Any) -> dict[str, Any]:
    return {
        "name": "f",
        "direction": "maximize",
        "search_space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "scale": "log"}},
        "objective": objective,
    }


def test_a_fused_python_objective_names_what_its_groups_share() -> None:
    parsed = StudyDefinition.model_validate(
        definition(kind="python", entrypoint="model:objective", fuse=4, shared=["hidden"])
    )
    assert parsed.objective.fuse == 4 and parsed.objective.shared == ["hidden"]


@pytest.mark.parametrize(
    "objective",
    [
        {"kind": "python", "entrypoint": "model:objective", "shared": ["hidden"]},  # no fuse
        {"kind": "trainer", "dataset": "digits", "fuse": 4, "shared": ["hidden"]},
    ],
)
def test_shared_without_a_fused_python_objective_is_refused(objective: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="shared: only for kind python with fuse"):
        StudyDefinition.model_validate(definition(**objective))

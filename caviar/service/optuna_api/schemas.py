"""Wire formats of Optuna's storage API over REST.

JSON has no infinity or NaN, and Optuna allows both in trial values, intermediate values and
attributes: numbers that may be non-finite travel as :data:`Number` (a JSON number, or the string
``"inf"``, ``"-inf"`` or ``"nan"``), and attribute values as JSON text (``value_json``, written and
read with Python's ``json``, which spells them ``Infinity`` and ``NaN`` as Optuna's RDB storage does).
Distributions travel as Optuna's own ``distribution_to_json`` text; datetimes as ISO 8601 text in
Optuna's naive local time (the service's clock, as with Optuna's RDB storage).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from caviar.service.types import INT32_MAX

Number = float | Literal["inf", "-inf", "nan"]
"""A float that may be non-finite."""
StateName = Literal["RUNNING", "COMPLETE", "PRUNED", "FAIL", "WAITING"]
Direction = Literal["MINIMIZE", "MAXIMIZE"]
AttrKind = Literal["user", "system"]
Id = int
_Strict = ConfigDict(extra="forbid")


class StudyCreate(BaseModel):
    model_config = _Strict
    directions: list[Direction] = Field(min_length=1, max_length=16)
    study_name: str | None = Field(default=None, max_length=128)


class StudyCreated(BaseModel):
    study_id: Id
    study_name: str


class StudyIdRead(BaseModel):
    study_id: Id


class FrozenStudyWire(BaseModel):
    study_id: Id
    study_name: str
    directions: list[Direction]
    user_attrs_json: str
    system_attrs_json: str


class AttrWrite(BaseModel):
    model_config = _Strict
    kind: AttrKind
    key: str = Field(min_length=0, max_length=2048)
    value_json: str = Field(max_length=1_000_000)


class ParamWire(BaseModel):
    name: str
    internal: Number
    distribution: str


class FrozenTrialWire(BaseModel):
    trial_id: Id
    study_id: Id
    number: int
    state: StateName
    values: list[Number] | None
    datetime_start: str | None
    datetime_complete: str | None
    params: list[ParamWire]
    user_attrs_json: str
    system_attrs_json: str
    intermediate_values: list[tuple[int, Number]]


class TemplateWire(BaseModel):
    model_config = _Strict
    state: StateName
    values: list[Number] | None = None
    datetime_start: str | None = None
    datetime_complete: str | None = None
    params: list[ParamWire] = Field(default_factory=list, max_length=1024)
    user_attrs_json: str = "{}"
    system_attrs_json: str = "{}"
    intermediate_values: list[tuple[int, Number]] = Field(default_factory=list, max_length=100_000)


class TrialCreate(BaseModel):
    model_config = _Strict
    template: TemplateWire | None = None
    client_id: str | None = Field(default=None, max_length=128)


class TrialCreated(BaseModel):
    trial: FrozenTrialWire
    budget_left: int | None = Field(
        description="Trials clients may still start: new ones within the budget plus waiting ones "
        "(None: a study outside caviar)."
    )


class TrialList(BaseModel):
    trials: list[FrozenTrialWire]


class TrialIdRead(BaseModel):
    trial_id: Id


class ParamWrite(BaseModel):
    model_config = _Strict
    name: str = Field(max_length=2048)
    internal: Number
    distribution: str = Field(max_length=100_000)
    previous_distribution: str | None = Field(default=None, max_length=100_000)


class StateWrite(BaseModel):
    model_config = _Strict
    state: StateName
    values: list[Number] | None = Field(default=None, max_length=16)
    client_id: str | None = Field(default=None, max_length=128)


class StateWritten(BaseModel):
    updated: bool
    study_id: Id
    budget_left: int | None


class IntermediateWrite(BaseModel):
    model_config = _Strict
    step: int = Field(ge=0, le=INT32_MAX)
    value: Number


class HeartbeatBatch(BaseModel):
    model_config = _Strict
    trial_ids: list[Id] = Field(max_length=10_000)


class HeartbeatAnswer(BaseModel):
    lost: list[Id] = Field(description="Trials whose lease is gone (reaped, finished or never leased).")


class StorageInfo(BaseModel):
    heartbeat_interval_s: float

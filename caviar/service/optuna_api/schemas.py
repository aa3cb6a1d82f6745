"""Wire formats of Optuna's storage API over REST.

JSON has no infinity or NaN, and Optuna allows both in trial values, intermediate values and
attributes: numbers that may be non-finite travel as :data:`Number` (a JSON number, or the string
``"inf"``, ``"-inf"`` or ``"nan"``), and attribute values as JSON text (``value_json``, written and
read with Python's ``json``, which spells them ``Infinity`` and ``NaN`` as Optuna's RDB storage does).
Distributions travel as Optuna's own ``distribution_to_json`` text; datetimes as ISO 8601 text in
Optuna's naive local time (the service's clock, as with Optuna's RDB storage).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from caviar.service.types import INT32_MAX

Number = Annotated[float, Field(strict=True)] | Literal["inf", "-inf", "nan"]
"""A float that may be non-finite (never a boolean)."""
TrialValue = Annotated[float, Field(strict=True, allow_inf_nan=False)] | Literal["inf", "-inf"]
"""An objective value: infinite is allowed, NaN is not. Optuna never stores a NaN value (its
``tell`` fails such a trial) and its RDB storage cannot read one back from SQLite, which keeps NaN
as NULL: one NaN value would make the trial unreadable, so it is refused here (422)."""
StateName = Literal["RUNNING", "COMPLETE", "PRUNED", "FAIL", "WAITING"]
Direction = Literal["MINIMIZE", "MAXIMIZE"]
AttrKind = Literal["user", "system"]
Id = Annotated[int, Field(strict=True, ge=0, le=INT32_MAX)]
"""Optuna's study and trial ids (never a boolean, never past 32 bits)."""
Step = Annotated[int, Field(strict=True, ge=0, le=INT32_MAX)]
_Strict = ConfigDict(extra="forbid")

# Bounds that keep every request under the service's 1 MiB body cap even with every string at its
# longest and JSON-escaped (6 bytes a character): a bigger request would be 413, not a 422 naming it.
MAX_NAME = 128
"""An attribute key or a parameter name."""
MAX_ATTR_JSON = 100_000
"""One attribute value as JSON text."""
MAX_DISTRIBUTION = 1024
"""A distribution as Optuna's JSON text."""
MAX_TEMPLATE_PARAMS = 64
MAX_TEMPLATE_ATTRS_JSON = 20_000
MAX_TEMPLATE_STEPS = 2_000
MAX_INCLUDED_CHARS = 8_000
"""The ``included`` trial ids of an incremental read (a URL stays short; the client widens the read
instead of sending more)."""


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
    key: str = Field(max_length=MAX_NAME)
    value_json: str = Field(max_length=MAX_ATTR_JSON)


class ParamWire(BaseModel):
    name: str = Field(max_length=MAX_NAME)
    internal: Number
    distribution: str = Field(max_length=MAX_DISTRIBUTION)


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
    values: list[TrialValue] | None = None
    datetime_start: str | None = None
    datetime_complete: str | None = None
    params: list[ParamWire] = Field(default_factory=list, max_length=MAX_TEMPLATE_PARAMS)
    user_attrs_json: str = Field(default="{}", max_length=MAX_TEMPLATE_ATTRS_JSON)
    system_attrs_json: str = Field(default="{}", max_length=MAX_TEMPLATE_ATTRS_JSON)
    intermediate_values: list[tuple[Step, Number]] = Field(
        default_factory=list, max_length=MAX_TEMPLATE_STEPS
    )


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
    heartbeat_interval_s: float = Field(
        description="How often the client must renew a running trial's lease."
    )


class TrialList(BaseModel):
    trials: list[FrozenTrialWire]


class TrialIdRead(BaseModel):
    trial_id: Id


class ParamWrite(BaseModel):
    model_config = _Strict
    name: str = Field(max_length=MAX_NAME)
    internal: Number
    distribution: str = Field(max_length=MAX_DISTRIBUTION)
    previous_distribution: str | None = Field(default=None, max_length=MAX_DISTRIBUTION)


class StateWrite(BaseModel):
    model_config = _Strict
    state: StateName
    values: list[TrialValue] | None = Field(default=None, max_length=16)
    client_id: str | None = Field(default=None, max_length=128)
    prefetch: bool = Field(
        default=False,
        description="The client goes on to its next trial (an optimize loop): with a complete or pruned "
        "state, start that trial now, in the same step as this one ends, if the budget allows.",
    )


class StateWritten(BaseModel):
    updated: bool
    study_id: Id
    budget_left: int | None
    heartbeat_interval_s: float
    next_trial: FrozenTrialWire | None = Field(
        default=None, description="The running trial started for the client (``prefetch``), leased to it."
    )


class IntermediateWrite(BaseModel):
    model_config = _Strict
    step: Step
    value: Number


class HeartbeatBatch(BaseModel):
    model_config = _Strict
    trial_ids: list[Id] = Field(max_length=10_000)


class HeartbeatAnswer(BaseModel):
    lost: list[Id] = Field(description="Trials whose lease is gone (reaped, finished or never leased).")

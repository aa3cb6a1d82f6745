"""The bodies optuna-dashboard's write routes accept, checked before the dashboard sees them.

optuna-dashboard reads its JSON bodies without checking them (an empty body, a list, a string
where a number goes, a note version that is not a number, a malformed ``data:`` URI): each is a
500. :func:`body_refusal` answers them with a 422 in caviar's envelope, naming the field, and lets
through what the dashboard's own frontend sends. What needs the database (a finished trial) is
:class:`~caviar.service.dashboard.DashboardMount`'s to check.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import json
import re
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

MAX_DASHBOARD_BODY: Final = 64 * 1024 * 1024
"""The largest dashboard body read here (the service's body cap is smaller: it answers first)."""

_TEXT = Annotated[StrictStr, Field(max_length=100_000)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class CreateStudy(_Body):
    study_name: Annotated[StrictStr, Field(min_length=1, max_length=512)]
    directions: Annotated[list[Literal["minimize", "maximize"]], Field(min_length=1, max_length=100)]


class RenameStudy(_Body):
    study_name: Annotated[StrictStr, Field(min_length=1, max_length=512)]


class DeleteStudy(_Body):
    remove_associated_artifacts: StrictBool = True


class Note(_Body):
    version: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
    body: _TEXT


class Preference(_Body):
    mode: StrictStr
    candidates: Annotated[list[StrictInt], Field(max_length=1000)]
    clicked: StrictInt


class FeedbackComponent(_Body):
    output_type: Literal["note", "artifact"]
    artifact_key: StrictStr | None = None


class Tell(_Body):
    state: StrictStr
    values: Annotated[list[float], Field(max_length=1000)] | None = None


class UserAttrs(_Body):
    user_attrs: Annotated[dict[str, Any], Field(min_length=1, max_length=1000)]


class Upload(_Body):
    file: StrictStr
    filename: Annotated[StrictStr, Field(max_length=255)] = ""


_ID = r"-?\d+"
_ROUTES: Final[list[tuple[str, re.Pattern[str], type[_Body] | None]]] = [
    ("POST", re.compile(r"^/api/studies/?$"), CreateStudy),
    ("POST", re.compile(rf"^/api/studies/{_ID}/rename/?$"), RenameStudy),
    ("DELETE", re.compile(rf"^/api/studies/{_ID}/?$"), DeleteStudy),
    ("PUT", re.compile(rf"^/api/studies/{_ID}/note/?$"), Note),
    ("PUT", re.compile(rf"^/api/studies/{_ID}/{_ID}/note/?$"), Note),
    ("POST", re.compile(rf"^/api/studies/{_ID}/preference/?$"), Preference),
    ("PUT", re.compile(rf"^/api/studies/{_ID}/preference_feedback_component/?$"), FeedbackComponent),
    ("POST", re.compile(rf"^/api/trials/{_ID}/tell/?$"), Tell),
    ("POST", re.compile(rf"^/api/trials/{_ID}/user-attrs/?$"), UserAttrs),
    ("POST", re.compile(rf"^/api/artifacts/{_ID}(?:/{_ID})?/?$"), Upload),
]
"""The dashboard's routes that read a JSON body, and the body each takes (DELETE: optional)."""


def body_model(method: str, path: str) -> type[_Body] | None:
    """The body a dashboard write to ``path`` takes (None: it reads none, or it is no such route)."""
    for route_method, pattern, model in _ROUTES:
        if method == route_method and pattern.match(path):
            return model
    return None


def _data_uri_problem(value: str) -> str | None:
    """Why ``value`` is not a ``data:<type>;base64,<data>`` URI (None: it is one)."""
    prefix, _, rest = value.partition(":")
    header, comma, data = rest.partition(",")
    if prefix != "data" or not comma or not header.endswith(";base64"):
        return "must be a data URI: data:<media type>;base64,<data>"
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return "its data is not valid base64"
    return None


def body_refusal(method: str, path: str, body: bytes) -> tuple[str, str] | None:
    """Why a dashboard write's body is refused, as ``(field, message)``; None when it is fine.

    Args:
        method: the request's method.
        path: its path (a dashboard route).
        body: the whole body.
    """
    model = body_model(method, path)
    if model is None:
        return None
    if method == "DELETE" and not body.strip():
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return "body", "the body must be a JSON object"
    if not isinstance(data, dict):
        return "body", "the body must be a JSON object"
    try:
        checked = model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "body"
        return field, f"{field}: {error['msg']}"
    if isinstance(checked, Upload) and (problem := _data_uri_problem(checked.file)) is not None:
        return "file", f"file: {problem}"
    return None


PLOT: Final = re.compile(rf"^/api/studies/(?P<study>{_ID})/plot/(?P<kind>[^/]+)/?$")
"""optuna-dashboard's server-side plots (drawn with plotly, an optional package)."""


def plots_available() -> bool:
    """Whether server-side plots can be drawn here (plotly is installed)."""
    return importlib.util.find_spec("plotly") is not None

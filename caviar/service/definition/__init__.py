"""Study definitions: search spaces, samplers, pruners, budgets, and their Optuna mapping."""

from caviar.service.definition._auto import preload as preload_samplers
from caviar.service.definition._code import redact_env
from caviar.service.definition._codec import (
    REVERSE_PREFIX,
    decode,
    decode_params,
    decoded_name,
    encode,
    encode_params,
    is_reversed,
    search_scale,
    stored_name,
)
from caviar.service.definition._factories import (
    PRUNERS,
    SAMPLERS,
    allowed_options,
    build_pruner,
    build_sampler,
)
from caviar.service.definition._params import CheckedParams, check_params
from caviar.service.definition._parts import (
    MAX_SECONDS,
    NAME_PATTERN,
    Budget,
    Goal,
    PrunerSpec,
    SamplerSpec,
    WarmStart,
)
from caviar.service.definition._space import (
    CategoricalParam,
    FloatParam,
    IntParam,
    Param,
    is_active,
    sampling_order,
)
from caviar.service.definition._spec import (
    Objective,
    ObjectiveKind,
    StudyDefinition,
    StudyTemplate,
    check_finite,
    is_valid_name,
)

__all__ = [
    "MAX_SECONDS",
    "NAME_PATTERN",
    "PRUNERS",
    "REVERSE_PREFIX",
    "SAMPLERS",
    "Budget",
    "CategoricalParam",
    "CheckedParams",
    "FloatParam",
    "Goal",
    "IntParam",
    "Objective",
    "ObjectiveKind",
    "Param",
    "PrunerSpec",
    "SamplerSpec",
    "StudyDefinition",
    "StudyTemplate",
    "WarmStart",
    "allowed_options",
    "build_pruner",
    "build_sampler",
    "check_finite",
    "check_params",
    "decode",
    "decode_params",
    "decoded_name",
    "encode",
    "encode_params",
    "is_active",
    "is_reversed",
    "is_valid_name",
    "preload_samplers",
    "redact_env",
    "sampling_order",
    "search_scale",
    "stored_name",
]

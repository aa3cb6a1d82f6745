"""The study definition: pydantic models with every check of DESIGN.md."""

from __future__ import annotations

import functools
import json
import math
import re
import zlib
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from optuna.distributions import BaseDistribution
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.study import StudyDirection
from pydantic import Field, ValidationInfo, field_validator, model_validator

from caviar.service.definition._auto import WARMUP, AutoChoice, Shape, SobolWarmup, choose
from caviar.service.definition._code import (
    MetricsSpec,
    check_env_names,
    check_output_glob,
    command_placeholders,
)
from caviar.service.definition._codec import stored_name
from caviar.service.definition._factories import (
    build_pruner,
    build_sampler,
    grid_values,
    trial_seed,
)
from caviar.service.definition._parts import (
    MAX_CHOICES,
    NAME_PATTERN,
    Budget,
    PrunerSpec,
    SamplerSpec,
    Scalar,
    WarmStart,
    _Strict,
)
from caviar.service.definition._pbt import check_pbt
from caviar.service.definition._space import (
    MAX_GRID_POINTS,
    PARAM_NAME_PATTERN,
    RESERVED_PREFIXES,
    CategoricalParam,
    FloatParam,
    IntParam,
    Param,
    grid_size,
    sampling_order,
)
from caviar.service.types import TagText, nul_path
from caviar.trainer.spec import DATASETS, METRICS, MODELS, TUNABLE, TrialConfig

_NAME_RE = re.compile(NAME_PATTERN)


FILE_PREFIX = "file:"
DATA_FILE_SUFFIXES = (".csv", ".npz", ".parquet")


def check_data_file(path: str) -> None:
    """Refuse a ``file:`` dataset path that could leave the data root (``CAVIAR_DATA_DIR``).

    The path is relative, has no ``..`` part and no backslash or NUL, and names a .csv, .npz or
    .parquet file; workers resolve it under their own data root and check it again after
    following links.
    """
    pure = PurePosixPath(path)
    if not path or path.startswith(("/", "~")) or pure.is_absolute() or re.match(r"^[A-Za-z]:", path):
        raise ValueError("dataset: file: paths are relative to the data root (CAVIAR_DATA_DIR)")
    if ".." in pure.parts or "\\" in path or any(ord(c) < 32 for c in path):
        raise ValueError("dataset: file: paths may not contain '..', backslashes or control characters")
    if pure.suffix.lower() not in DATA_FILE_SUFFIXES:
        raise ValueError(f"dataset: file: datasets are {', '.join(DATA_FILE_SUFFIXES)} files")


ObjectiveKind = Literal["trainer", "external", "python", "command"]
"""What runs a trial: caviar's built-in trainer, an external client that asks and tells, or user code
that a worker runs when its ``--allow-code`` list names it (a Python function, or a command)."""

CODE_KINDS = ("python", "command")
ENTRYPOINT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
COMMAND_PLACEHOLDERS = ("study", "number")
"""Placeholders every command may use besides its parameters: the study's name, the trial's number."""


class Objective(_Strict):
    """What a trial runs.

    ``trainer``: caviar's built-in PyTorch trainer (``dataset``, ``model``, ``max_epochs``, ``fixed``,
    ``fuse``). ``external``: a client asks and tells. ``python``: a worker calls ``entrypoint``
    (``"package.module:function"``) with a :class:`caviar.Trial`. ``command``: a worker runs
    ``command`` with plain ``{param}`` placeholders filled in (and ``env``, which may not set loader,
    interpreter or caviar variables). User code runs only on workers whose ``--allow-code`` list
    names it, one child process per trial, at most ``timeout_s`` (see docs/security-code.md).
    """

    kind: ObjectiveKind = "external"
    dataset: str | None = Field(
        default=None, max_length=1024, description="digits | breast_cancer | wine | synthetic | file:PATH"
    )
    target: str = Field(default="target", max_length=256, description="Target column of a CSV/Parquet file.")
    model: str = Field(default="mlp", max_length=32, description="The trainer's model: " + " | ".join(MODELS))
    max_epochs: int = Field(default=20, ge=1, le=100_000)
    validation_split: float = Field(default=0.2, gt=0, lt=1)
    fixed: dict[
        Annotated[str, Field(max_length=64)], Annotated[Scalar, Field(union_mode="left_to_right")]
    ] = Field(
        default_factory=dict, max_length=256, description="Hyperparameters held constant (JSON scalars)."
    )
    fuse: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Train up to this many trials fused (kind python: the entrypoint gets a list of trials).",
    )
    shared: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None,
        max_length=256,
        description="kind python with fuse: the parameters every member of a fused group shares (the "
        "architecture); default: every declared int and categorical parameter",
    )
    entrypoint: str | None = Field(
        default=None, max_length=256, description="kind python: the function to call, package.module:function"
    )
    command: list[Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None, min_length=1, max_length=256, description="kind command: argv with {param} placeholders"
    )
    env: dict[str, Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=dict, max_length=64, description="kind python/command: extra environment variables"
    )
    timeout_s: float | None = Field(
        default=None, gt=0, le=30 * 86400, description="kind python/command: kill and fail a trial after this"
    )
    metrics: MetricsSpec | None = Field(
        default=None, description="kind command: read the metrics from the program's own output."
    )
    outputs: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list,
        max_length=64,
        description="kind python/command: globs of files in the trial's directory (checkpoint.pt, *.png) "
        "the worker stores as the trial's artifacts when it ends",
    )

    @model_validator(mode="after")
    def _check(self) -> Objective:
        if self.kind == "trainer":
            if not self.dataset:
                raise ValueError("dataset is required for kind trainer")
            if self.dataset.startswith(FILE_PREFIX):
                check_data_file(self.dataset.removeprefix(FILE_PREFIX))
            elif self.dataset not in DATASETS:
                raise ValueError(
                    f"dataset must be one of {', '.join(DATASETS)} or file:PATH, got {self.dataset!r}"
                )
            if self.model not in MODELS:
                raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")
            unknown = sorted(set(self.fixed) - TUNABLE)
            if unknown:
                raise ValueError(f"fixed: unknown trainer hyperparameter {unknown[0]!r}")
            try:
                TrialConfig.from_params(self.fixed)
            except ValueError as exc:
                raise ValueError(f"fixed: {exc}") from None
        if self.kind == "python":
            if not self.entrypoint or not re.match(ENTRYPOINT_PATTERN, self.entrypoint):
                raise ValueError(
                    f"entrypoint: kind python needs package.module:function (got {self.entrypoint!r})"
                )
        elif self.entrypoint is not None:
            raise ValueError("entrypoint: only for kind python")
        if self.shared is not None and (self.kind != "python" or self.fuse is None):
            raise ValueError("shared: only for kind python with fuse")
        if self.kind == "command":
            if not self.command:
                raise ValueError("command: kind command needs a command (a list of arguments)")
            if any("\x00" in part for part in self.command):
                raise ValueError("command: arguments may not contain NUL characters")
        elif self.command is not None:
            raise ValueError("command: only for kind command")
        if self.metrics is not None and self.kind != "command":
            raise ValueError("metrics: only for kind command")
        if self.kind not in CODE_KINDS and (self.env or self.timeout_s is not None):
            raise ValueError("env and timeout_s: only for kind python or command")
        if self.outputs and self.kind not in CODE_KINDS:
            raise ValueError("outputs: only for kind python or command")
        for index, pattern in enumerate(self.outputs):
            check_output_glob(index, pattern)
        for name, value in self.env.items():
            if "\x00" in value:
                raise ValueError(f"env.{name}: may not contain NUL characters")
        return self


class StudyTemplate(_Strict):
    """A study definition without its name (schedules stamp one on per run)."""

    direction: Literal["maximize", "minimize"] | None = None
    directions: list[Literal["maximize", "minimize"]] | None = Field(
        default=None, min_length=1, max_length=16
    )
    metric: str | list[str] | None = None
    objective: Objective = Field(default_factory=Objective)
    search_space: dict[str, Param] = Field(
        default_factory=dict,
        validate_default=True,
        description="Declared parameters. Optional for external, python and command objectives: their code "
        "may suggest undeclared ones (define-by-run).",
    )
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    budget: Budget = Field(default_factory=Budget)
    warm_start: WarmStart | None = None
    priority: int = Field(default=0, ge=-1_000_000, le=1_000_000)
    tags: dict[TagText, TagText] = Field(default_factory=dict, max_length=64)

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        where = nul_path(data)
        if where:
            raise ValueError(f"{where}: must not contain NUL characters")
        return data

    @field_validator("search_space")
    @classmethod
    def _check_space(cls, space: dict[str, Param], info: ValidationInfo) -> dict[str, Param]:
        objective = info.data.get("objective")
        if not space and (not isinstance(objective, Objective) or objective.kind == "trainer"):
            # external, python and command objectives may declare none: their code (or an Optuna
            # storage's client) suggests its parameters as it runs (define-by-run)
            raise ValueError("search_space must define at least one parameter (the trainer needs its space)")
        if len(space) > 256:
            raise ValueError("search_space may define at most 256 parameters")
        if sum(len(p.choices) for p in space.values() if isinstance(p, CategoricalParam)) > MAX_CHOICES:
            raise ValueError(f"search_space may define at most {MAX_CHOICES} categorical choices in all")
        for name, param in space.items():
            if not re.match(PARAM_NAME_PATTERN, name):
                raise ValueError(f"{name!r}: parameter names must match {PARAM_NAME_PATTERN}")
            if name.startswith(RESERVED_PREFIXES):
                raise ValueError(f"{name!r}: parameter names may not start with 'one_minus_' or 'caviar'")
            for parent, allowed in (param.when or {}).items():
                parent_param = space.get(parent)
                if not isinstance(parent_param, CategoricalParam):
                    raise ValueError(f"{name}.when: parent {parent!r} must be a categorical parameter")
                missing = [v for v in allowed if v not in parent_param.choices]
                if missing or not allowed:
                    raise ValueError(
                        f"{name}.when.{parent}: values must be among its choices (got {allowed!r})"
                    )
        sampling_order(space)  # raises on cycles
        if isinstance(objective, Objective) and objective.kind == "trainer":
            for name in space:
                if name not in TUNABLE:
                    raise ValueError(
                        f"{name!r} is not a trainer hyperparameter (known: {', '.join(sorted(TUNABLE))})"
                    )
                if name in objective.fixed:
                    raise ValueError(f"{name!r} is both searched and fixed")
        return space

    @field_validator("tags")
    @classmethod
    def _check_tags(cls, tags: dict[str, str]) -> dict[str, str]:
        for key, value in tags.items():
            if not 1 <= len(key) <= 64 or len(value) > 256:
                raise ValueError("tag keys are 1-64 characters, values at most 256")
        return tags

    @model_validator(mode="after")
    def _check_objectives(self) -> StudyTemplate:
        if self.direction is not None and self.directions is not None:
            raise ValueError("directions: give either direction or directions, not both")
        n = len(self.directions) if self.directions else 1
        metrics = self.metrics
        if len(metrics) != n:
            raise ValueError(f"metric: {len(metrics)} metric name(s) for {n} direction(s)")
        if len(set(metrics)) != len(metrics):
            raise ValueError("metric: names must be unique")
        if self.budget.goal is not None and n > 1:
            raise ValueError("budget.goal: a goal is for single-objective studies")
        if self.objective.kind == "trainer":
            unknown = [m for m in metrics if m not in METRICS]
            if unknown:
                raise ValueError(f"metric: the trainer reports {', '.join(METRICS)}, not {unknown[0]!r}")
        check_env_names(self.objective.env)
        if self.objective.kind == "command" and self.objective.command:
            unknown = sorted(
                command_placeholders(self.objective.command)
                - set(self.search_space)
                - set(COMMAND_PLACEHOLDERS)
            )
            if unknown:
                raise ValueError(
                    f"objective.command: placeholder {{{unknown[0]}}} names no parameter "
                    f"(parameters: {', '.join(self.search_space)}; also {', '.join(COMMAND_PLACEHOLDERS)})"
                )
        if self.sampler.type == "grid":
            if not self.search_space:
                raise ValueError(
                    "sampler: grid needs a declared search_space (it cannot sample undeclared parameters)"
                )
            points = 1
            for name, param in self.search_space.items():
                if param.when:
                    raise ValueError(f"sampler: grid cannot sample conditional parameter {name!r}")
                if isinstance(param, FloatParam) and param.step is None:
                    raise ValueError(f"sampler: grid needs a step for float parameter {name!r}")
                points *= grid_size(param)
                if points > MAX_GRID_POINTS:
                    raise ValueError(f"sampler: the grid has more than {MAX_GRID_POINTS} points")
        if self.pruner.type == "pbt":
            o = self.objective
            check_pbt(self.pruner.options, o.kind, o.fuse, o.max_epochs, self.search_space, n)
        try:
            self.sampler_for(0)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sampler: invalid {self.sampler.type} options: {exc}") from exc
        return self

    # ---- derived views -------------------------------------------------------------------

    @property
    def metrics(self) -> list[str]:
        """The names of the optimised metrics, one per direction."""
        if self.metric is None:
            default = "val_accuracy" if self.objective.kind == "trainer" else "value"
            n = len(self.directions) if self.directions else 1
            return [default] if n == 1 else [f"{default}_{i}" for i in range(n)]
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def study_directions(self) -> list[StudyDirection]:
        """Optuna's directions, one per objective."""
        names = self.directions or [self.direction or "maximize"]
        return [StudyDirection.MAXIMIZE if d == "maximize" else StudyDirection.MINIMIZE for d in names]

    @property
    def uses_data_file(self) -> bool:
        """Whether trials read a ``file:`` dataset (allowed over REST only with a data root)."""
        return (self.objective.dataset or "").startswith(FILE_PREFIX)

    @property
    def multi_objective(self) -> bool:
        return len(self.study_directions) > 1

    def distributions(self) -> dict[str, BaseDistribution]:
        """Optuna distributions keyed by stored name (``one_minus_<name>`` for reverse_log)."""
        return {stored_name(name, p): p.distribution() for name, p in self.search_space.items()}

    def grid(self) -> dict[str, list[Any]]:
        """The grid sampler's search space, by stored name."""
        grid: dict[str, list[Any]] = {}
        for name, param in self.search_space.items():
            if isinstance(param, CategoricalParam):
                grid[name] = list(param.choices)
            elif isinstance(param, IntParam):
                grid[name] = list(range(param.low, param.high + 1, param.step))
            elif param.step is not None:
                grid[stored_name(name, param)] = grid_values(param.low, param.high, param.step)
        return grid

    def sampler_for(self, trial_number: int) -> BaseSampler:
        """The study's sampler, seeded for ``trial_number`` (auto: the stage that samples it)."""
        if self.sampler.type == "auto":
            stage = self.auto_choice.stage_for(trial_number)
            if stage.type == WARMUP:
                unconditional = {
                    stored_name(name, p): p.distribution()
                    for name, p in self.search_space.items()
                    if not p.when
                }
                return SobolWarmup(
                    unconditional, self._stream_seed, trial_seed(self.sampler.seed, trial_number)
                )
            return build_sampler(
                stage.type, dict(stage.options), self.sampler.seed, trial_number=trial_number
            )
        grid = self.grid() if self.sampler.type == "grid" else None
        return build_sampler(
            self.sampler.type, self.sampler.options, self.sampler.seed, grid=grid, trial_number=trial_number
        )

    @functools.cached_property
    def auto_choice(self) -> AutoChoice:
        """What ``{type: auto}`` chooses for this study's space, objectives and budget."""
        space = self.search_space.values()
        return choose(
            Shape(
                numeric=sum(1 for p in space if not isinstance(p, CategoricalParam)),
                categorical=sum(1 for p in space if isinstance(p, CategoricalParam)),
                # no declared space: the code suggests its parameters, maybe conditionally
                conditional=sum(1 for p in space if p.when) or int(not self.search_space),
                objectives=len(self.study_directions),
                n_trials=self.budget.n_trials,
                max_parallel=self.budget.max_parallel,
            )
        )

    def warmup_trials(self) -> int:
        """Trials the sampler draws before it models results (random or Sobol start-up points).

        Workers train these unfused: every start-up trial gets its own draw of the non-fusible
        hyperparameters (architecture, batch size, optimizer), as in an unfused study.
        """
        if self.sampler.type == "auto":
            later = [stage.start for stage in self.auto_choice.stages if stage.type != WARMUP]
            return min(later, default=self.budget.n_trials)
        if self.sampler.type in ("tpe", "gp"):
            return int(self.sampler.options.get("n_startup_trials", 10))
        return 0

    def sampler_description(self) -> dict[str, Any]:
        """The sampler as the API and the dashboard (study attribute ``caviar:sampler``) show it."""
        if self.sampler.type == "auto":
            return {**self.auto_choice.describe(), "seed": self.sampler.seed}
        return self.sampler.model_dump(mode="json")

    @functools.cached_property
    def _stream_seed(self) -> int:
        """The seed of sequences shared by all trials (Sobol's scramble): the study's seed, else a hash
        of what no edit changes (name, objective, search space), the same in every server process
        and before and after a PATCH of the budget."""
        if self.sampler.seed is not None:
            return self.sampler.seed
        fixed = self.model_dump(mode="json", include={"name", "objective", "search_space"})
        return zlib.crc32(json.dumps(fixed, sort_keys=True).encode())

    def build_pruner(self) -> BasePruner:
        """The study's pruner (Hyperband's max_resource defaults to the trainer's max_epochs)."""
        max_resource = self.objective.max_epochs if self.objective.kind == "trainer" else None
        return build_pruner(self.pruner.type, self.pruner.options, max_resource=max_resource)


class StudyDefinition(StudyTemplate):
    """A full study definition: a template with a unique name."""

    name: str = Field(pattern=NAME_PATTERN, max_length=128)

    @model_validator(mode="after")
    def _not_from_itself(self) -> StudyDefinition:
        if self.warm_start is not None and self.warm_start.source == self.name:
            raise ValueError("warm_start.from: a study cannot warm-start from itself")
        return self

    @classmethod
    def from_template(cls, name: str, template: dict[str, Any]) -> StudyDefinition:
        """Stamp ``name`` onto a template."""
        return cls.model_validate({**template, "name": name})


def is_valid_name(name: str) -> bool:
    """Whether ``name`` is a valid study or schedule name."""
    return bool(_NAME_RE.match(name))


def check_finite(values: list[float]) -> None:
    """Refuse NaN and infinity (Python's json accepts the ``NaN`` literal)."""
    for value in values:
        if not math.isfinite(value):
            raise ValueError(f"values must be finite numbers (got {value})")

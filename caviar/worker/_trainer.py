"""Running ``kind: trainer`` studies: fused groups of the built-in trainer on the slot's device.

With ``--fuse K`` (or the study's ``objective.fuse``) the slot claims one trial, then up to K - 1
more whose non-fusible hyperparameters are pinned to the first one's (the sampler chooses the
rest), and trains them as one group with :func:`caviar.trainer.train_group`. A member that leaves
(pruned, early-stopped, done) is told at once, and a newly claimed trial takes its place when the
sampler's free choice for it shares the group's non-fusible values; the first that does not
starts the next group, so architecture, batch size and optimizer stay under search.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from caviar import trainer
from caviar._client import Trial
from caviar.trainer.spec import FUSIBLE, PERTURBABLE, TrialConfig
from caviar.worker._api import Stopped
from caviar.worker._asha import Rungs, decide_epoch

if TYPE_CHECKING:
    from caviar.worker._types import SlotLike

_log = logging.getLogger("caviar.worker")


class DataFileRefused(ValueError):
    """A ``file:`` dataset this worker may not read."""


def resolve_data_file(data_dir: str | None, relative: str) -> Path:
    """The path of a ``file:`` dataset: inside ``data_dir``, checked again after following links.

    Raises:
        DataFileRefused: no data root, an absolute path, ``..``, a path that leaves the root
            through a link, or no such file; the message never says which file exists.
    """
    if not data_dir:
        raise DataFileRefused("this worker reads no file datasets (CAVIAR_DATA_DIR is unset)")
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts or not relative:
        raise DataFileRefused("file datasets are paths relative to the data root, without '..'")
    root = Path(data_dir).resolve()
    resolved = (root / candidate).resolve()
    if not resolved.is_relative_to(root) or not resolved.is_file():
        raise DataFileRefused(f"dataset file:{relative} is not available in this worker's data root")
    return resolved


def data_error(spec: str, exc: Exception) -> str:
    """A trial's fail reason for a dataset that could not be loaded: never the file's contents.

    Only caviar's own messages (which name the problem, not the data) are passed on; a parser's
    message may quote the file, so other errors are reported by their type alone.
    """
    if isinstance(exc, DataFileRefused | trainer.DatasetError):
        return str(exc)
    return f"dataset {spec} could not be read ({type(exc).__name__})"


def _attr(value: float) -> float | str:
    """A metric as a trial attribute (non-finite values as text: attributes are JSON numbers)."""
    return value if math.isfinite(value) else str(value)


MAX_LINEAGE_ATTRS = 16
"""Lineage entries kept per trial as ``pbt_<n>`` attributes (the latest; ``pbt_exploits`` counts all)."""


def pbt_settings(definition: dict[str, Any], seed: int) -> trainer.PBT | None:
    """The PBT settings of a ``pruner: {type: pbt}`` study (ranges from its search space), else None."""
    pruner = definition.get("pruner") or {}
    if pruner.get("type") != "pbt":
        return None
    options = pruner.get("options") or {}
    perturb = options.get("perturb") or {}
    space: dict[str, Any] = definition.get("search_space") or {}

    def numeric(param: dict[str, Any]) -> bool:
        choices = param.get("choices") or []
        return param.get("type") == "float" or (
            param.get("type") == "categorical"
            and all(isinstance(c, int | float) and not isinstance(c, bool) for c in choices)
        )

    names = perturb.get("params") or [n for n, p in space.items() if n in PERTURBABLE and numeric(p)]
    dimensions = []
    for name in names:
        param = space.get(name) or {}
        if param.get("type") == "categorical":
            dimensions.append(trainer.Dimension(name, choices=tuple(float(c) for c in param["choices"])))
        elif param.get("type") == "float":
            low, high = float(param["low"]), float(param["high"])
            step = param.get("step")
            scale = str(param.get("scale", "linear"))
            dimensions.append(
                trainer.Dimension(name, low, high, scale, None if step is None else float(step))
            )
    return trainer.PBT(
        tuple(dimensions),
        interval=int(options.get("interval", 4)),
        quantile=float(options.get("quantile", 0.25)),
        factors=tuple(float(f) for f in perturb.get("factors", (0.8, 1.2))),
        resample_probability=float(options.get("resample_probability", 0.25)),
        seed=seed,
        maximize=(definition.get("directions") or [definition.get("direction") or "maximize"])[0]
        == "maximize",
    )


def lineage_attrs(
    entries: list[dict[str, Any]], config: TrialConfig, settings: trainer.PBT
) -> dict[str, Any]:
    """A trial's PBT lineage as user attributes (JSON scalars: entries are JSON text)."""
    if not entries:
        return {}
    attrs: dict[str, Any] = {
        "pbt_exploits": len(entries),
        "pbt_parent": entries[-1]["parent"],
        "pbt_step": entries[-1]["step"],
        "pbt_params": json.dumps(
            {d.name: float(f"{getattr(config, d.name):.6g}") for d in settings.dimensions}
        ),
    }
    first = max(0, len(entries) - MAX_LINEAGE_ATTRS)
    for number, entry in enumerate(entries[first:], start=first + 1):
        attrs[f"pbt_{number}"] = json.dumps(entry, separators=(",", ":"))[:1000]
    return attrs


def non_fusible(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in FUSIBLE}


def group_key(config: TrialConfig) -> tuple[tuple[str, str], ...]:
    """What members of one fused group must share."""
    return tuple(sorted((k, str(v)) for k, v in config.to_params().items() if k not in FUSIBLE))


class TrainerRunner:
    """Claims and trains trials of built-in trainer studies for one slot."""

    kind = "trainer"

    def __init__(self, slot: SlotLike) -> None:
        self.slot = slot
        self.max_fuse: int | None = None  # lowered after an out-of-memory error
        self._started: dict[str, int] = {}  # study -> trials started, as far as this slot's asks tell
        self._datasets: dict[tuple[str, float, str], trainer.Dataset] = {}
        if slot.device == "cpu":
            torch.set_num_threads(slot.threads)

    def run(self, study: dict[str, Any]) -> bool:
        """Claim a group of trials of ``study`` and train it; False when there was nothing to claim.

        The dataset is loaded before any trial is claimed, so no lease is held while it loads.
        """
        try:
            data: trainer.Dataset | Exception = self._dataset(study)
        except Exception as exc:
            data = exc
        group = self._claim(study, self._fuse_size(study))
        if not group:
            return False
        if isinstance(data, Exception):
            reason = data_error(study["definition"]["objective"]["dataset"], data)
            for trial in group:
                self.slot.finish(trial, "fail", reason=reason)
            return True
        self._train(study, data, group)
        return True

    def _fuse_size(self, study: dict[str, Any]) -> int:
        pbt = (study["definition"].get("pruner") or {}).get("type") == "pbt"  # a population from the start
        # the study's count when it was listed, or what this slot's own asks have seen since
        started = max(study.get("trials_started", 0), self._started.get(study["name"], 0))
        if not pbt and started < study.get("warmup_trials", 0):
            # the sampler's start-up points: each trial keeps its own draw of every hyperparameter
            return 1
        size = self.slot.options.fuse or study["definition"]["objective"].get("fuse") or 1
        return int(max(1, min(size, self.max_fuse or size)))

    def _claim(
        self, study: dict[str, Any], count: int, fixed: dict[str, Any] | None = None, *, pin: bool = True
    ) -> list[Trial]:
        """Ask up to ``count`` trials; with ``pin``, all share non-fusible values (the first one's,
        unless ``fixed``), else each is the sampler's free choice."""
        group: list[Trial] = []
        for _ in range(count):
            trial = self.slot.ask(study["name"], fixed=fixed)
            if trial is None:
                break
            group.append(trial)
            self._started[study["name"]] = max(self._started.get(study["name"], 0), trial.number + 1)
            if fixed is None and pin:
                # the rest of the group shares the first trial's non-fusible hyperparameters
                fixed = non_fusible(trial.params)
        return group

    def _config(self, study: dict[str, Any], params: dict[str, Any]) -> TrialConfig:
        objective = study["definition"]["objective"]
        return TrialConfig.from_params(
            {
                **objective.get("fixed", {}),
                **params,
                "model": objective.get("model", "mlp"),
                "max_epochs": objective.get("max_epochs", 20),
                "device": self.slot.device,
            }
        )

    def _dataset(self, study: dict[str, Any]) -> trainer.Dataset:
        objective = study["definition"]["objective"]
        spec = str(objective["dataset"])
        split = float(objective.get("validation_split", 0.2))
        target = str(objective.get("target", "target"))
        key = (spec, split, target)
        if key not in self._datasets:
            source: str | Path = spec
            if spec.startswith("file:"):
                source = resolve_data_file(self.slot.options.data_dir, spec.removeprefix("file:"))
            self._datasets[key] = trainer.load_dataset(source, split, seed=0, target=target)
        return self._datasets[key]

    def _train(self, study: dict[str, Any], data: trainer.Dataset, group: list[Trial]) -> None:
        # Trials handed out first may be retries with other non-fusible values: train them apart.
        subgroups: dict[tuple[Any, ...], list[tuple[Trial, TrialConfig]]] = {}
        for trial in group:
            try:
                config = self._config(study, trial.params)
            except ValueError as exc:
                self.slot.finish(trial, "fail", reason=f"invalid trainer config: {exc}")
                continue
            subgroups.setdefault(group_key(config), []).append((trial, config))
        for members in subgroups.values():
            if self.slot.stop.is_set():
                return
            # a group smaller than the fused size (a retry, a trial that did not fit the last group)
            # is topped up with trials pinned to its non-fusible values
            for trial in self._claim(
                study, self._fuse_size(study) - len(members), non_fusible(members[0][0].params)
            ):
                try:
                    members.append((trial, self._config(study, trial.params)))
                except ValueError as exc:
                    self.slot.finish(trial, "fail", reason=f"invalid trainer config: {exc}")
            self._train_members(study, data, [t for t, _ in members], [c for _, c in members])

    def _train_members(
        self, study: dict[str, Any], data: trainer.Dataset, members: list[Trial], configs: list[TrialConfig]
    ) -> None:
        slot = self.slot
        trials = list(members)  # grows as refills join; index = member index in train_group
        metrics: list[str] = study["metrics"]

        def report(entries: list[tuple[int, int, float]]) -> set[int]:
            # one request for the whole epoch, in the given order (see caviar.worker._asha)
            answers = slot.should_prune_many([(trials[m], step, value) for m, step, value in entries])
            return {m for (m, _, _), prune in zip(entries, answers, strict=True) if prune}

        settings = pbt_settings(study["definition"], seed=trials[0].number)
        lineage: dict[int, list[dict[str, Any]]] = {}

        def exploited(event: trainer.Exploit) -> None:
            def short(values: dict[str, float]) -> dict[str, float]:
                return {k: float(f"{v:.6g}") for k, v in values.items()}

            def score(value: float) -> float | None:  # JSON has no NaN: a diverged member's is null
                return float(f"{value:.6g}") if math.isfinite(value) else None

            lineage.setdefault(event.member, []).append(
                {
                    "step": event.step,
                    "parent": trials[event.parent].number,
                    "score": score(event.score),
                    "parent_score": score(event.parent_score),
                    "old": short(event.old),
                    "new": short(event.new),
                }
            )

        population = None if settings is None else trainer.Population(settings, exploited)

        def record(member: int, result: trainer.TrialResult) -> None:
            # told the moment it leaves the group: the sampler and pruner see it at once
            extra = (
                {} if settings is None else lineage_attrs(lineage.get(member, []), result.config, settings)
            )
            self._tell(trials[member], metrics, result, extra)

        key = group_key(configs[0])
        capacity = len(configs)
        warmup = study.get("warmup_trials", 0)
        warmup_group = trials[0].number < warmup  # formed of the sampler's start-up trials
        leftovers: list[Trial] = []

        def refill(free: int) -> list[TrialConfig]:
            # New trials take the places of members that left. Each is the sampler's free choice
            # over the whole space (not pinned to this group), so non-fusible hyperparameters keep
            # being searched: one that shares this group's values joins it, the first that does not
            # seeds the next group (and ends this group's refills). So does the first trial after
            # the warm-up offered to a group formed in it (a group of one, smaller than the fused
            # size): the next group is formed at the full size, not refilled at one.
            if slot.stop.is_set() or leftovers:
                return []
            joining: list[TrialConfig] = []
            for _ in range(free):
                claimed = self._claim(study, 1, pin=False)
                if not claimed:
                    break
                trial = claimed[0]
                try:
                    config = self._config(study, trial.params)
                except ValueError as exc:
                    slot.finish(trial, "fail", reason=f"invalid trainer config: {exc}")
                    continue
                grown = warmup_group and trial.number >= warmup and self._fuse_size(study) > capacity
                if group_key(config) != key or grown:
                    leftovers.append(trial)  # it seeds the next group
                    break
                trials.append(trial)
                joining.append(config)
            return joining

        # asha: members at a rung are ranked together (the group is a cohort), see caviar.worker._asha
        rungs = Rungs.of(study["definition"])
        by_rungs = None if rungs is None else functools.partial(decide_epoch, rungs=rungs, report=report)
        try:
            trainer.train_group(
                configs,
                data,
                metric=metrics[0],
                on_result=record,
                refill=refill,
                interrupt=slot.stop,
                report_epoch=by_rungs or report,
                population=population,
            )
        except (Stopped, trainer.Interrupted):
            return  # everything held is handed back when the slot stops
        except torch.cuda.OutOfMemoryError:
            held = slot.still_held(trials)
            if len(held) > 1:
                self.max_fuse = max(1, len(held) // 2)
                _log.warning(
                    "out of memory with %d fused trials; handing back, fusing %d", len(held), self.max_fuse
                )
                for trial in held:
                    slot.hand_back(trial, "out of memory in a fused group; retried with a smaller group")
            else:
                for trial in held:
                    slot.finish(trial, "fail", reason="CUDA out of memory")
        except Exception as exc:
            _log.exception("training failed for trials %s of %s", [t.number for t in trials], study["name"])
            for trial in slot.still_held(trials):
                slot.finish(trial, "fail", reason=f"{type(exc).__name__}: {exc}"[:2000])
        if leftovers and not slot.stop.is_set():
            self._train(study, data, leftovers)

    def _tell(
        self,
        trial: Trial,
        metrics: list[str],
        result: trainer.TrialResult,
        extra: dict[str, Any] | None = None,
    ) -> None:
        slot = self.slot
        attrs: dict[str, Any] = {
            **(extra or {}),
            "epochs": result.epochs,
            "train_seconds": round(result.seconds, 3),
            "device": slot.device,
            "worker": slot.worker_id,
            **{f"final_{k}": _attr(v) for k, v in result.metrics.items()},
        }
        if result.pruned:
            slot.finish(trial, "pruned", user_attrs=attrs)
            return
        diverged = {k: v for k, v in result.metrics.items() if not math.isfinite(v)}
        if diverged:  # a NaN loss fails the trial with its reason, even when accuracy looks finite
            slot.finish(trial, "fail", reason=f"training diverged: {diverged}", user_attrs=attrs)
            return
        if not slot.is_lost(trial):
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "checkpoint.pt")
                result.save(path)
                try:
                    trial.upload(path)
                except Exception as exc:  # the result still counts without its weights
                    _log.warning("checkpoint upload of trial %d failed: %s", trial.number, exc)
        slot.finish(trial, "complete", values=[result.metrics[m] for m in metrics], user_attrs=attrs)

"""``caviar worker``: one process per device slot drawing trials from the study queue.

The parent discovers device slots (GPUs respecting ``CUDA_VISIBLE_DEVICES`` and ``--gpus``,
``--per-gpu`` slots each, plus ``--cpu`` CPU slots), spawns one process per slot and restarts a
child that dies. Each slot claims trials through the same domain code as the REST ask (directly
on the database, no HTTP hop), trains them with :func:`trainer.train_group` (fused groups of up
to K trials), reports every epoch for pruning, heartbeats from a background thread and tells the
result. SIGTERM/SIGINT: take no new work, hand the running trials back for retry, exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, TypeVar

import torch
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, OperationalError
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from service.db import Database
from service.definition import StudyDefinition
from service.errors import CaviarError, Conflict, RateLimited
from service.studies.service import definition_of
from service.trials import service as trials
from service.trials.artifacts import artifact_store, save_checkpoint
from service.workers.service import register_worker, touch_worker
from storage import StudyRecord
from trainer._config import FUSIBLE, TrialConfig
from trainer._data import Dataset, load_dataset
from trainer._train import TrialResult, train_group

_log = logging.getLogger("caviar.worker")
T = TypeVar("T")
DB_ERRORS = (OperationalError, DBAPIError)


@dataclass
class WorkerOptions:
    """Options of ``caviar worker`` (one instance is shared by every slot)."""

    database_url: str
    gpus: str = "all"
    per_gpu: int = 1
    cpu: int | None = None
    studies: Sequence[str] = ()
    fuse: int | None = None
    max_trials: int | None = None
    heartbeat_interval_s: float = 30.0
    poll_interval_s: float = 2.0
    artifact_dir: str = "./caviar-artifacts"
    exit_when_idle_s: float | None = None
    db_retry_s: float = 300.0
    worker_prefix: str = field(default_factory=socket.gethostname)


class Stopped(Exception):
    """Raised inside training when the slot was asked to stop."""


# ---- devices and the supervisor ------------------------------------------------------------


def discover_slots(gpus: str, per_gpu: int, cpu: int | None) -> list[str]:
    """Device names of the slots to start: ``cuda:N`` (``per_gpu`` each) then ``cpu`` slots.

    ``gpus`` is ``all``, ``none`` or a comma-separated list of indices (of the devices visible
    through ``CUDA_VISIBLE_DEVICES``). With no GPU slot and ``cpu`` unset, one CPU slot starts.
    """
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == "none":
        indices: list[int] = []
    elif gpus == "all":
        indices = list(range(available))
    else:
        try:
            indices = [int(part) for part in gpus.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"--gpus must be all, none or a list like 0,1 (got {gpus!r})") from None
        missing = [i for i in indices if i >= available]
        if missing:
            raise ValueError(f"--gpus: GPU {missing[0]} is not visible ({available} visible)")
    slots = [f"cuda:{i}" for i in indices for _ in range(per_gpu)]
    n_cpu = cpu if cpu is not None else (0 if slots else 1)
    slots.extend("cpu" for _ in range(n_cpu))
    return slots


def run_workers(options: WorkerOptions) -> int:
    """Start one process per slot and supervise them until they finish or SIGTERM arrives.

    Returns:
        The exit status (0 after a clean stop).
    """
    slots = discover_slots(options.gpus, options.per_gpu, options.cpu)
    if not slots:
        raise ValueError("no device slots: pass --cpu N or make a GPU visible")
    cpu_slots = sum(1 for s in slots if s == "cpu")
    threads = max(1, (os.cpu_count() or 1) // max(1, cpu_slots))
    ctx = multiprocessing.get_context("spawn")
    stopping = threading.Event()

    def start(index: int) -> BaseProcess:
        child = ctx.Process(
            target=run_slot, args=(options, slots[index], index, threads), name=f"slot{index}"
        )
        child.start()
        return child

    def stop(signum: int, _frame: Any) -> None:
        stopping.set()
        for child in children:
            if child.pid and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)

    children = [start(i) for i in range(len(slots))]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"caviar worker: {len(slots)} slot(s): {', '.join(slots)}", flush=True)
    done = [False] * len(children)
    restarts = [0.0] * len(children)
    while not all(done):
        time.sleep(0.2)
        for i, child in enumerate(children):
            if done[i] or child.is_alive():
                continue
            if child.exitcode == 0 or stopping.is_set():
                done[i] = True
                continue
            # a crash (or a kill) of one slot never takes the others down: restart it, with backoff
            wait = min(30.0, 1.0 + 2 * restarts[i])
            _log.warning(
                "slot %d (%s) exited with %s; restarting in %.0fs", i, slots[i], child.exitcode, wait
            )
            if stopping.wait(wait):
                done[i] = True
                continue
            restarts[i] += 1
            children[i] = start(i)
    for child in children:
        child.join(timeout=15)
    return 0


# ---- one slot ------------------------------------------------------------------------------


class Slot:
    """The loop of one device slot: claim, train, report, tell."""

    def __init__(self, options: WorkerOptions, device: str, index: int) -> None:
        self.options = options
        self.device = device
        self.worker_id = f"{options.worker_prefix}-{os.getpid()}-{device.replace(':', '')}"
        self.db = Database(options.database_url, pool_size=1)
        self.policy = trials.LeasePolicy(heartbeat_interval_s=options.heartbeat_interval_s)
        self.store = artifact_store(options.artifact_dir)
        self.stop = threading.Event()
        self.held: dict[tuple[str, int], bool] = {}  # (study, number) -> lease still ours
        self.held_lock = threading.Lock()
        self.max_fuse: int | None = None  # lowered after an out-of-memory error
        self.finished = 0
        self._datasets: dict[tuple[str, float, str], Dataset] = {}

    # -- database calls survive outages ---------------------------------------------------

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a database operation, retrying with exponential backoff while the database is down."""
        for attempt in Retrying(
            retry=retry_if_exception_type(DB_ERRORS),
            wait=wait_exponential(multiplier=0.2, max=5),
            stop=stop_after_delay(self.options.db_retry_s),
            reraise=True,
        ):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    _log.warning("database unavailable; retry %d", attempt.retry_state.attempt_number)
                return fn(*args, **kwargs)
        raise AssertionError("unreachable")

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        self.call(
            register_worker,
            self.db,
            self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            device=self.device,
        )
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        idle_since = last_reap = time.monotonic()
        try:
            while not self.stop.is_set():
                if self.options.max_trials is not None and self.finished >= self.options.max_trials:
                    break
                try:
                    worked = self._work_once()
                except DB_ERRORS:
                    _log.exception("database error outside a trial; backing off")
                    worked = False
                    self.stop.wait(5)
                if worked:
                    idle_since = time.monotonic()
                    continue
                if time.monotonic() - last_reap >= self.options.heartbeat_interval_s:
                    last_reap = time.monotonic()
                    with contextlib.suppress(*DB_ERRORS):
                        trials.reap(self.db)  # an idle worker recovers lapsed trials, so the study can end
                    continue
                idle_for = time.monotonic() - idle_since
                if self.options.exit_when_idle_s is not None and idle_for >= self.options.exit_when_idle_s:
                    break
                self.stop.wait(self.options.poll_interval_s)
        finally:
            self._hand_back_all()
            with contextlib.suppress(*DB_ERRORS):
                touch_worker(self.db, self.worker_id, status="stopped")
            self.db.dispose()

    def _heartbeat_loop(self) -> None:
        interval = self.options.heartbeat_interval_s
        beats = 0
        while not self.stop.wait(interval):
            beats += 1
            with self.held_lock:
                held = [key for key, ours in self.held.items() if ours]
            try:
                for study, number in held:  # leases first: they are what lapses
                    try:
                        trials.heartbeat(self.db, study, number, policy=self.policy)
                    except Conflict:
                        with self.held_lock:
                            self.held[(study, number)] = False  # reaped: stop training it
                touch_worker(self.db, self.worker_id, status="busy" if held else "idle", trials=held)
                if beats % 4 == 0:
                    trials.reap(self.db)  # workers reap too, so leases lapse even with no server up
            except DB_ERRORS:
                _log.warning("heartbeat: database unavailable")
            except Exception:
                _log.exception("heartbeat failed")

    def _runnable_studies(self) -> list[StudyRecord]:
        with self.db.session() as session:
            query = select(StudyRecord).where(
                StudyRecord.objective_kind == "trainer", StudyRecord.state.in_(("queued", "running"))
            )
            if self.options.studies:
                query = query.where(StudyRecord.name.in_(list(self.options.studies)))
            records = list(session.scalars(query))
        records.sort(key=lambda r: (-r.priority, r.created_at, r.id))
        return records

    def _work_once(self) -> bool:
        for record in self.call(self._runnable_studies):
            definition = definition_of(record)
            group = self._claim(record.name, definition)
            if group:
                self._train(record.name, definition, group)
                return True
        return False

    def _fuse_size(self, definition: StudyDefinition) -> int:
        size = self.options.fuse or definition.objective.fuse or 1
        return max(1, min(size, self.max_fuse or size))

    def _room(self) -> int | None:
        """How many more trials ``--max-trials`` lets this slot take (None: no limit)."""
        if self.options.max_trials is None:
            return None
        with self.held_lock:
            return max(0, self.options.max_trials - self.finished - len(self.held))

    def _claim(
        self,
        name: str,
        definition: StudyDefinition,
        count: int | None = None,
        fixed: dict[str, Any] | None = None,
    ) -> list[trials.TrialAssignment]:
        """Ask up to ``count`` trials (default: the fused group size) sharing non-fusible values."""
        count = self._fuse_size(definition) if count is None else count
        room = self._room()
        if room is not None:
            count = min(count, room)
        group: list[trials.TrialAssignment] = []
        for _ in range(count):
            if self.stop.is_set():
                break
            try:
                assignment = self.call(
                    trials.ask, self.db, name, worker_id=self.worker_id, policy=self.policy, fixed=fixed
                )
            except (Conflict, RateLimited):
                break
            with self.held_lock:
                self.held[(name, assignment.number)] = True
            group.append(assignment)
            if fixed is None:
                # the rest of the group shares the first trial's non-fusible hyperparameters
                fixed = _non_fusible(assignment.params)
        return group

    def _config(self, definition: StudyDefinition, params: dict[str, Any]) -> TrialConfig:
        objective = definition.objective
        return TrialConfig.from_params(
            {
                **objective.fixed,
                **params,
                "model": objective.model,
                "max_epochs": objective.max_epochs,
                "device": self.device,
            }
        )

    def _dataset(self, definition: StudyDefinition) -> Dataset:
        objective = definition.objective
        assert objective.dataset is not None
        key = (objective.dataset, objective.validation_split, objective.target)
        if key not in self._datasets:
            source: str | Path = objective.dataset
            if objective.dataset.startswith("file:"):
                source = Path(objective.dataset.removeprefix("file:"))
            self._datasets[key] = load_dataset(
                source, objective.validation_split, seed=0, target=objective.target
            )
        return self._datasets[key]

    def _train(self, name: str, definition: StudyDefinition, group: list[trials.TrialAssignment]) -> None:
        # Trials handed out first may be retries with other non-fusible values: train them apart.
        subgroups: dict[tuple[Any, ...], list[trials.TrialAssignment]] = {}
        configs: dict[int, TrialConfig] = {}
        for assignment in group:
            try:
                configs[assignment.number] = self._config(definition, assignment.params)
            except ValueError as exc:
                self._finish(name, assignment.number, "fail", reason=f"invalid trainer config: {exc}")
                continue
            subgroups.setdefault(_group_key(configs[assignment.number]), []).append(assignment)
        for members in subgroups.values():
            if self.stop.is_set():
                return
            self._train_members(name, definition, members, [configs[m.number] for m in members])

    def _train_members(
        self,
        name: str,
        definition: StudyDefinition,
        members: list[trials.TrialAssignment],
        configs: list[TrialConfig],
    ) -> None:
        numbers = [m.number for m in members]

        def report(member: int, step: int, value: float) -> bool:
            if self.stop.is_set():
                raise Stopped
            number = numbers[member]
            with self.held_lock:
                ours = self.held.get((name, number), False)
            if not ours:
                return True  # the lease was lost: stop training this member, its retry runs
            try:
                return self.call(trials.report, self.db, name, number, step, value, policy=self.policy)
            except Conflict:
                with self.held_lock:
                    self.held[(name, number)] = False
                return True

        def record(member: int, result: TrialResult) -> None:
            # told the moment it leaves the group: the sampler and pruner see it at once
            self._tell(name, definition, numbers[member], result)

        key = _group_key(configs[0])
        fixed = _non_fusible(members[0].params)
        leftovers: list[trials.TrialAssignment] = []

        def refill(free: int) -> list[TrialConfig]:
            # new trials take the places of members that left, so the group stays full
            if self.stop.is_set() or leftovers:
                return []
            joining: list[TrialConfig] = []
            for assignment in self._claim(name, definition, free, fixed):
                try:
                    config = self._config(definition, assignment.params)
                except ValueError as exc:
                    self._finish(name, assignment.number, "fail", reason=f"invalid trainer config: {exc}")
                    continue
                if _group_key(config) != key:  # a retry with other non-fusible values: train it next
                    leftovers.append(assignment)
                    continue
                numbers.append(assignment.number)
                joining.append(config)
            return joining

        try:
            data = self._dataset(definition)
            train_group(configs, data, report, metric=definition.metrics[0], on_result=record, refill=refill)
        except Stopped:
            return  # everything held is handed back in run()'s finally
        except torch.cuda.OutOfMemoryError:
            held = self._still_held(name, numbers)
            if len(held) > 1:
                self.max_fuse = max(1, len(held) // 2)
                _log.warning(
                    "out of memory with %d fused trials; handing back, fusing %d", len(held), self.max_fuse
                )
                for number in held:
                    self._hand_back(
                        name, number, "out of memory in a fused group; retried with a smaller group"
                    )
            else:
                for number in held:
                    self._finish(name, number, "fail", reason="CUDA out of memory")
        except Exception as exc:
            _log.exception("training failed for trials %s of %s", numbers, name)
            for number in self._still_held(name, numbers):
                self._finish(name, number, "fail", reason=f"{type(exc).__name__}: {exc}"[:2000])
        if leftovers and not self.stop.is_set():
            self._train(name, definition, leftovers)

    def _still_held(self, name: str, numbers: list[int]) -> list[int]:
        """The members not yet told (the others left the group and were recorded already)."""
        with self.held_lock:
            return [n for n in numbers if (name, n) in self.held]

    def _tell(self, name: str, definition: StudyDefinition, number: int, result: TrialResult) -> None:
        with self.held_lock:
            if not self.held.get((name, number), False):
                self.held.pop((name, number), None)
                return
        trial_id = self.call(self._trial_id, name, number)
        attrs = {
            "epochs": result.epochs,
            "train_seconds": round(result.seconds, 3),
            "device": self.device,
            "worker": self.worker_id,
            **{f"final_{k}": v for k, v in result.metrics.items()},
        }
        for key, value in attrs.items():
            self.call(self.db.optuna.set_trial_user_attr, trial_id, key, value)
        if result.pruned:
            self._finish(name, number, "pruned")
            return
        diverged = {k: v for k, v in result.metrics.items() if not _finite(v)}
        if diverged:  # a NaN loss fails the trial with its reason, even when accuracy looks finite
            self._finish(name, number, "fail", reason=f"training diverged: {diverged}")
            return
        values = [result.metrics[metric] for metric in definition.metrics]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "checkpoint.pt")
            result.save(path)
            self.call(save_checkpoint, self.db, self.store, name, number, path)
        self._finish(name, number, "complete", values=values)

    def _trial_id(self, name: str, number: int) -> int:
        record = trials.load_record(self.db, name)
        return self.db.optuna.get_trial_id_from_study_id_trial_number(record.optuna_study_id, number)

    def _finish(
        self,
        name: str,
        number: int,
        state: str,
        *,
        values: list[float] | None = None,
        reason: str | None = None,
    ) -> None:
        try:
            self.call(trials.tell, self.db, name, number, state, values=values, reason=reason)
        except CaviarError as exc:
            _log.warning("tell %s of trial %d of %s refused: %s", state, number, name, exc.message)
        with self.held_lock:
            self.held.pop((name, number), None)
        self.finished += 1

    def _hand_back(self, name: str, number: int, reason: str) -> None:
        try:
            self.call(trials.release, self.db, name, number, reason=reason)
        except CaviarError as exc:
            _log.warning("hand back of trial %d of %s refused: %s", number, name, exc.message)
        with self.held_lock:
            self.held.pop((name, number), None)

    def _hand_back_all(self) -> None:
        with self.held_lock:
            held = [key for key, ours in self.held.items() if ours]
        for name, number in held:
            try:
                self._hand_back(name, number, "handed back by a stopping worker")
            except DB_ERRORS:
                _log.warning("could not hand back trial %d of %s: the reaper will", number, name)


def _non_fusible(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in FUSIBLE}


def _group_key(config: TrialConfig) -> tuple[tuple[str, str], ...]:
    """What members of one fused group must share."""
    return tuple(sorted((k, str(v)) for k, v in config.to_params().items() if k not in FUSIBLE))


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


def run_slot(options: WorkerOptions, device: str, index: int, threads: int) -> None:
    """Entry point of one slot process."""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s slot{index}[{device}] %(levelname)s %(message)s"
    )
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if device == "cpu":
        torch.set_num_threads(threads)
    slot = Slot(options, device, index)

    def stop(signum: int, _frame: Any) -> None:
        slot.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    slot.run()

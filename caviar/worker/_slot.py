"""One worker slot: a process bound to one device that claims, runs, reports and tells trials.

The slot keeps every trial it holds in :attr:`Slot.held`; a background thread renews all their
leases in one call per heartbeat interval and marks the ones the service says are lost, which
stops their training at the next report (their results are dropped: a retry runs elsewhere). A
trial whose study was stopped is stopped the same way but told pruned, so the study can end.
SIGTERM/SIGINT: take no new work, hand the running trials back (retried without using up a
retry), exit 0.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from caviar._client import Client, Trial
from caviar._errors import CaviarApiError, LeaseLost
from caviar._logging import configure_logging
from caviar.worker._allow import CODE_KINDS, AllowList, pin_of, pin_refusal
from caviar.worker._api import EXIT_PERMANENT, Stopped, WorkerApi, is_permanent, one_line
from caviar.worker._fused_program import FusedProgramRunner
from caviar.worker._options import WorkerOptions
from caviar.worker._types import Runner

if TYPE_CHECKING:
    from caviar.worker._trainer import TrainerRunner

_log = logging.getLogger("caviar.worker")


class Slot:
    """The loop of one device slot.

    Args:
        options: the worker's options.
        device: ``cpu`` or ``cuda:N``.
        threads: CPU threads this slot may use.
    """

    def __init__(self, options: WorkerOptions, device: str, threads: int = 1) -> None:
        self.options = options
        self.device = device
        self.threads = threads
        self.worker_id = f"{options.worker_prefix}-{os.getpid()}-{device.replace(':', '')}"
        self.client = Client(options.url, options.token, retry_s=options.retry_s)
        self.api = WorkerApi(self.client, self.worker_id)
        self.stop = threading.Event()
        self.done = threading.Event()  # set once every held trial is handed back: heartbeats end
        self.held: dict[tuple[str, int], Trial] = {}
        self.lost: set[tuple[str, int]] = set()
        self.stopping: set[tuple[str, int]] = set()  # their study was stopped: prune them
        self.held_lock = threading.Lock()
        self.finished = 0
        self.heartbeat_interval_s = 30.0  # the service's own, once registered
        self.displaced = False  # another registration took this slot's worker id
        self._trainer: TrainerRunner | None = None
        self.runners: dict[str, Runner] = {"trainer": _Trainer(self)}
        self.allow = AllowList.parse(options.allow_code)
        self.pins = {name: dict(pin) for name, pin in options.pins.items()}
        self.refused: dict[tuple[str, str, str], bool] = {}  # (study, created_at, objective) -> told
        if options.allow_code:
            programs = FusedProgramRunner(self)  # kind python with fuse: fused groups
            for kind in CODE_KINDS:  # a kind not on the list is fetched too: its studies are refused
                self.runners[kind] = programs

    @property
    def trainer(self) -> TrainerRunner:
        """The built-in trainer's runner, made at the first trainer study: it imports torch (about
        2 s and 200 MB a slot), which a slot that only runs programs never needs."""
        if self._trainer is None:
            from caviar.worker._trainer import TrainerRunner  # lazy: torch, for trainer studies only

            self._trainer = TrainerRunner(self)
        return self._trainer

    # ---- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        self.heartbeat_interval_s = self.api.register(
            host=socket.gethostname(), pid=os.getpid(), device=self.device
        )
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        self._say_what_is_refused()
        idle_since = time.monotonic()
        try:
            while not self.stop.is_set() and self.room() != 0:
                try:
                    worked = self._work_once()
                except CaviarApiError as exc:
                    if is_permanent(exc):
                        raise
                    _log.warning("service error outside a trial (%s); backing off", exc)
                    worked = False
                if worked:
                    idle_since = time.monotonic()
                    continue
                idle = self.options.exit_when_idle_s
                if idle is not None and time.monotonic() - idle_since >= idle:
                    break
                self.stop.wait(self.options.poll_interval_s)
        finally:
            # heartbeats go on until the trials are handed back: the training loop may take an
            # epoch to notice the stop, and a lease that lapses meanwhile makes the hand-back fail
            self.hand_back_all("handed back by a stopping worker")
            self.stop.set()
            self.done.set()
            beat.join(timeout=self.heartbeat_interval_s)
            if not self.displaced:
                with contextlib.suppress(CaviarApiError):
                    self.api.beat([], status="stopped")
            self.client.close()
        if self.displaced:
            raise RuntimeError(f"worker id {self.worker_id} was registered again by another worker")

    def _say_what_is_refused(self) -> None:
        """A worker asked for studies it will not run says so once, instead of idling silently."""
        if not self.options.studies:
            return
        for item in self.api.queue(kinds=["python", "command", "external"], studies=self.options.studies):
            if item["objective_kind"] == "external":
                _log.warning(
                    "study %s is kind external: its trials are run by clients, not workers", item["name"]
                )
            elif item["objective_kind"] not in self.runners:
                _log.warning(
                    "study %s runs user code (kind %s): start the worker with --allow-code "
                    "(python:MODULE_PREFIX or command:PROGRAM) to run it here",
                    item["name"],
                    item["objective_kind"],
                )

    def _work_once(self) -> bool:
        for item in self.api.queue(kinds=list(self.runners), studies=self.options.studies):
            if self.stop.is_set():
                return False
            if item["objective_kind"] in CODE_KINDS and self._refuse_code(item):
                continue
            if self.runners[item["objective_kind"]].run(item):
                return True
        return False

    def _code_refusal(self, item: dict[str, Any]) -> str | None:
        """Why this worker does not run a code study (its allow-list, its ``--study`` pin)."""
        why = self.allow.refusal(item["definition"]["objective"])
        if why is None and self.options.studies:
            now = pin_of(item)
            pinned = self.pins.setdefault(item["name"], now)  # not there at start: pinned when first seen
            why = pin_refusal(item["name"], pinned, now)
        return why

    def _refuse_code(self, item: dict[str, Any]) -> bool:
        """Skip a code study this worker may not run; the first time, say why on the study.

        One trial is claimed and handed back with the reason (a hand-back uses up neither a retry
        nor the failure budget), so whoever looks at the study's trials sees which worker refused
        what and how to allow it. Returns whether the study is refused.
        """
        why = self._code_refusal(item)
        if why is None:
            return False
        pin = pin_of(item)
        key = (item["name"], pin["created_at"], pin["objective"])
        if self.refused.get(key):
            return True
        if key not in self.refused:
            _log.warning("refusing study %s: %s", item["name"], why, extra={"study": item["name"]})
        self.refused[key] = False
        trial = self.ask(item["name"])
        if trial is not None:
            self.hand_back(trial, f"refused by worker {self.worker_id}: {why}"[:2000])
            self.refused[key] = True
        return True

    def _heartbeat_loop(self) -> None:
        # twice per interval: a lease (two intervals) survives one slow or lost beat and more
        while not self.done.wait(self.heartbeat_interval_s / 2):
            with self.held_lock:
                sent = {  # stopping ones too: kept
                    key: trial for key, trial in self.held.items() if key not in self.lost
                }
            held = [(study, number, trial.credential) for (study, number), trial in sent.items()]
            try:
                lost = self.api.beat(held, status="busy" if held else "idle")
            except CaviarApiError as exc:
                if exc.code == "not_your_worker" and not self.displaced:
                    # our registration lapsed and another took the id: our leases are not renewed
                    # any more; hand the trials back and restart the slot (a new pid: a new id)
                    _log.error(
                        "worker id %s was registered again elsewhere; restarting the slot", self.worker_id
                    )
                    self.displaced = True
                    self.stop.set()
                else:
                    _log.warning("heartbeat failed: %s", exc)
                continue
            if lost:
                with self.held_lock:
                    for study, number, code in lost:
                        if self.held.get((study, number)) is not sent.get((study, number)):
                            # told or handed back while the beat was out, and maybe a new trial
                            # claimed under the same study and number (a study recreated under its
                            # name): the answer is about the old trial, not this one
                            continue
                        if code == "study_stopped":  # the lease is kept until the trial is told
                            if (study, number) not in self.stopping:
                                _log.info("trial %d of %s: its study was stopped; pruning it", number, study)
                            self.stopping.add((study, number))
                        else:
                            _log.warning("trial %d of %s: %s; stopping it", number, study, code)
                            self.lost.add((study, number))

    # ---- what runners call -------------------------------------------------------------

    def room(self) -> int | None:
        """How many more trials ``--max-trials`` lets this slot take (None: no limit)."""
        if self.options.max_trials is None:
            return None
        with self.held_lock:
            return max(0, self.options.max_trials - self.finished - len(self.held))

    def ask(self, study: str, *, fixed: dict[str, Any] | None = None) -> Trial | None:
        """Claim a trial (None when the study has none for us now, or the slot stops)."""
        if self.stop.is_set() or self.room() == 0:
            return None
        trial = self.api.ask(study, fixed=fixed)
        if trial is not None:
            with self.held_lock:
                key = (study, trial.number)
                self.held[key] = trial
                self.lost.discard(key)
                self.stopping.discard(key)
        return trial

    def is_lost(self, trial: Trial) -> bool:
        with self.held_lock:
            return (trial.study, trial.number) in self.lost

    def should_prune(self, trial: Trial, step: int, value: float) -> bool:
        """Report an intermediate value; True when the trial must stop (pruned, its study stopped, or
        its lease lost)."""
        if self.stop.is_set():
            raise Stopped
        with self.held_lock:
            key = (trial.study, trial.number)
            if key in self.lost or key in self.stopping:
                return True
        try:
            trial.report(float(value), int(step))
            return trial.should_prune()
        except LeaseLost:
            self._mark_lost(trial)
            return True

    def should_prune_many(self, reports: Sequence[tuple[Trial, int, float]]) -> list[bool]:
        """Report intermediate values of several trials of one study in one call (a fused group's
        epoch); per report, in order, True when its trial must stop (as :meth:`should_prune`)."""
        if self.stop.is_set():
            raise Stopped
        with self.held_lock:
            done = self.lost | self.stopping
            sent = [i for i, (trial, _, _) in enumerate(reports) if (trial.study, trial.number) not in done]
        answers = [True] * len(reports)
        if not sent:
            return answers
        study = reports[sent[0]][0].study
        if any(trial.study != study for trial, _, _ in reports):
            raise ValueError("should_prune_many: the reports of one call are of one study")
        outcomes = self.api.report_many(study, [reports[i] for i in sent])
        for i, (prune, code) in zip(sent, outcomes, strict=True):
            answers[i] = prune
            if code is not None:  # as a heartbeat's lost trials: its retry (if any) runs elsewhere
                trial = reports[i][0]
                _log.warning("trial %d of %s: %s; stopping it", trial.number, trial.study, code)
                self._mark_lost(trial)
        return answers

    def finish(
        self,
        trial: Trial,
        state: str,
        *,
        values: list[float] | None = None,
        reason: str | None = None,
        user_attrs: dict[str, Any] | None = None,
        fatal: bool = False,
    ) -> None:
        """Tell a trial's outcome (a trial whose lease was lost is dropped: its retry runs elsewhere).

        A ``fatal`` failure is not retried and pauses the study (see the tell endpoint)."""
        key = (trial.study, trial.number)
        if not self.is_lost(trial):
            try:
                if state == "complete":
                    trial.tell(values=values, user_attrs=user_attrs)
                elif state == "pruned":
                    trial.prune(user_attrs=user_attrs)
                else:
                    trial.fail(reason or "", user_attrs=user_attrs, fatal=fatal)
            except CaviarApiError as exc:
                _log.warning("tell %s of trial %d of %s refused: %s", state, trial.number, trial.study, exc)
        with self.held_lock:
            self.held.pop(key, None)
            self.lost.discard(key)
            self.stopping.discard(key)
            self.finished += 1

    def hand_back(self, trial: Trial, reason: str) -> None:
        """Give a trial back unfinished: the service retries it without using up a retry."""
        key = (trial.study, trial.number)
        if not self.is_lost(trial):
            try:
                trial.release(reason)
            except CaviarApiError as exc:
                _log.warning("hand back of trial %d of %s refused: %s", trial.number, trial.study, exc)
        with self.held_lock:
            self.held.pop(key, None)
            self.lost.discard(key)
            self.stopping.discard(key)

    def still_held(self, trials: list[Trial]) -> list[Trial]:
        """The trials not told yet (the others left their group and were recorded already)."""
        with self.held_lock:
            return [t for t in trials if (t.study, t.number) in self.held]

    def hand_back_all(self, reason: str) -> None:
        with self.held_lock:
            held = list(self.held.values())
        for trial in held:
            self.hand_back(trial, reason)

    def _mark_lost(self, trial: Trial) -> None:
        with self.held_lock:
            self.lost.add((trial.study, trial.number))


def run_slot(options: WorkerOptions, device: str, index: int, threads: int) -> None:
    """Entry point of one slot process."""
    configure_logging(options.log_format, options.log_level, fields={"slot": index, "device": device})
    logging.getLogger("httpx").setLevel(logging.WARNING)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack
    slot = Slot(options, device, threads)

    def stop(signum: int, _frame: Any) -> None:
        slot.stop.set()
        slot.client.http.interrupt()  # a request retrying through an outage gives up now

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        slot.run()
    except CaviarApiError as exc:
        if not is_permanent(exc):
            _crashed(exc)
        _log.error("caviar worker: %s", one_line(exc))
        sys.exit(EXIT_PERMANENT)
    except Exception as exc:
        _crashed(exc)


def _crashed(exc: Exception) -> None:
    """One line for a slot that died (the traceback at debug level); the supervisor restarts it."""
    debug = _log.isEnabledFor(logging.DEBUG)
    _log.error("slot stopped by %s: %s", type(exc).__name__, exc, exc_info=exc if debug else None)
    sys.exit(1)


class _Trainer:
    """The ``trainer`` kind's entry in :attr:`Slot.runners`: :attr:`Slot.trainer`, made at first use."""

    def __init__(self, slot: Slot) -> None:
        self.slot = slot

    def run(self, study: dict[str, Any]) -> bool:
        return self.slot.trainer.run(study)

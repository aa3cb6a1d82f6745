"""``caviar worker``: discover device slots, start one process per slot, restart the ones that die."""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Mapping
from multiprocessing.process import BaseProcess
from typing import Any

from caviar._backoff import RestartBackoff
from caviar._client import Client
from caviar._errors import CaviarApiError
from caviar._logging import announce, configure_logging
from caviar.worker._allow import AllowList, check_pass_env, describe, pin_of
from caviar.worker._api import EXIT_PERMANENT, WorkerApi, is_permanent, one_line
from caviar.worker._options import WorkerOptions

_log = logging.getLogger("caviar.worker")

RESTART_BACKOFF_MAX_S = 30.0
RESTART_STABLE_S = 60.0
"""A slot that ran this long before it died is restarted after the shortest delay again."""


def visible_gpus() -> int:
    """How many GPUs this process sees (through ``CUDA_VISIBLE_DEVICES``)."""
    # lazy: torch is imported only to count GPUs (and only when GPUs are asked for)
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def discover_slots(gpus: str, per_gpu: int, cpu: int | None, *, available: int | None = None) -> list[str]:
    """Device names of the slots to start: ``cuda:N`` (``per_gpu`` each) then ``cpu`` slots.

    ``gpus`` is ``all``, ``none`` or a comma-separated list of indices (of the devices visible
    through ``CUDA_VISIBLE_DEVICES``). With no GPU slot and ``cpu`` unset, one CPU slot starts.

    Args:
        gpus: which GPUs.
        per_gpu: slots per GPU.
        cpu: CPU slots.
        available: visible GPUs (default: asked from torch when ``gpus`` is not ``none``).
    """
    if gpus == "none":
        indices: list[int] = []
    else:
        count = visible_gpus() if available is None else available
        if gpus == "all":
            indices = list(range(count))
        else:
            try:
                indices = [int(part) for part in gpus.split(",") if part.strip()]
            except ValueError:
                raise ValueError(f"--gpus must be all, none or a list like 0,1 (got {gpus!r})") from None
            missing = [i for i in indices if not 0 <= i < count]
            if missing:
                raise ValueError(f"--gpus: GPU {missing[0]} is not visible ({count} visible)")
    slots = [f"cuda:{i}" for i in indices for _ in range(per_gpu)]
    n_cpu = cpu if cpu is not None else (0 if slots else 1)
    slots.extend("cpu" for _ in range(n_cpu))
    return slots


def _checked_code_options(options: WorkerOptions) -> WorkerOptions:
    """Check ``--allow-code`` and ``--pass-env``, say what code runs, and pin ``--study`` studies.

    Raises:
        ValueError: a malformed ``--allow-code`` or ``--pass-env`` value.
    """
    allow = AllowList.parse(options.allow_code)
    pass_env = check_pass_env(options.pass_env)
    options = _checked_directories(options)
    if not options.allow_code:
        return options
    if allow.any_code:
        _log.warning(
            "--allow-code all: this worker runs ANY program or Python function that a write token puts "
            "in a study, as this user, on this host; name what may run instead "
            "(--allow-code python:MODULE_PREFIX, --allow-code command:PROGRAM)"
        )
    else:
        _log.info("caviar worker runs only this code: %s", describe(allow))
    pins = dict(options.pins)
    if options.studies:
        # lazy: the client (httpx) is needed only to pin the studies named at start
        from caviar._client import Client
        from caviar._errors import CaviarApiError

        with Client(options.url, options.token, retry_s=options.retry_s) as client:
            for name in options.studies:
                try:
                    study = client.study(name).info()
                except CaviarApiError as exc:
                    _log.info("study %s: not pinned at start (%s); pinned when first seen", name, exc.code)
                    continue
                pins[name] = pin_of(study)
                _log.info(
                    "study %s pinned (created %s, objective %s): a recreated study or a changed objective "
                    "is refused until this worker is restarted",
                    name,
                    pins[name]["created_at"],
                    pins[name]["objective"],
                )
    return dataclasses.replace(options, pass_env=pass_env, pins=pins)


def _checked_directories(options: WorkerOptions) -> WorkerOptions:
    """``--code-dir`` (default: the directory the worker starts in) and ``--workdir`` as absolute
    paths, the same in every slot; ``--workdir`` is made when missing.

    Raises:
        ValueError: the code directory is not a directory, or the work directory cannot be made.
    """
    code_dir = os.path.abspath(options.code_dir or os.getcwd())
    if not os.path.isdir(code_dir):
        raise ValueError(f"--code-dir {code_dir}: not a directory")
    workdir = None
    if options.workdir is not None:
        workdir = os.path.abspath(options.workdir)
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"--workdir {workdir}: cannot make it: {exc.strerror}") from None
    return dataclasses.replace(options, code_dir=code_dir, workdir=workdir)


def slot_threads(cpu_slots: int, environ: Mapping[str, str] = os.environ) -> int:
    """Torch threads per slot: the cores this process may use, shared out among its CPU slots.

    ``OMP_NUM_THREADS``, when set to a positive number, caps it (as it caps torch itself), so
    several workers or test processes on one machine do not each take every core.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // max(1, cpu_slots))
    cap = environ.get("OMP_NUM_THREADS", "").strip()
    if cap.isdigit() and int(cap) > 0:
        threads = min(threads, int(cap))
    return threads


def run_workers(options: WorkerOptions) -> int:
    """Start one process per slot and supervise them until they finish or SIGTERM arrives.

    A slot that crashes (or is killed) is restarted with exponential backoff (1 s, 2 s, ... up to
    30 s; back to 1 s after it ran a minute); the others go on. A permanent refusal (a bad or
    revoked token, a missing scope) ends the whole worker with one line and status 2, before any
    slot starts when the token is wrong from the outset.

    Returns:
        The exit status (0 after a clean stop, 2 after a permanent error).
    """
    # lazy: the slot module imports the trainer (torch) only in the slot processes
    from caviar.worker._slot import run_slot

    configure_logging(options.log_format, options.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise here
    options = _checked_code_options(options)
    slots = discover_slots(options.gpus, options.per_gpu, options.cpu)
    if not slots:
        raise ValueError("no device slots: pass --cpu N or make a GPU visible")
    refusal = _refusal(options)
    if refusal is not None:
        _log.error("caviar worker: %s", refusal)
        return 2
    threads = slot_threads(sum(1 for s in slots if s == "cpu"))
    ctx = multiprocessing.get_context("spawn")
    stopping = threading.Event()

    def start(index: int) -> BaseProcess:
        child = ctx.Process(
            target=run_slot, args=(options, slots[index], index, threads), name=f"slot{index}"
        )
        child.start()
        started[index] = time.monotonic()
        return child

    def stop(signum: int, _frame: Any) -> None:
        stopping.set()
        for child in children:
            if child.pid and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)

    started = [0.0] * len(slots)
    backoffs = [RestartBackoff(1.0, RESTART_BACKOFF_MAX_S, RESTART_STABLE_S) for _ in slots]
    children = [start(i) for i in range(len(slots))]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    announce(
        options.log_format, _log.name, f"caviar worker: {len(slots)} slot(s): {', '.join(slots)}", slots=slots
    )
    done = [False] * len(children)
    failed = False
    while not all(done):
        stopping.wait(0.2)
        for i, child in enumerate(children):
            if done[i] or child.is_alive():
                continue
            if child.exitcode == 0 or stopping.is_set():
                done[i] = True
                continue
            if child.exitcode == EXIT_PERMANENT:  # the slot said why, in one line
                stop(signal.SIGTERM, None)
                failed = True
                done[i] = True
                continue
            wait = backoffs[i].next_delay(time.monotonic() - started[i])
            _log.warning(
                "slot %d (%s) exited with %s; restarting in %.0fs",
                i,
                slots[i],
                child.exitcode,
                wait,
                extra={"slot": i, "device": slots[i], "exit_code": child.exitcode, "restart_in_s": wait},
            )
            if stopping.wait(wait):
                done[i] = True
                continue
            children[i] = start(i)
    for child in children:
        child.join(timeout=15)
    return 2 if failed else 0


def _refusal(options: WorkerOptions) -> str | None:
    """Why the service refuses this worker for good (a bad token, a missing scope), else None.

    An unreachable service is not a refusal: the slots keep trying, as they do through outages.
    """
    client = Client(options.url, options.token, retry_s=0)
    try:
        WorkerApi(client, "preflight").check_access()
    except CaviarApiError as exc:
        return one_line(exc) if is_permanent(exc) else None
    finally:
        client.close()
    return None

"""The options of ``caviar worker``."""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass
class WorkerOptions:
    """Options of ``caviar worker`` (one instance is shared by every slot).

    Attributes:
        url: the caviar service (``None``: ``CAVIAR_URL``, else the local ``caviar serve``).
        token: a ``worker``-scope token (``None``: ``CAVIAR_API_TOKEN``).
        gpus: ``all``, ``none`` or GPU indices like ``0,1``.
        per_gpu: slots (processes) per GPU.
        cpu: CPU slots (default: one when there is no GPU slot).
        studies: only these studies (default: every runnable study, by priority).
        fuse: train up to this many trials of a trainer study as one fused group.
        max_trials: each slot exits after finishing this many trials.
        poll_interval_s: how often an idle slot looks at the queue.
        exit_when_idle_s: exit after this long without work.
        data_dir: the only directory ``file:`` datasets are read from (``CAVIAR_DATA_DIR``).
        allow_code: ``--allow-code`` values: the user code this host runs (``python:PREFIX``,
            ``command:PROGRAM [ARG ...]`` or ``all``; see :mod:`caviar.worker._allow`). Empty: none.
        pass_env: ``--pass-env`` names (or ``PREFIX*``) of this worker's environment its children
            get, beyond the default ones (never ``CAVIAR_*``).
        pins: what ``--study`` pinned at start, per study name (identity and objective fingerprint);
            filled in by :func:`~caviar.worker.run_workers`.
        retry_s: how long a call is retried while the service is unreachable.
        worker_prefix: the first part of each slot's worker id (default: the host name).
        log_format: slot log lines as ``text`` or ``json`` (one object a line).
        log_level: the least severe level the slots log.
        workdir: where each trial's own working directory is made (``None``: the system's temporary
            directory); see :mod:`caviar.worker._program`.
        keep_trial_dirs: leave each trial's directory in place after the trial (default: removed).
        code_dir: where a ``kind: python`` entrypoint and a command's relative script are found
            (``None``: the directory the worker was started in).
    """

    url: str | None = None
    token: str | None = None
    gpus: str = "all"
    per_gpu: int = 1
    cpu: int | None = None
    studies: Sequence[str] = ()
    fuse: int | None = None
    max_trials: int | None = None
    poll_interval_s: float = 2.0
    exit_when_idle_s: float | None = None
    data_dir: str | None = None
    allow_code: Sequence[str] = ()
    pass_env: Sequence[str] = ()
    pins: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    retry_s: float = 300.0
    worker_prefix: str = field(default_factory=socket.gethostname)
    log_format: str = "text"
    log_level: str = "info"
    workdir: str | None = None
    keep_trial_dirs: bool = False
    code_dir: str | None = None

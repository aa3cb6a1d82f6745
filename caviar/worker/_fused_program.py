"""Fused groups of a ``kind: python`` study (``objective: {kind: python, fuse: K}``).

The slot claims one trial, then up to K - 1 more that share its values of the objective's
``shared`` parameters (default: every declared int and categorical parameter, i.e. the
architecture), and runs the entrypoint once, in one child process, with the list of those trials
(:mod:`caviar.worker._run_fused`), so the user's code can train them as one
(:class:`caviar.FusedModels`). Trials the sampler draws before it models results (its start-up
points) run in groups of one, as the built-in trainer's do, so each keeps its own draw of every
parameter.

Each member keeps its own lease (the slot heartbeats them all), reports and prune decisions
(straight from the child, with its own credential), result and ``trial.log`` (the group's log,
stored with every member). A pruned member leaves its place empty: the others train on. When the
child exits, every member not told yet is finished from what the child handed back: its result,
its prune decision, or the child's failure (exit status and the end of stderr), as for one trial
(:meth:`caviar.worker._program.ProgramRunner._run`). ``outputs`` files are the group's: stored with
every member (a member's own files are better uploaded with ``trials[i].upload``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from caviar._client import Trial
from caviar.worker._program import ProgramRunner, _Child, _read_result, setup_error
from caviar.worker._run_fused import TRIALS_ENV

_log = logging.getLogger("caviar.worker")

_SHARED_TYPES = ("int", "categorical")


class FusedProgramRunner(ProgramRunner):
    """Runs ``kind: python`` and ``kind: command`` trials: fused groups for a python objective with
    ``fuse``, else one trial per child (:class:`ProgramRunner`)."""

    def run(self, study: dict[str, Any]) -> bool:
        """Claim a group (or one trial) of ``study`` and run it; False when there was nothing to claim."""
        size = fuse_size(study)
        if size is None:
            return super().run(study)
        return run_fused(self, study, size)


def fuse_size(study: dict[str, Any]) -> int | None:
    """How many trials a group of this study may hold (None: not a fused python study)."""
    objective = study["definition"]["objective"]
    if objective.get("kind") != "python" or not objective.get("fuse"):
        return None
    if study.get("trials_started", 0) < study.get("warmup_trials", 0):
        return 1  # the sampler's start-up points: each trial keeps its own draw of every parameter
    return int(objective["fuse"])


def shared_names(definition: dict[str, Any]) -> list[str]:
    """The parameters a group's members share: ``objective.shared``, else the declared int and
    categorical ones."""
    shared = definition["objective"].get("shared")
    if shared is not None:
        return [str(name) for name in shared]
    space = definition.get("search_space") or {}
    return [name for name, spec in space.items() if spec.get("type") in _SHARED_TYPES]


def claim(runner: ProgramRunner, study: dict[str, Any], size: int) -> list[list[Trial]]:
    """Up to ``size`` trials: the first one free, the rest pinned to its shared values; split into
    groups that share them (a retry handed out meanwhile keeps its own values: a group of its own)."""
    slot = runner.slot
    first = slot.ask(study["name"])
    if first is None:
        return []
    names = shared_names(study["definition"])
    fixed = {name: first.params[name] for name in names if name in first.params}
    claimed = [first]
    while len(claimed) < size:
        trial = slot.ask(study["name"], fixed=fixed)
        if trial is None:
            break
        claimed.append(trial)
    groups: dict[str, list[Trial]] = {}
    for trial in claimed:
        key = json.dumps([trial.params.get(name) for name in names])
        groups.setdefault(key, []).append(trial)
    return list(groups.values())


def run_fused(runner: ProgramRunner, study: dict[str, Any], size: int) -> bool:
    """Claim a group of ``study`` and run it; False when there was nothing to claim."""
    groups = claim(runner, study, size)
    if not groups:
        return False
    for group in groups:
        if runner.slot.stop.is_set():
            for trial in group:
                runner.slot.hand_back(trial, "handed back by a stopping worker")
            continue
        _run_in_directory(runner, study, group)
    return True


def _run_in_directory(runner: ProgramRunner, study: dict[str, Any], group: list[Trial]) -> None:
    options = runner.slot.options
    if options.workdir is not None:
        os.makedirs(options.workdir, exist_ok=True)
    first = group[0]
    trial_dir = Path(tempfile.mkdtemp(prefix=f"{first.study}-{first.number}-fused-", dir=options.workdir))
    try:
        with tempfile.TemporaryDirectory(prefix="caviar-group-") as tmp:
            _run_group(runner, study, group, Path(tmp), trial_dir)
    finally:
        if options.keep_trial_dirs:
            _log.info(
                "group of trial %d of %s: its directory is kept: %s", first.number, first.study, trial_dir
            )
        else:
            shutil.rmtree(trial_dir, ignore_errors=True)


def _run_group(
    runner: ProgramRunner, study: dict[str, Any], group: list[Trial], tmp: Path, trial_dir: Path
) -> None:
    slot = runner.slot
    objective = study["definition"]["objective"]
    results = {trial.number: tmp / f"result-{trial.number}.json" for trial in group}
    env = runner._env(objective, group[0], results[group[0].number], trial_dir)
    payloads = []
    for trial in group:
        payload = json.loads(runner._env(objective, trial, results[trial.number], trial_dir)["CAVIAR_TRIAL"])
        payloads.append({**payload, "credential": trial.credential})
    env.pop("CAVIAR_TRIAL", None)
    env.pop("CAVIAR_API_TOKEN", None)  # each member's own credential travels with it
    env[TRIALS_ENV] = json.dumps(payloads)
    argv = [sys.executable, "-m", "caviar.worker._run_fused", objective["entrypoint"]]
    started = time.monotonic()
    timeout = objective.get("timeout_s")
    try:
        child = _Child(argv, env, tmp / "trial.log", lambda _line: None, trial_dir)
    except OSError as exc:
        for trial in group:
            runner._setup_failed(trial, f"cannot start the objective: {type(exc).__name__}: {exc}")
        return

    def end_reason() -> str:
        if slot.stop.is_set():
            return "stopped"
        if all(slot.is_lost(trial) for trial in group):
            return "lost"
        return "timeout" if timeout is not None and time.monotonic() - started > timeout else ""

    why = child.watch(end_reason)
    code = child.process.wait()
    child.close()
    seconds = round(time.monotonic() - started, 3)
    tail = "\n".join(child.stderr_tail)[-1500:]
    attrs: dict[str, Any] = {
        "device": slot.device,
        "worker": slot.worker_id,
        "seconds": seconds,
        "fused_with": ",".join(str(t.number) for t in group),
    }
    for trial in group:
        told = _read_result(results[trial.number])
        if why == "stopped" and told is None:
            slot.hand_back(trial, "handed back by a stopping worker")
            continue
        lost = slot.is_lost(trial)
        if not lost:
            try:
                trial.upload(child.log_path, filename="trial.log")
            except Exception as exc:  # the outcome still counts without its log
                _log.warning("log upload of trial %d failed: %s", trial.number, exc)
            runner._upload_outputs(objective, trial, trial_dir)
        prune_decided = Path(f"{results[trial.number]}.pruned").exists()
        if lost:
            slot.finish(trial, "fail")  # dropped: its lease is gone and its retry runs elsewhere
        elif told is not None and told.get("state") in ("complete", "fail", "pruned"):
            slot.finish(
                trial,
                told["state"],
                values=told.get("values"),
                reason=told.get("reason"),
                user_attrs={**attrs, **told.get("user_attrs", {})},
            )
        elif why == "timeout":
            slot.finish(trial, "fail", reason=f"timeout after {timeout} s", user_attrs=attrs)
        elif code != 0 and prune_decided:
            slot.finish(trial, "pruned", user_attrs=attrs)
        elif code > 0 and setup_error(code, tail, kind="python"):
            runner._setup_failed(
                trial, f"cannot load the entrypoint (exit code {code}); stderr: {tail}", attrs=attrs
            )
        else:
            exit_text = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            reason = f"{exit_text}; stderr: {tail}" if tail else exit_text
            slot.finish(trial, "fail", reason=reason, user_attrs=attrs)

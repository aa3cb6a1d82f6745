"""Running user code: ``kind: python`` (a function) and ``kind: command`` (any program).

One child process per trial, pinned to the slot's device (``CUDA_VISIBLE_DEVICES``), with
``CAVIAR_TRIAL`` (JSON: study, number, params, ...), ``CAVIAR_URL`` and ``CAVIAR_API_TOKEN`` in its
environment. The child reports through the SDK (``caviar.current_trial()``, straight to the
service) or by printing ``caviar-report step=N value=X`` lines, which the worker reports for it.
Its result comes back through the SDK (written to a file the worker reads) or a printed
``caviar-result value=X`` line; the worker is the one that tells the service, after storing the
child's output as the trial's log. The worker heartbeats for the child; a prune decision stops
it (the SDK raises ``TrialPruned``; a printing program gets SIGTERM, then SIGKILL after a grace
period); a non-zero exit, a crash or a timeout fails the trial with the end of its stderr.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from caviar._client import Trial
from caviar.worker._api import Stopped

if TYPE_CHECKING:
    from caviar.worker._types import SlotLike

_log = logging.getLogger("caviar.worker")

GRACE_S = 10.0
"""How long a child has to exit after SIGTERM before it is killed."""
LOG_LIMIT = 10 * 1024 * 1024
"""At most this much of a child's output is kept as the trial's log (the end, if longer)."""
STDERR_TAIL_LINES = 20
_LINE = re.compile(r"^caviar-(report|result)\s+(.*)$")


def parse_line(line: str) -> tuple[str, dict[str, str]] | None:
    """``caviar-report step=3 value=0.91`` -> ``("report", {"step": "3", "value": "0.91"})``."""
    match = _LINE.match(line.strip())
    if match is None:
        return None
    fields = dict(part.split("=", 1) for part in match.group(2).split() if "=" in part)
    return match.group(1), fields


def device_env(device: str) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a slot: its GPU index, or none for a CPU slot."""
    return device.split(":", 1)[1] if device.startswith("cuda:") else ""


def command_argv(command: list[str], params: dict[str, Any], study: str, number: int) -> list[str]:
    """The command with its ``{param}``, ``{study}`` and ``{number}`` placeholders filled in."""
    values = {**params, "study": study, "number": number}
    return [argument.format(**values) for argument in command]


class _Child:
    """A running child process: its output goes to a log file; stdout lines are parsed."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, on_line: Any) -> None:
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 (closed in close())
        self.log_lock = threading.Lock()
        self.logged = 0
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.process = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self.readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, on_line), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, None), daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream: IO[bytes], on_line: Any) -> None:
        for raw in iter(stream.readline, b""):
            with self.log_lock:
                if self.logged < LOG_LIMIT:
                    self.log.write(raw)
                    self.logged += len(raw)
            line = raw.decode("utf-8", "replace")
            if on_line is None:
                self.stderr_tail.append(line.rstrip("\n"))
            else:
                on_line(line)

    def terminate(self) -> None:
        """SIGTERM to the child's process group, SIGKILL after the grace period."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def close(self) -> None:
        for reader in self.readers:
            reader.join(timeout=5)
        self.log.close()


class ProgramRunner:
    """Runs trials of ``kind: python`` and ``kind: command`` studies, one child process each."""

    def __init__(self, slot: SlotLike) -> None:
        self.slot = slot

    def run(self, study: dict[str, Any]) -> bool:
        """Claim one trial of ``study`` and run it; False when there was nothing to claim."""
        trial = self.slot.ask(study["name"])
        if trial is None:
            return False
        with tempfile.TemporaryDirectory(prefix="caviar-trial-") as tmp:
            self._run(study, trial, Path(tmp))
        return True

    def _argv(self, objective: dict[str, Any], trial: Trial) -> list[str]:
        if objective["kind"] == "python":
            return [sys.executable, "-m", "caviar.worker._run_python", objective["entrypoint"]]
        return command_argv(objective["command"], trial.params, trial.study, trial.number)

    def _env(self, objective: dict[str, Any], trial: Trial, result_file: Path) -> dict[str, str]:
        slot = self.slot
        payload = {
            "study": trial.study,
            "number": trial.number,
            "params": trial.params,
            "retry_of": trial.retry_of,
            "worker_id": slot.worker_id,
            "heartbeat_interval_s": trial.heartbeat_interval_s,
            "result_file": str(result_file),
        }
        env = {**os.environ, **objective.get("env", {})}
        # `python` in a command means the worker's own interpreter (its environment has caviar)
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        env.update(
            CAVIAR_TRIAL=json.dumps(payload),
            CAVIAR_URL=slot.client.url,
            CUDA_VISIBLE_DEVICES=device_env(slot.device),
            PYTHONUNBUFFERED="1",
        )
        if slot.options.token:
            env["CAVIAR_API_TOKEN"] = slot.options.token
        return env

    def _run(self, study: dict[str, Any], trial: Trial, tmp: Path) -> None:
        slot = self.slot
        objective = study["definition"]["objective"]
        result_file = tmp / "result.json"
        printed: dict[str, Any] = {}  # what the child printed: its result, or that it was pruned

        def on_line(line: str) -> None:
            parsed = parse_line(line)
            if parsed is None:
                return
            kind, fields = parsed
            try:
                if kind == "report":
                    if slot.should_prune(trial, int(fields["step"]), float(fields["value"])):
                        printed["pruned"] = True
                elif "values" in fields:
                    printed["values"] = [float(v) for v in fields["values"].split(",")]
                else:
                    printed["values"] = [float(fields["value"])]
            except (KeyError, ValueError):
                _log.warning("trial %d: ignoring a malformed line %r", trial.number, line.strip()[:200])
            except Stopped:
                printed["stopped"] = True

        started = time.monotonic()
        timeout = objective.get("timeout_s")
        try:
            child = _Child(
                self._argv(objective, trial),
                self._env(objective, trial, result_file),
                tmp / "trial.log",
                on_line,
            )
        except OSError as exc:  # not found, not executable
            slot.finish(trial, "fail", reason=f"cannot start the command: {type(exc).__name__}: {exc}")
            return
        why = ""
        while child.process.poll() is None:
            if slot.stop.is_set() or printed.get("stopped"):
                why = "stopped"
            elif slot.is_lost(trial):
                why = "lost"
            elif printed.get("pruned"):
                why = "pruned"
            elif timeout is not None and time.monotonic() - started > timeout:
                why = "timeout"
            if why:
                child.terminate()
                break
            time.sleep(0.2)
        code = child.process.wait()
        child.close()
        seconds = round(time.monotonic() - started, 3)
        if why == "stopped":
            slot.hand_back(trial, "handed back by a stopping worker")
            return
        if not slot.is_lost(trial):
            try:
                trial.upload(child.log_path, filename="trial.log")
            except Exception as exc:  # the outcome still counts without its log
                _log.warning("log upload of trial %d failed: %s", trial.number, exc)
        attrs: dict[str, Any] = {"device": slot.device, "worker": slot.worker_id, "seconds": seconds}
        told = _read_result(result_file)
        tail = "\n".join(child.stderr_tail)[-1500:]
        if why == "lost":
            slot.finish(trial, "fail")  # dropped: its lease is gone and its retry runs elsewhere
        elif why == "timeout":
            slot.finish(trial, "fail", reason=f"timeout after {timeout} s", user_attrs=attrs)
        elif why == "pruned" or (told or {}).get("state") == "pruned":
            slot.finish(trial, "pruned", user_attrs={**attrs, **(told or {}).get("user_attrs", {})})
        elif told is not None and told.get("state") in ("complete", "fail"):
            slot.finish(
                trial,
                told["state"],
                values=told.get("values"),
                reason=told.get("reason"),
                user_attrs={**attrs, **told.get("user_attrs", {})},
            )
        elif code != 0:
            exit_text = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
            slot.finish(
                trial, "fail", reason=f"{exit_text}; stderr: {tail}" if tail else exit_text, user_attrs=attrs
            )
        elif "values" in printed:
            slot.finish(trial, "complete", values=printed["values"], user_attrs=attrs)
        else:
            reason = "exited without a result: print `caviar-result value=X` or call trial.tell(X)"
            slot.finish(trial, "fail", reason=reason, user_attrs=attrs)


def _read_result(path: Path) -> dict[str, Any] | None:
    """What the child told through the SDK (None when it told nothing)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

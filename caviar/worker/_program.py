"""Running user code: ``kind: python`` (a function) and ``kind: command`` (any program).

One child process per trial, pinned to the slot's device (``CUDA_VISIBLE_DEVICES``), with a clean
environment (see :mod:`caviar.worker._allow`: a pass-through list of the worker's, never its token)
plus ``CAVIAR_TRIAL`` (JSON: study, number, params, ...), ``CAVIAR_URL`` and, when the service
has tokens, ``CAVIAR_API_TOKEN``: a credential for this one trial that can only report, heartbeat,
upload and tell it, and expires when the trial ends. The child reports through the SDK
(``caviar.current_trial()``, straight to the service) or by printing ``caviar-report step=N
value=X`` lines, which the worker reports for it. Its result comes back through the SDK (written
to a file the worker reads) or a printed ``caviar-result value=X`` line; the worker is the one
that tells the service, after storing the child's output as the trial's log. An unmodified program
may instead be read through the objective's ``metrics`` option (:class:`MetricsReader`:
``name=value`` pairs, a regex, or a JSON-lines file): each line read is reported, and the last value
is the trial's unless it prints a result. A program whose output caviar cannot read at all fails
its study's first trial as ``fatal``: not retried, and the study pauses with the reason (the lines
it printed and the format expected).

The worker heartbeats for the child; a prune decision stops it (an SDK program raises
``TrialPruned`` and ends PRUNED even when it lets the exception escape; a printing program gets
SIGTERM, then SIGKILL after a grace period); a non-zero exit, a crash or a timeout fails the trial
with the end of its stderr.
"""

from __future__ import annotations

import collections
import collections.abc
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

from caviar import _code_rules
from caviar._client import Trial
from caviar._errors import CaviarApiError
from caviar._http import api_path
from caviar.worker._allow import child_environment, interpreter_path
from caviar.worker._api import Stopped

if TYPE_CHECKING:
    from caviar.worker._types import SlotLike

_log = logging.getLogger("caviar.worker")

GRACE_S = 10.0
"""How long a child has to exit after SIGTERM before it is killed."""
LOG_LIMIT = 10 * 1024 * 1024
"""At most this much of a child's output is kept as the trial's log (the end, if longer)."""
STDERR_TAIL_LINES = 20
STALE_PREFIX_BYTES = 4096
"""How much of a JSON-lines file left by an earlier trial is kept to tell an append from a rewrite."""
STDOUT_TAIL_LINES = 10
"""How many of the last lines a program printed an unreadable-output failure shows."""
_LINE = re.compile(r"^caviar-(report|result)\s+(.*)$")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_STEP = re.compile(r"(?<![\w.])(?:step|epoch|iteration|iter)\s*(?:=|:)?\s*(\d+)\b", re.IGNORECASE)


class MetricsReader:
    """Reads a program's metrics from its own output (the objective's ``metrics`` option).

    Args:
        spec: the option (``{format: stdout | regex | jsonl, pattern, file}``), None for none.
        metric_names: the study's metric names (``stdout`` and ``jsonl`` look for these).
    """

    def __init__(self, spec: dict[str, Any] | None, metric_names: list[str]) -> None:
        self.format = (spec or {}).get("format", "stdout") if spec is not None else None
        self.metric_names = metric_names
        self.pattern = re.compile(spec["pattern"]) if spec and spec.get("pattern") else None
        self.file = (spec or {}).get("file") or "metrics.jsonl"
        self._pairs = {
            name: re.compile(rf"(?<![\w.]){re.escape(name)}\s*(?:=|:)\s*({_NUMBER})(?![\w.])")
            for name in metric_names
        }
        self._offset = 0
        self._partial = b""
        self._stale: tuple[int, int, int, bytes] | None = None
        self.path = Path(self.file)

    def expected(self) -> str:
        """The format this reader expects, for an error message."""
        sdk = "`caviar-report step=N value=X` / `caviar-result value=X` lines or caviar.current_trial()"
        if self.format is None:
            return f"{sdk}; or set objective.metrics to read the program's own output"
        if self.format == "regex":
            assert self.pattern is not None
            return f"lines matching the regex {self.pattern.pattern!r} (objective.metrics), or {sdk}"
        if self.format == "jsonl":
            field = self.metric_names[0]
            return f"JSON lines with a {field!r} field in {self.file} (objective.metrics), or {sdk}"
        pairs = " or ".join(f"`{n}=X` / `{n}: X`" for n in self.metric_names)
        return f"lines with {pairs} (objective.metrics, format stdout), or {sdk}"

    def parse_line(self, line: str) -> tuple[int | None, dict[str, float]] | None:
        """A stdout line -> ``(step or None, {metric: value})``; None when the line has no metric."""
        if self.format == "stdout":
            found = {}
            for name, pair in self._pairs.items():
                match = pair.search(line)
                if match is not None:
                    found[name] = float(match.group(1))
            if not found:
                return None
            counted = _STEP.search(line)
            return (int(counted.group(1)) if counted else None), found
        if self.format == "regex":
            assert self.pattern is not None
            match = self.pattern.search(line)
            if match is None:
                return None
            try:
                value = float(match.group("value"))
                step_text = match.groupdict().get("step")
                step = int(float(step_text)) if step_text else None
            except (TypeError, ValueError):
                return None
            return step, {self.metric_names[0]: value}
        return None

    def start(self, directory: Path) -> None:
        """Note the ``jsonl`` file as it is before the program starts: what it holds is not this
        trial's. A program that appends to it is read from where it was; one that rewrites it (a
        new file, or the same one truncated or with other first bytes) is read from its start."""
        self.path = directory / self.file
        try:
            with open(self.path, "rb") as handle:
                before = os.fstat(handle.fileno())
                prefix = handle.read(STALE_PREFIX_BYTES)
        except OSError:
            self._stale = None
            return
        self._stale = (before.st_ino, before.st_size, before.st_mtime_ns, prefix)
        self._offset = before.st_size

    def read_file(self) -> list[tuple[int | None, dict[str, float]]]:
        """New complete JSON lines of the ``jsonl`` file since the last call."""
        if self.format != "jsonl":
            return []
        try:
            with open(self.path, "rb") as handle:
                if self._stale is not None:
                    now = os.fstat(handle.fileno())
                    inode, size, mtime, prefix = self._stale
                    if (now.st_ino, now.st_size, now.st_mtime_ns) == (inode, size, mtime):
                        return []  # not written yet
                    if now.st_ino != inode or now.st_size < size or handle.read(len(prefix)) != prefix:
                        self._offset, self._partial = 0, b""  # rewritten: all of it is this trial's
                    self._stale = None
                handle.seek(self._offset)
                chunk = handle.read(LOG_LIMIT)
        except OSError:
            return []
        self._offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        parsed = []
        for raw in lines:
            try:
                item = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(item, dict):
                continue
            found = {
                name: float(item[name])
                for name in self.metric_names
                if isinstance(item.get(name), int | float) and not isinstance(item.get(name), bool)
            }
            if not found and len(self.metric_names) == 1 and isinstance(item.get("value"), int | float):
                found = {self.metric_names[0]: float(item["value"])}
            step = item.get("step", item.get("epoch"))
            if found:
                parsed.append((int(step) if isinstance(step, int) else None, found))
        return parsed


def metric_names(definition: dict[str, Any]) -> list[str]:
    """The study's metric names, as the definition (JSON) gives them."""
    metric = definition.get("metric")
    if metric:
        return [metric] if isinstance(metric, str) else [str(m) for m in metric]
    directions = definition.get("directions")
    return ["value"] if not directions else [f"value_{i}" for i in range(len(directions))]


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
    """The command with its ``{param}``, ``{study}`` and ``{number}`` placeholders filled in.

    Placeholders are plain names filled with ``str(value)``: never :meth:`str.format`.
    """
    values = {**params, "study": study, "number": number}
    return [_code_rules.fill(argument, values) for argument in command]


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
        env = child_environment(os.environ, slot.options.pass_env, secrets=[slot.options.token])
        env.update(objective.get("env", {}))  # checked: no loader, interpreter or caviar variable
        # `python` in a command means the worker's own interpreter (its environment has caviar)
        env["PATH"] = interpreter_path(env.get("PATH"), sys.executable)
        env.update(
            CAVIAR_TRIAL=json.dumps(payload),
            CAVIAR_URL=slot.client.url,
            CUDA_VISIBLE_DEVICES=device_env(slot.device),
            PYTHONUNBUFFERED="1",
        )
        if trial.credential:  # never the worker's own token: one for this trial only
            env["CAVIAR_API_TOKEN"] = trial.credential
        return env

    def _run(self, study: dict[str, Any], trial: Trial, tmp: Path) -> None:
        slot = self.slot
        objective = study["definition"]["objective"]
        result_file = tmp / "result.json"
        printed: dict[str, Any] = {}  # what the child printed: its result, or that it was pruned
        metrics = MetricsReader(objective.get("metrics"), metric_names(study["definition"]))
        measured: dict[str, float] = {}  # the last value of each metric read from its own output
        reports = [0]
        stdout_tail: collections.deque[str] = collections.deque(maxlen=STDOUT_TAIL_LINES)
        lock = threading.Lock()

        def on_metrics(step: int | None, found: dict[str, float]) -> None:
            if printed.get("pruned"):
                return  # the program is being stopped: what it prints now does not count
            with lock:
                measured.update(found)
                if len(metrics.metric_names) != 1:
                    return  # several objectives: no intermediate values (as in Optuna); the last ones count
                step = reports[0] if step is None or step < 0 else step
                reports[0] = max(reports[0], step) + 1
            try:
                if slot.should_prune(trial, step, found[metrics.metric_names[0]]):
                    printed["pruned"] = True
            except CaviarApiError as exc:
                _log.warning("trial %d: report refused: %s", trial.number, exc)
            except Stopped:
                printed["stopped"] = True

        def on_line(line: str) -> None:
            if line.strip():
                stdout_tail.append(line.rstrip("\n")[:500])
            parsed = parse_line(line)
            if parsed is None:
                found = metrics.parse_line(line)
                if found is not None:
                    on_metrics(*found)
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
        metrics.start(Path.cwd())  # the child runs in the worker's working directory
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
        except KeyError as exc:  # a placeholder of a parameter this trial does not have (conditional)
            slot.finish(trial, "fail", reason=f"cannot start the command: no value for placeholder {exc}")
            return
        why = ""
        while child.process.poll() is None:
            for found in metrics.read_file():
                on_metrics(*found)
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
        if not why:
            for found in metrics.read_file():
                on_metrics(*found)
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
        # the SDK marks a prune decision: a program that then lets TrialPruned escape (or exits
        # non-zero) was pruned, it did not crash
        prune_decided = Path(f"{result_file}.pruned").exists()
        if why == "lost":
            slot.finish(trial, "fail")  # dropped: its lease is gone and its retry runs elsewhere
        elif why == "timeout":
            slot.finish(trial, "fail", reason=f"timeout after {timeout} s", user_attrs=attrs)
        elif (
            why == "pruned"
            or (told or {}).get("state") == "pruned"
            or (told is None and code != 0 and prune_decided)
        ):
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
        elif measured and all(name in measured for name in metrics.metric_names):
            values = [measured[name] for name in metrics.metric_names]
            slot.finish(trial, "complete", values=values, user_attrs=attrs)
        else:
            self._unreadable(study, trial, metrics, reports[0] > 0 or bool(measured), stdout_tail, attrs)

    def _unreadable(
        self,
        study: dict[str, Any],
        trial: Trial,
        metrics: MetricsReader,
        partly: bool,
        stdout_tail: collections.abc.Iterable[str],
        attrs: dict[str, Any],
    ) -> None:
        """Fail a trial whose program exited 0 without a result caviar could read.

        On the study's first trial (nothing complete or pruned yet) the failure is ``fatal``: every
        trial would fail the same way, so it is not retried and the study pauses with the reason,
        instead of spending the budget and ``max_failed_trials`` on full trainings.
        """
        lines = "\n".join(stdout_tail) or "(nothing)"
        what = "no value for every metric" if partly else "nothing caviar recognises"
        reason = (
            f"exited without a result: the program printed {what}; expected {metrics.expected()}. "
            f"Its last lines:\n{lines}"
        )
        fatal = False
        if not partly:
            try:
                counts = self.slot.client.http.get(api_path("studies", study["name"]))["trial_counts"]
                fatal = int(counts.get("complete", 0)) + int(counts.get("pruned", 0)) == 0
            except (CaviarApiError, KeyError, TypeError) as exc:
                _log.warning("trial %d: could not read the study's trial counts: %s", trial.number, exc)
        self.slot.finish(trial, "fail", reason=reason[-2000:], user_attrs=attrs, fatal=fatal)


def _read_result(path: Path) -> dict[str, Any] | None:
    """What the child told through the SDK (None when it told nothing)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

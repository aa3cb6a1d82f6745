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

Whatever the child starts ends with the trial, however it ends (``setsid`` grandchildren too: the
slot is a child subreaper on Linux, see :class:`_Child`); its output is read in bounded pieces
and the log keeps the last :data:`LOG_LIMIT` bytes.

Each trial's child runs in a fresh directory of its own (``CAVIAR_TRIAL_DIR``), made under the
worker's ``--workdir`` and removed after the trial unless ``--keep-trial-dirs``; a ``jsonl`` metrics
file is read there. Code is found in the worker's code directory (``--code-dir``, default the
directory the worker was started in; see :func:`resolve_code_paths`), which is also put first on the
child's ``PYTHONPATH``. The files the objective's ``outputs`` globs match in the trial's directory
are uploaded as the trial's artifacts when it ends (any state), each at most
:data:`OUTPUT_FILE_LIMIT` bytes and :data:`OUTPUT_TOTAL_LIMIT` in all.

A program that cannot start is a setup error (:func:`setup_error`): the trial fails with a reason
starting ``setup error:``, ``fatal`` (not retried; the study pauses with the reason until
``caviar study resume``), so a typo does not spend ``max_failed_trials``.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from caviar import _code_rules
from caviar._client import Trial
from caviar._errors import CaviarApiError
from caviar._http import api_path
from caviar.worker._allow import child_environment, interpreter_path
from caviar.worker._api import Stopped
from caviar.worker._run_python import SETUP_ERROR_EXIT

if TYPE_CHECKING:
    from caviar.worker._types import SlotLike

_log = logging.getLogger("caviar.worker")

GRACE_S = 10.0
"""How long a child has to exit after SIGTERM before it is killed."""
LOG_LIMIT = 10 * 1024 * 1024
"""At most this much of a child's output is kept as the trial's log (the end, if longer)."""
READ_CHUNK = 64 * 1024
"""A child's output is read in pieces of at most this many bytes."""
LINE_LIMIT = 1024 * 1024
"""A longer output line is only logged: not parsed, and never held whole in memory."""
REAP_S = 5.0
"""How long ending what is left of a trial's processes may take."""
_COPY_PIECE = 1024 * 1024
_PR_SET_CHILD_SUBREAPER = 36
STDERR_TAIL_LINES = 20
STALE_PREFIX_BYTES = 4096
"""How much of a JSON-lines file left by an earlier trial is kept to tell an append from a rewrite."""
STDOUT_TAIL_LINES = 10
"""How many of the last lines a program printed an unreadable-output failure shows."""
OUTPUT_FILE_LIMIT = 512 * 1024 * 1024
"""A file an objective's ``outputs`` match that is larger than this is not uploaded (logged)."""
OUTPUT_TOTAL_LIMIT = 2 * 1024 * 1024 * 1024
"""At most this many bytes of ``outputs`` are uploaded per trial (the files past it are logged)."""
OUTPUT_FILE_COUNT = 100
"""At most this many files of ``outputs`` are uploaded per trial."""
SETUP_ERROR = "setup error: "
"""How the reason of a trial whose program could not start begins."""
_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")
_PYTHON_OPTIONS_WITH_VALUE = frozenset({"-W", "-X", "-Q"})
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


class _TailLog:
    """A log file that keeps the last ``limit`` bytes written to it.

    Everything is appended; once the file holds twice the limit, its last ``limit`` bytes are
    copied to its start (in 1 MiB pieces) and it is cut there, and :meth:`close` does the same.
    So the disk holds at most ``2 * limit`` bytes, memory a piece, and the log ends as the end of
    the output (its first line may be cut).
    """

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.size = 0
        self.lock = threading.Lock()
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def write(self, data: bytes) -> None:
        """Append ``data`` (thread-safe)."""
        with self.lock:
            view = memoryview(data)
            while view:
                written = os.pwrite(self.fd, view, self.size)
                self.size += written
                view = view[written:]
            if self.size > 2 * self.limit:
                self._keep_tail()

    def _keep_tail(self) -> None:
        start = self.size - self.limit
        for offset in range(0, self.limit, _COPY_PIECE):
            piece = os.pread(self.fd, min(_COPY_PIECE, self.limit - offset), start + offset)
            os.pwrite(self.fd, piece, offset)
        os.ftruncate(self.fd, self.limit)
        self.size = self.limit

    def close(self) -> None:
        """Cut the file to its last ``limit`` bytes and close it."""
        with self.lock:
            if self.fd < 0:
                return
            if self.size > self.limit:
                self._keep_tail()
            os.close(self.fd)
            self.fd = -1


def resolve_code_paths(argv: list[str], code_dir: Path) -> tuple[list[str], Path | None]:
    """A command whose program and script are found in the code directory, not the trial's.

    The child's working directory is its trial directory, so relative paths that name *code* are
    resolved against ``code_dir``: the program when it is a relative path with a ``/``
    (``./train.sh``, ``bin/train``; a bare name is looked up on ``PATH``), and, when the program
    is a Python interpreter (``python``, ``python3``, ``python3.12``), its script (the first
    argument that is not an option, unless ``-m`` or ``-c`` comes first); for any other program
    (``bash train.sh``, ``Rscript fit.R``), its first argument that is not an option when that names
    a file in ``code_dir``. Every other argument is left as it is: relative to the trial's
    directory, where the program writes its files.

    Returns:
        The command, and the script's path when the program is Python running a script.
    """
    resolved = list(argv)
    program = resolved[0]
    if "/" in program and not os.path.isabs(program):
        resolved[0] = str(code_dir / program)
    if not _PYTHON.match(os.path.basename(program)):
        # another interpreter (bash train.sh, Rscript fit.R, node train.js): its script is its first
        # argument that is not an option, taken from the code directory when it is a file there
        for index in range(1, len(resolved)):
            argument = resolved[index]
            if argument.startswith("-"):
                continue
            if not os.path.isabs(argument) and (code_dir / argument).is_file():
                resolved[index] = str(code_dir / argument)
            break
        return resolved, None
    skip = False
    for index in range(1, len(resolved)):
        argument = resolved[index]
        if skip:
            skip = False
        elif argument.startswith(("-m", "-c")):
            return resolved, None
        elif argument in _PYTHON_OPTIONS_WITH_VALUE:
            skip = True
        elif argument == "-":
            return resolved, None
        elif not argument.startswith("-"):
            script = Path(argument) if os.path.isabs(argument) else code_dir / argument
            resolved[index] = str(script)
            return resolved, script
    return resolved, None


def setup_error(code: int, stderr_tail: str, *, kind: str) -> bool:
    """Whether a child that exited ``code`` (without telling a result) never got to run its code.

    ``kind: python``: the entrypoint could not be loaded (:data:`SETUP_ERROR_EXIT`, see
    :mod:`caviar.worker._run_python`). ``kind: command``: the Python interpreter could not open
    its script (exit status 2 and ``can't open file`` on stderr); a missing program or script is
    caught before the start (see :meth:`ProgramRunner._run`).
    """
    if kind == "python":
        return code == SETUP_ERROR_EXIT
    return code == 2 and "can't open file" in stderr_tail


class _Child:
    """A running child process: its output goes to a log file; stdout lines are parsed.

    The child leads a new session (so its own process group). On Linux its slot is a child
    subreaper (:func:`become_subreaper`), so whatever the child starts stays below the slot even
    when it leaves the group (``setsid``, a double fork): :meth:`terminate` and :meth:`close` end
    all of it (:meth:`reap`).
    """

    def __init__(
        self, argv: list[str], env: dict[str, str], log_path: Path, on_line: Any, cwd: Path | None = None
    ) -> None:
        self.log_path = log_path
        self.log = _TailLog(log_path, LOG_LIMIT)
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        # the slot's children from before this trial are not the trial's (today a slot runs one
        # child at a time; this keeps it right should it ever run more)
        self.before = {pid for pid, proc in _processes().items() if proc.ppid == os.getpid()}
        self.process = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, cwd=cwd
        )
        found = _processes().get(self.process.pid)
        self.started = found.started if found is not None else 0
        assert self.process.stdout is not None and self.process.stderr is not None
        self.readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, on_line), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, None), daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream: IO[bytes], on_line: Any) -> None:
        """Read ``stream`` in pieces of at most :data:`READ_CHUNK` bytes and split its lines here.

        Each line goes to the log; one of at most :data:`LINE_LIMIT` bytes is also given to
        ``on_line`` (stdout) or kept for the stderr tail. A longer line is written to the log as it
        comes and is never held whole, nor parsed.
        """
        fd = stream.fileno()
        partial = bytearray()
        overlong = 0  # bytes of the current line, once it is longer than LINE_LIMIT
        while chunk := os.read(fd, READ_CHUNK):
            start = 0
            while start < len(chunk):
                end = chunk.find(b"\n", start)
                piece = chunk[start:] if end < 0 else chunk[start : end + 1]
                start += len(piece)
                if not overlong and len(partial) + len(piece) > LINE_LIMIT:
                    overlong = len(partial)
                    self.log.write(bytes(partial))
                    partial.clear()
                    overlong += len(piece)
                    self.log.write(piece)
                elif overlong:
                    overlong += len(piece)
                    self.log.write(piece)
                else:
                    partial += piece
                if end >= 0:
                    self._line(bytes(partial), overlong, on_line)
                    partial.clear()
                    overlong = 0
        if partial or overlong:
            self._line(bytes(partial), overlong, on_line)

    def _line(self, raw: bytes, overlong: int, on_line: Any) -> None:
        if overlong:
            if on_line is None:
                self.stderr_tail.append(f"(a line of {overlong} bytes: see trial.log)")
            return
        self.log.write(raw)
        line = raw.decode("utf-8", "replace")
        if on_line is None:
            self.stderr_tail.append(line.rstrip("\n"))
        else:
            on_line(line)

    def watch(self, reason: Callable[[], str], every_s: float = 0.2) -> str:
        """Wait for the child to exit, asking ``reason`` every ``every_s`` seconds whether to end
        it first (``stopped``, ``lost``, ``pruned``, ``timeout``; empty: go on).

        Returns:
            The reason the child was terminated for (it was sent SIGTERM, and SIGKILL after the
            grace period), or ``""`` when it exited by itself; wait for it and :meth:`close` after.
        """
        while self.process.poll() is None:
            why = reason()
            if why:
                self.terminate()
                return why
            time.sleep(every_s)
        return ""

    def _signal_all(self, signum: int) -> None:
        """Send ``signum`` to the child's process group and to every process of this trial."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)
        for pid in self.descendants():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    def descendants(self) -> set[int]:
        """The live processes of this trial but the child itself (Linux, from ``/proc``).

        They are those below the slot that started with or after the child (and were not the
        slot's before it), and everything below them, plus any left in the child's session.
        """
        table = _processes()
        me = os.getpid()
        below: dict[int, list[int]] = {}
        for pid, proc in table.items():
            below.setdefault(proc.ppid, []).append(pid)
        todo = [
            pid
            for pid, proc in table.items()
            if (proc.ppid == me and proc.started >= self.started and pid not in self.before)
            or proc.session == self.process.pid
        ]
        found: set[int] = set()
        while todo:
            pid = todo.pop()
            if pid not in found:
                found.add(pid)
                todo.extend(below.get(pid, ()))
        found.discard(self.process.pid)
        return {pid for pid in found if table[pid].state != "Z"}

    def reap(self) -> None:
        """SIGKILL whatever is left of the trial, until nothing is, and collect the zombies the
        slot inherited (a few rounds: a process may start another while it is being killed)."""
        deadline = time.monotonic() + REAP_S
        while True:
            left = self.descendants()
            if self.process.poll() is None:
                left.add(self.process.pid)
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self._collect()
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if left:
            _log.warning("could not end every process of a trial: %s still run", sorted(left))

    def _collect(self) -> None:
        """Wait for the slot's exited children of this trial (orphans re-parented to the slot)."""
        me = os.getpid()
        for pid, proc in _processes().items():
            if proc.ppid == me and proc.state == "Z" and pid != self.process.pid and pid not in self.before:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)

    def terminate(self) -> None:
        """SIGTERM to the child's process group and everything it started, SIGKILL after the grace
        period (and all of it ends in :meth:`close`)."""
        if self.process.poll() is not None:
            return
        self._signal_all(signal.SIGTERM)
        try:
            self.process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            self._signal_all(signal.SIGKILL)
        self.process.wait()

    def close(self) -> None:
        """End everything the trial started, then finish reading its output and cut its log."""
        self.reap()
        for reader in self.readers:
            reader.join(timeout=5)
        self.log.close()


class _Proc(NamedTuple):
    ppid: int
    session: int
    state: str
    started: int


def _processes() -> dict[int, _Proc]:
    """Every process's parent, session, state and start time (clock ticks since boot), read from
    ``/proc``; empty where there is none (not Linux)."""
    table: dict[int, _Proc] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rfind(b")") + 2 :].split()
        try:
            table[int(name)] = _Proc(int(fields[1]), int(fields[3]), fields[0].decode(), int(fields[19]))
        except (IndexError, ValueError):
            continue
    return table


def become_subreaper() -> bool:
    """Make this process a child subreaper (Linux ``prctl(PR_SET_CHILD_SUBREAPER)``): a process
    orphaned below it (its parent exited, e.g. after ``setsid``) becomes its child instead of
    init's, so a trial cannot leave processes the slot does not see. False where it is not
    available (not Linux): there only the child's process group and session are ended."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


class ProgramRunner:
    """Runs trials of ``kind: python`` and ``kind: command`` studies, one child process each."""

    def __init__(self, slot: SlotLike) -> None:
        self.slot = slot
        if not become_subreaper():  # runners live in slot processes: the whole slot becomes one
            _log.info("not a child subreaper: a trial's processes that leave its session may outlive it")
        self.code_dir = Path(slot.options.code_dir or os.getcwd()).resolve()

    def run(self, study: dict[str, Any]) -> bool:
        """Claim one trial of ``study`` and run it; False when there was nothing to claim."""
        trial = self.slot.ask(study["name"])
        if trial is None:
            return False
        options = self.slot.options
        workdir = options.workdir
        if workdir is not None:
            os.makedirs(workdir, exist_ok=True)
        trial_dir = Path(tempfile.mkdtemp(prefix=f"{trial.study}-{trial.number}-", dir=workdir))
        try:
            with tempfile.TemporaryDirectory(prefix="caviar-trial-") as tmp:
                self._run(study, trial, Path(tmp), trial_dir)
        finally:
            if options.keep_trial_dirs:
                _log.info("trial %d of %s: its directory is kept: %s", trial.number, trial.study, trial_dir)
            else:
                shutil.rmtree(trial_dir, ignore_errors=True)
        return True

    def _argv(self, objective: dict[str, Any], trial: Trial) -> tuple[list[str], Path | None]:
        """The child's command, and the script it runs when that is ``python SCRIPT``."""
        if objective["kind"] == "python":
            return [sys.executable, "-m", "caviar.worker._run_python", objective["entrypoint"]], None
        argv = command_argv(objective["command"], trial.params, trial.study, trial.number)
        return resolve_code_paths(argv, self.code_dir)

    def _env(
        self, objective: dict[str, Any], trial: Trial, result_file: Path, trial_dir: Path
    ) -> dict[str, str]:
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
        # the code directory first: entrypoints and `python -m` modules are found there
        python_path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join([str(self.code_dir), *([python_path] if python_path else [])])
        env.update(
            CAVIAR_TRIAL=json.dumps(payload),
            CAVIAR_TRIAL_DIR=str(trial_dir),
            CAVIAR_URL=slot.client.url,
            CUDA_VISIBLE_DEVICES=device_env(slot.device),
            PYTHONUNBUFFERED="1",
        )
        if trial.credential:  # never the worker's own token: one for this trial only
            env["CAVIAR_API_TOKEN"] = trial.credential
        return env

    def _setup_failed(self, trial: Trial, why: str, *, attrs: dict[str, Any] | None = None) -> None:
        """Fail a trial whose program could not start: fatal (no retry, the study pauses), said once."""
        reason = f"{SETUP_ERROR}{why}"[:2000]
        _log.error(
            "trial %d of %s: %s (the study pauses: fix it, then `caviar study resume %s`)",
            trial.number,
            trial.study,
            reason.splitlines()[0] if reason else reason,
            trial.study,
            extra={"study": trial.study},
        )
        self.slot.finish(trial, "fail", reason=reason, user_attrs=attrs, fatal=True)

    def _upload_outputs(self, objective: dict[str, Any], trial: Trial, trial_dir: Path) -> None:
        """Upload the files the objective's ``outputs`` globs match in the trial's directory."""
        patterns = objective.get("outputs") or []
        if not patterns or self.slot.is_lost(trial):
            return
        found: dict[Path, None] = {}
        inside = trial_dir.resolve()
        for pattern in patterns:
            for path in sorted(trial_dir.glob(pattern)):
                # no links: a file stored is one the trial wrote in its own directory
                if path.is_file() and not path.is_symlink() and path.resolve().is_relative_to(inside):
                    found.setdefault(path)
        total, names = 0, set[str]()
        for path in found:
            relative = path.relative_to(trial_dir).as_posix()
            name = relative.replace("/", "-")
            size = path.stat().st_size
            why = ""
            if not _ARTIFACT_NAME.match(name) or name == "trial.log":
                why = f"its name {name!r} cannot be stored (letters, digits, . _ -; not trial.log)"
            elif name in names:
                why = f"another output is stored as {name!r}"
            elif size > OUTPUT_FILE_LIMIT:
                why = f"{size} bytes, over the {OUTPUT_FILE_LIMIT} bytes a file may have"
            elif total + size > OUTPUT_TOTAL_LIMIT:
                why = f"the outputs would pass {OUTPUT_TOTAL_LIMIT} bytes in all"
            elif len(names) >= OUTPUT_FILE_COUNT:
                why = f"more than {OUTPUT_FILE_COUNT} files"
            if why:
                _log.warning(
                    "trial %d of %s: output %s not uploaded: %s", trial.number, trial.study, relative, why
                )
                continue
            try:
                trial.upload(path, filename=name)
            except Exception as exc:  # the outcome still counts without its files
                _log.warning(
                    "trial %d of %s: output %s not uploaded: %s", trial.number, trial.study, relative, exc
                )
                continue
            names.add(name)
            total += size

    def _run(self, study: dict[str, Any], trial: Trial, tmp: Path, trial_dir: Path) -> None:
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
        metrics.start(trial_dir)  # the child runs in its trial's directory
        try:
            argv, script = self._argv(objective, trial)
        except KeyError as exc:  # a placeholder of a parameter this trial does not have (conditional)
            self._setup_failed(trial, f"cannot start the command: no value for placeholder {exc}")
            return
        if script is not None and not script.is_file():
            self._setup_failed(
                trial,
                f"cannot start the command: no script {script} (a relative script is found in the "
                f"worker's code directory {self.code_dir}: start the worker there or pass --code-dir)",
            )
            return
        try:
            child = _Child(
                argv,
                self._env(objective, trial, result_file, trial_dir),
                tmp / "trial.log",
                on_line,
                trial_dir,
            )
        except OSError as exc:  # not found, not executable
            self._setup_failed(trial, f"cannot start the command: {type(exc).__name__}: {exc}")
            return

        def reason() -> str:
            for found in metrics.read_file():
                on_metrics(*found)
            if slot.stop.is_set() or printed.get("stopped"):
                return "stopped"
            if slot.is_lost(trial):
                return "lost"
            if printed.get("pruned"):
                return "pruned"
            return "timeout" if timeout is not None and time.monotonic() - started > timeout else ""

        why = child.watch(reason)
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
        if why != "lost":
            self._upload_outputs(objective, trial, trial_dir)
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
        elif code > 0 and not printed and not measured and setup_error(code, tail, kind=objective["kind"]):
            what = "cannot load the entrypoint" if objective["kind"] == "python" else "cannot run the script"
            self._setup_failed(trial, f"{what} (exit code {code}); stderr: {tail}", attrs=attrs)
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

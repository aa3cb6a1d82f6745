"""A trial's processes and output, seen from its slot: everything a trial starts (a ``setsid``
grandchild too) ends with it however it ends, its log keeps the last 10 MiB, and a huge line
without a newline does not grow the slot.

The slot here is a small process (``SLOT``) that runs :class:`ProgramRunner` with a fake slot and
trial, so no service or database is involved: these tests run on one database only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import caviar
from caviar.service.processes import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux: /proc and subreapers")

SLOT = textwrap.dedent(
    """
    import json, os, resource, shutil, signal, sys, threading, types
    from caviar.worker._program import ProgramRunner

    objective, out = json.loads(sys.argv[1]), sys.argv[2]
    finished = []
    def ask(study):
        return types.SimpleNamespace(
            study=study, number=0, params={}, retry_of=None, heartbeat_interval_s=1.0, credential=None,
            upload=lambda path, filename: shutil.copyfile(path, os.path.join(out, filename)),
        )
    slot = types.SimpleNamespace(
        options=types.SimpleNamespace(
            pass_env=[], token="worker-secret", code_dir=os.getcwd(), workdir=None, keep_trial_dirs=False
        ),
        client=types.SimpleNamespace(url="http://127.0.0.1:9", http=None),
        device="cpu", worker_id="w", stop=threading.Event(), ask=ask,
        should_prune=lambda trial, step, value: objective.get("prune", False),
        finish=lambda trial, state, **kw: finished.append({"state": state, **kw}),
        hand_back=lambda trial, reason: finished.append({"state": "handed back", "reason": reason}),
        is_lost=lambda trial: False,
    )
    signal.signal(signal.SIGTERM, lambda *_: slot.stop.set())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ProgramRunner(slot).run({"name": "s", "definition": {"objective": objective, "metric": "value"}})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"finished": finished, "grown_kib": peak - before}), flush=True)
    """
)

# starts a grandchild in a new session (it writes its pid to the file `grandchild` and keeps the
# trial's stdout and stderr open), then does what the test says
GRANDCHILD = (
    "setsid sh -c 'echo $$ > grandchild.tmp; mv grandchild.tmp grandchild; exec sleep 300' & "
    "while [ ! -e grandchild ]; do sleep 0.01; done;"
)


def run_slot(tmp: Path, command: str, *, on_start: Any = None, **objective: Any) -> dict[str, Any]:
    """Run one trial of ``sh -c command`` (in ``tmp``) in a slot process; what the slot told."""
    spec = {"kind": "command", "command": ["sh", "-c", f"cd {tmp}; {command}"], **objective}
    slot = subprocess.Popen(
        [sys.executable, "-c", SLOT, json.dumps(spec), str(tmp)], cwd=tmp, stdout=subprocess.PIPE, text=True
    )
    try:
        if on_start is not None:
            on_start(slot)
        out, _ = slot.communicate(timeout=60)
    finally:
        slot.kill()
    assert slot.returncode == 0, out
    return dict(json.loads(out.splitlines()[-1]))


def gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def grandchild(tmp_path: Path) -> Any:
    """The grandchild's pid once the test ran (it is killed afterwards in any case)."""
    pids: list[int] = []

    def read() -> int:
        pids.append(int((tmp_path / "grandchild").read_text()))
        return pids[-1]

    yield read
    for pid in pids:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_setsid_grandchild_ends_with_a_trial_that_exits(tmp_path: Path, grandchild: Any) -> None:
    told = run_slot(tmp_path, f"{GRANDCHILD} echo caviar-result value=1")
    assert [f["state"] for f in told["finished"]] == ["complete"]
    assert gone(grandchild())


def test_a_setsid_grandchild_ends_with_a_trial_that_times_out(tmp_path: Path, grandchild: Any) -> None:
    told = run_slot(tmp_path, f"{GRANDCHILD} sleep 300", timeout_s=1)
    assert told["finished"][0]["state"] == "fail"
    assert "timeout" in told["finished"][0]["reason"]
    assert gone(grandchild())


def test_a_setsid_grandchild_ends_with_a_pruned_trial(tmp_path: Path, grandchild: Any) -> None:
    command = f"{GRANDCHILD} echo caviar-report step=0 value=1; sleep 300"
    told = run_slot(tmp_path, command, prune=True)
    assert [f["state"] for f in told["finished"]] == ["pruned"]
    assert gone(grandchild())


def test_a_setsid_grandchild_ends_with_a_trial_handed_back_by_sigterm(
    tmp_path: Path, grandchild: Any
) -> None:
    def stop_when_started(slot: subprocess.Popen[str]) -> None:
        wait_until(lambda: (tmp_path / "grandchild").exists(), timeout=30, message="no grandchild")
        slot.send_signal(signal.SIGTERM)

    told = run_slot(tmp_path, f"{GRANDCHILD} sleep 300", on_start=stop_when_started)
    assert [f["state"] for f in told["finished"]] == ["handed back"]
    assert gone(grandchild())


def test_the_log_keeps_the_last_10_mib(tmp_path: Path) -> None:
    # 30 MiB of numbered 1 KiB lines, then the result
    lines = 30 * 1024
    program = f"import sys\nfor i in range({lines}): sys.stdout.write('line %09d%s\\n' % (i, '.' * 1009))\n"
    (tmp_path / "print.py").write_text(program + "print('caviar-result value=1')\n")
    told = run_slot(tmp_path, f"{sys.executable} print.py")
    assert [f["state"] for f in told["finished"]] == ["complete"]
    log = (tmp_path / "trial.log").read_bytes()
    assert len(log) == 10 * 1024 * 1024
    assert log.endswith(b"line %09d%s\ncaviar-result value=1\n" % (lines - 1, b"." * 1009))
    assert b"line %09d" % 0 not in log
    assert b"line %09d" % (lines - 10 * 1024 + 1) in log
    assert b"line %09d" % (lines - 10 * 1024 - 1) not in log


@pytest.mark.slow
def test_a_300_mb_line_without_newline_costs_no_more_memory_than_the_cap(tmp_path: Path) -> None:
    size = 300 * 1000 * 1000
    started = time.monotonic()
    told = run_slot(tmp_path, f"head -c {size} /dev/zero | tr '\\0' x; echo; echo caviar-result value=2")
    # the huge line is logged (its end), not parsed; the next line still is
    assert told["finished"][0]["state"] == "complete"
    assert told["finished"][0]["values"] == [2.0]
    print("slot grew by", told["grown_kib"], "KiB")
    assert told["grown_kib"] < 60 * 1024, told
    log = (tmp_path / "trial.log").read_bytes()
    assert len(log) == 10 * 1024 * 1024
    assert log.endswith(b"xxx\ncaviar-result value=2\n")
    assert time.monotonic() - started < 60


def test_a_huge_stderr_line_fails_the_trial_with_its_reason(tmp_path: Path) -> None:
    told = run_slot(tmp_path, "head -c 20000000 /dev/zero | tr '\\0' y >&2; echo >&2; echo broke >&2; exit 3")
    assert told["finished"][0]["state"] == "fail"
    reason = told["finished"][0]["reason"]
    assert reason.startswith("exit code 3; stderr:"), reason
    assert "(a line of 20000001 bytes: see trial.log)\nbroke" in reason
    assert len(reason) < 2000


@pytest.mark.slow
def test_a_real_worker_ends_the_setsid_grandchildren_of_timed_out_trials(db_url: str, tmp_path: Path) -> None:
    """Through the service and a real worker (the issue's finding: every timeout left a process)."""
    from tests.worker.test_programs import serve_api, start_worker

    # every attempt (the trial's retries too) starts a grandchild and notes its pid
    command = f"cd {tmp_path} && (setsid sh -c 'echo $$ >> grandchildren; exec sleep 300' &) && sleep 300"
    server, url = serve_api(db_url, tmp_path)
    try:
        with caviar.Client(url) as client:
            study = client.create_study(
                {
                    "name": "orphans",
                    "direction": "maximize",
                    "search_space": {"x": {"type": "float", "low": 0.0, "high": 1.0}},
                    "objective": {"kind": "command", "command": ["sh", "-c", command], "timeout_s": 2},
                    "sampler": {"type": "random", "seed": 0},
                    # two attempts (the retry starts a grandchild too), then the study fails
                    "budget": {"n_trials": 1, "max_retries": 1, "max_failed_trials": 2},
                }
            )
            with start_worker(url, tmp_path, tmp_path, "--cpu", "1", "--exit-when-idle", "1") as worker:
                assert worker.wait(120) == 0, worker.output()
            trials = study.trials()
        pids = [int(line) for line in (tmp_path / "grandchildren").read_text().split()]
        ran = [(t["state"], t["fail_reason"]) for t in trials if t["state"] != "waiting"]  # retries
        assert ran and all(s == "fail" and "timeout" in (r or "") for s, r in ran), ran
        assert len(pids) == len(ran)
        assert [pid for pid in pids if not gone(pid)] == []
    finally:
        server.stop()
        noted = tmp_path / "grandchildren"
        for pid in [int(line) for line in noted.read_text().split()] if noted.exists() else []:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)

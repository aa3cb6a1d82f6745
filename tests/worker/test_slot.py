"""A slot's bookkeeping of the trials it holds: claims, tells, hand-backs, lost leases and stops.

These drive :class:`caviar.worker._slot.Slot` with stand-in trials and a stand-in worker API, in
this process and without a service (the end-to-end behaviour is in test_worker.py), so that each
rule is checked on its own and fast enough for ``make mutants``.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import pytest

from caviar._errors import CaviarApiError, LeaseLost
from caviar.worker._api import Stopped
from caviar.worker._options import WorkerOptions
from caviar.worker._slot import Slot


class FakeTrial:
    """Records every call a slot makes on a trial."""

    def __init__(self, study: str, number: int, *, refuse: CaviarApiError | None = None) -> None:
        self.study = study
        self.number = number
        self.credential = f"cred-{study}-{number}"
        self.calls: list[tuple[Any, ...]] = []
        self.refuse = refuse
        self.prune_answer = False
        self.report_code: str | None = None  # what a batch of reports answers for it

    def _call(self, *call: Any) -> None:
        self.calls.append(call)
        if self.refuse is not None:
            raise self.refuse

    def tell(self, *, values: Any = None, user_attrs: Any = None) -> None:
        self._call("tell", values, user_attrs)

    def prune(self, *, user_attrs: Any = None) -> None:
        self._call("prune", user_attrs)

    def fail(self, reason: str, *, user_attrs: Any = None, fatal: bool = False) -> None:
        self._call("fail", reason, user_attrs, fatal)

    def release(self, reason: str) -> None:
        self._call("release", reason)

    def report(self, value: float, step: int) -> None:
        self._call("report", value, step)

    def should_prune(self) -> bool:
        self.calls.append(("should_prune",))
        return self.prune_answer


class FakeApi:
    """The worker API a slot calls: hands out the queued trials, answers heartbeats."""

    def __init__(self, trials: list[FakeTrial] | None = None) -> None:
        self.trials = list(trials or [])
        self.asked: list[tuple[str, Any]] = []
        self.beats: list[tuple[list[Any], str]] = []
        self.lost_answers: list[Any] = []
        self.batches: list[tuple[str, list[tuple[int, int, float]]]] = []

    def ask(self, study: str, *, fixed: Any = None) -> FakeTrial | None:
        self.asked.append((study, fixed))
        return self.trials.pop(0) if self.trials else None

    def report_many(
        self, study: str, reports: list[tuple[FakeTrial, int, float]]
    ) -> list[tuple[bool, str | None]]:
        self.batches.append((study, [(trial.number, step, value) for trial, step, value in reports]))
        return [
            (trial.prune_answer or trial.report_code is not None, trial.report_code)
            for trial, _, _ in reports
        ]

    def beat(self, held: list[Any], *, status: str) -> list[Any]:
        self.beats.append((held, status))
        answer = self.lost_answers.pop(0) if self.lost_answers else []
        if isinstance(answer, Exception):
            raise answer
        return answer


def make_slot(trials: list[FakeTrial] | None = None, **options: Any) -> tuple[Slot, FakeApi]:
    slot = Slot(WorkerOptions(url="http://127.0.0.1:9", gpus="none", cpu=1, **options), "cpu")
    api = FakeApi(trials)
    slot.api = api  # type: ignore[assignment]
    return slot, api


def held_keys(slot: Slot) -> set[tuple[str, int]]:
    return set(slot.held)


def test_a_claimed_trial_is_held_under_its_study_and_number() -> None:
    trial = FakeTrial("s", 3)
    slot, api = make_slot([trial])
    assert slot.ask("s", fixed={"lr": 0.1}) is trial
    assert api.asked == [("s", {"lr": 0.1})]
    assert slot.held == {("s", 3): trial}
    # nothing to claim: nothing held, None
    assert slot.ask("s") is None
    assert held_keys(slot) == {("s", 3)}


def test_a_stopping_slot_claims_nothing() -> None:
    slot, api = make_slot([FakeTrial("s", 0)])
    slot.stop.set()
    assert slot.ask("s") is None
    assert api.asked == []


def test_max_trials_counts_the_finished_and_the_held_ones() -> None:
    slot, api = make_slot([FakeTrial("s", n) for n in range(4)], max_trials=3)
    assert slot.room() == 3
    first = slot.ask("s")
    assert first is not None
    assert slot.room() == 2
    slot.finish(first, "complete", values=[1.0])
    assert slot.room() == 2  # one finished, none held
    assert slot.ask("s") is not None and slot.ask("s") is not None
    assert slot.room() == 0
    # no room: not asked at all
    assert slot.ask("s") is None
    assert len(api.asked) == 3
    # never below zero
    slot.finished = 10
    assert slot.room() == 0
    unlimited, _ = make_slot()
    assert unlimited.room() is None


@pytest.mark.parametrize(
    ("state", "kwargs", "call"),
    [
        ("complete", {"values": [1.5], "user_attrs": {"a": 1}}, ("tell", [1.5], {"a": 1})),
        ("pruned", {"user_attrs": {"b": 2}}, ("prune", {"b": 2})),
        (
            "failed",
            {"reason": "diverged", "user_attrs": {"c": 3}, "fatal": True},
            ("fail", "diverged", {"c": 3}, True),
        ),
        ("failed", {}, ("fail", "", None, False)),
    ],
)
def test_finish_tells_the_outcome_and_forgets_the_trial(
    state: str, kwargs: dict[str, Any], call: tuple[Any, ...]
) -> None:
    trial = FakeTrial("s", 1)
    slot, _ = make_slot([trial])
    slot.ask("s")
    slot.stopping.add(("s", 1))
    slot.finish(trial, state, **kwargs)  # type: ignore[arg-type]
    assert trial.calls == [call]
    assert slot.held == {} and slot.stopping == set() and slot.lost == set()
    assert slot.finished == 1


def test_a_lost_trial_is_finished_without_a_tell() -> None:
    trial = FakeTrial("s", 1)
    other = FakeTrial("s", 2)
    slot, _ = make_slot([trial, other])
    slot.ask("s")
    slot.ask("s")
    slot.lost.add(("s", 1))
    assert slot.is_lost(trial) and not slot.is_lost(other)
    slot.finish(trial, "complete", values=[1.0])
    assert trial.calls == []
    assert slot.lost == set() and held_keys(slot) == {("s", 2)}
    assert slot.finished == 1


def test_a_refused_tell_is_logged_and_the_trial_still_finished(caplog: pytest.LogCaptureFixture) -> None:
    trial = FakeTrial("s", 1, refuse=CaviarApiError(409, "trial_finished", "already told"))
    slot, _ = make_slot([trial])
    slot.ask("s")
    slot.finish(trial, "complete", values=[1.0])
    assert slot.held == {} and slot.finished == 1
    assert "tell complete of trial 1 of s refused" in caplog.text


def test_a_hand_back_releases_the_trial_with_its_reason_and_does_not_count_as_finished() -> None:
    trial = FakeTrial("s", 4)
    slot, _ = make_slot([trial], max_trials=2)
    slot.ask("s")
    slot.stopping.add(("s", 4))
    slot.hand_back(trial, "out of memory")
    assert trial.calls == [("release", "out of memory")]
    assert slot.held == {} and slot.stopping == set()
    assert slot.finished == 0
    assert slot.room() == 2


def test_a_lost_trial_is_forgotten_without_a_release_and_a_refused_release_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lost = FakeTrial("s", 1)
    refused = FakeTrial("s", 2, refuse=CaviarApiError(409, "lease_lost", "gone"))
    slot, _ = make_slot([lost, refused])
    slot.ask("s")
    slot.ask("s")
    slot.lost.add(("s", 1))
    slot.hand_back(lost, "stopping")
    assert lost.calls == []
    assert slot.lost == set()
    slot.hand_back(refused, "stopping")
    assert refused.calls == [("release", "stopping")]
    assert slot.held == {}
    assert "hand back of trial 2 of s refused" in caplog.text


def test_hand_back_all_hands_back_every_held_trial() -> None:
    trials = [FakeTrial("a", 0), FakeTrial("b", 0), FakeTrial("a", 1)]
    slot, _ = make_slot(list(trials))
    for study in ("a", "b", "a"):
        slot.ask(study)
    slot.hand_back_all("worker stops")
    assert [t.calls for t in trials] == [[("release", "worker stops")]] * 3
    assert slot.held == {}


def test_still_held_keeps_the_order_of_the_trials_not_told_yet() -> None:
    trials = [FakeTrial("s", n) for n in range(3)]
    slot, _ = make_slot(list(trials))
    for _ in trials:
        slot.ask("s")
    slot.finish(trials[1], "complete", values=[0.0])
    assert slot.still_held(trials) == [trials[0], trials[2]]


def test_should_prune_reports_and_asks_the_pruner() -> None:
    trial = FakeTrial("s", 1)
    slot, _ = make_slot([trial])
    slot.ask("s")
    assert slot.should_prune(trial, 2, 0.5) is False  # type: ignore[arg-type]
    trial.prune_answer = True
    assert slot.should_prune(trial, 3, 1) is True  # type: ignore[arg-type]
    assert trial.calls == [("report", 0.5, 2), ("should_prune",), ("report", 1.0, 3), ("should_prune",)]
    assert type(trial.calls[2][1]) is float and type(trial.calls[2][2]) is int


def test_should_prune_stops_lost_and_stopped_trials_without_reporting() -> None:
    lost, stopping = FakeTrial("s", 1), FakeTrial("s", 2)
    slot, _ = make_slot([lost, stopping])
    slot.ask("s")
    slot.ask("s")
    slot.lost.add(("s", 1))
    slot.stopping.add(("s", 2))
    assert slot.should_prune(lost, 1, 0.0) is True  # type: ignore[arg-type]
    assert slot.should_prune(stopping, 1, 0.0) is True  # type: ignore[arg-type]
    assert lost.calls == [] and stopping.calls == []


def test_a_lease_lost_on_report_marks_the_trial_lost() -> None:
    trial = FakeTrial("s", 1, refuse=LeaseLost(409, "lease_lost", "reaped"))
    slot, _ = make_slot([trial])
    slot.ask("s")
    assert slot.should_prune(trial, 1, 0.0) is True  # type: ignore[arg-type]
    assert slot.lost == {("s", 1)}
    assert slot.is_lost(trial)  # type: ignore[arg-type]


def test_should_prune_raises_stopped_once_the_slot_stops() -> None:
    trial = FakeTrial("s", 1)
    slot, _ = make_slot([trial])
    slot.ask("s")
    slot.stop.set()
    with pytest.raises(Stopped):
        slot.should_prune(trial, 1, 0.0)  # type: ignore[arg-type]
    assert trial.calls == []


def test_a_batch_of_reports_skips_lost_and_stopping_trials_and_marks_refused_ones_lost() -> None:
    kept, pruned, lost, stopping, refused = (FakeTrial("s", n) for n in range(5))
    slot, api = make_slot([kept, pruned, lost, stopping, refused])
    for _ in range(5):
        slot.ask("s")
    pruned.prune_answer = True
    refused.report_code = "not_your_trial"
    slot.lost.add(("s", 2))
    slot.stopping.add(("s", 3))
    reports = [(t, 4, 0.5) for t in (kept, pruned, lost, stopping, refused)]
    assert slot.should_prune_many(reports) == [False, True, True, True, True]  # type: ignore[arg-type]
    assert api.batches == [("s", [(0, 4, 0.5), (1, 4, 0.5), (4, 4, 0.5)])]  # one call, in order
    assert slot.lost == {("s", 2), ("s", 4)}
    assert slot.should_prune_many([(lost, 5, 0.5)]) == [True]  # type: ignore[list-item]
    assert len(api.batches) == 1  # nothing left to send: no call
    with pytest.raises(ValueError, match="of one study"):
        slot.should_prune_many([(kept, 5, 0.5), (FakeTrial("t", 0), 5, 0.5)])  # type: ignore[list-item]
    slot.stop.set()
    with pytest.raises(Stopped):
        slot.should_prune_many([(kept, 6, 0.5)])  # type: ignore[list-item]


def run_heartbeats(slot: Slot, api: FakeApi, beats: int) -> None:
    """Run the heartbeat loop until it has sent ``beats`` heartbeats."""
    seen = threading.Event()
    original = api.beat

    def beat(held: list[Any], *, status: str) -> list[Any]:
        try:
            return original(held, status=status)
        finally:
            if len(api.beats) >= beats:
                slot.done.set()
                seen.set()

    api.beat = beat  # type: ignore[method-assign]
    slot.heartbeat_interval_s = 0.002
    thread = threading.Thread(target=slot._heartbeat_loop, daemon=True)
    thread.start()
    assert seen.wait(30)
    thread.join(30)
    assert not thread.is_alive()


def test_heartbeats_name_the_held_trials_and_mark_the_lost_and_stopped_ones() -> None:
    trials = [FakeTrial("s", n) for n in range(4)]
    slot, api = make_slot(list(trials))
    for _ in trials:
        slot.ask("s")
    slot.lost.add(("s", 3))  # already lost: not renewed
    api.lost_answers = [
        [("s", 0, "lease_lost"), ("s", 1, "study_stopped")],
        CaviarApiError(0, "unreachable", "down"),  # a failed beat: the loop goes on
        [("s", 1, "study_stopped")],
    ]
    run_heartbeats(slot, api, 4)
    first_held, first_status = api.beats[0]
    assert first_status == "busy"
    assert sorted(first_held) == [("s", n, f"cred-s-{n}") for n in range(3)]
    assert slot.lost == {("s", 0), ("s", 3)}
    assert slot.stopping == {("s", 1)}
    # the stopped trial's lease is kept: renewed by the next beats, the lost one no more
    assert sorted(api.beats[-1][0]) == [("s", 1, "cred-s-1"), ("s", 2, "cred-s-2")]
    assert all(n in slot.held for n in [("s", 0), ("s", 1), ("s", 2), ("s", 3)])


@pytest.mark.parametrize("code", ["lease_lost", "trial_finished", "study_stopped"])
def test_a_beat_answered_after_its_trial_left_does_not_touch_a_new_trial_under_the_same_number(
    code: str,
) -> None:
    """A study deleted and recreated under its name numbers its trials from 0 again: a beat that
    was out when the old trial 0 was handed back, answered "lost" for it, must not mark the new
    trial 0 (it would get no heartbeat and no tell, and its lease would lapse)."""
    old, new = FakeTrial("s", 0), FakeTrial("s", 0)
    new.credential = "cred-new"
    slot, api = make_slot([old, new])
    slot.ask("s")
    beat_out, answer = threading.Event(), threading.Event()

    def beat(held: list[Any], *, status: str) -> list[Any]:
        api.beats.append((held, status))
        if len(api.beats) == 1:  # the first beat: for the old trial, answered late
            beat_out.set()
            assert answer.wait(30)
            return [("s", 0, code)]
        slot.done.set()
        return []

    api.beat = beat  # type: ignore[method-assign]
    slot.heartbeat_interval_s = 0.002
    thread = threading.Thread(target=slot._heartbeat_loop, daemon=True)
    thread.start()
    assert beat_out.wait(30)
    slot.hand_back(old, "refused")  # type: ignore[arg-type]
    assert slot.ask("s") is new
    answer.set()
    thread.join(30)
    assert not thread.is_alive()
    assert api.beats[0][0] == [("s", 0, "cred-s-0")]
    assert api.beats[-1][0] == [("s", 0, "cred-new")]  # the new trial is still renewed
    assert slot.lost == set() and slot.stopping == set()
    assert not slot.is_lost(new)  # type: ignore[arg-type]


def test_a_trial_claimed_again_under_a_number_is_not_lost_or_stopping() -> None:
    old, new = FakeTrial("s", 0), FakeTrial("s", 0)
    slot, _ = make_slot([old, new])
    slot.ask("s")
    slot.lost.add(("s", 0))
    slot.stopping.add(("s", 0))
    slot.held.pop(("s", 0))  # left without a tell or a hand-back clearing its marks
    slot.ask("s")
    assert slot.lost == set() and slot.stopping == set()


def test_an_idle_slot_beats_idle() -> None:
    slot, api = make_slot()
    run_heartbeats(slot, api, 1)
    assert api.beats[0] == ([], "idle")


class LoopApi(FakeApi):
    """A worker API with a queue: ``queue`` answers the queued studies (each call, the next answer)."""

    def __init__(self, queues: list[Any], trials: list[FakeTrial] | None = None) -> None:
        super().__init__(trials)
        self.queues = list(queues)
        self.queue_calls: list[tuple[list[str], Any]] = []
        self.registered: list[dict[str, Any]] = []

    def register(self, **about: Any) -> float:
        self.registered.append(about)
        return 60.0

    def queue(self, *, kinds: list[str], studies: Any = ()) -> list[dict[str, Any]]:
        self.queue_calls.append((list(kinds), studies))
        answer = self.queues.pop(0) if self.queues else []
        if isinstance(answer, Exception):
            raise answer
        return list(answer)


class FakeRunner:
    """A runner that claims one trial per study and holds it (or finishes it)."""

    def __init__(self, slot: Slot, *, finish: bool) -> None:
        self.slot = slot
        self.finish = finish
        self.ran: list[str] = []

    def run(self, item: dict[str, Any]) -> bool:
        self.ran.append(item["name"])
        trial = self.slot.ask(item["name"])
        if trial is None:
            return False
        if self.finish:
            self.slot.finish(trial, "complete", values=[1.0])  # type: ignore[arg-type]
        return True


def loop_slot(
    queues: list[Any], trials: list[FakeTrial], *, finish: bool, **options: Any
) -> tuple[Slot, LoopApi, FakeRunner]:
    slot = Slot(
        WorkerOptions(url="http://127.0.0.1:9", gpus="none", cpu=1, poll_interval_s=0.001, **options), "cpu"
    )
    api = LoopApi(queues, trials)
    slot.api = api  # type: ignore[assignment]
    runner = FakeRunner(slot, finish=finish)
    slot.runners = {"trainer": runner}
    return slot, api, runner


def trainer_item(name: str) -> dict[str, Any]:
    return {"name": name, "objective_kind": "trainer", "definition": {"objective": {"kind": "trainer"}}}


def test_the_loop_works_until_max_trials_then_says_it_stopped() -> None:
    trials = [FakeTrial("a", 0), FakeTrial("a", 1), FakeTrial("a", 2)]
    slot, api, runner = loop_slot(
        [[trainer_item("a")]] * 5, list(trials), finish=True, max_trials=2, exit_when_idle_s=30
    )
    slot.run()
    assert slot.finished == 2 and runner.ran == ["a", "a"]
    assert api.registered and api.registered[0]["device"] == "cpu"
    assert api.queue_calls[0] == (["trainer"], ())
    assert api.beats[-1] == ([], "stopped")  # the last beat says the slot stopped
    assert slot.stop.is_set() and slot.done.is_set()


def test_a_stopping_loop_hands_back_what_it_holds() -> None:
    trials = [FakeTrial("a", 0)]
    slot, _api, _ = loop_slot([[trainer_item("a")]], list(trials), finish=False, max_trials=1)
    slot.run()  # holds one trial, no room left: the loop ends and hands it back
    assert trials[0].calls == [("release", "handed back by a stopping worker")]
    assert slot.held == {} and slot.finished == 0


def test_an_idle_slot_exits_after_exit_when_idle_and_goes_on_through_service_errors() -> None:
    slot, api, runner = loop_slot(
        [CaviarApiError(503, "unavailable", "down"), [trainer_item("a")], []],
        [],
        finish=True,
        exit_when_idle_s=0.05,
    )
    slot.run()
    assert runner.ran == ["a"]  # the study had nothing to claim
    assert len(api.queue_calls) >= 3


def test_a_permanent_service_error_ends_the_loop() -> None:
    slot, _, _ = loop_slot(
        [CaviarApiError(401, "unauthorized", "bad token")], [], finish=True, exit_when_idle_s=5
    )
    with pytest.raises(CaviarApiError):
        slot.run()
    assert slot.stop.is_set()


def test_a_slot_stopped_between_studies_runs_no_more() -> None:
    slot, _, runner = loop_slot([[trainer_item("a"), trainer_item("b")]], [], finish=True)
    slot.stop.set()
    assert slot._work_once() is False
    assert runner.ran == []


def test_the_first_study_with_work_ends_the_pass() -> None:
    slot, _, runner = loop_slot(
        [[trainer_item("a"), trainer_item("b"), trainer_item("c")]], [FakeTrial("b", 0)], finish=True
    )
    slot.api.trials = []  # type: ignore[attr-defined]
    assert slot._work_once() is False
    assert runner.ran == ["a", "b", "c"]
    slot2, _, runner2 = loop_slot([[trainer_item("a"), trainer_item("b")]], [FakeTrial("a", 0)], finish=True)
    assert slot2._work_once() is True
    assert runner2.ran == ["a"]


def code_item(name: str, created: str = "2026-01-01", objective: str = "o1") -> dict[str, Any]:
    return {
        "name": name,
        "objective_kind": "command",
        "created_at": created,
        "objective_fingerprint": objective,
        "definition": {"objective": {"kind": "command", "command": ["evil", "--now"]}},
    }


def test_a_refused_code_study_gets_one_trial_handed_back_with_the_reason_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refused = FakeTrial("c", 0)
    slot, api, _ = loop_slot([], [refused, FakeTrial("c", 1)], finish=True, allow_code=("command:ls",))
    item = code_item("c")
    assert slot._refuse_code(item) is True
    ((name, reason),) = refused.calls
    assert name == "release" and reason.startswith(f"refused by worker {slot.worker_id}: ")
    assert slot.held == {}
    caplog.clear()
    assert slot._refuse_code(item) is True  # said once: nothing claimed again
    assert len(api.asked) == 1 and "refusing" not in caplog.text
    # an allowed program is not refused
    ok = code_item("ok")
    ok["definition"]["objective"]["command"] = ["ls", "-l"]
    assert slot._refuse_code(ok) is False


def test_a_slot_imports_torch_only_for_its_first_trainer_study() -> None:
    """A slot that runs only programs starts without torch (about 2 s and 200 MB a slot)."""
    script = (
        "import sys\n"
        "from caviar.worker._options import WorkerOptions\n"
        "from caviar.worker._slot import Slot\n"
        "slot = Slot(WorkerOptions(url='http://127.0.0.1:9', gpus='none', cpu=1, allow_code=['all']), 'cpu')\n"
        "assert set(slot.runners) >= {'trainer', 'python', 'command'}, slot.runners\n"
        "assert 'torch' not in sys.modules, 'torch imported before a trainer study'\n"
        "assert slot.trainer is slot.trainer and 'torch' in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr

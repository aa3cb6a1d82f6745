"""One worker slot (``caviar.worker._slot.Slot``) in this process, against a live service in this
process: out-of-memory halving of a fused group, asha's in-group cut with its refills, and a lease
lost mid-training.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from caviar.service import store, trials
from caviar.service.db import Database
from caviar.service.processes import wait_until
from tests.worker.conftest import digits_study, finished_counts, run_slot_in_thread

pytestmark = pytest.mark.slow


# ---- one slot in this process, against a live service in this process ------------------------


@pytest.mark.one_database
def test_out_of_memory_halves_the_fused_group_and_the_trials_still_finish(
    db: Database, live: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fused group of 4 that runs out of device memory in its training step is handed back; the
    slot fuses 2 from then on and every trial finishes (the OOM is raised by the optimizer step)."""
    import torch

    from caviar.trainer._optim import FusedOptimizer

    body = digits_study("oom", n_trials=6, max_epochs=2, fuse=4)
    body["sampler"] = {"type": "random", "seed": 0}  # no start-up trials: the first group is fused
    body["pruner"] = {"type": "none"}
    # a hand-back is no failure and uses no retry: with none allowed, a failed member would end the study
    body["budget"].update(max_retries=0, max_failed_trials=0)
    store.create_study(db, store.parse_definition(body))
    sizes: list[int] = []
    step = FusedOptimizer.step

    def step_or_oom(self: FusedOptimizer) -> None:
        sizes.append(len(self.lr))
        if len(self.lr) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        step(self)

    monkeypatch.setattr(FusedOptimizer, "step", step_or_oom)
    slot = run_slot_in_thread(live, 120, fuse=4)
    assert slot.trainer.max_fuse == 2
    assert sizes[0] == 4 and sizes.count(4) == 1  # one OOM, then never 4 again
    after = sizes[1:]
    assert after and max(after) == 2, sorted(set(after))
    items = trials.list_trials(db, "oom", limit=1000).items
    handed_back = [t for t in items if t.state == "fail"]
    assert len(handed_back) == 4 and all("out of memory" in (t.fail_reason or "") for t in handed_back)
    assert sorted(t.retry_of for t in items if t.retry_of is not None) == sorted(
        t.number for t in handed_back
    )
    assert sum(1 for t in items if t.state == "complete") == 6
    assert store.load_record(db, "oom").state == "completed"


@pytest.mark.one_database
def test_asha_stops_the_bottom_of_a_fused_cohort_and_refills_its_places(
    db: Database, steady: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no pruner named (asha), a fused group of 4 ranks its members at each rung: at step 1 the
    bottom three of the first cohort stop before any trial has finished, and every stopped member's
    place is taken by a new trial at once, so the group trains 4 members while the budget lasts."""
    from caviar.worker import _trainer
    from caviar.worker._slot import Slot

    body = digits_study("asha", n_trials=16, max_epochs=4, fuse=4)
    body["search_space"] = {k: body["search_space"][k] for k in ("lr", "dropout")}  # all fusible
    body["objective"]["fixed"] = {"layers": 1, "hidden_units": 16, "batch_size": 64, "optimizer": "adam"}
    body["sampler"] = {"type": "random", "seed": 0}  # no start-up trials: the first group is fused
    del body["pruner"]
    store.create_study(db, store.parse_definition(body))
    claimed = [0]
    ask = Slot.ask

    def counting_ask(self: Slot, study: str, **kwargs: Any) -> Any:
        trial = ask(self, study, **kwargs)
        claimed[0] += trial is not None
        return trial

    epochs: list[tuple[int, int, list[int], set[int]]] = []  # (claimed, complete, steps, stopped)
    decide = _trainer.decide_epoch

    def recording_decide(entries: list[tuple[int, int, float]], **kwargs: Any) -> set[int]:
        stopped = decide(entries, **kwargs)
        done = finished_counts(db, "asha")["complete"]
        epochs.append((claimed[0], done, [step for _, step, _ in entries], stopped))
        return stopped

    monkeypatch.setattr(Slot, "ask", counting_ask)
    monkeypatch.setattr(_trainer, "decide_epoch", recording_decide)
    run_slot_in_thread(steady, 300, fuse=4)
    first_rung = next(e for e in epochs if 1 in e[2])
    assert first_rung[2] == [1, 1, 1, 1] and first_rung[1] == 0  # the first cohort, nothing finished yet
    assert len(first_rung[3]) >= 3  # 4 // 3 = 1 goes on
    while_budget_lasts = [e for e in epochs if e[0] < 16]
    assert while_budget_lasts and all(len(steps) == 4 for _, _, steps, _ in while_budget_lasts), epochs
    assert any(len(set(steps)) > 1 for _, _, steps, _ in epochs)  # refills train beside the rest
    counts = finished_counts(db, "asha")
    assert counts["complete"] + counts["pruned"] == 16 and counts["pruned"] >= 3, counts
    assert store.load_record(db, "asha").state == "completed"


def test_a_slot_that_loses_a_lease_mid_training_stops_that_trial_and_records_nothing(
    db: Database, live: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial 0's lease lapses while it trains (no heartbeat for it, its first epoch takes 2.5 s):
    the reaper fails it, another worker takes the retry, and the slot then stops training trial 0
    at its next report and never tells it (nor the retry) anything."""
    from caviar._client import Trial
    from caviar.worker._api import WorkerApi
    from caviar.worker._slot import Slot

    body = digits_study("lease", n_trials=2, max_epochs=4)
    body["sampler"] = {"type": "random", "seed": 0}
    body["pruner"] = {"type": "none"}
    body["budget"]["max_parallel"] = 4
    store.create_study(db, store.parse_definition(body))
    api = f"{live}/api/v1/studies/lease"
    calls: list[tuple[str, int]] = []
    retry: dict[str, Any] = {}
    answers: list[bool] = []  # the slot's prune decisions for trial 0

    for method in ("tell", "prune", "fail", "release"):
        original = getattr(Trial, method)

        def recording(
            self: Trial, *args: Any, _name: str = method, _original: Any = original, **kwargs: Any
        ) -> Any:
            calls.append((_name, self.number))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Trial, method, recording)
    beat = WorkerApi.beat

    def beat_without_trial_0(self: WorkerApi, held: Any, *, status: str) -> Any:
        return beat(self, [ref for ref in held if ref[1] != 0], status=status)

    monkeypatch.setattr(WorkerApi, "beat", beat_without_trial_0)
    report_many = WorkerApi.report_many

    def recording_reports(self: WorkerApi, study: str, reports: Any) -> Any:
        calls.extend(("report", trial.number) for trial, _, _ in reports)
        return report_many(self, study, reports)

    monkeypatch.setattr(WorkerApi, "report_many", recording_reports)
    should_prune_many = Slot.should_prune_many

    def slow_first_epoch_of_trial_0(self: Slot, reports: list[tuple[Trial, int, float]]) -> list[bool]:
        if any(trial.number == 0 for trial, _, _ in reports) and not retry:
            wait_until(lambda: trials.get_trial(db, "lease", 0).state == "fail", 20, "trial 0 was not reaped")
            asked = httpx.post(f"{api}/trials/ask", json={"worker_id": "new-owner"}, timeout=30)
            assert asked.status_code == 200, asked.text
            retry.update(asked.json())
            keeper.start()  # the new owner keeps its lease
        decided = should_prune_many(self, reports)
        answers.extend(
            answer for (trial, _, _), answer in zip(reports, decided, strict=True) if trial.number == 0
        )
        return decided

    import threading

    done = threading.Event()

    def keep_the_retry() -> None:
        while not done.wait(0.2):
            httpx.post(
                f"{api}/trials/{retry['number']}/heartbeat", json={"worker_id": "new-owner"}, timeout=30
            )

    keeper = threading.Thread(target=keep_the_retry, daemon=True)

    monkeypatch.setattr(Slot, "should_prune_many", slow_first_epoch_of_trial_0)
    try:
        run_slot_in_thread(live, 120)
    finally:
        done.set()
    assert retry["number"] != 0
    reaped = trials.get_trial(db, "lease", 0)
    assert reaped.state == "fail" and "lease expired" in (reaped.fail_reason or ""), reaped.fail_reason
    # one report (answered lease_lost), then nothing: training of trial 0 stopped, no result told
    assert [c for c in calls if c[1] == 0] == [("report", 0)], calls
    assert not [c for c in calls if c[1] == retry["number"]], calls
    assert answers == [True]  # stopped at that report, not an epoch later
    taken = trials.get_trial(db, "lease", retry["number"])
    assert (taken.state, taken.retry_of, taken.worker_id) == ("running", 0, "new-owner")
    told = httpx.post(
        f"{api}/trials/{retry['number']}/tell",
        json={"state": "complete", "value": 0.5, "worker_id": "new-owner"},
        timeout=30,
    )
    assert told.status_code == 200, told.text
    assert trials.get_trial(db, "lease", retry["number"]).value == 0.5
    others = [
        t for t in trials.list_trials(db, "lease", limit=100).items if t.number not in (0, retry["number"])
    ]
    assert [t.state for t in others] == ["complete"]  # the slot went on with the study's other trial

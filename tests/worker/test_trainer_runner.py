"""The trainer runner's group rules, with stand-in trials and training: the fused size, the
non-fusible pin, and what an out-of-memory error or a crash does to the group (in this process,
fast; the end-to-end out-of-memory run is in test_worker.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from caviar import trainer
from caviar.worker._api import Stopped
from caviar.worker._slot import Slot
from caviar.worker._trainer import TrainerRunner
from tests.worker.test_slot import FakeTrial, make_slot

OOM_REASON = "out of memory in a fused group; retried with a smaller group"


def study(fuse: int | None = 4, *, started: int = 10, warmup: int = 0) -> dict[str, Any]:
    objective: dict[str, Any] = {"dataset": "digits", "max_epochs": 1}
    if fuse is not None:
        objective["fuse"] = fuse
    return {
        "name": "s",
        "definition": {"objective": objective},
        "metrics": ["accuracy"],
        "trials_started": started,
        "warmup_trials": warmup,
    }


def trial(number: int, lr: float = 0.01, **params: Any) -> FakeTrial:
    made = FakeTrial("s", number)
    made.params = {"lr": lr, **params}  # type: ignore[attr-defined]
    return made


def runner_with(trials: list[FakeTrial], **options: Any) -> tuple[TrainerRunner, Slot]:
    slot, _ = make_slot(trials, **options)
    runner = slot.trainer
    assert isinstance(runner, TrainerRunner)
    return runner, slot


def test_the_fused_size_follows_the_worker_then_the_study_then_the_memory_cap() -> None:
    runner, _ = runner_with([])
    assert runner._fuse_size(study(4)) == 4
    assert runner._fuse_size(study(None)) == 1
    # the sampler's start-up trials are never fused; the last one before the end of warm-up neither
    assert runner._fuse_size(study(4, started=2, warmup=3)) == 1
    assert runner._fuse_size(study(4, started=3, warmup=3)) == 4
    assert runner._fuse_size({**study(4), "trials_started": 0, "warmup_trials": 0}) == 4
    runner.max_fuse = 2
    assert runner._fuse_size(study(4)) == 2
    runner.max_fuse = 8
    assert runner._fuse_size(study(4)) == 4
    pinned, _ = runner_with([], fuse=3)
    assert pinned._fuse_size(study(4)) == 3


def test_a_group_shares_the_first_trials_non_fusible_values() -> None:
    first = trial(0, lr=0.1, hidden=64)
    runner, slot = runner_with([first, trial(1), trial(2)])
    group = runner._claim(study(), 3)
    assert [t.number for t in group] == [0, 1, 2]
    assert slot.api.asked == [("s", None), ("s", {"hidden": 64}), ("s", {"hidden": 64})]  # type: ignore[attr-defined]
    free, slot = runner_with([trial(3), trial(4)])
    assert len(free._claim(study(), 5, pin=False)) == 2
    assert slot.api.asked == [("s", None)] * 3  # type: ignore[attr-defined]
    given, slot = runner_with([trial(5), trial(6)])
    given._claim(study(), 2, {"hidden": 32})
    assert slot.api.asked == [("s", {"hidden": 32})] * 2  # type: ignore[attr-defined]


def test_a_group_formed_in_the_warm_up_is_not_refilled_past_it_the_next_group_is_fused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A group of one (the sampler's warm-up) is refilled only while the warm-up lasts: the first
    trial after it seeds a new group at the fused size, though the study was listed in the warm-up.
    Before, the group of one refilled itself for the rest of the study, which never fused."""
    runner, slot = runner_with([trial(n) for n in range(1, 8)])
    listed = study(4, started=1, warmup=3)  # trials 0-2 are the warm-up; this listing is stale soon
    sizes: list[int] = []
    joined: list[int] = []

    def train_group(configs: list[Any], data: Any, **kwargs: Any) -> None:
        sizes.append(len(configs))
        if len(sizes) == 1:  # the lone member leaves twice: each time its place is offered
            joined.append(len(kwargs["refill"](1)))
            joined.append(len(kwargs["refill"](1)))

    monkeypatch.setattr(trainer, "train_group", train_group)
    runner._train(listed, None, runner._claim(listed, runner._fuse_size(listed)))  # type: ignore[arg-type]
    # trial 1 alone; trial 2 (the warm-up's last) joins it alone; trial 3 seeds a group of 4
    assert sizes == [1, 4]
    assert joined == [1, 0]
    assert sorted(n for _, n in slot.held) == list(range(1, 7))
    assert runner._fuse_size(listed) == 4  # this slot's own asks say the warm-up is over


def test_a_group_formed_after_the_warm_up_refills_at_its_own_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """A group smaller than the fused size for another reason (the study ran out of trials to hand
    out when it was formed) takes refills as before: only warm-up groups end at the warm-up."""
    runner, slot = runner_with([trial(5), trial(6)])
    listed = study(4, started=5, warmup=3)
    joined: list[int] = []

    def train_group(configs: list[Any], data: Any, **kwargs: Any) -> None:
        slot.api.trials.append(trial(7))  # type: ignore[attr-defined]
        joined.append(len(kwargs["refill"](2)))

    monkeypatch.setattr(trainer, "train_group", train_group)
    runner._train(listed, None, runner._claim(listed, runner._fuse_size(listed)))  # type: ignore[arg-type]
    assert joined == [1]  # trial 7 joined the group of two


def fail_training(monkeypatch: pytest.MonkeyPatch, exc: BaseException, *, told_first: int = 0) -> list[int]:
    """Make training tell its first ``told_first`` members (pruned) and then raise ``exc``."""
    sizes: list[int] = []

    def train_group(configs: list[Any], data: Any, **kwargs: Any) -> None:
        sizes.append(len(configs))
        for member in range(told_first):
            result = trainer.TrialResult(
                config=configs[member],
                metrics={"accuracy": 0.5},
                history=[],
                pruned=True,
                epochs=1,
                best_epoch=0,
                seconds=0.1,
                _state={},
                _meta={},
            )
            kwargs["on_result"](member, result)
        raise exc

    monkeypatch.setattr(trainer, "train_group", train_group)
    return sizes


@pytest.mark.parametrize(("size", "halved"), [(4, 2), (3, 1), (2, 1), (5, 2)])
def test_out_of_memory_hands_the_whole_group_back_and_halves_the_fused_size(
    monkeypatch: pytest.MonkeyPatch, size: int, halved: int
) -> None:
    group = [trial(n) for n in range(size)]
    runner, slot = runner_with(list(group))
    sizes = fail_training(monkeypatch, torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"))
    runner._train(study(size), None, runner._claim(study(size), size))  # type: ignore[arg-type]
    assert sizes == [size]
    assert runner.max_fuse == halved
    assert runner._fuse_size(study(size)) == halved
    assert [t.calls for t in group] == [[("release", OOM_REASON)]] * size
    assert slot.held == {} and slot.finished == 0


def test_out_of_memory_halves_what_is_still_held_not_the_group_it_started_with(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    group = [trial(n) for n in range(4)]
    runner, slot = runner_with(list(group))
    fail_training(monkeypatch, torch.cuda.OutOfMemoryError("oom"), told_first=1)
    runner._train(study(4), None, runner._claim(study(4), 4))  # type: ignore[arg-type]
    assert runner.max_fuse == 1  # 3 left: 3 // 2
    assert group[0].calls[0][0] == "prune"
    assert [t.calls for t in group[1:]] == [[("release", OOM_REASON)]] * 3
    assert slot.finished == 1


def test_out_of_memory_of_a_single_trial_fails_it_and_keeps_the_fused_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alone = trial(0)
    runner, slot = runner_with([alone])
    fail_training(monkeypatch, torch.cuda.OutOfMemoryError("oom"))
    runner._train(study(1), None, runner._claim(study(1), 1))  # type: ignore[arg-type]
    assert runner.max_fuse is None
    assert alone.calls == [("fail", "CUDA out of memory", None, False)]
    assert slot.held == {} and slot.finished == 1


def test_a_crash_in_training_fails_every_member_still_held_with_its_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    group = [trial(n) for n in range(3)]
    runner, slot = runner_with(list(group))
    fail_training(monkeypatch, RuntimeError("boom " + "x" * 3000), told_first=1)
    runner._train(study(3), None, runner._claim(study(3), 3))  # type: ignore[arg-type]
    assert runner.max_fuse is None
    assert group[0].calls[0][0] == "prune"
    for member in group[1:]:
        ((name, reason, attrs, fatal),) = member.calls
        assert (name, attrs, fatal) == ("fail", None, False)
        assert reason.startswith("RuntimeError: boom x") and len(reason) == 2000
    assert slot.held == {}


@pytest.mark.parametrize("exc", [Stopped(), trainer.Interrupted()])
def test_a_stop_during_training_leaves_the_group_held_for_the_hand_back(
    monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    group = [trial(n) for n in range(2)]
    runner, slot = runner_with(list(group))
    fail_training(monkeypatch, exc)
    runner._train(study(2), None, runner._claim(study(2), 2))  # type: ignore[arg-type]
    assert [t.calls for t in group] == [[], []]
    assert len(slot.held) == 2 and runner.max_fuse is None


def result(metrics: dict[str, float], *, pruned: bool = False, saved: list[str] | None = None) -> Any:
    class Result:
        epochs = 3
        seconds = 1.23456

        def save(self, path: str) -> None:
            Path(path).write_bytes(b"weights")
            if saved is not None:
                saved.append(path)

    made = Result()
    made.metrics = metrics  # type: ignore[attr-defined]
    made.pruned = pruned  # type: ignore[attr-defined]
    return made


class UploadingTrial(FakeTrial):
    def __init__(self, number: int, *, fail_upload: bool = False) -> None:
        super().__init__("s", number)
        self.fail_upload = fail_upload

    def upload(self, path: str) -> None:
        self.calls.append(("upload", Path(path).name, Path(path).read_bytes()))
        if self.fail_upload:
            raise OSError("disk full")


def test_a_result_is_told_with_its_values_in_metric_order_and_its_weights_uploaded() -> None:
    told = UploadingTrial(0)
    runner, slot = runner_with([told])
    slot.ask("s")
    runner._tell(told, ["val_loss", "val_accuracy"], result({"val_accuracy": 0.9, "val_loss": 0.2}))  # type: ignore[arg-type]
    upload, tell = told.calls
    assert upload == ("upload", "checkpoint.pt", b"weights")
    assert tell[:2] == ("tell", [0.2, 0.9])
    assert tell[2] == {
        "epochs": 3,
        "train_seconds": 1.235,
        "device": "cpu",
        "worker": slot.worker_id,
        "final_val_accuracy": 0.9,
        "final_val_loss": 0.2,
    }


def test_a_failed_upload_still_tells_the_result_and_a_lost_trial_uploads_nothing() -> None:
    failing, lost = UploadingTrial(0, fail_upload=True), UploadingTrial(1)
    runner, slot = runner_with([failing, lost])
    slot.ask("s")
    slot.ask("s")
    runner._tell(failing, ["val_accuracy"], result({"val_accuracy": 0.5}))  # type: ignore[arg-type]
    assert [c[0] for c in failing.calls] == ["upload", "tell"]
    slot.lost.add(("s", 1))
    runner._tell(lost, ["val_accuracy"], result({"val_accuracy": 0.5}))  # type: ignore[arg-type]
    assert lost.calls == []


def test_pruned_and_diverged_results() -> None:
    pruned, diverged = UploadingTrial(0), UploadingTrial(1)
    runner, slot = runner_with([pruned, diverged])
    slot.ask("s")
    slot.ask("s")
    runner._tell(pruned, ["val_accuracy"], result({"val_accuracy": float("nan")}, pruned=True))  # type: ignore[arg-type]
    ((name, attrs),) = pruned.calls
    assert name == "prune" and attrs["final_val_accuracy"] == "nan"
    runner._tell(diverged, ["val_accuracy"], result({"val_accuracy": 0.5, "val_loss": float("inf")}))  # type: ignore[arg-type]
    ((name, reason, attrs, fatal),) = diverged.calls
    assert (name, fatal) == ("fail", False)
    assert reason == "training diverged: {'val_loss': inf}"
    assert attrs["final_val_loss"] == "inf" and attrs["final_val_accuracy"] == 0.5


def test_a_dataset_that_cannot_be_read_fails_the_claimed_group_with_its_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    group = [trial(n) for n in range(2)]
    runner, slot = runner_with(list(group))

    def unreadable(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("bad csv at line 3")

    monkeypatch.setattr(trainer, "load_dataset", unreadable)
    assert runner.run(study(2)) is True
    reasons = [t.calls[0][1] for t in group]
    assert reasons == ["dataset digits could not be read (ValueError)"] * 2
    assert slot.held == {}
    # nothing to claim: False, and nothing told
    assert runner.run(study(2)) is False


def pruned_result(config: Any) -> Any:
    return trainer.TrialResult(
        config=config,
        metrics={"val_accuracy": 0.5},
        history=[],
        pruned=True,
        epochs=1,
        best_epoch=0,
        seconds=0.1,
        _state={},
        _meta={},
    )


def test_training_gets_the_data_metric_and_stop_and_refills_from_the_sampler_free_choice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Members report through the slot, each leaves the group told, free places are refilled by
    trials of the same non-fusible values, and the first trial of other values seeds the next group."""
    group = [trial(0, hidden_units=64), trial(1, lr=0.2, hidden_units=64)]
    refills = [trial(2, lr=0.3, hidden_units=64), trial(3, hidden_units=32), trial(4, hidden_units=64)]
    runner, slot = runner_with(group + refills)
    data = object()
    calls: list[dict[str, Any]] = []

    def train_group(configs: list[Any], given: Any, **kwargs: Any) -> None:
        calls.append({"configs": list(configs), "data": given, **kwargs})
        assert kwargs["report_epoch"]([(len(configs) - 1, 3, 0.25)]) == set()
        joined = kwargs["refill"](3)
        for member, config in enumerate([*configs, *joined]):
            kwargs["on_result"](member, pruned_result(config))
        assert kwargs["refill"](1) == []  # a leftover seeds the next group: no more refills

    monkeypatch.setattr(trainer, "train_group", train_group)
    claimed = runner._claim(study(2), 2)
    runner._train({**study(2), "metrics": ["val_accuracy"]}, data, claimed)  # type: ignore[arg-type]
    first, second = calls
    assert first["data"] is data and second["data"] is data
    assert first["metric"] == "val_accuracy" and first["interrupt"] is slot.stop
    assert [c.lr for c in first["configs"]] == [0.01, 0.2]
    # the last member reported through the slot; trial 2 joined the first group, trial 3 (other
    # hidden units) seeded the second, topped up to the fused size pinned to its values
    assert slot.api.batches[0] == ("s", [(1, 3, 0.25)])  # type: ignore[attr-defined]
    assert [c.lr for c in first["configs"]] == [0.01, 0.2]
    assert second["configs"][0].hidden_units == 32
    assert all(t.calls and t.calls[-1][0] == "prune" for t in [*group, *refills])
    assert slot.api.asked == [  # type: ignore[attr-defined]
        ("s", None),
        ("s", {"hidden_units": 64}),
        ("s", None),
        ("s", None),
        ("s", {"hidden_units": 32}),
        ("s", None),  # the second group's refills: nothing left to claim
        ("s", None),
    ]
    assert slot.held == {} and slot.finished == 5

"""Population-based training inside a fused group: the exploit copies, the explore rules, lineage."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
import torch.nn.functional as F

from caviar.trainer import PBT, Dataset, Dimension, Exploit, Population, TrialConfig, train_group
from caviar.trainer._pbt import explore, quantiles
from caviar.trainer._train import _Group

LR = Dimension("lr", 1e-4, 1e-1, "log")
BETA2 = Dimension("beta2", 0.9, 0.9999, "reverse_log")
DROPOUT = Dimension("dropout", 0.0, 0.5, "linear")


def _trained_group(data: Dataset, lrs: list[float]) -> _Group:
    """A batch-norm MLP group with Adam after a few steps: every member's state is its own."""
    configs = [
        TrialConfig(layers=2, hidden_units=16, batch_norm=True, lr=lr, seed=i, device="cpu")
        for i, lr in enumerate(lrs)
    ]
    group = _Group(configs, data, torch.device("cpu"))
    group.set_epoch_lr(0)
    k = len(configs)
    for start in range(0, 96, 32):
        index = torch.arange(start, start + 32).repeat(k, 1) + torch.arange(k)[:, None]
        logits = group.model(data.X_train[index])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data.y_train[index].reshape(-1))
        group.optimizer.zero_grad()
        loss.backward()
        group.optimizer.step()
    return group


def test_exploit_copies_weights_optimizer_state_and_perturbs_in_place(small_tabular: Dataset) -> None:
    group = _trained_group(small_tabular, [1e-2, 3e-3, 1e-3, 3e-4])
    group.optimizer.steps[0] += 5  # the parent's step count differs from the member's
    before = {name: t.clone() for name, t in group.model.state_dict().items()}
    events: list[Exploit] = []
    population = Population(
        PBT((LR, BETA2, DROPOUT), interval=2, quantile=0.25, resample_probability=0.0), events.append
    )
    # member 3 is worst, member 0 best: 3 copies 0; members 1 and 2 are untouched
    group.exploit(population, [0, 1, 2, 3], epoch=1, scores=[0.9, 0.7, 0.6, 0.1], metric="val_accuracy")

    assert [(e.member, e.parent, e.step) for e in events] == [(3, 0, 2)]
    state = group.model.state_dict()
    assert any("running_mean" in name for name in state)  # batch-norm statistics are copied too
    for name, t in state.items():
        assert torch.equal(t[3], t[0]), name
        for slot in (0, 1, 2):
            assert torch.equal(t[slot], before[name][slot]), name
    for name, tensors in group.optimizer.state.items():
        for t in tensors:
            assert torch.equal(t[3], t[0]), name
            assert t[0].abs().sum() > 0  # real moments, not zeros
    assert group.optimizer.steps[3] == group.optimizer.steps[0] == 8

    new = group.configs[3]
    assert new.seed == 3  # its own streams (shuffle, dropout) stay its own
    assert math.isclose(new.lr, 1e-2 * 0.8) or math.isclose(new.lr, 1e-2 * 1.2)
    one_minus = 1 - new.beta2
    assert math.isclose(one_minus, 0.001 * 0.8) or math.isclose(one_minus, 0.001 * 1.2)
    assert group.optimizer.coef["lr"][3].item() == pytest.approx(new.lr)
    assert group.optimizer.coef["beta2"][3].item() == pytest.approx(new.beta2)
    assert events[0].old["lr"] == 3e-4 and events[0].new["lr"] == pytest.approx(new.lr)


def test_no_exploit_before_the_interval_or_without_a_better_parent(small_tabular: Dataset) -> None:
    group = _trained_group(small_tabular, [1e-2, 1e-3])
    events: list[Exploit] = []
    population = Population(PBT((LR,), interval=3), events.append)
    group.exploit(population, [0, 1], epoch=1, scores=[0.9, 0.1], metric="val_accuracy")  # 2 epochs done
    group.exploit(population, [0, 1], epoch=2, scores=[0.5, 0.5], metric="val_accuracy")  # a tie
    assert events == []
    group.exploit(population, [0, 1], epoch=2, scores=[0.2, 0.1], metric="val_loss")  # lower is better
    assert [(e.member, e.parent) for e in events] == [(0, 1)]


def test_explore_scales_and_clamps() -> None:
    rng = random.Random(0)
    up = explore({"lr": 0.01, "beta2": 0.999, "dropout": 0.25}, (LR, BETA2, DROPOUT), (1.2,), 0.0, rng)
    assert up["lr"] == pytest.approx(0.012)
    assert 1 - up["beta2"] == pytest.approx(0.0012)  # reverse-log: 1 - beta is perturbed
    assert up["dropout"] == pytest.approx(0.3)
    clamped = explore({"lr": 0.09, "beta2": 0.99995, "dropout": 0.45}, (LR, BETA2, DROPOUT), (1.2,), 0.0, rng)
    assert clamped == {"lr": 0.1, "beta2": 0.9999, "dropout": 0.5}
    low = explore({"lr": 1.1e-4, "beta2": 0.91, "dropout": 0.0}, (LR, BETA2, DROPOUT), (0.8,), 0.0, rng)
    assert low == {"lr": 1e-4, "beta2": pytest.approx(1 - 0.09 * 0.8), "dropout": 0.0}
    assert explore({"beta2": 0.91}, (BETA2,), (1.2,), 0.0, rng) == {"beta2": 0.9}  # 1 - 0.09 * 1.2 < 0.9
    choices = Dimension("weight_decay", choices=(0.0, 1e-4, 1e-3))
    assert explore({"weight_decay": 1e-4}, (choices,), (1.2,), 0.0, rng) == {"weight_decay": 1e-3}
    assert explore({"weight_decay": 1e-4}, (choices,), (0.8,), 0.0, rng) == {"weight_decay": 0.0}
    draws = [explore({"lr": 0.01, "beta2": 0.99}, (LR, BETA2), (1.2,), 1.0, rng) for _ in range(400)]
    lrs = sorted(d["lr"] for d in draws)
    assert lrs[0] >= 1e-4 and lrs[-1] <= 1e-1
    assert sum(lr < 1e-2 for lr in lrs) > 200  # log-uniform: 2/3 of the draws below 1e-2
    betas = [d["beta2"] for d in draws]
    assert all(0.9 <= b <= 0.9999 for b in betas)
    assert sum(b > 0.999 for b in betas) > 100  # reverse-log: a third above 0.999


def test_quantiles_follow_ray_tunes_rule() -> None:
    assert quantiles([0.5], 0.25, True) == ([], [])
    assert quantiles([0.1, 0.9, 0.5, 0.3], 0.25, True) == ([0], [1])
    assert quantiles([0.1, 0.9, 0.5, 0.3, 0.2], 0.5, True) == ([0, 4], [2, 1])  # at most n // 2
    assert quantiles([0.1, 0.9, float("nan")], 0.25, False) == ([2], [0])  # NaN ranks last


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="quantile"):
        PBT((LR,), quantile=0.6)
    with pytest.raises(ValueError, match="interval"):
        PBT((LR,), interval=0)
    with pytest.raises(ValueError, match="perturb"):
        Dimension("seed", 0, 10)


def test_train_group_exploits_every_interval_and_returns_the_last_config(small_tabular: Dataset) -> None:
    good = TrialConfig(layers=1, hidden_units=16, lr=3e-2, max_epochs=6, device="cpu")
    configs = [dataclasses.replace(good, seed=i, lr=lr) for i, lr in enumerate([3e-2, 1e-2, 1e-5, 1e-5])]
    events: list[Exploit] = []
    population = Population(PBT((LR,), interval=2, quantile=0.5, resample_probability=0.0), events.append)
    results = train_group(configs, small_tabular, metric="val_accuracy", population=population)
    assert {e.step for e in events} <= {2, 4} and {e.member for e in events if e.step == 2} == {2, 3}
    for event in events:
        assert event.parent in (0, 1) or event.step == 4
        assert event.parent_score > event.score
    for result in results[2:]:
        assert result.config.lr >= 1e-4 and result.config.lr != 1e-5  # copied and perturbed
        assert len(result.history) == 6  # its own epoch budget
    assert results[2].metrics["val_accuracy"] > 0.6

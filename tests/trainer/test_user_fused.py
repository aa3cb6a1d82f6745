"""Fusing a user's own nn.Module (caviar.FusedModels): each member trains exactly as it would alone."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import caviar
from caviar.trainer import FusedModels

IN, CLASSES, N, BATCH, EPOCHS = 6, 3, 48, 12, 3


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(IN, 16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, CLASSES))


def bn_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(IN, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES))


def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, IN, generator=generator)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def order(epoch: int) -> list[torch.Tensor]:
    return list(torch.randperm(N, generator=torch.Generator().manual_seed(100 + epoch)).split(BATCH))


def solo_run(model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]) -> list[float]:
    x, y = data()
    optimizer = make_optimizer(model)
    losses = []
    for epoch in range(EPOCHS):
        model.train()
        for batch in order(epoch):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


def fused_run(fused: FusedModels, optimizer: caviar.trainer.MemberOptimizer) -> list[list[float]]:
    x, y = data()
    losses = []
    for epoch in range(EPOCHS):
        fused.train()
        for batch in order(epoch):
            per_member = fused.losses(F.cross_entropy, fused(x[batch]), y[batch])
            optimizer.zero_grad()
            per_member.sum().backward()
            optimizer.step()
            losses.append(per_member.tolist())
    return losses


SEEDS = [1, 2, 3, 4]
LRS = [1e-3, 5e-3, 2e-2, 5e-2]


@pytest.mark.parametrize("build", [mlp, bn_mlp], ids=["mlp", "batchnorm"])
@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_each_member_matches_its_solo_run(build: Callable[[], nn.Module], kind: str) -> None:
    betas1, decays, momenta = [0.9, 0.8, 0.95, 0.7], [0.0, 1e-2, 1e-3, 0.1], [0.0, 0.5, 0.9, 0.0]

    def solo_optimizer(index: int) -> Callable[[nn.Module], torch.optim.Optimizer]:
        def make(model: nn.Module) -> torch.optim.Optimizer:
            lr, decay = LRS[index], decays[index]
            if kind == "adam":
                return torch.optim.Adam(
                    model.parameters(), lr=lr, betas=(betas1[index], 0.99), weight_decay=decay
                )
            if kind == "adamw":
                return torch.optim.AdamW(
                    model.parameters(), lr=lr, betas=(betas1[index], 0.99), weight_decay=decay
                )
            return torch.optim.SGD(model.parameters(), lr=lr, momentum=momenta[index], weight_decay=decay)

        return make

    solos = [solo_run(seeded(build, seed), solo_optimizer(i)) for i, seed in enumerate(SEEDS)]
    fused = FusedModels([seeded(build, seed) for seed in SEEDS])
    optimizer = fused.optimizer(kind, lr=LRS, betas=(betas1, 0.99), weight_decay=decays, momentum=momenta)
    together = fused_run(fused, optimizer)
    for member, solo in enumerate(solos):
        assert [step[member] for step in together] == pytest.approx(solo, rel=1e-5, abs=1e-6), member
    # the learning rates took effect: the members' trajectories differ
    assert len({round(step[0] - step[3], 6) for step in together}) > 1


def test_batch_norm_running_statistics_are_each_members_own() -> None:
    solo = seeded(bn_mlp, 7)
    solo_run(solo, lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    fused = FusedModels([seeded(bn_mlp, 3), seeded(bn_mlp, 7)])
    fused_run(fused, fused.optimizer("sgd", lr=[0.01, 0.1]))
    state = fused.state_dict(1)
    for name, tensor in solo.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert int(state["1.num_batches_tracked"]) == EPOCHS * (N // BATCH)
    assert not torch.allclose(fused.state_dict(0)["1.running_mean"], state["1.running_mean"])


def test_eval_mode_uses_running_statistics_like_the_solo_model() -> None:
    fused = FusedModels([seeded(bn_mlp, 1), seeded(bn_mlp, 2)])
    fused_run(fused, fused.optimizer("adam", lr=1e-2))
    x, _ = data()
    fused.eval()
    with torch.no_grad():
        out = fused(x)
    for member in range(2):
        alone = fused.model(member)
        assert not alone.training
        with torch.no_grad():
            torch.testing.assert_close(out[member], alone(x), rtol=1e-5, atol=1e-6)


def test_dropout_draws_its_own_mask_per_member() -> None:
    build = lambda: nn.Sequential(nn.Linear(IN, 64), nn.Dropout(0.5))  # noqa: E731
    torch.manual_seed(0)
    model = build()
    fused = FusedModels([model, model])  # the same weights twice
    out = fused(torch.ones(4, IN))
    assert not torch.equal(out[0] == 0, out[1] == 0)
    fused.eval()
    with torch.no_grad():
        out = fused(torch.ones(4, IN))
    torch.testing.assert_close(out[0], out[1])


def test_per_member_inputs_and_targets() -> None:
    fused = FusedModels([seeded(mlp, s) for s in (1, 2)])
    x = torch.randn(2, 5, IN)
    y = torch.randint(0, CLASSES, (2, 5))
    losses = fused.losses(F.cross_entropy, fused(x, shared=False), y)
    for member in range(2):
        alone = F.cross_entropy(fused.model(member)(x[member]), y[member])
        assert losses[member].item() == pytest.approx(alone.item(), rel=1e-6)
    with pytest.raises(ValueError, match="first axis must be K"):
        fused(torch.randn(3, 5, IN), shared=False)


def test_a_members_state_dict_round_trips() -> None:
    models = [seeded(bn_mlp, s) for s in (1, 2, 3)]
    fused = FusedModels(models)
    fused_run(fused, fused.optimizer("adam", lr=1e-2))
    state = fused.state_dict(2)
    assert list(state) == list(models[2].state_dict())
    fresh = bn_mlp()
    fresh.load_state_dict(state)  # strict: every name, every shape
    again = FusedModels([fresh, fresh, fresh])
    for name, tensor in again.state_dict(1).items():
        assert torch.equal(tensor, state[name]), name
    saved = {name: t.clone() for name, t in fused.state_dict(0).items()}
    state["0.weight"].add_(1.0)  # copies: changing them leaves the member alone
    assert torch.equal(fused.state_dict(2)["0.weight"] + 1.0, state["0.weight"])
    assert all(torch.equal(fused.state_dict(0)[n], t) for n, t in saved.items())


def test_a_dropped_member_stops_and_a_refilled_one_trains_as_if_alone() -> None:
    fused = FusedModels([seeded(mlp, s) for s in (1, 2, 3)])
    optimizer = fused.optimizer("adam", lr=[1e-2, 1e-2, 1e-2])
    x, y = data()

    def step() -> torch.Tensor:
        losses = fused.losses(F.cross_entropy, fused(x[:BATCH]), y[:BATCH])
        optimizer.zero_grad()
        losses.sum().backward()
        optimizer.step()
        return losses.detach()

    step()
    fused.drop(1)
    frozen = fused.state_dict(1)
    moving = fused.state_dict(0)
    losses = step()
    assert losses[1].item() == 0.0
    assert all(torch.equal(fused.state_dict(1)[n], t) for n, t in frozen.items())
    assert not torch.equal(fused.state_dict(0)["0.weight"], moving["0.weight"])
    # refill place 1 with a new model and its own lr: it trains as that model would alone
    newcomer = seeded(mlp, 9)
    solo = seeded(mlp, 9)
    fused.load_member(1, newcomer)
    optimizer.set(1, lr=3e-2)
    solo_optimizer = torch.optim.Adam(solo.parameters(), lr=3e-2)
    for _ in range(3):
        together = step()
        loss = F.cross_entropy(solo(x[:BATCH]), y[:BATCH])
        solo_optimizer.zero_grad()
        loss.backward()
        solo_optimizer.step()
        assert together[1].item() == pytest.approx(loss.item(), rel=1e-5)


def test_models_of_different_architectures_are_refused() -> None:
    with pytest.raises(ValueError, match="differ"):
        FusedModels([mlp(), bn_mlp()])
    with pytest.raises(ValueError, match="one value or 2"):
        FusedModels([mlp(), mlp()]).optimizer("adam", lr=[1e-3, 1e-3, 1e-3])
    with pytest.raises(ValueError, match="adam, adamw or sgd"):
        FusedModels([mlp()]).optimizer("lbfgs")


def test_caviar_fused_is_a_lazy_top_level_name() -> None:
    fused = caviar.fused(mlp, 3)
    assert isinstance(fused, caviar.FusedModels) and fused.k == 3
    assert fused(torch.randn(2, IN)).shape == (3, 2, CLASSES)

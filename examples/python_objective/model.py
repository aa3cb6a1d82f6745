"""Your own PyTorch model, tuned by caviar workers (``kind: python``).

The worker imports this module from its working directory and calls ``objective(trial)`` in a
child process per trial: ``trial.params`` holds this trial's hyperparameters, ``trial.report``
sends the validation accuracy every epoch (and raises ``caviar.TrialPruned`` when the study's
pruner stops the trial), and the return value is the trial's result.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split
from torch import nn

import caviar


class WineNet(nn.Module):
    """A small MLP: 13 features -> 3 cultivars."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(13, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_wine(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    as_tensor = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return as_tensor(x_train), torch.tensor(y_train), as_tensor(x_val), torch.tensor(y_val)


def objective(trial: caviar.Trial) -> float:
    params = trial.params
    torch.manual_seed(trial.number)
    x_train, y_train, x_val, y_val = load_data()
    model = WineNet(hidden=int(params["hidden"]), dropout=params["dropout"])
    optimizer = torch.optim.Adam(model.parameters(), lr=params["lr"], betas=(params["beta1"], 0.999))
    accuracy = 0.0
    for epoch in range(30):
        model.train()
        for batch in torch.randperm(len(x_train)).split(16):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_val).argmax(dim=1) == y_val).float().mean().item()
        trial.report(accuracy, epoch)  # Optuna's order: value, step
        if trial.should_prune():
            raise caviar.TrialPruned()  # the trial ends PRUNED (optuna.TrialPruned works too)
    torch.save(model.state_dict(), "model.pt")
    trial.upload("model.pt")  # stored with the trial: caviar study download NAME model.pt --trial N
    return accuracy

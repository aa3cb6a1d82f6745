"""An unmodified Optuna objective (in the style of optuna-examples), tuned by caviar.

Nothing here knows caviar: the objective defines its search space as it runs (``n_layers`` decides
how many ``n_units_l{i}`` exist: a conditional space under an int parent), reports the validation
accuracy each epoch and raises ``optuna.TrialPruned`` when the pruner says so. The data set is
scikit-learn's digits (bundled: no download).

Three ways to run it:

    python objective.py                          # plain Optuna, in memory (for comparison)
    python objective.py --url http://127.0.0.1:8000   # caviar.Client(...).study(...).optimize(objective)
    caviar study create -f study.yaml && caviar worker --allow-code python:objective --cpu 2

See docs/optuna.md for what each way gives and costs.
"""

from __future__ import annotations

import argparse
import warnings

import optuna
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

EPOCHS = 15


def objective(trial: optuna.Trial) -> float:
    x, y = load_digits(return_X_y=True)
    x_train, x_valid, y_train, y_valid = train_test_split(x / 16.0, y, test_size=0.25, random_state=0)

    n_layers = trial.suggest_int("n_layers", 1, 3)
    layers = [trial.suggest_int(f"n_units_l{i}", 4, 128, log=True) for i in range(n_layers)]
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    alpha = trial.suggest_float("alpha", 1e-6, 1e-2, log=True)
    batch_size = trial.suggest_categorical("batch_size", [32, 64, 128])

    classifier = MLPClassifier(
        hidden_layer_sizes=tuple(layers),
        learning_rate_init=lr,
        alpha=alpha,
        batch_size=batch_size,
        random_state=trial.number,
    )
    accuracy = 0.0
    for epoch in range(EPOCHS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            classifier.partial_fit(x_train, y_train, classes=list(range(10)))
        accuracy = classifier.score(x_valid, y_valid)
        trial.report(accuracy, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return accuracy


DEFINITION = {
    "name": "optuna-digits",
    "direction": "maximize",
    "metric": "val_accuracy",
    "objective": {"kind": "external"},  # no search_space: the objective suggests its own
    "sampler": {"type": "tpe", "seed": 0},
    "pruner": {"type": "median", "options": {"n_startup_trials": 3, "n_warmup_steps": 3}},
    "budget": {"n_trials": 20, "max_parallel": 4},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=None, help="a caviar service (else: plain Optuna, in memory)")
    parser.add_argument("--token", default=None, help="a write token (default: CAVIAR_API_TOKEN)")
    parser.add_argument("--name", default=DEFINITION["name"])
    parser.add_argument("--n-trials", type=int, default=20)
    parser.add_argument("--n-jobs", type=int, default=2)
    args = parser.parse_args()
    if args.url is None:
        study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(3, 3))
        study.optimize(objective, n_trials=args.n_trials, n_jobs=args.n_jobs)
        print(f"best value {study.best_value:.4f} with {study.best_params}")
        return

    import caviar

    with caviar.Client(args.url, args.token) as client:
        definition = {**DEFINITION, "name": args.name}
        definition["budget"] = {**DEFINITION["budget"], "n_trials": args.n_trials}
        try:
            study = client.create_study(definition)
        except caviar.CaviarApiError as exc:
            if exc.code != "name_taken":
                raise
            study = client.study(args.name)  # join the study: its budget is shared
        finished = study.optimize(objective, n_jobs=args.n_jobs)
        best = study.best()
        print(f"this run finished {finished} trials; best value {best['value']:.4f} with {best['params']}")


if __name__ == "__main__":
    main()

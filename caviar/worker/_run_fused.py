"""``python -m caviar.worker._run_fused package.module:function``: a fused group of a ``kind: python`` study.

Run by a worker for an objective with ``fuse: K`` (see :mod:`caviar.worker._fused_program`), in one
child process (with ``CAVIAR_TRIALS``, a JSON list of the members' trials): calls the function
with the list of the group's trials (1 to K :class:`caviar.Trial`, each Optuna-compatible:
``params``, ``suggest_*``, ``report``, ``should_prune``, ``upload``), so it can train them as one
(:class:`caviar.FusedModels`). Each member reports, is pruned and ends on its own:

* the function returns one value per member (a number, or a list of numbers for several
  objectives), in the order of the trials; ``None`` for a member it stopped because
  ``should_prune()`` said so ends that member PRUNED;
* a member may also be told inside the function (``trials[i].tell(v)``, ``trials[i].prune()``):
  its entry in the returned list is then ignored;
* ``caviar.TrialPruned`` (or Optuna's) escaping the function prunes every member not told yet;
  any other exception fails them (the worker gives each the traceback's end);
* a member whose lease is lost (the worker or service gave it up) answers ``should_prune()`` True
  from its next report on, instead of raising: the others train on;
* ``caviar.report_group(trials, values, step)`` reports the group's epoch in one request (each
  member's credential proves its own report).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from caviar._client import Client, Trial, is_pruned
from caviar._errors import LeaseLost
from caviar.worker._run_python import load_entrypoint

TRIALS_ENV = "CAVIAR_TRIALS"
"""The environment variable holding the members' trials (a JSON list, one object per member)."""


class MemberTrial(Trial):
    """One member of a fused group: a lost lease prunes it instead of raising in the group's loop."""

    lost = False

    def report(self, value: float, step: int) -> None:
        if self.lost:
            return
        try:
            super().report(value, step)
        except LeaseLost:
            self.lost = True
            self._prune = True
            self._finished = True  # nothing more can be told for it: the worker drops it

    def _answered(self, prune: bool, step: int, code: str | None = None, message: str = "") -> None:
        super()._answered(prune, step, code, message)
        if code is not None:  # not recorded (caviar.report_group): as a lost lease above
            self.lost = True
            self._finished = True


def current_trials() -> list[MemberTrial]:
    """The fused group's trials, as the worker handed them over in ``CAVIAR_TRIALS``."""
    raw = os.environ.get(TRIALS_ENV)
    if not raw:
        raise RuntimeError(f"not running a fused group under a caviar worker ({TRIALS_ENV} is unset)")
    url = os.environ.get("CAVIAR_URL")
    return [
        MemberTrial(
            Client(url, payload.get("credential")),  # each member's own credential: it can only touch it
            payload,
            worker_id=payload.get("worker_id"),
            heartbeat=False,  # the worker heartbeats for its members
            result_file=payload.get("result_file"),
        )
        for payload in json.loads(raw)
    ]


def finish(trials: Sequence[Trial], result: Any) -> str | None:
    """Tell each member not told yet its entry of ``result``; an error message when it cannot."""
    if not isinstance(result, list | tuple) or len(result) != len(trials):
        for trial in trials:
            if not trial.finished and trial.should_prune():
                trial.prune()
        return (
            f"the objective returned {type(result).__name__} {str(result)[:200]}; a fused objective "
            f"returns a list of {len(trials)} values, one per trial (None for a pruned one)"
        )
    for index, (trial, value) in enumerate(zip(trials, result, strict=True)):
        if trial.finished:
            continue
        if value is None:
            if trial.should_prune():
                trial.prune()
            else:
                trial.fail(f"the objective returned None for member {index} (trial {trial.number})")
        else:
            trial.tell(value)
    return None


def main(argv: list[str]) -> int:
    objective = load_entrypoint(argv, "caviar.worker._run_fused")
    if isinstance(objective, int):
        return objective
    trials = current_trials()
    try:
        result = objective(trials)
    except Exception as exc:
        if not is_pruned(exc):  # caviar.TrialPruned or optuna.TrialPruned
            raise
        for trial in trials:
            if not trial.finished:
                trial.prune()
        return 0
    error = finish(trials, result)
    if error is not None:
        print(f"caviar: {argv[0]}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

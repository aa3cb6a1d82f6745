"""``caviar worker``: processes that draw trials from a caviar service and run them.

A worker needs only the service's URL and a ``worker``-scope token. One process per device
slot (GPU, or CPU) claims trials of the runnable studies in priority order, runs them (the
built-in trainer, fused K at a time), reports every epoch, heartbeats all its leases in one call,
uploads checkpoints and tells the result, all over the REST API.
"""

from caviar.worker._options import WorkerOptions
from caviar.worker._supervisor import discover_slots, run_workers

__all__ = ["WorkerOptions", "discover_slots", "run_workers"]

"""One Optuna storage per process and database URL."""

from __future__ import annotations

import threading

import optuna
from optuna.storages import BaseStorage

from caviar.storage._engine import engine_kwargs, yield_to_renewals

_lock = threading.Lock()
_storages: dict[str, BaseStorage] = {}


def get_optuna_storage(url: str) -> BaseStorage:
    """Optuna's RDB storage on ``url`` behind its trial cache, created once per process.

    The schema must already exist (``caviar db upgrade``): servers and workers never create
    tables, which is what makes several of them safe to start together.
    """
    with _lock:
        storage = _storages.get(url)
        if storage is None:
            rdb = optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs(url, pool_size=2),
                skip_table_creation=True,
                skip_compatibility_check=True,
            )
            yield_to_renewals(rdb.engine, url)  # SQLite: lease renewals write first
            storage = optuna.storages.get_storage(rdb)
            _storages[url] = storage
        return storage


def reset_optuna_storages() -> None:
    """Forget cached storages (tests, and a child process after fork)."""
    with _lock:
        for storage in _storages.values():
            rdb = getattr(storage, "_backend", storage)
            engine = getattr(rdb, "engine", None)
            if engine is not None:
                engine.dispose()
        _storages.clear()

"""caviar's one settings class: environment variables with the ``CAVIAR_`` prefix."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from caviar._logging import LogFormat, LogLevel

MIN_TOKEN_CHARS = 32
"""Tokens set by environment (admin, worker) are at least this long: they guard a network service."""


class Settings(BaseSettings):
    """Service, worker and CLI configuration.

    Every field reads ``CAVIAR_<FIELD>`` from the environment (or a ``.env`` file); CLI flags
    override them by constructing ``Settings(field=value)``.
    """

    model_config = SettingsConfigDict(env_prefix="CAVIAR_", env_file=".env", extra="ignore")

    database_url: str = Field(default="sqlite:///./caviar.db", description="SQLAlchemy URL of the database.")
    api_token: SecretStr | None = Field(
        default=None, description="Admin bearer token; unset = loopback only."
    )
    worker_token: SecretStr | None = Field(
        default=None, description="A static worker-scope token (deployments hand it to their workers)."
    )
    db_pool_size: int = Field(
        default=4,
        ge=1,
        le=100,
        description="Connections per server process for caviar's tables (as many again on overflow); "
        "Optuna's storage keeps at most 4 more. A process opens at most 2 x this + lease_pool_size + 4.",
    )
    lease_pool_size: int = Field(
        default=2,
        ge=1,
        le=20,
        description="Connections per server process kept for lease renewals only (worker and trial "
        "heartbeats, the renewal of a report): a burst of asks, an import or a slow sampler never takes "
        "them. A process opens at most 2 x db_pool_size + lease_pool_size + 4.",
    )
    lease_margin_s: float | None = Field(
        default=None,
        ge=0,
        description="Grace the reaper gives a lapsed lease, judged by the database's clock "
        "(default: heartbeat_interval_s / 2).",
    )
    max_concurrent_asks: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Asks one server process runs at once; more wait in line (ask_queue_s, "
        "max_queued_asks), then are answered 429 `too_many_asks` with Retry-After (the client and "
        "worker wait and retry). Default: db_pool_size.",
    )
    ask_queue_s: float = Field(
        default=5.0,
        ge=0,
        le=600,
        description="How long an ask beyond max_concurrent_asks waits in line for a turn (holding no "
        "thread or connection) before it is answered 429 `too_many_asks`; 0 answers at once.",
    )
    max_queued_asks: int = Field(
        default=100,
        ge=0,
        le=100_000,
        description="Asks one server process lets wait in line; one more is answered 429 "
        "`too_many_asks` at once.",
    )
    ask_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="An ask whose sampler takes longer is answered 503 `sampler_slow`; its trial is "
        "handed back (not counted as a failure) once sampled, and the next ask gets it.",
    )
    import_chunk_size: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="Trials an enqueue or import writes per hold of the study's lock (asks and "
        "heartbeats go on between chunks).",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535, description="0: any free port (printed at start).")
    processes: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=64)
    heartbeat_interval_s: float = Field(default=30.0, gt=0)
    artifact_dir: str = "./caviar-artifacts"
    reaper_interval_s: float | None = Field(
        default=None, gt=0, description="How often the service reaps lapsed leases (default: heartbeat/2)."
    )
    scheduler_interval_s: float = Field(default=5.0, gt=0)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    timeout_keep_alive_s: int = Field(
        default=30,
        ge=1,
        le=3600,
        description="A connection idle this long (new, or after a response) is closed.",
    )
    timeout_headers_s: float = Field(
        default=10.0, gt=0, le=3600, description="A request head must arrive within this many seconds."
    )
    timeout_body_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="The longest pause between two pieces of a request body before the connection is cut.",
    )
    data_dir: str | None = Field(
        default=None, description="The only directory `file:` datasets are read from; unset: none over REST."
    )
    max_artifact_bytes: int = Field(
        default=2 * 1024**3, ge=1024, description="Largest file a worker or client may store with a trial."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins (scheme://host[:port]) whose pages may call the API from a browser: CORS "
        "answers them, and their writes pass the cross-site check. Comma-separated or a JSON list; "
        "empty (the default): none but the service's own. `*` is refused.",
    )
    metrics_auth: bool = Field(
        default=True,
        description="With a token set, /metrics needs a read-scope token too; false opens it to scrapers.",
    )
    migrate_on_start: bool = True
    wait_for_db_s: float = Field(
        default=180.0, ge=0, description="How long `caviar serve` waits for the database at start."
    )
    log_format: LogFormat = Field(default="text", description="Log lines: text, or json (one object a line).")
    log_level: LogLevel = Field(
        default="info", description="Least severe level logged (the access log is info)."
    )
    background_tasks: bool = Field(default=True, description="Run the reaper and scheduler in the service.")

    @field_validator("api_token", "worker_token")
    @classmethod
    def _strong(cls, token: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < MIN_TOKEN_CHARS:
            variable = f"CAVIAR_{str(info.field_name).upper()}"
            raise ValueError(
                f"{variable} must be at least {MIN_TOKEN_CHARS} characters "
                "(python3 -c 'import secrets; print(secrets.token_urlsafe(32))'); unset it for no auth"
            )
        return token

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _exact_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
                raise ValueError(
                    f"CAVIAR_CORS_ORIGINS: {origin!r} is not an origin like https://ui.example[:port] "
                    "(no wildcard, no path)"
                )
        return [origin.rstrip("/") for origin in origins]

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def reap_margin_s(self) -> float:
        """The reaper's grace past a lease's expiry (``lease_margin_s``, default heartbeat / 2)."""
        return self.heartbeat_interval_s / 2 if self.lease_margin_s is None else self.lease_margin_s

    @property
    def ask_limit(self) -> int:
        """Asks one server process runs at once (``max_concurrent_asks``, default ``db_pool_size``)."""
        return self.max_concurrent_asks or self.db_pool_size

    @property
    def reap_every_s(self) -> float:
        return self.reaper_interval_s or max(0.2, self.heartbeat_interval_s / 2)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings read from the environment."""
    return Settings()

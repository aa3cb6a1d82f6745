"""caviar's one settings class: environment variables with the ``CAVIAR_`` prefix."""

from __future__ import annotations

import os
from functools import lru_cache

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from caviar._logging import LogFormat, LogLevel


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
    data_dir: str | None = Field(
        default=None, description="The only directory `file:` datasets are read from; unset: none over REST."
    )
    max_artifact_bytes: int = Field(
        default=2 * 1024**3, ge=1024, description="Largest file a worker or client may store with a trial."
    )
    cors_origins: list[str] = Field(default_factory=list)
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

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def lease_s(self) -> float:
        """How long a lease lasts without a heartbeat: two heartbeat intervals."""
        return 2 * self.heartbeat_interval_s

    @property
    def reap_every_s(self) -> float:
        return self.reaper_interval_s or max(0.2, self.heartbeat_interval_s / 2)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings read from the environment."""
    return Settings()

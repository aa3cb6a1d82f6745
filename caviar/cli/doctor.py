"""``caviar doctor``: one command to run when something is off, each check a line with its fix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import typer

import caviar
from caviar import _http
from caviar._client import Client
from caviar._errors import CaviarApiError
from caviar.cli._common import ServiceToken, ServiceUrl, safe, say
from caviar.worker._allow import AllowList, describe
from caviar.worker._supervisor import discover_slots


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, whether it holds, and what to do if not."""

    ok: bool
    what: str
    fix: str = ""

    def line(self) -> str:
        mark = "[green]✓[/]" if self.ok else "[red]✗[/]"
        return f"{mark} {self.what}" + (f" — {self.fix}" if self.fix and not self.ok else "")


def service_checks(client: Client) -> tuple[list[Check], dict[str, Any] | None]:
    """The service, its database and the token; the token's answer from ``/whoami`` (None if refused)."""
    try:
        client.http.get("/healthz")
    except CaviarApiError as exc:
        if exc.code == "unreachable":
            fix = "start one with `caviar serve`, or point to one with --url URL or CAVIAR_URL"
            return [Check(False, f"no caviar service answers at {client.url}", fix)], None
        if exc.code == "database_unreachable":
            fix = "check CAVIAR_DATABASE_URL where the service runs, and that the database is up"
            return [
                Check(True, f"service at {client.url}"),
                Check(False, "the service's database", fix),
            ], None
        return [Check(False, f"service at {client.url} answered {exc.status}: {exc.message}")], None
    checks = [Check(True, f"service at {client.url}"), Check(True, "the service reaches its database")]
    try:
        me = dict(client.http.get(_http.api_path("whoami")))
    except CaviarApiError as exc:
        fix = "pass a valid token with --token or CAVIAR_API_TOKEN (`caviar token create` makes one)"
        return [*checks, Check(False, f"token refused: {exc.message}", fix)], None
    version = str(me.get("version", "unknown"))
    checks.append(
        Check(
            version == caviar.__version__,
            f"service version {version} (this client: {caviar.__version__})",
            "install the same caviar version on both sides",
        )
    )
    if me["auth"]:
        checks.append(Check(True, f"token valid: {me['scope']} scope (can {', '.join(me['scopes'])})"))
    else:
        checks.append(Check(True, "the service asks for no token (it listens on loopback only)"))
    return checks, me


def worker_checks(
    client: Client, me: dict[str, Any], gpus: str, allow: AllowList, studies: list[str]
) -> list[Check]:
    """What a worker started here with these options would do: its slots, and which studies it takes."""
    checks = [
        Check(
            "worker" in me["scopes"],
            "the token may run trials (worker scope)",
            "a worker needs a worker-scope token: `caviar token create --scope worker`",
        )
    ]
    try:
        slots = discover_slots(gpus, 1, None)
        checks.append(
            Check(
                bool(slots),
                f"device slots: {', '.join(slots) or 'none'}",
                "pass --gpus none to use the CPU, or make a GPU visible",
            )
        )
    except ValueError as exc:
        checks.append(Check(False, f"devices: {exc}", "see `nvidia-smi` and CUDA_VISIBLE_DEVICES"))
    checks.append(Check(True, f"user code allowed: {describe(allow)}"))
    params: list[tuple[str, str]] = [("study", ",".join(studies))] if studies else []
    params += [("kind", kind) for kind in ("trainer", "python", "command", "external")]
    queued = client.http.get(_http.api_path("queue"), params=params)["items"]
    if not queued:
        checks.append(Check(True, "no queued study" + (f" among {', '.join(studies)}" if studies else "")))
    for item in queued:
        name, kind = safe(item["name"]), item["objective_kind"]
        if kind == "external":
            checks.append(Check(True, f"study {name}: kind external, run by clients (workers skip it)"))
        elif kind == "trainer":
            checks.append(Check(True, f"study {name}: built-in trainer, would be taken"))
        else:
            why = allow.refusal(item["definition"]["objective"])
            checks.append(
                Check(
                    why is None,
                    f"study {name}: kind {kind}, would be " + ("taken" if why is None else "refused"),
                    safe(why or ""),
                )
            )
    return checks


def doctor(
    url: ServiceUrl = None,
    token: ServiceToken = None,
    worker: Annotated[
        bool, typer.Option("--worker", help="Also check what a worker started here would do.")
    ] = False,
    gpus: Annotated[str, typer.Option(help="As for `caviar worker` (with --worker).")] = "none",
    allow_code: Annotated[
        list[str] | None, typer.Option("--allow-code", metavar="SPEC", help="As for `caviar worker`.")
    ] = None,
    study: Annotated[list[str] | None, typer.Option(help="As for `caviar worker` (repeatable).")] = None,
) -> None:
    """Check the service, its database, the token and (with --worker) a worker's view: ✓ or ✗ with the fix."""
    client = Client(url or _http.DEFAULT_URL, token, retry_s=0.0, wait_for_service=False)
    try:
        checks, me = service_checks(client)
        if worker and me is not None:
            try:
                allow = AllowList.parse(allow_code or ())
            except ValueError as exc:
                checks.append(Check(False, str(exc)))
            else:
                checks += worker_checks(client, me, gpus, allow, list(study or ()))
    finally:
        client.close()
    for check in checks:
        say(check.line())
    if not all(check.ok for check in checks):
        raise typer.Exit(1)

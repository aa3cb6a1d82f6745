"""``caviar worker``: the command line of the worker package (registered by ``caviar.cli``)."""

from __future__ import annotations

from typing import Annotated

import typer

from caviar.cli._common import LogFormatOption, LogLevelOption, fail
from caviar.worker._options import WorkerOptions
from caviar.worker._supervisor import run_workers


def worker(
    url: Annotated[
        str | None,
        typer.Option(envvar="CAVIAR_URL", help="The caviar service (default: http://127.0.0.1:8000)."),
    ] = None,
    token: Annotated[
        str | None, typer.Option(envvar="CAVIAR_API_TOKEN", help="A worker-scope token.", show_default=False)
    ] = None,
    gpus: Annotated[str, typer.Option(help="all | none | comma-separated GPU indices.")] = "all",
    per_gpu: Annotated[int, typer.Option("--per-gpu", min=1, help="Slots (processes) per GPU.")] = 1,
    cpu: Annotated[int | None, typer.Option(min=0, help="CPU slots (default: 1 when no GPU slot).")] = None,
    study: Annotated[list[str] | None, typer.Option(help="Only these studies (repeatable).")] = None,
    fuse: Annotated[int | None, typer.Option(min=1, help="Train up to K trials of a study fused.")] = None,
    max_trials: Annotated[
        int | None, typer.Option("--max-trials", min=1, help="Each slot exits after N.")
    ] = None,
    exit_when_idle: Annotated[
        float | None, typer.Option("--exit-when-idle", min=0, help="Exit after this many idle seconds.")
    ] = None,
    poll_interval: Annotated[float, typer.Option("--poll-interval", min=0.05)] = 2.0,
    data_dir: Annotated[
        str | None,
        typer.Option(envvar="CAVIAR_DATA_DIR", help="The only directory file: datasets are read from."),
    ] = None,
    allow_code: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-code",
            metavar="SPEC",
            help="Run this user code (repeatable): python:MODULE_PREFIX, command:PROGRAM [ARGS] "
            "(an absolute path or a bare name) or all (anything a write token submits). "
            "Nothing else runs.",
        ),
    ] = None,
    pass_env: Annotated[
        list[str] | None,
        typer.Option(
            "--pass-env",
            metavar="NAME",
            help="Also pass this variable (or PREFIX*) of the worker's environment to user code "
            "(repeatable; HOME, LANG, LC_*, TZ, TMPDIR, PATH, CUDA_* pass by default; never CAVIAR_*).",
        ),
    ] = None,
    workdir: Annotated[
        str | None,
        typer.Option(
            "--workdir",
            help="Make each trial's own working directory (CAVIAR_TRIAL_DIR) here "
            "(default: the system's temporary directory).",
        ),
    ] = None,
    keep_trial_dirs: Annotated[
        bool, typer.Option("--keep-trial-dirs", help="Leave each trial's directory after the trial.")
    ] = False,
    code_dir: Annotated[
        str | None,
        typer.Option(
            "--code-dir",
            help="Where entrypoints and a command's relative script are found (on the children's "
            "PYTHONPATH; default: the directory the worker is started in).",
        ),
    ] = None,
    log_format: LogFormatOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Draw trials from a caviar service and run them: one process per device slot (REST only)."""
    options = WorkerOptions(
        url=url,
        token=token,
        gpus=gpus,
        per_gpu=per_gpu,
        cpu=cpu,
        studies=tuple(study or ()),
        fuse=fuse,
        max_trials=max_trials,
        poll_interval_s=poll_interval,
        exit_when_idle_s=exit_when_idle,
        data_dir=data_dir,
        allow_code=tuple(allow_code or ()),
        pass_env=tuple(pass_env or ()),
        log_format=log_format or "text",
        log_level=log_level or "info",
        workdir=workdir,
        keep_trial_dirs=keep_trial_dirs,
        code_dir=code_dir,
    )
    try:
        code = run_workers(options)
    except ValueError as exc:
        fail(str(exc))
    raise typer.Exit(code)

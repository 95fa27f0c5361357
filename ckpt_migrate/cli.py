"""``ckpt-migrate``: a thin click layer over :mod:`ckpt_migrate.api`."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import click

from ckpt_migrate import __version__, interrupts
from ckpt_migrate.core.errors import EXIT_CODES_HELP, EXIT_INTERNAL, CkptMigrateError
from ckpt_migrate.core.text import one_line

FORMATS = ["text", "json", "markdown"]
FORMAT = click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="text",
    show_default=True,
    help="Report format (json: schema_version 1, see README).",
)
BASE_MODEL = click.option(
    "--base-model",
    default=None,  # not click.Path(file_okay=False): every command words a missing or file base model alike
    help="Hugging Face model directory or Hub id (default: the adapter's base_model_name_or_path when it is at "
    "hand); only the tensors a repair needs are read (needed for LoRA-only heads).",
)
OPTIMIZER = click.option(
    "--optimizer",
    type=click.Choice(["drop", "remap"]),
    default="drop",
    show_default=True,
    help="Stale optimizer.pt: drop it (Adam moments and LR schedule restart on resume), or remap it onto the "
    "repaired parameters (needs --base-model for the parameter order; falls back to drop if unprovable).",
)


def _version_option(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    from packaging.version import InvalidVersion, Version

    try:
        return None if value is None else str(Version(value))
    except InvalidVersion:
        raise click.BadParameter(f"{value!r} is not a version (e.g. 4.44.2)") from None


TARGET_TRANSFORMERS = click.option(
    "--target-transformers",
    metavar="VERSION",
    default=None,
    callback=_version_option,
    help="The transformers release that will resume the checkpoint (default: the installed one); "
    "trainer_state.json fields it does not know are dropped.",
)
TARGET_PEFT = click.option(
    "--target-peft",
    metavar="VERSION",
    default=None,
    callback=_version_option,
    help="The peft release that will load the adapter (default: the installed one); adapter_config.json keys it "
    "does not know are dropped when that keeps the model, else the checkpoint is refused (exit 4).",
)
ALLOW_LOSSY = click.option(
    "--allow-lossy",
    is_flag=True,
    help="Write the best repair of a checkpoint that lost trained values (e.g. bias='lora_only' biases peft never "
    "saved), recording the loss; refused (exit 4) without it.",
)
DEBUG = click.option("--debug", is_flag=True, help="Show a Python traceback on errors.")


def _run(debug: bool, action: Callable[[], int]) -> None:
    """Run a command: one line on stderr and a documented exit code for every failure.

    An interrupt (Ctrl-C, SIGTERM) is exit 130 and one line, whatever exception it surfaced as (see
    :mod:`ckpt_migrate.interrupts`); what this run staged is removed.
    """
    previous = interrupts.install()
    try:
        code = _outcome(debug, action)
    finally:
        interrupts.restore(previous)
    sys.exit(code)


def _outcome(debug: bool, action: Callable[[], int]) -> int:
    try:
        code = action()
        # an interrupt a library swallowed still ends the run as one (staged_output published nothing after it)
        return interrupts.finish_interrupted() if interrupts.interrupted() else code
    except KeyboardInterrupt:
        return interrupts.finish_interrupted()
    except Exception as exc:  # noqa: BLE001
        if interrupts.is_interrupt(exc):
            return interrupts.finish_interrupted()
        if debug:
            raise
        if isinstance(exc, CkptMigrateError):
            click.echo(f"ckpt-migrate: error: {one_line(str(exc))}", err=True)
            return exc.exit_code
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        message = f"{type(exc).__name__}: {first}"
        click.echo(f"ckpt-migrate: internal error: {one_line(message)} (rerun with --debug)", err=True)
        return EXIT_INTERNAL


def _emit(report, fmt: str) -> int:
    from ckpt_migrate.render import render_report

    click.echo(render_report(report, fmt), nl=False)
    return report.exit_code


@click.group(epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="ckpt-migrate")
def main() -> None:
    """Repair PEFT checkpoints broken by peft <= 0.12 (tuner-wrapped classification heads).

    Read a dry run first: ckpt-migrate fix SRC --dry-run. Retraining is preferred when you can.
    """


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("src", type=click.Path(path_type=str))
@click.option(
    "--out", type=click.Path(path_type=str), default=None, help="New checkpoint directory (must not exist or be empty)."
)
@click.option("--dry-run", is_flag=True, help="Show exactly what would be written; write nothing.")
@FORMAT
@BASE_MODEL
@OPTIMIZER
@TARGET_TRANSFORMERS
@TARGET_PEFT
@ALLOW_LOSSY
@click.option(
    "--verify/--no-verify",
    default=None,
    help="Check each staged checkpoint with `verify` (needs a base model); publish only passes. Default: when a "
    "base model is at hand and its weights are at most 1 GB.",
)
@click.option(
    "--executor",
    default="local",
    show_default=True,
    metavar="local|dask|dask://HOST:PORT",
    help="Where the checkpoints of a batch are repaired: here one after another, on a Dask LocalCluster (one task "
    "per checkpoint), or on a running Dask scheduler. SRC, --out and --base-model may be URLs (s3://, gs://, ...).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@DEBUG
def fix(
    src: str,
    out: str | None,
    dry_run: bool,
    fmt: str,
    base_model: str | None,
    optimizer: str,
    target_transformers: str | None,
    target_peft: str | None,
    allow_lossy: bool,
    verify: bool | None,
    executor: str,
    quiet: bool,
    debug: bool,
) -> None:
    """Repair SRC (adapter dir, checkpoint-N, or a run dir of checkpoint-*) into --out.

    The source is never modified. Output is staged beside --out and renamed into place only when complete.
    """

    if out is None and not dry_run:
        raise click.UsageError("--out is required (or pass --dry-run)")

    def action() -> int:
        from ckpt_migrate.api import fix as fix_checkpoints

        report = fix_checkpoints(
            src,
            out,
            base_model=base_model,
            dry_run=dry_run,
            progress=False if quiet else None,
            optimizer=optimizer,
            target_transformers=target_transformers,
            target_peft=target_peft,
            verify=verify,
            allow_lossy=allow_lossy,
            executor=executor,
        )
        code = _emit(report, fmt)
        for result in report.checkpoints:
            if result.failed:
                message = f"{result.source}: {result.status}: {result.error}"
                click.echo(f"ckpt-migrate: error: {one_line(message)}", err=True)
        return code

    _run(debug, action)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("src", type=click.Path(path_type=str))
@FORMAT
@BASE_MODEL
@OPTIMIZER
@TARGET_TRANSFORMERS
@TARGET_PEFT
@ALLOW_LOSSY
@DEBUG
def inspect(
    src: str,
    fmt: str,
    base_model: str | None,
    optimizer: str,
    target_transformers: str | None,
    target_peft: str | None,
    allow_lossy: bool,
    debug: bool,
) -> None:
    """Say what SRC is, what is wrong with it, and the repair plan (reads headers only)."""

    def action() -> int:
        from ckpt_migrate.api import inspect as inspect_checkpoints

        report = inspect_checkpoints(
            src,
            base_model=base_model,
            optimizer=optimizer,
            target_transformers=target_transformers,
            target_peft=target_peft,
            allow_lossy=allow_lossy,
        )
        return _emit(report, fmt)

    _run(debug, action)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("src", type=click.Path(path_type=str))
@click.option(
    "--out", type=click.Path(path_type=str), default=None, help="New model directory (must not exist or be empty)."
)
@click.option("--dry-run", is_flag=True, help="Show what would be written; write nothing.")
@BASE_MODEL
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="dtype of the floating tensors (auto: as the base model stores them).",
)
@click.option(
    "--adapter",
    default=None,
    help="Which adapter of a checkpoint holding several to merge: its name (default: the one at the top, or the "
    "only one).",
)
@click.option(
    "--allow-lossy",
    is_flag=True,
    help="Merge the best repair of a checkpoint whose trained values were never saved, recording the loss.",
)
@FORMAT
@click.option("--quiet", is_flag=True, help="No progress bar.")
@DEBUG
def export(
    src: str,
    out: str | None,
    dry_run: bool,
    base_model: str | None,
    dtype: str,
    adapter: str | None,
    allow_lossy: bool,
    fmt: str,
    quiet: bool,
    debug: bool,
) -> None:
    """Write a standalone model from SRC: the base with every adapter delta folded in and the repaired head.

    SRC (a checkpoint or a Hub id) is repaired in memory first; plain transformers loads the result.
    """
    if out is None and not dry_run:
        raise click.UsageError("--out is required (or pass --dry-run)")

    def action() -> int:
        from ckpt_migrate.api import export as export_model

        progress = False if quiet else None
        report = export_model(
            src,
            out,
            base_model=base_model,
            dtype=dtype,
            dry_run=dry_run,
            progress=progress,
            adapter=adapter,
            allow_lossy=allow_lossy,
        )
        return _emit(report, fmt)

    _run(debug, action)


@main.command("verify", epilog=EXIT_CODES_HELP)
@click.argument("checkpoint", type=click.Path(path_type=str))
@click.option(
    "--base-model",
    required=True,
    help="Local Hugging Face model directory the adapter belongs to.",
)
@click.option(
    "--source",
    type=click.Path(file_okay=False, path_type=str),
    default=None,
    help="The broken original: also compare with its own function, computed without folding.",
)
@FORMAT
@click.option("--quiet", is_flag=True, help="No progress lines.")
@DEBUG
def verify_command(checkpoint: str, base_model: str, source: str | None, fmt: str, quiet: bool, debug: bool) -> None:
    """Load CHECKPOINT with transformers + the installed peft and prove it reproduces a model.

    Fails when adapter tensors go unused, implied parameters are missing, or any parameter on the
    forward path is left random (two loads under different seeds must give identical logits).
    """

    def action() -> int:
        from ckpt_migrate.api import verify
        from ckpt_migrate.render import render_verdict

        verdict = verify(checkpoint, base_model, source=source, progress=False if quiet else None)
        click.echo(render_verdict(verdict, fmt), nl=False)
        return verdict.exit_code

    _run(debug, action)


@main.command()
@FORMAT
def migrations(fmt: str) -> None:
    """List the known migrations, in the order they run."""
    from ckpt_migrate.api import list_migrations
    from ckpt_migrate.render import render_migrations

    click.echo(render_migrations(list_migrations(), fmt), nl=False)


def entry_point() -> None:
    """The ``ckpt-migrate`` console script: :func:`main`, then an exit that skips interpreter teardown.

    Once torch is imported, tearing the interpreter down takes about 0.7 s (freeing torch's module
    graph) and does nothing for the user: every output is fsynced and published, and every staging
    directory removed, before a command returns. Only stdout and stderr are left to flush.
    """
    try:
        main()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said there
            code = code or 1
    os._exit(code or 0)

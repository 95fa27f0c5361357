"""``ckpt-migrate``: a thin click layer over :mod:`ckpt_migrate.api`."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from enum import Enum
from typing import Any

import click

from ckpt_migrate import __version__, interrupts
from ckpt_migrate.core.errors import EXIT_CODES_HELP, EXIT_INTERNAL, CkptMigrateError
from ckpt_migrate.core.options import EXPORT, FIX, INSPECT, MIGRATIONS, VERIFY, Flag, flags_for, parse_version
from ckpt_migrate.core.text import one_line


def _version_option(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    try:
        return parse_version(param.name or "", value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a version (e.g. 4.44.2)") from None


#: What each kind of option is to click (core/options.py's Flag.kind).
_KINDS: dict[str, dict[str, Any]] = {
    "path": {"type": click.Path(path_type=str)},
    "directory": {"type": click.Path(file_okay=False, path_type=str)},
    "version": {"callback": _version_option},
    # not click.Path(file_okay=False) for --base-model: every command words a missing or file base model alike
    "": {},
}


def _click_option(flag: Flag, verb: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    default = flag.default.value if isinstance(flag.default, Enum) else flag.default
    settings: dict[str, Any] = {"help": flag.help_for(verb), "show_default": flag.show_default, "default": default}
    if flag.is_flag:
        settings["is_flag"] = True
    if flag.choices:
        settings["type"] = click.Choice(list(flag.choices))
    if flag.metavar:
        settings["metavar"] = flag.metavar
    if verb in flag.required:
        settings["required"] = True
    settings.update(_KINDS[flag.kind])
    return click.option(flag.flag, flag.name, **settings)


def declared(verb: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Every option ``verb`` takes (core/options.py), as click options, in their declared order."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for flag in reversed(flags_for(verb)):  # click lists the option decorated last first
            command = _click_option(flag, verb)(command)
        return command

    return decorate


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


def _report(verb: str, arguments: dict[str, Any], fmt: str) -> int:
    """Run the api verb of the same name with the command's arguments; print its report; name failed checkpoints."""
    from ckpt_migrate import api

    report = getattr(api, verb)(**arguments)
    code = _emit(report, fmt)
    for result in report.checkpoints if verb == FIX else ():
        if result.failed:
            message = f"{result.source}: {result.status}: {result.error}"
            click.echo(f"ckpt-migrate: error: {one_line(message)}", err=True)
    return code


def _progress(quiet: bool) -> bool | None:
    return False if quiet else None  # None: a progress bar when stderr is a terminal


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("src", type=click.Path(path_type=str))
@declared(FIX)
def fix(src: str, fmt: str, quiet: bool, debug: bool, **arguments: Any) -> None:
    """Repair SRC (adapter dir, checkpoint-N, or a run dir of checkpoint-*) into --out.

    The source is never modified. Output is staged beside --out and renamed into place only when complete.
    """
    _run(debug, lambda: _report(FIX, {"src": src, "progress": _progress(quiet), **arguments}, fmt))


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("src", type=click.Path(path_type=str))
@declared(INSPECT)
def inspect(src: str, fmt: str, debug: bool, **arguments: Any) -> None:
    """Say what SRC is, what is wrong with it, and the repair plan (reads headers only)."""
    _run(debug, lambda: _report(INSPECT, {"src": src, **arguments}, fmt))


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("src", type=click.Path(path_type=str))
@declared(EXPORT)
def export(src: str, fmt: str, quiet: bool, debug: bool, **arguments: Any) -> None:
    """Write a standalone model from SRC: the base with every adapter delta folded in and the repaired head.

    SRC (a checkpoint or a Hub id) is repaired in memory first; plain transformers loads the result.
    """
    _run(debug, lambda: _report(EXPORT, {"src": src, "progress": _progress(quiet), **arguments}, fmt))


@main.command("verify", epilog=EXIT_CODES_HELP)
@click.argument("checkpoint", type=click.Path(path_type=str))
@declared(VERIFY)
def verify_command(checkpoint: str, fmt: str, quiet: bool, debug: bool, **arguments: Any) -> None:
    """Load CHECKPOINT with transformers + the installed peft and prove it reproduces a model.

    Fails when adapter tensors go unused, implied parameters are missing, or any parameter on the
    forward path is left random (two loads under different seeds must give identical logits).
    """

    def action() -> int:
        from ckpt_migrate.api import verify
        from ckpt_migrate.render import render_verdict

        verdict = verify(checkpoint, progress=_progress(quiet), **arguments)
        click.echo(render_verdict(verdict, fmt), nl=False)
        return verdict.exit_code

    _run(debug, action)


@main.command()
@declared(MIGRATIONS)
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
    try:  # not click's standalone mode: it makes a Ctrl-C while parsing the command line "Aborted!", exit 1
        code: object = main(standalone_mode=False)  # --help, --version: 0
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.Abort as exc:
        code = interrupts.finish_interrupted() if interrupts.is_interrupt(exc) else 1
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

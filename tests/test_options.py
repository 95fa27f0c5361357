"""Options are declared once (ckpt_migrate/core/options.py): every command's click options come from the declarations,
each reaches the api verb of the same name under its own name, and every planning option given on the command line
reaches the plan. A new option is its declaration plus its keyword in the api verbs that take it: these tests hold
every declared option to that, with nothing to add here."""

from __future__ import annotations

import inspect as signatures

import pytest
from click.testing import CliRunner
from conftest import FIXTURES

from ckpt_migrate import api
from ckpt_migrate.cli import main
from ckpt_migrate.core.errors import EXIT_USAGE
from ckpt_migrate.core.options import FLAGS, OUT_REQUIRED, Flag, Options, flags_for
from ckpt_migrate.verbs import planning

CLI_ONLY = {"fmt", "quiet", "debug"}  # how the command prints, not what the verb does
VERBS = sorted({verb for flag in FLAGS for verb in flag.verbs})


@pytest.mark.parametrize("verb", VERBS)
def test_each_command_takes_exactly_its_declared_options_and_its_verb_every_one(verb):
    command = main.commands["verify" if verb == "verify" else verb]
    declared = [flag.name for flag in flags_for(verb)]
    options = [p.name for p in command.params if p.param_type_name == "option"]
    assert options == declared
    if verb == "migrations":
        return
    parameters = signatures.signature(getattr(api, verb)).parameters
    for name in set(declared) - CLI_ONLY:
        assert name in parameters, f"ckpt_migrate.api.{verb} lacks the keyword {name} its command passes"


def _given(flag: Flag) -> tuple[list[str], object]:
    """Command-line words giving ``flag`` a value other than its default, and the value the plan must hold."""
    if flag.is_flag:
        return [flag.flag], True
    if flag.choices:
        value = next(c for c in reversed(flag.choices) if c != flag.default)
        return [flag.flag, value], value
    assert flag.kind == "version", f"teach this test a value for {flag.flag}"
    return [flag.flag, "4.44.2"], "4.44.2"


@pytest.mark.parametrize("verb", ["inspect", "fix"])
def test_every_planning_option_given_on_the_command_line_reaches_the_plan(verb, monkeypatch):
    seen: list[Options] = []
    plan = planning.plan_checkpoint
    monkeypatch.setattr(planning, "plan_checkpoint", lambda *a, **k: seen.append(a[3]) or plan(*a, **k))
    args, expected = [verb, str(FIXTURES / "llama_score" / "run" / "checkpoint-4"), "--format", "json"], {}
    args += ["--dry-run"] if verb == "fix" else []
    for flag in Options.flags():
        if verb in flag.verbs:
            words, expected[flag.name] = _given(flag)
            args += words
    result = CliRunner().invoke(main, args)
    assert result.exit_code in (0, 3, 4), result.output
    assert seen and {name: getattr(seen[0], name) for name in expected} == expected


@pytest.mark.parametrize("verb", ["fix", "export"])
def test_out_is_checked_once_before_anything_is_read(verb, tmp_path):
    missing = tmp_path / "no-such-checkpoint"  # unread: the missing --out is the error, as the command line's
    result = CliRunner().invoke(main, [verb, str(missing)])
    assert result.exit_code == EXIT_USAGE
    assert result.output.strip() == f"ckpt-migrate: error: {OUT_REQUIRED}"

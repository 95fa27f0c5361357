"""Every command-line option, declared once: its flag, help, default and the verbs that take it.

The click options of every command are built from :data:`FLAGS` by one decorator (``ckpt_migrate.cli.declared``),
which hands them to the verb of :mod:`ckpt_migrate.api` of the same name as keyword arguments of the same names.
The options planning depends on are the fields of :class:`Options`, each declaring its flag in its metadata; a verb
builds its ``Options`` from its own keyword arguments (:meth:`Options.from_arguments`), and migrations read it as
``context.options``. Adding an option is its declaration here plus its keyword (and docstring line) in the verbs of
:mod:`ckpt_migrate.api` that take it; then the code that uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from ckpt_migrate.core.errors import UsageError

FIX, INSPECT, EXPORT, VERIFY, MIGRATIONS = "fix", "inspect", "export", "verify", "migrations"
REPORTS = (FIX, INSPECT, EXPORT, VERIFY)


@dataclass(frozen=True)
class Flag:
    """One command-line option: ``name`` is the keyword of the api verbs (and the ``Options`` field, if any).

    ``kind``: ``"version"`` (a release, e.g. 4.44.2), ``"path"``, ``"directory"``, or ``""`` (a string, or a flag
    with ``is_flag``). ``parse``: what turns the value given into the ``Options`` field (versions: normalised).
    ``per_verb``: (verb, help) for a verb that words it otherwise; ``required``: verbs that cannot do without it.
    """

    name: str
    flag: str
    help: str
    verbs: tuple[str, ...]
    default: Any = None
    choices: tuple[str, ...] = ()
    is_flag: bool = False
    kind: str = ""
    metavar: str | None = None
    show_default: bool = False
    per_verb: tuple[tuple[str, str], ...] = ()
    required: tuple[str, ...] = ()
    parse: Callable[[Any], Any] | None = None

    def help_for(self, verb: str) -> str:
        return dict(self.per_verb).get(verb, self.help)

    def value(self, given: Any) -> Any:
        """The value as planning holds it: ``parse``d, a version normalised (``ValueError`` when it is none)."""
        if self.parse is not None:
            return self.parse(given)
        return parse_version(self.name, given) if self.kind == "version" else given


class OptimizerPolicy(str, Enum):
    """What to do with an ``optimizer.pt`` that no longer matches the trainable parameters."""

    DROP = "drop"
    REMAP = "remap"

    __str__ = str.__str__


def _flag(flag: Flag) -> Any:
    return field(default=flag.default, metadata={"flag": flag})


@dataclass(frozen=True)
class Options:
    """The user's choices that planning depends on (``context.options`` in a migration).

    ``target_transformers`` / ``target_peft``: the releases that will load the checkpoint (None: the installed ones).
    ``allow_lossy``: write the best repair of a checkpoint that lost trained values, recording the loss.
    ``merge_into_base``: the repair is merged into the base model (``export``), never loaded as an adapter, so an
    adapter peft would refuse to load (no module left to adapt) is no reason to refuse. Not a command-line option.
    """

    optimizer: OptimizerPolicy = _flag(
        Flag(
            "optimizer",
            "--optimizer",
            "Stale optimizer.pt: drop it (Adam moments and LR schedule restart on resume), or remap it onto the "
            "repaired parameters (needs --base-model for the parameter order; falls back to drop if unprovable).",
            (FIX, INSPECT),
            default=OptimizerPolicy.DROP,
            choices=tuple(p.value for p in OptimizerPolicy),
            parse=OptimizerPolicy,
            show_default=True,
        )
    )
    target_transformers: str | None = _flag(
        Flag(
            "target_transformers",
            "--target-transformers",
            "The transformers release that will resume the checkpoint (default: the installed one); "
            "trainer_state.json fields it does not know are dropped.",
            (FIX, INSPECT),
            kind="version",
            metavar="VERSION",
        )
    )
    target_peft: str | None = _flag(
        Flag(
            "target_peft",
            "--target-peft",
            "The peft release that will load the adapter (default: the installed one); adapter_config.json keys it "
            "does not know are dropped when that keeps the model, else the checkpoint is refused (exit 4).",
            (FIX, INSPECT),
            kind="version",
            metavar="VERSION",
        )
    )
    allow_lossy: bool = _flag(
        Flag(
            "allow_lossy",
            "--allow-lossy",
            "Write the best repair of a checkpoint that lost trained values (e.g. bias='lora_only' biases peft never "
            "saved), recording the loss; refused (exit 4) without it.",
            (FIX, INSPECT, EXPORT),
            default=False,
            is_flag=True,
            per_verb=(
                (
                    EXPORT,
                    "Merge the best repair of a checkpoint whose trained values were never saved, recording the loss.",
                ),
            ),
        )
    )
    merge_into_base: bool = False

    @classmethod
    def flags(cls) -> tuple[Flag, ...]:
        return tuple(f.metadata["flag"] for f in fields(cls) if "flag" in f.metadata)

    @classmethod
    def arguments(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """The planning options among a verb's keyword arguments (its ``locals()``), as given."""
        return {flag.name: values[flag.name] for flag in cls.flags() if flag.name in values}

    @classmethod
    def from_arguments(cls, values: Mapping[str, Any], **fixed: Any) -> Options:
        """Options from a verb's keyword arguments, and ``fixed`` ones the verb decides itself; a bad value is a
        ``ValueError`` (on the command line, click's usage error names it first)."""
        parsed = {flag.name: flag.value(values[flag.name]) for flag in cls.flags() if flag.name in values}
        return cls(**parsed, **fixed)


def parse_version(name: str, value: str | None) -> str | None:
    """``value`` as a normalised release (``4.44`` stays ``4.44``); a ``ValueError`` naming ``name`` if it is none."""
    from packaging.version import InvalidVersion, Version

    try:
        return None if value is None else str(Version(value))
    except InvalidVersion:
        raise ValueError(f"{name} {value!r} is not a version (e.g. 4.44.2)") from None


#: Every command-line option in the order --help lists them; the planning options sit where Options.flags() is.
FLAGS: tuple[Flag, ...] = (
    Flag(
        "out",
        "--out",
        "New checkpoint directory (must not exist or be empty).",
        (FIX, EXPORT),
        kind="path",
        per_verb=((EXPORT, "New model directory (must not exist or be empty)."),),
    ),
    Flag(
        "dry_run",
        "--dry-run",
        "Show exactly what would be written; write nothing.",
        (FIX, EXPORT),
        default=False,
        is_flag=True,
        per_verb=((EXPORT, "Show what would be written; write nothing."),),
    ),
    Flag(
        "fmt",
        "--format",
        "Report format (json: schema_version 1, see README).",
        (*REPORTS, MIGRATIONS),
        default="text",
        choices=("text", "json", "markdown"),
        show_default=True,
    ),
    Flag(
        "base_model",
        "--base-model",
        "Hugging Face model directory or Hub id (default: the adapter's base_model_name_or_path when it is at "
        "hand); only the tensors a repair needs are read (needed for LoRA-only heads).",
        (FIX, INSPECT, EXPORT, VERIFY),
        per_verb=((VERIFY, "Local Hugging Face model directory the adapter belongs to."),),
        required=(VERIFY,),
    ),
    Flag(
        "source",
        "--source",
        "The broken original: also compare with its own function, computed without folding.",
        (VERIFY,),
        kind="directory",
    ),
    *Options.flags(),
    Flag(
        "verify",
        "--verify/--no-verify",
        "Check each staged checkpoint with `verify` (needs a base model); publish only passes. Default: when a "
        "base model is at hand and its weights are at most 1 GB.",
        (FIX, EXPORT),
        per_verb=(
            (
                EXPORT,
                "Check the staged model with `verify --source SRC` (plain transformers against the source computed "
                "unmerged by peft); publish only a pass. Default: when the base's weights are at most 1 GB.",
            ),
        ),
    ),
    Flag(
        "executor",
        "--executor",
        "Where the checkpoints of a batch are repaired: here one after another, on a Dask LocalCluster (one task "
        "per checkpoint), or on a running Dask scheduler. SRC, --out and --base-model may be URLs (s3://, gs://, ...).",
        (FIX,),
        default="local",
        show_default=True,
        metavar="local|dask|dask://HOST:PORT",
    ),
    Flag(
        "dtype",
        "--dtype",
        "dtype of the floating tensors (auto: as the base model stores them).",
        (EXPORT,),
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        show_default=True,
    ),
    Flag(
        "adapter",
        "--adapter",
        "Which adapter of a checkpoint holding several to merge: its name (default: the one at the top, or the "
        "only one).",
        (EXPORT,),
    ),
    Flag(
        "quiet",
        "--quiet",
        "No progress bar.",
        (FIX, EXPORT, VERIFY),
        default=False,
        is_flag=True,
        per_verb=((VERIFY, "No progress lines."),),
    ),
    Flag("debug", "--debug", "Show a Python traceback on errors.", REPORTS, default=False, is_flag=True),
)

#: The one message for a missing --out (fix and export; a fleet fix is a fix).
OUT_REQUIRED = "--out is required unless --dry-run is given"


def require_out(out: str | Path | None, dry_run: bool) -> None:
    """The one check that ``--out`` is given unless ``--dry-run`` is (exit 2), before anything is read."""
    if out is None and not dry_run:
        raise UsageError(OUT_REQUIRED)


def flags_for(verb: str) -> tuple[Flag, ...]:
    """The options of ``verb``, in --help order."""
    return tuple(flag for flag in FLAGS if verb in flag.verbs)

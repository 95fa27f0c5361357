"""The verbs, each a documented function: ``inspect``, ``fix``, ``export``, ``load``, ``verify``, ``list_migrations``.

The CLI is a thin layer over these; none of them imports torch, transformers or peft unless it
computes tensors or loads a model. Their steps are in :mod:`ckpt_migrate.verbs`; the options planning depends on
are declared once, in :mod:`ckpt_migrate.core.options`, and each verb takes them by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt_migrate.core.errors import UnreadableInputError
from ckpt_migrate.core.migration import Migration
from ckpt_migrate.core.options import require_out
from ckpt_migrate.core.plan import Options, Status
from ckpt_migrate.core.report import CheckpointResult, Report
from ckpt_migrate.formats.base_model import BaseModel
from ckpt_migrate.formats.checkpoint import find_checkpoints
from ckpt_migrate.formats.hub import resolve, resolve_model
from ckpt_migrate.planner import plan_checkpoint
from ckpt_migrate.progress import phase, steps
from ckpt_migrate.verbs.checking import verify_after_proof
from ckpt_migrate.verbs.planning import plan_all, refuse_misfitting_base

if TYPE_CHECKING:
    from ckpt_migrate.verification import VerifyResult

__all__ = ["CheckpointResult", "Report", "export", "fix", "inspect", "list_migrations", "load", "verify"]


def list_migrations() -> list[Migration]:
    """The known migrations, in the order they run.

    >>> [m.ID for m in list_migrations()][0]
    '0001_fold_double_wrapped_head'
    """
    from ckpt_migrate.migrations import MIGRATIONS

    return list(MIGRATIONS)


def inspect(
    src: str | Path,
    *,
    base_model: str | Path | None = None,
    optimizer: str = "drop",
    target_transformers: str | None = None,
    target_peft: str | None = None,
    allow_lossy: bool = False,
    progress: bool | None = None,
) -> Report:
    """Say what each checkpoint at ``src`` is, what is wrong with it, and the repair plan.

    Reads only ``adapter_config.json``, file sizes and safetensors headers (a ``.bin`` adapter is
    loaded with ``torch.load(weights_only=True)``). ``progress``: name a planning phase that takes over a second on
    stderr (``None``: when it is a terminal).

    >>> inspect("run/checkpoint-500").exit_code  # doctest: +SKIP
    3
    """
    planning = Options.arguments(locals())  # the options planning depends on, as given (core/options.py)
    from ckpt_migrate.remote import as_local, wants_fleet

    src, base_model = as_local(src), as_local(base_model)
    if wants_fleet(src, base_model):  # a URL: the planner on a sparse local mirror (headers only)
        from ckpt_migrate.remote.fleet import inspect as inspect_remote

        return inspect_remote(str(src), base_model=base_model, **planning)
    options = Options.from_arguments(planning)
    src = resolve(src, what="SRC")
    report = Report("inspect", src, dry_run=True)
    with phase(f"planning {src.name or src} (headers only)", progress):
        report.checkpoints, base = plan_all(src, base_model, options, report.notes)
    report.base_model = base.directory if base is not None else None
    return report


def fix(
    src: str | Path,
    out: str | Path | None = None,
    *,
    base_model: str | Path | None = None,
    dry_run: bool = False,
    progress: bool | None = None,
    optimizer: str = "drop",
    target_transformers: str | None = None,
    target_peft: str | None = None,
    verify: bool | None = None,
    allow_lossy: bool = False,
    executor: str = "local",
) -> Report:
    """Repair every broken checkpoint at ``src`` into ``out`` (mirroring a run directory's layout).

    With ``dry_run`` nothing is written and the report predicts exactly what a real run writes.
    Clean checkpoints are not written. ``progress`` shows a byte counter on stderr (``None``: only
    when stderr is a terminal). ``optimizer``: ``"drop"`` the stale ``optimizer.pt`` (default) or
    ``"remap"`` it onto the repaired parameters (needs ``base_model`` for the parameter order).
    ``target_transformers`` / ``target_peft``: the releases that will resume the checkpoint
    (default: the installed ones). Before anything is published, each output gets the static proof
    (:mod:`ckpt_migrate.proof`) on the base model, when one is at hand; a failed proof refuses the checkpoint
    (exit 4, or 5 when the base does not fit the adapter). ``verify`` runs :func:`verify` on each staged checkpoint
    against its source and publishes only those that pass (needs a base model; ``None``: when the base's weights
    are at most ``proof.AUTO_VERIFY_MAX_BYTES``). ``allow_lossy``: write the best repair of a
    checkpoint that lost trained values (refused by default), recording the loss in the report and the manifest.
    ``src``, ``out`` and ``base_model`` may be URLs (``s3://``...); ``executor``: ``"local"``, ``"dask"`` or
    ``"dask://HOST:PORT"`` (one task per checkpoint, see :mod:`ckpt_migrate.remote.fleet`).

    >>> fix("run", "run-fixed", base_model="bart-base").exit_code  # doctest: +SKIP
    0
    """
    planning = Options.arguments(locals())  # the options planning depends on, as given (core/options.py)
    require_out(out, dry_run)
    from ckpt_migrate.remote import as_local, wants_fleet

    src, out, base_model = as_local(src), as_local(out), as_local(base_model)
    if wants_fleet(src, out, base_model, executor=executor):
        from ckpt_migrate.remote.fleet import fix as fix_fleet

        return fix_fleet(
            str(src), None if out is None else str(out), base_model=base_model, dry_run=dry_run, progress=progress,
            executor=executor, verify=verify, **planning,
        )  # fmt: skip
    from ckpt_migrate.verbs.fixing import fix_local

    options = Options.from_arguments(planning)
    return fix_local(src, out, options, base_model=base_model, dry_run=dry_run, progress=progress, verify=verify)


def export(
    src: str | Path,
    out: str | Path | None = None,
    *,
    base_model: str | Path | None = None,
    dtype: str = "auto",
    dry_run: bool = False,
    max_shard_bytes: int = 5 * 10**9,
    progress: bool | None = None,
    adapter: str | None = None,
    allow_lossy: bool = False,
    verify: bool | None = None,
) -> Report:
    """Write a standalone model: ``base_model`` with every adapter delta of ``src`` folded in and its repaired head.

    ``src`` (a checkpoint, broken or repaired; a path or a Hub id) is repaired in memory by the same
    migrations as ``fix``, with the same refusals. Plain transformers loads the result with the Auto
    class of its ``config.json`` (the base's, with the head class the adapter was trained for).
    ``dtype``: ``"auto"`` (the base's) or ``float32``/``bfloat16``/``float16``. ``adapter``: which adapter of a
    checkpoint holding several (peft's subfolder name; default: the one at the top, else the only one).
    ``allow_lossy``: as for ``fix``, merge the best repair of a checkpoint that lost trained values, recording the loss.
    ``verify``: before publishing, load the staged model with plain transformers and compare its logits with the
    source's own function (:func:`verify` with ``source``); publish only a pass (unasked: when the base's weights are
    at most 1 GB).

    >>> export("run/checkpoint-500", "merged", base_model="acme/tiny-llama").exit_code  # doctest: +SKIP
    0
    """
    planning = Options.arguments(locals())  # the options planning depends on, as given (core/options.py)
    require_out(out, dry_run)
    from ckpt_migrate.execute.export import DTYPE_NAMES
    from ckpt_migrate.verbs.exporting import export_model

    if dtype != "auto" and dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be auto or one of {sorted(DTYPE_NAMES)}")
    return export_model(
        src, out, planning, base_model=base_model, dtype=dtype, dry_run=dry_run, max_shard_bytes=max_shard_bytes,
        progress=progress, adapter=adapter, verify=verify,
    )  # fmt: skip


RETRAIN_ON_LOAD = (
    "ckpt-migrate: retraining is preferred: this model was repaired in memory, and training on from it starts "
    "with fresh optimizer state, so the run is not identical to an uninterrupted one"
)


def load(base_model: str | Path, checkpoint: str | Path, *, is_trainable: bool = False) -> Any:
    """The peft model of ``checkpoint`` on ``base_model`` with the repair applied in memory; nothing is written.

    Refuses what ``fix`` refuses (a LoRA-only head whose base weights are not in ``base_model``, …). The
    transformers Auto class comes from the base's ``architectures``, else its ``model_type`` and the adapter's
    ``task_type`` (or, without one, the top-level modules its tensors use).

    >>> model = load("acme/tiny-llama", "run/checkpoint-500")  # doctest: +SKIP
    >>> model(input_ids=ids).logits  # the trained model's logits  # doctest: +SKIP
    """
    from ckpt_migrate.execute.in_memory import load_repaired
    from ckpt_migrate.verification import choose_auto_class

    base = BaseModel.open(resolve_model(base_model))
    src = resolve(checkpoint, what="checkpoint")
    relatives = find_checkpoints(src)
    if len(relatives) != 1:
        raise UnreadableInputError(f"load takes one checkpoint; this holds {', '.join(relatives)}", src)
    plan = plan_checkpoint(src / relatives[0], relatives[0], base, Options())
    if plan.status is Status.UNRECOVERABLE:
        refuse_misfitting_base(plan, base)
    elif plan.after.config:
        from ckpt_migrate.proof import prove_plan

        proof = prove_plan(plan, base)
        if proof.state == "failed":
            raise proof.error(plan.source)
    auto_class = choose_auto_class(base.config(), plan.after.config, base.directory / "config.json", plan.after.tensors)
    if is_trainable and plan.status is Status.REPAIRABLE:
        import warnings

        warnings.warn(RETRAIN_ON_LOAD, UserWarning, stacklevel=2)
    return load_repaired(plan, base, auto_class, is_trainable)


def verify(
    checkpoint: str | Path, base_model: str | Path, *, source: str | Path | None = None, progress: bool | None = None
) -> VerifyResult:
    """Load ``checkpoint`` onto ``base_model`` with the installed transformers and peft and judge it.

    With ``source`` (the broken original) also compare with the source's own function, computed
    without folding. See :mod:`ckpt_migrate.verification` for every check.

    >>> verify("fixed/checkpoint-500", "bart-base", source="run/checkpoint-500").ok  # doctest: +SKIP
    True
    """
    with steps(f"verify {Path(checkpoint).name}", progress):
        return verify_after_proof(checkpoint, base_model, source=source)

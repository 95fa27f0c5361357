"""The known migrations, in the order they run.

Each module defines ``ID``, ``SUMMARY`` (one line), ``CAUSED_BY`` (the upstream release and issue
that produced the broken format), ``detect(state) -> bool`` and ``plan(state) -> None``, which edits
the :class:`ckpt_migrate.plan.CheckpointState` without reading tensor data. To add one, add a module
here and append it to ``MIGRATIONS``.
"""

from ckpt_migrate.migrations import (
    m0001_fold_double_wrapped_head,
    m0002_fold_lora_only_head,
    m0003_drop_stale_optimizer,
    m0004_portable_rng_state,
)

MIGRATIONS = (
    m0001_fold_double_wrapped_head,
    m0002_fold_lora_only_head,
    m0003_drop_stale_optimizer,
    m0004_portable_rng_state,
)

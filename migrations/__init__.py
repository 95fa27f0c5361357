"""The known migrations, in the order they run: every ``mNNNN_<id>.py`` module of this package.

Each module fulfils :class:`ckpt_migrate.core.migration.Migration` (``ID``, ``SUMMARY``, ``CAUSED_BY``,
``CHANGES_TRAINABLE_PARAMETERS``, ``detect``, ``plan``, and ``write``/``compute``/``failures`` when its plan needs
them). Adding a migration is adding its file (``scripts/new_migration.py`` writes it and its test): the number in
the name fixes its place in the order, and ``ID`` must equal the name without the ``m``. Modules named ``_*.py``
are not migrations: they hold what several migrations share (``_tuner_fold.py``, ``_tuner_merge.py``).
"""

from __future__ import annotations

import importlib
import pkgutil
import re

from ckpt_migrate.core.migration import Migration, check_migration

MIGRATIONS: tuple[Migration, ...] = tuple(
    check_migration(importlib.import_module(f"{__name__}.{name}"))
    for name in sorted(info.name for info in pkgutil.iter_modules(__path__))
    if re.fullmatch(r"m\d{4}_\w+", name)
)


def by_id(migration_id: str) -> Migration:
    """The migration with this ``ID`` (KeyError if none)."""
    for migration in MIGRATIONS:
        if migration.ID == migration_id:
            return migration
    raise KeyError(migration_id)

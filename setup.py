"""Package discovery, which pyproject.toml alone cannot express for this layout.

``ckpt_migrate.migrations`` lives in the top-level ``migrations/`` directory (mapped by ``package-dir`` in
pyproject.toml). ``[tool.setuptools.packages.find]`` does not follow such a mapping, and a hand-written list
silently leaves out every subpackage nobody added to it (a wheel without ``ckpt_migrate.core`` shipped once), so
both trees are discovered here. Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

MIGRATIONS = "ckpt_migrate.migrations"

setup(
    packages=[
        *find_packages(include=["ckpt_migrate", "ckpt_migrate.*"]),
        MIGRATIONS,
        *(f"{MIGRATIONS}.{name}" for name in find_packages("migrations")),
    ]
)

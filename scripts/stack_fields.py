"""Which fields each release's ``TrainerState`` / ``TrainerControl`` / ``LoraConfig`` knows, read from the wheels.

The version tables of ``migrations/m0005_trainer_state_for_target.py`` were derived with this script:
it downloads each release's wheel from PyPI (``pip download --no-deps``, nothing installed), parses
the dataclass with :mod:`ast` (nothing imported) and prints, for every field, the first release
that has it. Run: ``python scripts/stack_fields.py [--cache DIR] transformers|peft``.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

SOURCES = {  # package: (files that may define the classes, oldest layout last; class names)
    "transformers": (("transformers/trainer_callback.py",), ("TrainerState", "TrainerControl")),
    "peft": (("peft/tuners/lora/config.py", "peft/tuners/lora.py", "peft/config.py"), ("LoraConfig", "PeftConfig")),
}
#: Field defaults that are not literals: what they evaluate to.
_FACTORIES = {"list": [], "dict": {}}
VERSIONS = {
    "transformers": [f"4.{minor}.0" for minor in range(30, 58)] + [f"5.{minor}.0" for minor in range(0, 25)],
    "peft": [f"0.{minor}.0" for minor in range(4, 22)],
}


def _default(value: ast.expr | None) -> object:
    """A field's default as JSON data; ``"<not a literal>"`` where it is computed."""
    if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "field":
        for keyword in value.keywords:
            if keyword.arg == "default":
                return _default(keyword.value)
            if keyword.arg == "default_factory" and isinstance(keyword.value, ast.Name):
                return _FACTORIES.get(keyword.value.id, "<not a literal>")
        return "<no default>"
    if value is None:
        return "<no default>"
    try:
        return ast.literal_eval(value)
    except ValueError:
        return "<not a literal>"


def dataclass_fields(sources: list[str], class_name: str) -> dict[str, object]:
    """Field name -> default of ``class_name`` and of the mixins it inherits from in the same sources."""
    classes = {n.name: n for s in sources for n in ast.walk(ast.parse(s)) if isinstance(n, ast.ClassDef)}
    fields: dict[str, object] = {}
    pending = [class_name]
    while pending:
        node = classes.get(pending.pop(0))
        if node is None:
            continue
        for statement in node.body:
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                fields.setdefault(statement.target.id, _default(statement.value))
        pending += [b.id for b in node.bases if isinstance(b, ast.Name)]
    return fields


def wheel_sources(package: str, version: str, cache: Path) -> list[str] | None:
    wheels = list(cache.glob(f"{package}-{version}-*.whl"))
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{package}=={version}"]
        command += ["-d", str(cache)]
        if subprocess.run(command, capture_output=True).returncode != 0:
            return None  # no such release
        wheels = list(cache.glob(f"{package}-{version}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
        return [wheel.read(p).decode("utf-8") for p in SOURCES[package][0] if p in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", choices=sorted(SOURCES))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/stack-wheels"))
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    first_seen: dict[str, dict[str, str]] = {name: {} for name in SOURCES[args.package][1]}
    by_version: dict[str, dict[str, dict[str, object]]] = {}
    for version in VERSIONS[args.package]:
        sources = wheel_sources(args.package, version, args.cache)
        if sources is None:
            continue
        by_version[version] = {name: dataclass_fields(sources, name) for name in SOURCES[args.package][1]}
        for name, fields in by_version[version].items():
            for field in fields:
                first_seen[name].setdefault(field, version)
    print(json.dumps({"first_seen": first_seen, "by_version": by_version}, indent=1, default=str))


if __name__ == "__main__":
    main()

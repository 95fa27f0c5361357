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
    "peft": (("peft/tuners/lora/config.py", "peft/tuners/lora.py"), ("LoraConfig",)),
}
VERSIONS = {
    "transformers": [f"4.{minor}.0" for minor in range(30, 58)] + [f"5.{minor}.0" for minor in range(0, 25)],
    "peft": [f"0.{minor}.0" for minor in range(4, 22)],
}


def dataclass_fields(source: str, class_name: str) -> list[str]:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return [s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
    return []


def wheel_source(package: str, version: str, cache: Path) -> str | None:
    wheels = list(cache.glob(f"{package}-{version}-*.whl"))
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{package}=={version}"]
        command += ["-d", str(cache)]
        if subprocess.run(command, capture_output=True).returncode != 0:
            return None  # no such release
        wheels = list(cache.glob(f"{package}-{version}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
        path = next(p for p in SOURCES[package][0] if p in names)
        return wheel.read(path).decode("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", choices=sorted(SOURCES))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/stack-wheels"))
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    first_seen: dict[str, dict[str, str]] = {name: {} for name in SOURCES[args.package][1]}
    by_version: dict[str, dict[str, list[str]]] = {}
    for version in VERSIONS[args.package]:
        source = wheel_source(args.package, version, args.cache)
        if source is None:
            continue
        by_version[version] = {name: dataclass_fields(source, name) for name in SOURCES[args.package][1]}
        for name, fields in by_version[version].items():
            for field in fields:
                first_seen[name].setdefault(field, version)
    print(json.dumps({"first_seen": first_seen, "by_version": by_version}, indent=1))


if __name__ == "__main__":
    main()

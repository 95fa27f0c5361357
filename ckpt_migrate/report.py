"""Render a :class:`~ckpt_migrate.api.Report` as text (a readable diff), JSON (schema 1) or Markdown."""

from __future__ import annotations

import json
from typing import Any

from ckpt_migrate import __version__
from ckpt_migrate.api import CheckpointResult, Report

SCHEMA_VERSION = 1


def checkpoint_dict(result: CheckpointResult) -> dict[str, Any]:
    plan = result.plan
    entry: dict[str, Any] = {
        "source": str(result.source),
        "output": str(result.output) if result.output else None,
        "status": result.status,
        "migrations": plan.migrations if plan else [],
        "tensors_added": [t.as_dict() for t in plan.tensors_added] if plan else [],
        "tensors_removed": [t.as_dict(with_how=False) for t in plan.tensors_removed] if plan else [],
        "files_removed": [name for name, _, _ in plan.files_removed] if plan else [],
        "files_removed_detail": [
            {"name": name, "bytes": size, "reason": reason} for name, size, reason in plan.files_removed
        ]
        if plan
        else [],
        "files_rewritten": [
            {"name": name, "reason": rewrite.reason, **_rewrite_summary(rewrite)}
            for name, rewrite in plan.files_rewritten
        ]
        if plan
        else [],
        "config_changes": plan.config_changes if plan else {},
        "warnings": plan.warnings if plan else [],
        "errors": [result.error] if result.error else [],
    }
    if result.verification is not None:
        entry["verification"] = result.verification
    return entry


def _rewrite_summary(rewrite) -> dict[str, Any]:
    return {k: v for k, v in rewrite.details.items() if k in ("kept", "reset", "dropped")}


def to_dict(report: Report) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "tool_version": __version__,
        "command": report.command,
        "dry_run": report.dry_run,
        "source": str(report.source),
        "out": str(report.out) if report.out else None,
        "exit_code": report.exit_code,
        "checkpoints": [checkpoint_dict(c) for c in report.checkpoints],
    }


def render_json(report: Report) -> str:
    return json.dumps(to_dict(report), indent=2)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[list[str]], headers: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _shape(shape: list[int]) -> str:
    return str(tuple(shape))


def _headline(report: Report, entry: dict[str, Any], result: CheckpointResult) -> str:
    status = entry["status"]
    if status == "repairable" and report.command == "fix":
        status = "repairable (dry run: nothing written)"
    if status == "repaired":
        status = f"repaired -> {entry['output']}"
    if status == "clean" and report.command == "fix":
        status = "clean: nothing to do, nothing written"
    return f"== {result.source}: {status}"


def render_text(report: Report) -> str:
    lines: list[str] = []
    for result in report.checkpoints:
        entry = checkpoint_dict(result)
        lines.append(_headline(report, entry, result))
        if entry["migrations"]:
            lines.append("migrations: " + ", ".join(entry["migrations"]))
        for error in entry["errors"]:
            lines.append(f"ERROR: {error}")
        if entry["config_changes"]:
            lines.append("adapter_config.json:")
            for key, change in entry["config_changes"].items():
                lines.append(f"- {key}: {json.dumps(change['before'])}")
                lines.append(f"+ {key}: {json.dumps(change['after'])}")
        if entry["tensors_removed"]:
            lines.append(f"tensors removed ({len(entry['tensors_removed'])}):")
            rows = [[t["name"], _shape(t["shape"]), t["dtype"]] for t in entry["tensors_removed"]]
            lines += _table(rows, ["name", "shape", "dtype"])
        if entry["tensors_added"]:
            lines.append(f"tensors added ({len(entry['tensors_added'])}):")
            rows = [[t["name"], _shape(t["shape"]), t["dtype"], t["how"]] for t in entry["tensors_added"]]
            lines += _table(rows, ["name", "shape", "dtype", "how computed"])
        if entry["files_removed_detail"]:
            lines.append("files dropped:")
            rows = [[f["name"], _size(f["bytes"]), f["reason"]] for f in entry["files_removed_detail"]]
            lines += _table(rows, ["file", "size", "why"])
        for rewritten in entry["files_rewritten"]:
            lines.append(f"file rewritten: {rewritten['name']}: {rewritten['reason']}")
            for key in ("kept", "reset", "dropped"):
                if rewritten.get(key):
                    lines.append(f"  {key}: " + ", ".join(rewritten[key]))
        for warning in entry["warnings"]:
            lines.append(f"WARNING: {warning}")
        lines.append("")
    if len(report.checkpoints) > 1:
        lines.append("summary:")
        rows = [[c.relative, c.status, str(len(c.plan.migrations) if c.plan else 0)] for c in report.checkpoints]
        lines += _table(rows, ["checkpoint", "status", "migrations"])
    return "\n".join(lines).rstrip() + "\n"


def render_markdown(report: Report) -> str:
    lines: list[str] = [f"# ckpt-migrate {report.command} report", ""]
    for result in report.checkpoints:
        entry = checkpoint_dict(result)
        lines += [f"## `{result.source}`: {entry['status']}", ""]
        if entry["migrations"]:
            lines += ["Migrations: " + ", ".join(f"`{m}`" for m in entry["migrations"]), ""]
        lines += [f"> **Error:** {e}" for e in entry["errors"]]
        if entry["config_changes"]:
            lines += ["```diff"]
            for key, change in entry["config_changes"].items():
                lines += [f"- {key}: {json.dumps(change['before'])}", f"+ {key}: {json.dumps(change['after'])}"]
            lines += ["```", ""]
        if entry["tensors_removed"]:
            lines += ["**Tensors removed**", "", "| name | shape | dtype |", "|---|---|---|"]
            lines += [f"| `{t['name']}` | {_shape(t['shape'])} | {t['dtype']} |" for t in entry["tensors_removed"]]
            lines += [""]
        if entry["tensors_added"]:
            lines += ["**Tensors added**", "", "| name | shape | dtype | how computed |", "|---|---|---|---|"]
            lines += [
                f"| `{t['name']}` | {_shape(t['shape'])} | {t['dtype']} | {t['how']} |" for t in entry["tensors_added"]
            ]
            lines += [""]
        if entry["files_removed_detail"]:
            lines += ["**Files dropped**", "", "| file | size | why |", "|---|---|---|"]
            lines += [f"| `{f['name']}` | {_size(f['bytes'])} | {f['reason']} |" for f in entry["files_removed_detail"]]
            lines += [""]
        lines += [f"- **Rewritten:** `{r['name']}`: {r['reason']}" for r in entry["files_rewritten"]]
        lines += [f"- **Warning:** {w}" for w in entry["warnings"]]
        lines += [""]
    return "\n".join(lines).rstrip() + "\n"


RENDERERS = {"text": render_text, "json": render_json, "markdown": render_markdown}

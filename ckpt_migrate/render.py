"""Reports for people and programs: JSON (schema 1) from the data, text and Markdown from one section model.

``fix``/``inspect`` reports and ``verify`` verdicts are first turned into :class:`Section` s (a heading
and blocks: labelled lines, config diffs, tables); :func:`draw_text` and :func:`draw_markdown` draw
any section, so both formats always say the same things.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from ckpt_migrate import __version__
from ckpt_migrate.core.migration import Migration
from ckpt_migrate.core.plan import CheckpointPlan, Status
from ckpt_migrate.core.report import CheckpointResult, Report
from ckpt_migrate.core.text import listed
from ckpt_migrate.formats.trainer_files import file_verdicts
from ckpt_migrate.render_sections import Diff, Line, Section, Table, draw_markdown, draw_text, markdown_table
from ckpt_migrate.verification.result import SEEDS, VerifyResult

SCHEMA_VERSION = 1
STALE_OPTIMIZER = "0003_drop_stale_optimizer"  # its id says drop; with --optimizer remap it rewrites the file


# ------------------------------------------------------------------------------------ fix / inspect


def _adapter_fields(plan: CheckpointPlan | None) -> dict[str, Any]:
    """What a report says of one adapter: the one at the top of a checkpoint, or one in a subfolder."""
    return {
        "migrations": list(plan.migrations) if plan else [],
        "tensors_added": [t.as_dict() for t in plan.tensors_added] if plan else [],
        "tensors_removed": [t.as_dict(with_how=False) for t in plan.tensors_removed] if plan else [],
        "config_changes": plan.config_changes if plan else {},
    }


def _adapter_status(result: CheckpointResult, adapter: Any) -> Status:
    """A subfolder adapter's status: planned as repairable, repaired once its checkpoint was written."""
    written = result.status in (Status.REPAIRED, Status.WRITTEN) and adapter.status is Status.REPAIRABLE
    return result.status if written else adapter.status


def _reproduces(result: CheckpointResult, base: Any) -> dict[str, Any] | None:
    """Whether the output was shown to reproduce the trained model, how, and the command that checks it."""
    from ckpt_migrate.proof import reproduction, verify_command, why_not_by_construction

    plan = result.plan
    if plan is None or result.status not in (Status.REPAIRABLE, Status.REPAIRED, Status.WRITTEN):
        return None
    if result.status is Status.REPAIRABLE:
        if result.proof is not None and result.proof.state == "not run":
            text = f"not yet (dry run), and a real run will not show it: {result.proof.reason}"
            return {"shown": "no", "text": text, "check_with": verify_command("OUT", base, result.source)}
        if plan.losses:
            return {
                "shown": "no",
                "text": "lossy: trained values were never saved (see the losses)",
                "check_with": None,
            }
        text = "not yet (dry run): a real run shows it numerically by verify (bases up to 1 GB)"
        why_not = why_not_by_construction(plan)
        text += f"; not by construction: {why_not}" if why_not else ", or by construction once the static proof passes"
        return {"shown": "no", "text": text, "check_with": None}
    claim = reproduction(plan, result.proof, result.verification)
    output = result.output or "OUT"
    claim["check_with"] = None if claim["shown"] == "numerically" else verify_command(output, base, result.source)
    return claim


def _export_reproduces(result: CheckpointResult, base: Any, merged: Any) -> dict[str, Any] | None:
    """Whether the exported model was shown to reproduce the trained model: only ``verify`` of the written model
    (plain transformers against the source computed unmerged by peft) shows it; nothing is claimed by construction."""
    from ckpt_migrate.proof import reproduction, verify_command

    if result.plan is None or result.output is None:
        return None
    if result.plan.losses:
        return {"shown": "no", "text": "lossy: trained values were never saved (see the losses)", "check_with": None}
    claim = reproduction(result.plan, None, result.verification) if result.verification is not None else None
    if claim is not None and claim["shown"] == "numerically":
        return {**claim, "text": f"the model loaded by plain transformers: {claim['text']}", "check_with": None}
    text = "not compared numerically (verify did not run)" if result.verification is None else "verify failed"
    source = result.source if merged is None or merged is result.plan else result.source / merged.relative
    return {"shown": "no", "text": text, "check_with": verify_command(result.output, base, source)}


def checkpoint_dict(result: CheckpointResult, base: Any = None, export: Any = None) -> dict[str, Any]:
    """One checkpoint's entry; ``export``: the export plan when the checkpoint was merged (its adapter ``repair``)."""
    plan = result.plan
    entry: dict[str, Any] = {
        "source": str(result.source),
        "output": str(result.output) if result.output else None,
        "status": result.status.value,
        **_adapter_fields(plan),
        "migrations_not_needed": list(plan.not_needed) if plan else [],
        "fails_on": list(plan.fails_on) if plan else [],
        "files_removed": [name for name, _, _ in plan.files_removed] if plan else [],
        "files_removed_detail": [
            {"name": name, "bytes": size, "reason": reason}
            for name, size, reason in (plan.files_removed if plan else [])
        ],
        "files_rewritten": [
            {"name": name, "reason": rewrite.reason, **{label: list(names) for label, names in rewrite.listed}}
            for name, rewrite in (plan.files_rewritten if plan else [])
        ],
        # adapters in subfolders ("path": the subfolder, which peft names after the adapter)
        "adapters": [
            {"path": a.relative, "status": _adapter_status(result, a).value, **_adapter_fields(a)}
            for a in plan.adapters
        ]
        if plan
        else [],
        "files": [
            {"name": name, "bytes": size, "verdict": verdict.value, "reason": why}
            for name, size, verdict, why in (file_verdicts(plan) if plan else [])
        ],
        "warnings": plan.warnings if plan else [],
        "losses": plan.losses if plan else [],
        "errors": [result.error] if result.error else [],
    }
    if result.verification is not None:
        entry["verification"] = result.verification
    entry["proof"] = result.proof.to_dict() if result.proof is not None else None
    merged = export.repair if export is not None else None
    entry["reproduces"] = _export_reproduces(result, base, merged) if export is not None else _reproduces(result, base)
    return entry


def to_dict(report: Report) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "tool_version": __version__,
        "command": report.command,
        "dry_run": report.dry_run,
        "source": str(report.source),
        "out": str(report.out) if report.out else None,
        "exit_code": report.exit_code,
        "notes": list(report.notes),
        "checkpoints": [checkpoint_dict(c, report.base_model, report.export) for c in report.checkpoints],
        **({"export": export_dict(report.export)} if report.export is not None else {}),
    }


def export_dict(plan: Any) -> dict[str, Any]:
    return {
        "base_model": str(plan.base),
        "architectures": plan.config.get("architectures"),
        "num_labels": len(plan.config.get("id2label") or {}) or None,
        "dtype": plan.cast_to or "as the base",
        "peft_type": plan.repair.after.config.get("peft_type"),
        "merged_modules": list(plan.merged),
        "tensors_from_adapter": list(plan.from_adapter),
        "files_copied_from_base": list(plan.carried),
        "shards": {name: len(names) for name, names in plan.shards},
    }


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _status_text(report: Report, entry: dict[str, Any]) -> str:
    status = entry["status"]
    if report.command == "fix" and status == Status.REPAIRABLE:
        return "repairable (dry run: nothing written)"
    if status == Status.REPAIRED:
        return f"repaired -> {entry['output']} (static proof passed)"
    if status == Status.WRITTEN:
        return f"written, NOT proven -> {entry['output']}"
    if report.command == "fix" and status == Status.CLEAN:
        return "clean: nothing to do, nothing written"
    return status


def _adapter_blocks(entry: dict[str, Any], prefix: str) -> list[Line | Diff | Table]:
    """The config diff and tensor tables of one adapter (``prefix``: its subfolder, "" at the top)."""
    blocks: list[Line | Diff | Table] = []
    if entry["config_changes"]:
        changes = tuple(
            (
                key,
                "(absent)" if c.get("added") else json.dumps(c["before"]),
                "(removed)" if c.get("removed") else json.dumps(c["after"]),
            )
            for key, c in entry["config_changes"].items()
        )
        blocks.append(Diff(f"{prefix}adapter_config.json", changes))
    removed, added = entry["tensors_removed"], entry["tensors_added"]
    if removed:
        rows = tuple((t["name"], str(tuple(t["shape"])), t["dtype"]) for t in removed)
        blocks.append(Table(f"{prefix}tensors removed ({len(removed)})", ("name", "shape", "dtype"), rows))
    if added:
        rows = tuple((t["name"], str(tuple(t["shape"])), t["dtype"], t["how"]) for t in added)
        headers = ("name", "shape", "dtype", "how computed")
        blocks.append(Table(f"{prefix}tensors added ({len(added)})", headers, rows))
    return blocks


def _applied(plan: CheckpointPlan | None) -> tuple[str, ...]:
    """The applied migration ids, each named by what it did where its id says less: 0003 rewrites
    ``optimizer.pt`` under ``--optimizer remap``, and a remap must not read as a drop."""
    if plan is None:
        return ()
    rewrote = {rewrite.migration for _, rewrite in plan.files_rewritten}
    return tuple(f"{m} (--optimizer remap)" if m == STALE_OPTIMIZER and m in rewrote else m for m in plan.migrations)


def _proof_lines(entry: dict[str, Any]) -> list[Line]:
    """What the static proof established (or will, or why it did not run) and what the output reproduces."""
    lines = []
    proof = entry.get("proof")
    if proof is not None:
        state = proof["state"]
        if state in ("proven", "will run"):
            what = "; ".join(proof["established"])
            lines.append(Line("proof", f"{state}: {what} ({proof['how']})"))
        else:
            lines.append(Line("proof", f"{state}: {proof['reason']}"))
        lines += [Line("proof note", note) for note in proof["notes"]]
    verification = entry.get("verification")
    if verification is not None:
        lines.append(Line("verify", verify_verdict_text(verification)))
    claim = entry.get("reproduces")
    if claim is not None:
        shown = {"numerically": "shown numerically", "by construction": "exactly, by construction"}
        lines.append(Line("reproduces the trained model", f"{shown.get(claim['shown'], 'not shown')}: {claim['text']}"))
        if claim.get("check_with"):
            lines.append(Line("check with", claim["check_with"]))
    return lines


def verify_verdict_text(verification: dict[str, Any]) -> str:
    """``OK (max |logit diff| ... vs the source, tolerance ...; two loads identical)`` or ``FAILED: reasons``."""
    if not verification.get("ok"):
        reasons = verification.get("reasons") or []
        for path, adapter in (verification.get("adapters") or {}).items():
            reasons = reasons + [f"{path}: {r}" for r in adapter.get("reasons") or []]
        return "FAILED: " + ("; ".join(reasons) or "see --format json")
    verdicts = [verification] + list((verification.get("adapters") or {}).values())
    diffs = [v["max_logit_diff_vs_source"] for v in verdicts if v.get("max_logit_diff_vs_source") is not None]
    between = max((v.get("max_logit_diff_between_loads") or 0.0) for v in verdicts)
    versus = f"max |logit diff| {max(diffs):.3g} vs the source" if diffs else "not compared with the source"
    return f"OK ({versus}, tolerance {verification.get('tolerance', 0):g}; two loads differ by {between:.3g})"


def _checkpoint_section(report: Report, result: CheckpointResult) -> Section:
    entry = checkpoint_dict(result, report.base_model, report.export)
    if report.command == "export":  # the repair feeds the export in memory: no checkpoint files are written
        blocks: list[Line | Diff | Table] = [Line("migrations", code=tuple(entry["migrations"]))] * bool(
            entry["migrations"]
        )
        blocks += [
            b for b in _adapter_blocks(entry, "") if isinstance(b, Table) and b.title.startswith("tensors added")
        ]
        if entry["losses"]:
            text = "LOSSY: the exported model does not reproduce the trained model: " + "; ".join(entry["losses"])
            blocks.append(Line("WARNING", text))
        blocks += _proof_lines(entry)  # the proof, and once written: verify and what the model reproduces
        done = {Status.CLEAN: "clean: merged as it is", Status.REPAIRABLE: "repaired in memory"}.get(
            result.status, entry["status"]
        )
        return Section(f"{result.source}: {done}", blocks)
    section = Section(f"{result.source}: {_status_text(report, entry)}")
    blocks = section.blocks
    if entry["migrations"]:
        blocks.append(Line("migrations", code=_applied(result.plan)))
    if entry["migrations_not_needed"]:
        names = entry["migrations_not_needed"]
        blocks.append(Line(f"not needed ({len(names)})", listed(names, where_all="ckpt-migrate migrations lists all")))
    if report.command == "inspect" and entry["fails_on"]:
        if result.status is Status.CLEAN:  # fine where it will be used; the failures are other stacks'
            target = "the installed transformers and peft, or the releases --target-transformers/--target-peft name"
            blocks.append(Line("fine on the target stack", target))
            blocks.append(Line("would fail on other stacks (repair for one with --target-transformers/--target-peft)"))
            blocks += [Line("-", line) for line in entry["fails_on"]]
        else:
            blocks += [Line("fails on", line) for line in entry["fails_on"]]
    blocks += [Line("ERROR", error) for error in entry["errors"]]
    blocks += _adapter_blocks(entry, "")
    for adapter in entry["adapters"]:
        if adapter["status"] != Status.CLEAN:
            text = f"{adapter['status']}: {', '.join(adapter['migrations'])}"
            blocks.append(Line(f"adapter {adapter['path']} ({adapter['path']}/)", text))
            blocks += _adapter_blocks(adapter, f"{adapter['path']}/")
    written = entry["status"] in (Status.REPAIRABLE, Status.REPAIRED, Status.WRITTEN)
    blocks += _proof_lines(entry)
    if written:  # every file: copied, rewritten, dropped or copied unexamined, and why
        rows = tuple((f["name"], _size(f["bytes"]), f["verdict"], f["reason"]) for f in entry["files"])
        blocks.append(Table("files", ("file", "size", "verdict", "why"), rows))
    for rewritten in entry["files_rewritten"]:  # named lists: text shows a count and the first names
        for label, names in rewritten.items():
            if isinstance(names, list) and names:
                shown = listed(names, where_all="--format json lists all")
                blocks.append(Line(f"{rewritten['name']} {label} ({len(names)})", shown))
    what = "this output does not" if written else "written with --allow-lossy, this checkpoint does not"
    lossy = [f"LOSSY: {what} reproduce the trained model: " + "; ".join(entry["losses"])] if entry["losses"] else []
    blocks += [Line("WARNING", w) for w in entry["warnings"] + lossy]
    return section


RETRAIN_EXPORT = (
    "retraining is preferred: training on from this merged model starts with fresh optimizer state and without "
    "the adapter's structure, so it does not continue the training run"
)


def _capped(label: str, names: list[str]) -> Line:
    """``label (N): a, b, ... (+k more; --format json lists all)``: a long list shown by its count and first names."""
    return Line(f"{label} ({len(names)})", listed(list(names), where_all="--format json lists all"))


def _export_section(report: Report) -> Section:
    info = export_dict(report.export)
    done = "written" if report.checkpoints and report.checkpoints[0].output else "dry run: nothing written"
    blocks: list[Line | Diff | Table] = [
        Line("base model", info["base_model"]),
        Line("architectures", str(info["architectures"])),
        Line("dtype", info["dtype"]),
        _capped(f"merged {info['peft_type']} into", info["merged_modules"]),
        _capped("from the adapter", info["tensors_from_adapter"]),
    ]
    if info["files_copied_from_base"]:
        blocks.append(_capped("copied from the base", info["files_copied_from_base"]))
    blocks.append(Line("WARNING", RETRAIN_EXPORT))
    blocks.append(Table("files", ("file", "tensors"), tuple((n, str(c)) for n, c in info["shards"].items())))
    return Section(f"export to {report.out} ({done})" if report.out else f"export ({done})", blocks)


def report_sections(report: Report) -> list[Section]:
    sections = [Section("", [Line("note", note) for note in report.notes])] if report.notes else []
    sections += [_checkpoint_section(report, result) for result in report.checkpoints]
    if report.export is not None:
        sections.append(_export_section(report))
    if len(report.checkpoints) > 1:
        rows = tuple(
            (c.relative, str(c.status), str(len(c.plan.migrations) if c.plan else 0)) for c in report.checkpoints
        )
        sections.append(Section("", [Table("summary", ("checkpoint", "status", "migrations"), rows)]))
    return sections


# ------------------------------------------------------------------------------------ verify


def verify_sections(verdict: VerifyResult) -> list[Section]:
    head = ("OK, LOSSY" if verdict.losses else "OK") if verdict.ok else "FAILED"
    section = Section(
        f"{head}: {verdict.checkpoint} on base model {verdict.base_model} ({verdict.model_class}, {verdict.dtype})"
    )
    blocks = section.blocks
    blocks += [Line("-", reason) for reason in verdict.reasons]
    between = verdict.max_logit_diff_between_loads
    if math.isfinite(between):
        blocks.append(Line(f"max |logit diff| between two loads (seeds {SEEDS[0]}, {SEEDS[1]})", f"{between:.3g}"))
    else:
        blocks.append(Line("max |logit diff| between two loads", "not measured"))
    if verdict.source is not None:
        if verdict.max_logit_diff_vs_source is None:
            blocks.append(Line(f"vs source {verdict.source}", "not checked"))
        else:
            value = f"{verdict.max_logit_diff_vs_source:.3g} (tolerance {verdict.tolerance:g})"
            blocks.append(Line(f"max |logit diff| vs source {verdict.source}", value))
    blocks += [Line("note", note) for note in verdict.notes]
    if verdict.losses:
        text = "written with --allow-lossy: it can equal its source as saved, not the trained model: "
        blocks.append(Line("WARNING", "LOSSY: " + text + "; ".join(verdict.losses)))
    blocks.append(Line("versions", f"transformers {verdict.transformers_version}, peft {verdict.peft_version}"))
    return [section]


# ------------------------------------------------------------------------------------ entry points


def render_report(report: Report, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(to_dict(report), indent=2) + "\n"
    sections = report_sections(report)
    if fmt == "markdown":
        return draw_markdown(f"ckpt-migrate {report.command} report", sections)
    return draw_text(sections)


def render_migrations(known: Sequence[Migration], fmt: str, caused_by: bool = True) -> str:
    """``ckpt-migrate migrations``: the known migrations in order (``caused_by=False``: id and summary only)."""
    rows = [{"id": m.ID, "summary": m.SUMMARY, "caused_by": m.CAUSED_BY} for m in known]
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "markdown":
        headers = ("id", "summary", "caused by") if caused_by else ("id", "summary")
        cells = tuple(tuple(row.values())[: len(headers)] for row in rows)
        return "\n".join(markdown_table(Table("", headers, cells))) + "\n"
    lines: list[str] = []
    for r in rows:
        lines += [r["id"], f"    {r['summary']}"] + ([f"    caused by: {r['caused_by']}"] if caused_by else [])
    return "".join(line + "\n" for line in lines)


def render_verdict(verdict: VerifyResult, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(verdict.to_dict(), indent=2) + "\n"
    if fmt == "markdown":
        return draw_markdown("ckpt-migrate verify", verify_sections(verdict))
    section = verify_sections(verdict)[0]
    return draw_text([section], headings="")

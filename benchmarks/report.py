"""The benchmark's verdicts and Markdown tables."""

from __future__ import annotations

from runner import Pairs, Result

LABELS = {
    "cp+sync": "`cp -r` + `sync`",
    "fix": "`fix`",
    "remap": "`fix --optimizer remap`",
    "dry-run": "`fix --dry-run --format json`",
    "naive": "`naive_fix.py`",
    "help": "`--help`",
    "import-torch": '`python -c "import torch"`',
}
#: (suite, tool, reference) -> the largest median of per-pair ratios the issue allows
RATIO_TARGETS = {
    ("adapter", "fix", "cp+sync"): 1.3,
    ("trainer", "fix", "cp+sync"): 1.3,
    ("adapter", "fix", "naive"): 1.0,
    ("big", "remap", "cp+sync"): 1.5,
}
RSS_LIMIT_MB = 600.0
DRY_RUN_S, HELP_S = 1.5, 0.5


def _cpu(result: Result) -> str:
    return f"{result.median_cpu_s:.2f}"


def verdicts(comparisons: list[tuple[str, Pairs]], alone: dict[str, tuple[Result, bool | None]], torch_in) -> list:
    """Each target with its measured value and PASS/MISS."""
    out: list[dict] = []

    def add(target: str, measured: float, limit: float, unit: str, passed: bool) -> None:
        result = "PASS" if passed else "MISS"
        out.append({"target": target, "measured": round(measured, 3), "limit": limit, "unit": unit, "result": result})

    for suite, pair in comparisons:
        key = (suite, pair.tool.command, pair.reference.command)
        if key in RATIO_TARGETS:
            limit = RATIO_TARGETS[key]
            name = f"{LABELS[key[1]]} <= {limit}x {LABELS[key[2]]} ({suite} checkpoint, median of per-pair ratios)"
            add(name, pair.median_ratio, limit, "x", pair.median_ratio <= limit)
        if pair.tool.command in ("fix", "remap") and pair.reference.command == "cp+sync":
            rss = pair.tool.peak_rss_mb
            add(f"{LABELS[pair.tool.command]} peak RSS < 600 MB ({suite})", rss, RSS_LIMIT_MB, "MB", rss < RSS_LIMIT_MB)
    if "dry-run" in alone:
        result, imported = alone["dry-run"]
        add("dry run < 1.5 s (median)", result.median_s, DRY_RUN_S, "s", result.median_s < DRY_RUN_S)
        add("dry run does not import torch", float(bool(imported)), 0, "(1 = imports)", not imported)
    if "help" in alone:
        result, _ = alone["help"]
        add("--help < 0.5 s (not in the issue; kept)", result.median_s, HELP_S, "s", result.median_s < HELP_S)
    return out


def pairs_table(comparisons: list[tuple[str, Pairs]]) -> str:
    lines = [
        "| checkpoint | tool vs reference | pairs | median of per-pair ratios | min-max | wall s tool / ref "
        "| CPU-s tool / ref | peak RSS MB tool / ref | load avg before runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for suite, pair in comparisons:
        tool, ref = pair.tool, pair.reference
        low, high = min(pair.ratios), max(pair.ratios)
        load_low, load_high = pair.load_range
        lines.append(
            f"| {suite} | {LABELS[tool.command]} vs {LABELS[ref.command]} | {len(pair.ratios)} "
            f"| {pair.median_ratio:.2f}x | {low:.2f}-{high:.2f} | {tool.median_s:.2f} / {ref.median_s:.2f} "
            f"| {_cpu(tool)} / {_cpu(ref)} | {tool.peak_rss_mb:.0f} / {ref.peak_rss_mb:.0f} "
            f"| {load_low:.2f}-{load_high:.2f} |"
        )
    lines.append("")
    lines.append(
        "Per-pair ratios: "
        + "; ".join(
            f"{suite} {pair.tool.command}/{pair.reference.command}: " + ", ".join(f"{r:.2f}" for r in pair.ratios)
            for suite, pair in comparisons
        )
    )
    return "\n".join(lines)


def alone_table(alone: dict[str, tuple[Result, bool | None]]) -> str:
    lines = [
        "| command | runs | median wall s | min-max | CPU-s | peak RSS MB | imports torch | load avg before runs |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, (result, imported) in alone.items():
        walls = [r.wall_s for r in result.runs]
        loads = [r.load_avg for r in result.runs]
        flag = "-" if imported is None else ("yes" if imported else "no")
        lines.append(
            f"| {LABELS[name]} | {len(walls)} | {result.median_s:.3f} | {min(walls):.2f}-{max(walls):.2f} "
            f"| {_cpu(result)} | {result.peak_rss_mb:.0f} | {flag} | {min(loads):.2f}-{max(loads):.2f} |"
        )
    return "\n".join(lines)


def targets_table(checks: list[dict]) -> str:
    lines = ["| target | measured | result |", "|---|---:|---|"]
    for check in checks:
        measured = "-" if check["measured"] is None else f"{check['measured']:.3f} {check['unit']}"
        lines.append(f"| {check['target']} | {measured} | {check['result']} |")
    return "\n".join(lines)


def yes(value: bool) -> str:
    return "yes" if value else "NO"


def adapter_comparison(comparison: dict) -> str:
    return "\n".join(
        [
            f"- tensor names equal: {yes(comparison['same_names'])} ({comparison['tensor_count'][0]} tensors)",
            f"- dtypes and shapes equal: {yes(comparison['same_dtypes_and_shapes'])}",
            f"- values equal (tensor bytes identical): {yes(comparison['same_values'])}"
            + (
                f"; differing: {comparison['tensors_with_different_bytes'][:5]}"
                if not comparison["same_values"]
                else ""
            ),
            f"- same tensor order and offsets in the header: {yes(comparison['same_data_layout'])}",
            f"- data section byte-identical: {yes(comparison['data_section_byte_identical'])}",
            "- headers equal apart from `__metadata__` and whitespace padding: "
            f"{yes(comparison['same_header_except_metadata'])}"
            f" (data section starts at byte {comparison['data_start'][0]} in ckpt-migrate's file, "
            f"{comparison['data_start'][1]} in the naive one)",
            f"- adapter_config.json equal (parsed): {yes(comparison['adapter_config_equal'])}",
        ]
    )


def optimizer_comparison(comparison: dict) -> str:
    return "\n".join(
        [
            f"- states kept: {comparison['kept']} of {comparison['source_states']} "
            f"(expected {comparison['expected_kept']}: every body LoRA parameter; the old head's states dropped)",
            f"- every kept state equal to its source, tensor for tensor (keys, dtypes, shapes, values): "
            f"{yes(comparison['states_equal'])}",
            f"- param_groups as predicted (indices and hyperparameters): {yes(comparison['groups_equal'])}",
            f"- zip CRC-32 of every record checks out (`zipfile.testzip`): {yes(comparison['crc_ok'])}",
            f"- file size: {comparison['bytes'][0] / 2**30:.2f} GiB (source {comparison['bytes'][1] / 2**30:.2f} GiB)",
        ]
    )


def scaling_table(scaling: dict) -> str:
    rows = ["| dry run on | median wall s | peak RSS MB | runs (s) |", "|---|---:|---:|---|"]
    for key in ("tiny", "full"):
        row = scaling[key]
        runs = ", ".join(f"{r['wall_s']:.2f}" for r in row["runs"])
        size = f"{scaling[f'{key}_adapter_bytes'] / 2**20:,.1f} MiB adapter"
        rows.append(f"| {size} | {row['median_s']:.3f} | {row['peak_rss_mb']:.1f} | {runs} |")
    tiny, full = scaling["tiny"], scaling["full"]
    rows += [
        "",
        f"Dry-run time grows with size: {'YES' if scaling['time_grows'] else 'no'} "
        f"({full['median_s'] - tiny['median_s']:+.3f} s); peak RSS grows with size: "
        f"{'YES' if scaling['rss_grows'] else 'no'} ({full['peak_rss_mb'] - tiny['peak_rss_mb']:+.1f} MB); "
        f"median of per-pair ratios full/tiny {scaling['median_ratio']:.2f}x",
    ]
    return "\n".join(rows)

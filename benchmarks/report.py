"""The benchmark's verdicts and Markdown tables."""

from __future__ import annotations

import statistics

from runner import Result

TARGETS = {
    "time_ratio": 1.5,  # fix and remap wall <= 1.5 x cp+sync of the same checkpoint, warm cache
    "peak_rss_mb": 600.0,  # fix and remap peak RSS < 600 MB
    "dry_run_s": 1.5,  # dry run < 1.5 s
    "help_s": 0.5,  # --help < 0.5 s
}
LABELS = {
    "cp+sync": "`cp -r SRC DST && sync DST/*`",
    "fix": "`ckpt-migrate fix SRC --out DST --quiet`",
    "remap": "`ckpt-migrate fix SRC --out DST --quiet --optimizer remap --base-model BASE`",
    "dry-run": "`ckpt-migrate fix SRC --dry-run --format json`",
    "naive": "`naive_fix.py SRC DST`",
    "help": "`ckpt-migrate --help`",
}
#: ``export`` is measured by its own benchmark (a synthetic base of a few GB, against peft's merge_and_unload).
TODO_ROWS = [
    "| `ckpt-migrate export` (vs peft `merge_and_unload` + `save_pretrained`) | measured by "
    "`benchmarks/export_bench.py` (targets: peak RSS <= largest tensor + adapter + 300 MB, wall <= 1.5x a durable "
    "copy of the base) |"
]


def paired_ratio(result: Result, reference: Result) -> float:
    """Median over rounds of result/reference in the same round: robust to a disk that drifts between rounds."""
    return statistics.median(r.wall_s / c.wall_s for r, c in zip(result.runs, reference.runs, strict=True))


def verdicts(suites: dict[str, dict[str, dict[str, Result]]]) -> list[dict]:
    """Each target with its measured value and PASS/FAIL; ``suites[suite][cache][command]``."""
    out: list[dict] = []

    def add(target: str, measured: float | None, limit: float, unit: str, strict: bool) -> None:
        if measured is None:
            out.append({"target": target, "measured": None, "limit": limit, "unit": unit, "result": "n/a"})
            return
        passed = measured < limit if strict else measured <= limit
        result = "PASS" if passed else "MISS"
        out.append({"target": target, "measured": round(measured, 3), "limit": limit, "unit": unit, "result": result})

    small, big = suites.get("small", {}).get("warm", {}), suites.get("big", {}).get("warm", {})
    everywhere = [r for suite in suites.values() for cache in suite.values() for r in cache.items()]
    for suite, name in ((small, "fix"), (big, "remap")):
        tool, cp = suite.get(name), suite.get("cp+sync")
        both = tool is not None and cp is not None
        add(
            f"{name} <= 1.5x cp+sync, warm (ratio of medians)",
            tool.median_s / cp.median_s if both else None,
            1.5,
            "x",
            False,
        )
        add(
            f"{name} <= 1.5x cp+sync, warm (median of per-round ratios)",
            paired_ratio(tool, cp) if both else None,
            1.5,
            "x",
            False,
        )
        rss = [r.peak_rss_mb for key, r in everywhere if key == name]
        add(f"{name} peak RSS < 600 MB (all runs)", max(rss) if rss else None, TARGETS["peak_rss_mb"], "MB", True)
    fix, naive = small.get("fix"), small.get("naive")
    add(
        "fix no slower than the naive script, warm (ratio of medians)",
        fix.median_s / naive.median_s if fix and naive else None,
        1.0,
        "x",
        False,
    )
    for cache, by_name in suites.get("small", {}).items():
        dry, helps = by_name.get("dry-run"), by_name.get("help")
        add(f"dry run < 1.5 s, {cache}", dry.median_s if dry else None, TARGETS["dry_run_s"], "s", True)
        add(
            f"--help < 0.5 s, {cache} (not in the issue; kept from the earlier benchmark)",
            helps.median_s if helps else None,
            TARGETS["help_s"],
            "s",
            True,
        )
    return out


def results_table(results: dict[str, Result]) -> str:
    cp = results.get("cp+sync")
    lines = [
        "| command | median wall s | ratio vs cp+sync | peak RSS MB | median CPU s (user+sys) | runs (s) "
        "| load avg before each run |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for name, result in results.items():
        ratio = f"{result.median_s / cp.median_s:.2f}x" if cp else "-"
        runs = ", ".join(f"{r.wall_s:.2f}" for r in result.runs)
        loads = ", ".join(f"{r.load_avg:.2f}" for r in result.runs)
        lines.append(
            f"| {LABELS[name]} | {result.median_s:.3f} | {ratio} | {result.peak_rss_mb:.0f} | "
            f"{result.median_cpu_s:.2f} | {runs} | {loads} |"
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
        f"{'YES' if scaling['rss_grows'] else 'no'} ({full['peak_rss_mb'] - tiny['peak_rss_mb']:+.1f} MB)",
    ]
    return "\n".join(rows)

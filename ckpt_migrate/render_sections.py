"""One section model of a report (headed blocks: labelled lines, diffs, tables), drawn as text or Markdown."""

from __future__ import annotations

from dataclasses import dataclass, field

# ------------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class Line:
    """``label: text`` (text) / a bullet or call-out by label (Markdown); ``code`` items are set as code."""

    label: str
    text: str = ""
    code: tuple[str, ...] = ()


@dataclass(frozen=True)
class Diff:
    title: str
    changes: tuple[tuple[str, str, str], ...]  # key, before, after (as shown)


@dataclass(frozen=True)
class Table:
    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass
class Section:
    heading: str
    blocks: list[Line | Diff | Table] = field(default_factory=list)


# ------------------------------------------------------------------------------------ drawing


def _text_table(table: Table) -> list[str]:
    widths = [max(len(r[i]) for r in [table.headers, *table.rows]) for i in range(len(table.headers))]

    def line(row: tuple[str, ...]) -> str:
        return "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()

    title = [f"{table.title}:"] if table.title else []
    return title + [line(table.headers), line(tuple("-" * w for w in widths)), *(line(r) for r in table.rows)]


def _text_line(line: Line, indent: str) -> str:
    if line.label == "-":
        return f"{indent}- {line.text}"
    value = ", ".join(line.code) + (": " if line.code and line.text else "") + line.text
    return f"{indent}{line.label}: {value}" if value else f"{indent}{line.label}:"


def draw_text(sections: list[Section], headings: str = "== ") -> str:
    lines: list[str] = []
    for section in sections:
        if section.heading:
            lines.append(f"{headings}{section.heading}")
        indent = "" if headings else "  "
        for block in section.blocks:
            if isinstance(block, Line):
                lines.append(_text_line(block, indent))
            elif isinstance(block, Diff):
                lines.append(f"{block.title}:")
                for key, before, after in block.changes:
                    lines += [f"- {key}: {before}", f"+ {key}: {after}"]
            else:
                lines += _text_table(block)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _sentence_start(label: str) -> str:
    """``label`` with its first word capitalised, unless that word is a name (``rng_state.pth``, ``task_b/...``),
    which stays as written; nothing after the first word changes case (paths, ``LOSSY``)."""
    label = label.strip()
    first = label.split(" ", 1)[0]
    return first.capitalize() + label[len(first) :] if first.isalpha() else label


def _markdown_line(line: Line) -> str:
    code = ", ".join(f"`{c}`" for c in line.code)
    value = code + (": " if code and line.text else "") + line.text
    if not value:
        return f"- **{_sentence_start(line.label)}:**"
    if line.label == "ERROR":
        return f"> **Error:** {value}"
    if line.label == "-":
        return f"- {value}"
    return f"- **{_sentence_start(line.label)}:** {value}"


def markdown_table(table: Table) -> list[str]:
    lines = [f"**{_sentence_start(table.title)}**", ""] if table.title else []
    lines += ["| " + " | ".join(table.headers) + " |", "|" + "---|" * len(table.headers)]
    return lines + ["| " + " | ".join(_cell(c, i) for i, c in enumerate(row)) + " |" for row in table.rows]


def draw_markdown(title: str, sections: list[Section]) -> str:
    lines: list[str] = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.heading}", ""] if section.heading else []
        for block in section.blocks:
            if isinstance(block, Line):
                lines.append(_markdown_line(block))
                continue
            lines.append("")
            if isinstance(block, Diff):
                lines += [f"**{block.title}**", "", "```diff"]
                for key, before, after in block.changes:
                    lines += [f"- {key}: {before}", f"+ {key}: {after}"]
                lines += ["```"]
            else:
                lines += markdown_table(block)
            lines.append("")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _cell(value: str, column: int) -> str:
    value = value.replace("|", "\\|")
    return f"`{value}`" if column == 0 else value

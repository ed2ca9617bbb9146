"""Finished runs side by side: one row per model (the original, each recipe stage, each pass output),
read back from report.json / summary.json; rendered as markdown, a terminal table and a PNG of size
against perplexity. The recipe summary and ``squeeze report`` both use it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import datetime, timezone
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from squeeze import __version__
from squeeze.errors import SqueezeError

MIB = 2**20


@dataclass(frozen=True)
class Row:
    """One model: its size and its accuracy against the model it was compared with."""

    name: str
    pass_name: str  # prune, distill, quantize; "" for an original
    parameters: int
    disk_bytes: int
    perplexity: float | None = None
    kl_divergence: float | None = None  # nats/token, vs compared_with
    top1_agreement: float | None = None
    embedding_cosine: float | None = None  # encoders
    compared_with: str | None = None
    seconds: float | None = None
    peak_rss_bytes: int | None = None
    memory_estimate_bytes: int | None = None  # the plan's estimate, for recipe stages
    group: str = ""  # rows of one recipe run share a group; the plot joins them in order

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.disk_bytes / max(self.parameters, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"bits_per_weight": self.bits_per_weight}

    @classmethod
    def from_dict(cls, data: dict[str, Any], **changes: Any) -> Row:
        """A row read back from ``to_dict`` (its derived fields dropped)."""
        return cls(**{k: v for k, v in data.items() if k != "bits_per_weight"} | changes)


def _number(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def stage_row(
    report: dict[str, Any], name: str, group: str = "", memory_estimate: int | None = None, compared_with: str | None = None,
) -> Row:
    """The model a pass wrote, from its report.json; ``compared_with`` names what its KL is against
    when the report cannot know (a distillation teacher that is the recipe's original)."""
    size, accuracy, training = report["size"], report.get("accuracy") or {}, report.get("training")
    compared = compared_with or accuracy.get("reference") or (f"teacher ({training['teacher']})" if training else "its input")
    return Row(
        name=name,
        pass_name=report["pass_name"],
        parameters=training["student_parameters"] if training else size["parameters"],
        disk_bytes=size["disk_bytes_after"],
        perplexity=_number(accuracy.get("perplexity_after")),
        kl_divergence=_number(accuracy.get("kl_divergence")),
        top1_agreement=_number(accuracy.get("top1_agreement")),
        embedding_cosine=_number(accuracy.get("embedding_cosine_mean")),
        compared_with=compared if accuracy else None,
        seconds=sum(v for k, v in report["timings_s"].items() if k != "total"),
        peak_rss_bytes=report.get("peak_rss_bytes"),
        memory_estimate_bytes=memory_estimate or report.get("memory_estimate_bytes"),
        group=group,
    )


def original_row(report: dict[str, Any], group: str = "") -> Row:
    """The model a pass started from (for distillation: the teacher), from the "before" side of its report."""
    size, accuracy = report["size"], report.get("accuracy") or {}
    name = accuracy.get("reference") or f"original ({report['model'].get('name', '')})"
    cosine = 1.0 if accuracy.get("embedding_cosine_mean") is not None else None
    return Row(
        name=name,
        pass_name="",
        parameters=size["parameters"],
        disk_bytes=size["disk_bytes_before"],
        perplexity=_number(accuracy.get("perplexity_before")),
        kl_divergence=0.0 if accuracy.get("kl_divergence") is not None else None,
        top1_agreement=1.0 if accuracy.get("top1_agreement") is not None else None,
        embedding_cosine=cosine,
        group=group,
    )


def read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SqueezeError(f"cannot read {file}: {exc}") from None


def load_rows(folder: Path) -> list[Row]:
    """Rows of a finished run: a recipe output (summary.json: the original and every stage) or a
    pass output (report.json: the model it started from and the one it wrote)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SqueezeError(f"{folder} is not a folder of squeeze output")
    if (folder / "summary.json").is_file():
        summary = read_json(folder / "summary.json")
        try:
            return [Row.from_dict(row, group=str(folder)) for row in summary["rows"]]
        except (KeyError, TypeError) as exc:
            raise SqueezeError(f"{folder / 'summary.json'} is not a squeeze recipe summary ({exc})") from None
    if (folder / "report.json").is_file():
        report = read_json(folder / "report.json")
        try:
            return [original_row(report, str(folder)), stage_row(report, folder.name, str(folder))]
        except (KeyError, TypeError) as exc:
            raise SqueezeError(f"{folder / 'report.json'} is not a squeeze report ({exc})") from None
    raise SqueezeError(f"{folder} holds neither summary.json (a recipe run) nor report.json (a pass output)")


def merge_originals(rows: list[Row]) -> list[Row]:
    """Several runs of one model list its original once."""
    seen: set[tuple] = set()
    merged = []
    for row in rows:
        if not row.pass_name:
            key = (row.name, row.disk_bytes, None if row.perplexity is None else round(row.perplexity, 4))
            if key in seen:
                continue
            seen.add(key)
        merged.append(row)
    return merged


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:,.1f}"


def _cells(row: Row, base: Row | None) -> list[str]:
    size = _mib(row.disk_bytes)
    if base and row.disk_bytes and row is not base:
        size += f" ({base.disk_bytes / row.disk_bytes:.2f}x smaller)"
    perplexity = "-" if row.perplexity is None else f"{row.perplexity:,.3f}"
    if base and base.perplexity and row.perplexity is not None and row is not base:
        perplexity += f" ({row.perplexity / base.perplexity - 1:+.2%})"
    peak = _mib(row.peak_rss_bytes)
    if row.memory_estimate_bytes:
        peak += f" (est. {_mib(row.memory_estimate_bytes)})"
    return [
        row.name,
        size,
        f"{row.bits_per_weight:.2f}",
        perplexity,
        "-" if row.kl_divergence is None else f"{row.kl_divergence:.4f}",
        "-" if row.top1_agreement is None else f"{100 * row.top1_agreement:.2f}%",
        "-" if row.embedding_cosine is None else f"{row.embedding_cosine:.4f}",
        "-" if row.seconds is None else f"{row.seconds:,.1f}",
        peak,
    ]


HEADERS = ["model", "MiB on disk", "bits/weight", "perplexity", "KL", "top-1", "emb. cosine", "seconds", "peak RSS MiB"]


def _table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells, each row compared with the original of its group (the first original row);
    columns nobody has a number for are left out."""
    originals = {row.group: row for row in reversed(rows) if not row.pass_name}
    fallback = next((row for row in rows if not row.pass_name), None)
    cells = [_cells(row, originals.get(row.group, fallback)) for row in rows]
    used = [i for i in range(len(HEADERS)) if i < 3 or any(c[i] != "-" for c in cells)]
    return [HEADERS[i] for i in used], [[c[i] for i in used] for c in cells]


def to_markdown(rows: list[Row], title: str) -> str:
    headers, cells = _table(rows)
    lines = [f"# {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    compared = sorted({row.compared_with for row in rows if row.compared_with})
    if compared:
        lines += ["", "KL and top-1 agreement are measured against: " + "; ".join(compared) + "."]
    return "\n".join(lines) + "\n"


def to_rich(rows: list[Row], title: str) -> Table:
    headers, cells = _table(rows)
    table = Table(title=title, title_justify="left")
    for index, header in enumerate(headers):
        table.add_column(header, justify="left" if index == 0 else "right", overflow="fold", min_width=12 if index == 0 else None)
    for c in cells:
        table.add_row(*c)
    return table


def plot(rows: list[Row], file: Path, title: str) -> None:
    """PNG: size on disk (MiB) against perplexity (log scale), one line per run through its stages."""
    import matplotlib  # heavy: imported only when a plot is drawn

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    scored = [row for row in rows if row.perplexity is not None]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    groups: dict[str, list[Row]] = {}
    for row in scored:
        groups.setdefault(row.group, []).append(row)
    originals = [row for row in scored if not row.pass_name]
    for group, members in groups.items():
        chain = members
        if not any(not row.pass_name for row in members) and originals:
            chain = [originals[0]] + members  # a pass output starts from the original
        ax.plot([r.disk_bytes / MIB for r in chain], [r.perplexity for r in chain], marker="o", linewidth=1, alpha=0.8,
                label=Path(group).name if group else None)
        for row in members:
            ax.annotate(row.name, (row.disk_bytes / MIB, row.perplexity), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("size on disk (MiB)")
    ax.margins(x=0.15, y=0.08)  # room for the labels at the edges
    values = [r.perplexity for r in scored]
    if values and min(values) > 0 and max(values) / min(values) > 3:
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (log scale)")
    else:
        ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    if len(groups) > 1:
        ax.legend(fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)


def write_summary(
    folder: Path, title: str, reports: list[dict[str, Any]], original: str, columns: list[tuple[str, int | None, bool]], **fields: Any,
) -> dict[str, Any]:
    """summary.json, summary.md and summary.png of a recipe run: the original (named ``original``,
    its scores from the first report) and every stage, side by side. ``columns`` holds each stage's
    folder, memory estimate and whether its report compared it with the original; ``fields`` go
    into summary.json as they are. Returns the summary."""
    rows = [dataclasses.replace(original_row(reports[0]), name=original)]
    rows += [
        stage_row(report, folder_name, memory_estimate=estimate, compared_with=original if against else None)
        for (folder_name, estimate, against), report in zip(columns, reports)
    ]
    summary = {
        **fields, "rows": [row.to_dict() for row in rows], "squeeze_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / "summary.md").write_text(to_markdown(rows, title))
    plot(rows, folder / "summary.png", title)
    return summary

"""The memory and accuracy report of a pass: report.json, report.md and a rich table."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table

from squeeze.seq2seq import split_at

GIB = 1024**3
MIB = 1024**2


@dataclass
class SizeReport:
    """Bytes before and after. "Linear" means the layers the pass compressed, weights only."""

    parameters: int
    compressed_parameters: int
    disk_bytes_before: int  # the dense model's tensors at its load dtype, as safetensors would hold them
    disk_bytes_after: int  # the safetensors files written
    memory_bytes_before: int  # tensors of the loaded dense model
    memory_bytes_after: int  # tensors of the compressed model as squeeze holds it
    linear_bytes_before: int
    linear_bytes_after: int  # codes (packed) + scales + zero points in the checkpoint

    @property
    def bits_per_weight(self) -> float:
        """Checkpoint bits per compressed weight, scales and zero points included."""
        return 8 * self.linear_bytes_after / max(self.compressed_parameters, 1)

    @property
    def model_bits_per_weight(self) -> float:
        """Checkpoint bits per parameter over the whole model (embeddings and norms included)."""
        return 8 * self.disk_bytes_after / max(self.parameters, 1)

    @property
    def disk_ratio(self) -> float:
        return self.disk_bytes_before / max(self.disk_bytes_after, 1)

    @property
    def linear_ratio(self) -> float:
        return self.linear_bytes_after / max(self.linear_bytes_before, 1)


@dataclass
class AccuracyReport:
    data: str
    windows: int
    seq_len: int
    tokens: int
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    embedding_cosine_mean: float | None = None
    embedding_cosine_min: float | None = None
    reference: str | None = None  # what the "before" numbers and the KL are measured on, when not the pass's input
    # generation agreement: greedy continuations of this model scored against the reference's
    generation_prompts: int | None = None
    generation_tokens: int | None = None  # new tokens per prompt
    rouge1: float | None = None  # F-measures averaged over prompts, 0..1
    rouge2: float | None = None
    rougeL: float | None = None
    bleu: float | None = None  # corpus BLEU, 0..100
    exact_match: float | None = None  # share of prompts whose continuation is identical

    @property
    def perplexity_change(self) -> float | None:
        """Relative change of perplexity, e.g. 0.012 for +1.2%."""
        if self.perplexity_before is None or self.perplexity_after is None:
            return None
        return self.perplexity_after / self.perplexity_before - 1


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    relative_error: float
    max_abs_error: float
    output_error: float | None = None  # ‖(W − Ŵ)X‖ / ‖WX‖ on the calibration inputs (calibrated methods)
    method_loss: float | None = None  # the method's own objective (GPTQ: Σ (w − ŵ)² / [H⁻¹]_jj² / 2)
    sparsity: float | None = None  # share of the weights exactly zero after the pass
    nonzeros: int | None = None


@dataclass
class SparsityReport:
    """How sparse the compressed layers are and what it buys. FLOPs are multiply-adds × 2 of the
    Linear layers per token (attention's own matmuls and embeddings excluded)."""

    structure: str  # unstructured or N:M
    target: float  # the sparsity asked for (the mean of the per-layer targets for pruning)
    parameters: int  # weights in the sparse layers
    zeros: int
    dense_bytes: int | None  # the sparse layers' weights stored dense, at the checkpoint dtype (pruning)
    sparse_bytes: int | None  # the same weights in sparse-bitmask layout (values + bitmask + row offsets)
    linear_flops_dense: int  # per token, over every Linear layer (heads included)
    linear_flops_sparse: int  # the same with the sparse layers computing only their nonzeros

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.parameters, 1)

    @property
    def nonzeros(self) -> int:
        return self.parameters - self.zeros

    @property
    def sparse_ratio(self) -> float | None:
        if self.sparse_bytes is None or self.dense_bytes is None:
            return None
        return self.sparse_bytes / max(self.dense_bytes, 1)

    @property
    def flop_reduction(self) -> float:
        """Share of the Linear FLOPs per token a sparse kernel could skip, e.g. 0.45."""
        return 1 - self.linear_flops_sparse / max(self.linear_flops_dense, 1)


@dataclass
class TrainingReport:
    """What a distillation trained and what it cost. Bytes are the safetensors of each model."""

    teacher: str
    student: str  # the student spec, e.g. "layers:15" or a path
    teacher_parameters: int
    student_parameters: int
    teacher_bytes: int
    student_bytes: int
    steps: int
    tokens: int  # training tokens read (windows x seq_len), all processes together
    train_seconds: float  # optimizer steps only, summed over resumed sessions
    processes: int
    loss_first: float
    loss_last: float
    teacher_cache: str | None = None  # the cache folder, when the teacher's logits came from one
    resumed_from_step: int | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.train_seconds, 1e-9)


@dataclass
class Report:
    """Everything a pass measured. ``to_dict`` is the report.json schema."""

    pass_name: str
    model: dict[str, Any]
    settings: dict[str, Any]
    size: SizeReport
    timings_s: dict[str, float]
    peak_rss_bytes: int
    device: str
    accuracy: AccuracyReport | None = None
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sparsity: SparsityReport | None = None
    training: TrainingReport | None = None
    speed: dict[str, Any] | None = None  # --measure-speed: squeeze.speed.InferBench.to_dict() of input and output
    loading: str = ""  # markdown: how to load the checkpoint without squeeze, when it takes more than from_pretrained
    squeeze_version: str = ""
    created: str = ""
    memory_estimate_bytes: int | None = None  # squeeze.memory's estimate of the peak, made before loading
    peak_rss_stage: str = ""  # the timed stage during which the peak RSS was reached ("" if outside them)
    uncompressed: dict[str, str] = field(default_factory=dict)  # weight matrix left as it was → why

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["size"].update(
            bits_per_weight=self.size.bits_per_weight,
            model_bits_per_weight=self.size.model_bits_per_weight,
            disk_ratio=self.size.disk_ratio,
            linear_ratio=self.size.linear_ratio,
        )
        if self.accuracy is not None:
            data["accuracy"]["perplexity_change"] = self.accuracy.perplexity_change
        if self.sparsity is not None:
            data["sparsity"].update(
                sparsity=self.sparsity.sparsity,
                nonzeros=self.sparsity.nonzeros,
                sparse_ratio=self.sparsity.sparse_ratio,
                flop_reduction=self.sparsity.flop_reduction,
            )
        if self.training is not None:
            data["training"]["tokens_per_second"] = self.training.tokens_per_second
        data["timings_s"]["total"] = sum(self.timings_s.values())
        return data


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.1f} MiB"


def _fmt(value: float | None, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def summary_rows(report: Report) -> list[tuple[str, str, str]]:
    """(field, before, after) rows shared by the markdown and terminal renderings."""
    s = report.size
    if report.training is not None:
        return _training_rows(report)
    rows = [
        ("parameters", f"{s.parameters:,}", f"{s.compressed_parameters:,} compressed"),
        ("weights on disk", _fmt_bytes(s.disk_bytes_before), f"{_fmt_bytes(s.disk_bytes_after)} ({s.disk_ratio:.2f}x smaller)"),
        ("weights in memory", _fmt_bytes(s.memory_bytes_before), _fmt_bytes(s.memory_bytes_after)),
        (
            "compressed layers",
            _fmt_bytes(s.linear_bytes_before),
            f"{_fmt_bytes(s.linear_bytes_after)} ({100 * s.linear_ratio:.1f}% of before)",
        ),
        ("bits per weight (compressed layers)", "32" if s.linear_bytes_before == 4 * s.compressed_parameters else "-", f"{s.bits_per_weight:.2f}"),
        ("bits per weight (whole model)", f"{8 * s.disk_bytes_before / max(s.parameters, 1):.2f}", f"{s.model_bits_per_weight:.2f}"),
    ]
    sp = report.sparsity
    if sp is not None:
        rows += [
            ("sparsity (" + sp.structure + ")", f"target {sp.target:.2%}", f"{sp.sparsity:.2%} ({sp.zeros:,} zeros)"),
            ("nonzero weights (sparse layers)", f"{sp.parameters:,}", f"{sp.nonzeros:,}"),
        ]
        if sp.sparse_ratio is not None:
            rows.append((
                "sparse layers: dense vs sparse-bitmask bytes",
                _fmt_bytes(sp.dense_bytes),
                f"{_fmt_bytes(sp.sparse_bytes)} ({sp.sparse_ratio:.1%} of dense)",
            ))
        rows += [
            (
                "Linear matmul FLOPs per token",
                f"{sp.linear_flops_dense:,}",
                f"{sp.linear_flops_sparse:,} ({sp.flop_reduction:.1%} fewer with a sparse kernel)",
            ),
        ]
    return rows + _accuracy_rows(report, "original")


def _training_rows(report: Report) -> list[tuple[str, str, str]]:
    """Distillation: the teacher in the "before" column, the student in "after"."""
    t = report.training
    assert t is not None
    rows = [
        ("model", t.teacher, t.student),
        ("parameters", f"{t.teacher_parameters:,}", f"{t.student_parameters:,} ({t.student_parameters / max(t.teacher_parameters, 1):.1%})"),
        ("weights on disk", _fmt_bytes(t.teacher_bytes), f"{_fmt_bytes(t.student_bytes)} ({t.teacher_bytes / max(t.student_bytes, 1):.2f}x smaller)"),
        ("training", "", f"{t.steps:,} steps, {t.tokens:,} tokens, {t.processes} process(es)"),
        ("training speed", "", f"{t.tokens_per_second:,.0f} tokens/s ({t.train_seconds:.1f}s of steps)"),
        ("loss, first → last step", "", f"{t.loss_first:.4f} → {t.loss_last:.4f}"),
    ]
    if t.teacher_cache:
        rows.append(("teacher logits", "", f"from the cache {t.teacher_cache}"))
    if t.resumed_from_step is not None:
        rows.append(("resumed", "", f"from the checkpoint of step {t.resumed_from_step}"))
    return rows + _accuracy_rows(report, "teacher")


def _accuracy_rows(report: Report, reference: str) -> list[tuple[str, str, str]]:
    rows = []
    a = report.accuracy
    if a is not None:
        reference = a.reference or reference
        if a.perplexity_before is not None:
            change = a.perplexity_change
            label = f"perplexity (before: {a.reference})" if a.reference else "perplexity"
            rows.append((label, _fmt(a.perplexity_before, ".3f"), f"{_fmt(a.perplexity_after, '.3f')} ({change:+.2%})"))
            rows.append((f"KL divergence vs {reference} (nats/token)", "0", _fmt(a.kl_divergence, ".5f")))
            rows.append(("top-1 token agreement", "100%", f"{100 * (a.top1_agreement or 0):.2f}%"))
        if a.embedding_cosine_mean is not None:
            rows.append(("embedding cosine (mean / min)", "1", f"{a.embedding_cosine_mean:.5f} / {a.embedding_cosine_min:.5f}"))
        if a.rougeL is not None:
            rows.append((
                f"generation agreement ({a.generation_prompts} prompts x {a.generation_tokens} greedy tokens)", "1 / 100",
                f"ROUGE-1 {a.rouge1:.3f}, ROUGE-2 {a.rouge2:.3f}, ROUGE-L {a.rougeL:.3f}, BLEU {a.bleu:.1f}",
            ))
        text = f"{a.data}: {a.windows} x {a.seq_len} tokens"
        if report.model.get("kind") == "seq2seq":
            cut = split_at(a.seq_len)
            text += f" (the encoder reads the first {cut}, the decoder is scored on the last {a.seq_len - cut})"
        rows.append(("evaluation text", "", text))
    rows += speed_rows(report.speed)
    during = f" (reached while {report.peak_rss_stage})" if report.peak_rss_stage else ""
    rows.append(("peak RSS", "", _fmt_bytes(report.peak_rss_bytes) + during))
    if report.memory_estimate_bytes:
        rows.append(("peak RSS estimated before loading", "", _fmt_bytes(report.memory_estimate_bytes)))
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in report.timings_s.items())
    rows.append(("wall time", "", f"{sum(report.timings_s.values()):.1f}s ({timings})"))
    return rows


def speed_rows(speed: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """--measure-speed: the input (first form) against the output (last form)."""
    if not speed or len(speed.get("forms", [])) < 2:
        return []
    before, after = speed["forms"][0], speed["forms"][-1]
    ratios = next(v for k, v in after.items() if k.startswith("ratios_vs_"))
    return [
        (f"prefill tokens/s ({speed['prefill_tokens']} tokens)", f"{before['prefill_tokens_per_s']:,.0f}", f"{after['prefill_tokens_per_s']:,.0f} ({ratios['prefill']:.2f}x)"),
        (f"decode tokens/s ({speed['decode_tokens']} tokens)", f"{before['decode_tokens_per_s']:,.1f}", f"{after['decode_tokens_per_s']:,.1f} ({ratios['decode']:.2f}x)"),
        ("weights in memory when running", _fmt_bytes(before["weight_bytes"]), f"{_fmt_bytes(after['weight_bytes'])} ({ratios['weights']:.2f}x)"),
        ("peak RSS when running", _fmt_bytes(before["peak_rss_bytes"]), _fmt_bytes(after["peak_rss_bytes"])),
        ("runs on", before["runs_on"], after["runs_on"]),
    ]


def _columns(report: Report) -> tuple[str, str]:
    return ("teacher", "student") if report.training is not None else ("before", "after")


def _grouped(left: dict[str, str]) -> dict[str, tuple[int, str]]:
    """``left`` with block and expert numbers replaced by ``*``: one line per kind of matrix."""
    groups: dict[str, tuple[int, str]] = {}
    for name, why in left.items():
        pattern = re.sub(r"\.\d+\.", ".*.", name)
        count, _ = groups.get(pattern, (0, why))
        groups[pattern] = (count + 1, why)
    return groups


def to_markdown(report: Report, worst_layers: int = 0) -> str:
    """report.md: the summary table, the settings, and the per-layer error table."""
    lines = [
        f"# squeeze {report.pass_name}: {report.model.get('name', '')}",
        "",
        f"{report.settings.get('scheme', '')}",
        "",
        "| | {} | {} |".format(*_columns(report)),
        "|---|---|---|",
    ]
    lines += [f"| {name} | {before} | {after} |" for name, before, after in summary_rows(report)]
    lines += ["", "## Settings", ""]
    lines += [f"- **{k}**: {v}" for k, v in report.settings.items()]
    lines += [f"- **device**: {report.device}"]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    if report.uncompressed:
        lines += ["", "## Weight matrices left uncompressed", ""]
        lines += [f"- `{pattern}` ({count}): {why}" for pattern, (count, why) in _grouped(report.uncompressed).items()]
    if report.loading:
        lines += ["", "## Loading without squeeze", "", report.loading.rstrip()]
    if report.layers:
        layers = report.layers
        if worst_layers:
            layers = sorted(layers, key=lambda layer: -layer.relative_error)[:worst_layers]
        has_output = any(layer.output_error is not None for layer in layers)
        has_loss = any(layer.method_loss is not None for layer in layers)
        has_sparsity = any(layer.sparsity is not None for layer in layers)
        header = ["layer", "shape", "relative error", "max abs error"]
        header += ["output error"] * has_output + ["method loss"] * has_loss + ["sparsity", "nonzeros"] * has_sparsity
        lines += [
            "",
            f"## Per-layer {'pruning' if report.pass_name == 'prune' else 'quantization'} error",
            "",
            "relative error = ‖W − Ŵ‖ / ‖W‖ (Frobenius); max abs = largest elementwise |W − Ŵ|",
        ]
        if has_sparsity:
            lines.append("; sparsity = share of the layer's weights exactly zero after the pass")
        if has_output:
            lines.append("; output error = ‖(W − Ŵ)X‖ / ‖WX‖ over the layer's calibration inputs X")
        if has_loss:
            lines.append("; method loss = GPTQ's objective Σ (w − ŵ)² / [H⁻¹]ⱼⱼ² / 2 (its estimate of the squared output error)")
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for layer in layers:
            cells = [layer.name, f"{layer.shape[0]}x{layer.shape[1]}", f"{layer.relative_error:.5f}", f"{layer.max_abs_error:.3g}"]
            if has_output:
                cells.append(_fmt(layer.output_error, ".5f"))
            if has_loss:
                cells.append(_fmt(layer.method_loss, ".4g"))
            if has_sparsity:
                cells += [_fmt(layer.sparsity, ".2%"), f"{layer.nonzeros:,}" if layer.nonzeros is not None else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_rich(report: Report, worst_layers: int = 8) -> Group:
    """Terminal rendering: summary table and the layers with the largest error."""
    table = Table(title=f"squeeze {report.pass_name}: {report.model.get('name', '')} — {report.settings.get('scheme', '')}")
    table.add_column("")
    for column in _columns(report):
        table.add_column(column, justify="right")
    for row in summary_rows(report):
        table.add_row(*row)
    parts: list[Any] = [table]
    if report.layers:
        worst = sorted(report.layers, key=lambda layer: -layer.relative_error)[:worst_layers]
        layers = Table(title=f"largest per-layer error ({len(worst)} of {len(report.layers)}; all in report.md)")
        layers.add_column("layer")
        layers.add_column("shape")
        layers.add_column("relative error", justify="right")
        has_output = any(layer.output_error is not None for layer in worst)
        has_sparsity = any(layer.sparsity is not None for layer in worst)
        if has_output:
            layers.add_column("output error", justify="right")
        if has_sparsity:
            layers.add_column("sparsity", justify="right")
        for layer in worst:
            cells = [layer.name, f"{layer.shape[0]}x{layer.shape[1]}", f"{layer.relative_error:.5f}"]
            cells += [_fmt(layer.output_error, ".5f")] if has_output else []
            cells += [_fmt(layer.sparsity, ".2%")] if has_sparsity else []
            layers.add_row(*cells)
        parts.append(layers)
    return Group(*parts)


def write_report(report: Report, out_dir: Path) -> None:
    """Write report.json and report.md into ``out_dir``."""
    (out_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (out_dir / "report.md").write_text(to_markdown(report))


def plot_loss_curve(curve: list[dict[str, Any]], file: Path, title: str) -> None:
    """PNG of the training loss terms per step, and of held-out perplexity where it was measured."""
    import matplotlib  # heavy: imported only when a plot is drawn

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = [entry["step"] for entry in curve]
    terms = [k for k in ("loss", "kd", "ce", "hidden", "embedding") if any(k in entry for entry in curve)]
    evaluated = [entry for entry in curve if "eval_perplexity" in entry or "eval_cosine" in entry]
    fig, axes = plt.subplots(1, 2 if evaluated else 1, figsize=(11 if evaluated else 6, 4), squeeze=False)
    ax = axes[0][0]
    for term in terms:
        ax.plot(steps, [entry.get(term, float("nan")) for entry in curve], label=term, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if evaluated:
        key = "eval_perplexity" if "eval_perplexity" in evaluated[0] else "eval_cosine"
        right = axes[0][1]
        right.plot([e["step"] for e in evaluated], [e[key] for e in evaluated], marker="o")
        right.set_xlabel("optimizer step")
        right.set_ylabel("held-out perplexity" if key == "eval_perplexity" else "held-out embedding cosine")
        right.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)

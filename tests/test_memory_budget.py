"""--memory-budget: a run squeeze estimates above the budget is refused in one line before loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import squeeze.chain as chain
from squeeze.chain import check_memory, plan_run
from squeeze.cli import app
from squeeze.errors import OptionError
from squeeze.memory import read_in_blocks_bytes
from squeeze.models import meta_model, resolve_model
from squeeze.recipes import DistillStage, QuantizeStage

runner = CliRunner()
QUIET = ["--no-eval", "--quiet"]


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_refusal(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_a_pass_above_the_budget_is_refused_before_loading(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    result = run("quantize", tiny_llama_dir, "--out", out, "--memory-budget", "1MB")
    one_line_refusal(
        result, "this quantize pass needs about", "held whole", "one block at a time (one block alone is 144.5 KiB)",
        "above the budget (976.6 KiB", "--memory-budget",
    )
    assert not list(tmp_path.iterdir())


def test_a_pass_within_the_budget_runs(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = run("prune", tiny_llama_dir, "--sparsity", "0.5", "--out", tmp_path / "p", "--memory-budget", "64GB", *QUIET)
    assert result.exit_code == 0, result.output


def test_a_recipe_stage_above_the_budget_is_refused_and_nothing_written(tiny_llama_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - prune: {sparsity: 0.5}\n  - quantize: {bits: 8}\n")
    out = tmp_path / "run"
    result = run("run", recipe, "--model", tiny_llama_dir, "--out", out, "--memory-budget", "2MB", *QUIET)
    one_line_refusal(result, "stage 1 (01-", "needs about", "--memory-budget")
    assert not out.exists() and not (tmp_path / "run.partial").exists()


def test_a_bad_budget_names_the_flag(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = run("quantize", tiny_llama_dir, "--out", tmp_path / "never", "--memory-budget", "plenty")
    one_line_refusal(result, "--memory-budget must be a size")


def test_without_a_budget_the_available_memory_is_the_limit(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, plan = plan_run([QuantizeStage(bits=8)], str(tiny_llama_dir))
    need = plan[0].memory_bytes
    least = min(need, plan[0].stream_bytes)  # streamed, if that needs less
    monkeypatch.setattr(chain, "default_memory_budget", lambda: least - 1)
    with pytest.raises(OptionError, match="above the memory available now less a margin"):
        check_memory(plan)
    monkeypatch.setattr(chain, "default_memory_budget", lambda: need)
    assert check_memory(plan) == need
    monkeypatch.setattr(chain, "default_memory_budget", lambda: None)  # unknown: nothing to check against
    assert check_memory(plan) is None


def test_a_stage_that_fits_only_streamed_is_streamed(tiny_llama_dir: Path) -> None:
    _, plan = plan_run([QuantizeStage(bits=8)], str(tiny_llama_dir))
    entry = plan[0]
    assert entry.streamable and entry.stream_bytes is not None and not entry.stream
    entry.memory_bytes = entry.stream_bytes + 1  # as for a model too big to hold whole
    assert check_memory(plan, entry.stream_bytes) == entry.stream_bytes
    assert entry.stream and entry.estimate == entry.stream_bytes
    with pytest.raises(OptionError, match="one block at a time"):
        check_memory(plan, entry.stream_bytes - 1)


def test_what_cannot_stream_is_never_streamed(tiny_llama_dir: Path, tmp_path: Path) -> None:
    assert run("quantize", tiny_llama_dir, "--out", tmp_path / "q", *QUIET).exit_code == 0
    _, plan = plan_run([QuantizeStage(bits=8)], str(tmp_path / "q"))  # a quantized input is read whole
    assert not plan[0].streamable and plan[0].stream_bytes is None
    _, plan = plan_run([QuantizeStage(bits=8, format="gptq", mode="per-group", group_size=32)], str(tiny_llama_dir))
    assert not plan[0].streamable  # the gptq format is written whole
    check_memory(plan, stream=True)
    assert not plan[0].stream


def test_a_recipe_streams_every_stage(tiny_llama_dir: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - prune: {method: wanda, sparsity: 0.5, calib_samples: 4}\n  - quantize: {method: gptq, bits: 4, calib_samples: 4}\n")
    out = tmp_path / "run"
    dry = run("run", recipe, "--model", tiny_llama_dir, "--out", out, "--stream", "--dry-run", "--json", "--seq-len", "32")
    assert dry.exit_code == 0, dry.output
    assert "streamed" in dry.output
    result = run("run", recipe, "--model", tiny_llama_dir, "--out", out, "--stream", "--quiet", "--eval-tokens", "256", "--seq-len", "32",
                 "--data", "shakespeare")
    assert result.exit_code == 0, result.output
    reports = sorted(out.glob("*/report.json"))
    assert len(reports) == 2
    for report in reports:
        assert json.loads(report.read_text())["settings"]["streamed"] is True


def test_a_model_larger_than_the_gpu_streams_there(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, plan = plan_run([QuantizeStage(bits=8)], str(tiny_llama_dir))
    monkeypatch.setattr(chain, "accelerator_memory", lambda device: plan[0].memory_bytes - 1 if device.startswith("cuda") else None)
    check_memory(plan, "64GB", device="cpu")
    assert not plan[0].stream
    check_memory(plan, "64GB", device="cuda:0")
    assert plan[0].stream  # only the current block goes to the GPU


def test_a_streamed_teacher_is_estimated_one_block_at_a_time(make_tiny_llama, small_text: Path, tmp_path: Path) -> None:
    teacher = make_tiny_llama(12, 3)
    options = dict(student="layers:2", steps=1, batch_size=1, data=str(small_text), teacher_cache=str(tmp_path / "cache"))
    _, whole = plan_run([DistillStage(**options)], str(teacher), seq_len=32, eval_tokens=64)
    _, streamed = plan_run([DistillStage(stream_teacher=True, **options)], str(teacher), seq_len=32, eval_tokens=64)
    saved = whole[0].memory_bytes - streamed[0].memory_bytes
    model = meta_model(resolve_model(str(teacher)))
    held = read_in_blocks_bytes(model, 4)
    # the teacher is counted as what reading it one block at a time holds (fp32), not whole
    assert saved == sum(p.numel() for p in model.parameters()) * 4 - held
    assert held < sum(p.numel() for p in model.parameters()) * 4


def test_processes_on_one_machine_share_the_default_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from squeeze import sizes

    monkeypatch.setattr(sizes, "available_memory", lambda: 20 * 2**30)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = sizes.default_memory_budget()
    assert alone == 18 * 2**30  # a tenth kept back for the rest of the machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert sizes.default_memory_budget() == alone // 4

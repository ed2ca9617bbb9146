"""Data-parallel calibration (squeeze.calib.parallel): two processes under torchrun (gloo, CPU)
against one — the combined statistics, the written codes and the scores — plus a process that
fails mid-block, and a two-stage recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from squeeze.processes import Processes
from test_cli import leftovers, run

sys.path.insert(0, str(Path(__file__).parent))
from parallel_worker import COMMON, PASSES, ToyBlock, statistics, toy_inputs  # noqa: E402

WORKER = Path(__file__).with_name("parallel_worker.py")


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2`` of ``args``, one thread per process."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=timeout)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, in one file or sharded."""
    return {name: t for file in sorted(folder.glob("*.safetensors")) for name, t in load_file(file).items()}


def test_rows_are_shared_without_gaps_or_overlaps() -> None:
    for world in (1, 2, 3, 4):
        for count in (0, 1, 5, 64, 67):
            shares = [Processes(rank, world).rows(count) for rank in range(world)]
            assert [i for s in shares for i in range(count)[s]] == list(range(count))
            sizes = [len(range(count)[s]) for s in shares]
            assert max(sizes) - min(sizes) <= 1


def test_combined_statistics_equal_one_process(tmp_path: Path) -> None:
    done = torchrun(str(WORKER), "statistics", str(tmp_path / "stats.safetensors"))
    assert done.returncode == 0, done.stderr[-3000:]
    two = load_file(tmp_path / "stats.safetensors")
    one = statistics(ToyBlock(), toy_inputs())
    assert two.keys() == one.keys()
    for name, value in one.items():
        # the sampled rows are the very rows one process samples; the sums differ in order only
        torch.testing.assert_close(two[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def both(tiny_llama4_dir: Path, small_text: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """Every calibrated method through the command line, in two processes and in one."""
    root = tmp_path_factory.mktemp("parallel")
    done = torchrun(str(WORKER), "passes", str(tiny_llama4_dir), str(small_text), str(root / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    for name, command in PASSES.items():
        result = run(*command, tiny_llama4_dir, "--data", small_text, "--out", root / "one" / name, *COMMON)
        assert result.exit_code == 0, result.output
    return root / "one", root / "two", json.loads((root / "two" / "results.json").read_text())


@pytest.mark.parametrize("method", list(PASSES))
def test_two_processes_write_what_one_writes(both: tuple[Path, Path, dict], method: str) -> None:
    one, two, results = both
    assert results[method][0] == 0, results[method][1]
    a, b = tensors(one / method), tensors(two / method)
    assert a.keys() == b.keys()
    same = total = 0
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
        else:  # packed codes, bitmasks
            same += int((a[name] == b[name]).sum())
            total += a[name].numel()
    assert total == 0 or same / total >= 0.999
    first, second = (json.loads((d / method / "report.json").read_text()) for d in (one, two))
    for metric in ("perplexity_after", "kl_divergence", "top1_agreement"):
        assert second["accuracy"][metric] == pytest.approx(first["accuracy"][metric], rel=1e-4, abs=1e-7)
    assert second["settings"]["processes"] == 2 and "processes" not in first["settings"]
    tokens = 0 if method == "hqq" else 128  # HQQ reads no text: its processes share the layers
    assert f"process 1: {tokens} calibration tokens" in second["settings"]["per_process"]


def test_the_callers_group_is_left_up_and_autoround_is_refused(both: tuple[Path, Path, dict]) -> None:
    _, two, results = both
    assert results["group_still_up"] is True
    code, output = results["autoround"]
    assert code == 2 and "cannot share its calibration among processes" in output
    assert not (two / "ar").exists()


def test_a_process_failing_mid_block_stops_every_process(tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = torchrun(str(WORKER), "fail", str(tiny_llama4_dir), str(small_text), str(out))
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert any("injected failure in the second block" in line for line in lines), done.stderr[-3000:]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name != "out"]


def test_a_recipe_runs_in_two_processes(tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "two.yaml"
    recipe.write_text(
        "seq_len: 32\neval_tokens: 512\nstages:\n"
        "  - prune: {method: wanda, sparsity: 0.5, calib_samples: 8, batch_size: 2}\n"
        "  - quantize: {method: gptq, bits: 4, mode: per-group, group_size: 32, calib_samples: 8, batch_size: 2}\n"
    )
    args = ["run", str(recipe), "--model", str(tiny_llama4_dir), "--data", str(small_text), "-q"]
    done = torchrun("-m", "squeeze.cli", *args, "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert run(*args, "--out", tmp_path / "one").exit_code == 0
    stage = "02-quantize-gptq-w4a16-g32"
    a, b = tensors(tmp_path / "one" / stage), tensors(tmp_path / "two" / stage)
    assert all(torch.equal(a[name], b[name]) for name in a if not a[name].is_floating_point())
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert len(summary["rows"]) == 3 and not leftovers(tmp_path)

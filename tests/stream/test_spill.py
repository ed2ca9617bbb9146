"""Calibration activations spilled to disk: the same compressed tensors, one batch in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from squeeze.calib import spill as spill_module
from squeeze.calib.spill import SpilledInputs, new_inputs, spilled_calibration
from squeeze.chain import check_memory, check_pass_memory, plan_run
from squeeze.errors import OptionError
from squeeze.passes.prune import prune
from squeeze.passes.quantize import quantize
from squeeze.prune.config import PruneConfig
from squeeze.quant.config import QuantizeConfig
from squeeze.quant.scheme import scheme_from_options
from squeeze.recipes import PruneStage, QuantizeStage

from test_stream_pass import SMALL, assert_same, run


def test_spilled_inputs_read_back_what_was_written(tmp_path: Path) -> None:
    store = SpilledInputs(tmp_path)
    batches = [(torch.randn(2, 5, 8), {"mask": torch.ones(2, 5)}) for _ in range(3)]
    for item in batches:
        store.append(item)
    assert len(store) == 3 and len(list(store.folder.glob("*.safetensors"))) == 3
    for (hidden, kwargs), (want, want_kwargs) in zip(store, batches):
        assert torch.equal(hidden, want) and kwargs is want_kwargs
    with pytest.raises(IndexError):
        store[3]
    store.discard()
    assert not store.folder.exists() and not store


def test_inputs_go_to_disk_only_inside_the_context(tmp_path: Path) -> None:
    assert isinstance(new_inputs(), list)
    with spilled_calibration(tmp_path) as root:
        store = new_inputs()
        assert isinstance(store, SpilledInputs) and store.folder.parent == root
        store.append((torch.zeros(1, 2, 3), {}))
    assert not root.exists()  # everything under it is deleted at the end
    assert isinstance(new_inputs(), list)


class Written:
    """Counts the batches written to disk."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.files = 0
        save = spill_module.save_tensors_file

        def counted(tensors, path):
            self.files += 1
            save(tensors, path)

        monkeypatch.setattr(spill_module, "save_tensors_file", counted)


@pytest.mark.parametrize("method", ["gptq", "autoround", "wanda"])
def test_a_spilled_pass_writes_the_same_tensors(method: str, twelve_blocks: Path, tmp_path: Path, monkeypatch) -> None:
    if method != "wanda":
        # AutoRound also carries the unquantized model's hidden states from block to block
        options = {"autoround_iters": 2} if method == "autoround" else {}
        scheme = scheme_from_options(mode="per-group", bits=4, group_size=32, asym=True)
        config, run = QuantizeConfig(scheme=scheme, method=method, options=options), quantize
    else:
        config, run = PruneConfig(method="wanda", sparsity=0.5), prune
    held = run(str(twelve_blocks), tmp_path / "held", config, stream=True, **SMALL)
    written = Written(monkeypatch)
    spilled = run(str(twelve_blocks), tmp_path / "spilled", config, stream=True, spill_calibration=True, **SMALL)
    # every block's outputs for every batch went through the disk (4 windows in batches of two)
    assert written.files >= 12 * 2
    assert_same(held, spilled, tmp_path / "held", tmp_path / "spilled")
    assert any("calibration activations were kept on disk" in n for n in spilled.notes)
    assert not list(tmp_path.glob("squeeze-calibration-*"))  # the spill folder is gone


def test_spilling_needs_a_streamed_pass(twelve_blocks: Path, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="spill_calibration.*stream"):
        prune(str(twelve_blocks), tmp_path / "out", PruneConfig(method="wanda", sparsity=0.5), spill_calibration=True, **SMALL)
    assert not (tmp_path / "out").exists()


def test_the_budget_spills_when_only_that_fits(tiny_llama_dir: Path) -> None:
    _, plan = plan_run([PruneStage(method="wanda", sparsity=0.5, calib_samples=64)], str(tiny_llama_dir), seq_len=128)
    entry = plan[0]
    assert entry.spill_bytes is not None and entry.spill_bytes < entry.stream_bytes
    entry.memory_bytes = entry.stream_bytes + 1  # as for a model too big to hold whole
    assert check_memory(plan, entry.spill_bytes) == entry.spill_bytes
    assert entry.stream and entry.spill and entry.estimate == entry.spill_bytes
    entry.stream = entry.spill = False
    with pytest.raises(OptionError, match="with its calibration activations on disk"):
        check_memory(plan, entry.spill_bytes - 1)
    _, plan = plan_run([QuantizeStage(bits=8)], str(tiny_llama_dir))  # RTN reads no calibration text: nothing to spill
    assert plan[0].spill_bytes is None


def test_a_pass_run_alone_is_told_to_spill(tiny_llama_dir: Path, monkeypatch) -> None:
    stage = PruneStage(method="wanda", sparsity=0.5, calib_samples=64)
    _, plan = plan_run([stage], str(tiny_llama_dir), eval_tokens=256, seq_len=128)
    budget = plan[0].spill_bytes
    assert check_pass_memory(stage, str(tiny_llama_dir), "wikipedia", 256, 128, "float32", True, False, budget) == (True, True)
    assert check_pass_memory(stage, str(tiny_llama_dir), "wikipedia", 256, 128, "float32", True, False, plan[0].memory_bytes + plan[0].stream_bytes) == (False, False)


def test_the_cli_spills_when_the_budget_says_so(twelve_blocks: Path, tmp_path: Path) -> None:
    stage = PruneStage(method="wanda", sparsity=0.5, calib_samples=4)
    _, plan = plan_run([stage], str(twelve_blocks), "shakespeare", 256, 32)
    result = run(
        "prune", twelve_blocks, "--method", "wanda", "--sparsity", "0.5", "--out", tmp_path / "out", "--data", "shakespeare",
        "--eval-tokens", "256", "--seq-len", "32", "--calib-samples", "4", "--memory-budget", plan[0].spill_bytes, "--json", "--quiet",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["settings"]["streamed"] and any("calibration activations were kept on disk" in n for n in report["notes"])

"""A damaged distillation checkpoint: a resume says which one is damaged and falls back to the
newest whole one; with none whole it is refused in one line (issue #18, defect 9)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from squeeze.api import distill
from squeeze.distill import checkpoint
from squeeze.cli import app
from squeeze.distill.checkpoint import CheckpointDir, TrainingState, optimizer_tensors
from squeeze.distill.config import DistillConfig
from squeeze.errors import SqueezeError

FILES = ("weights.safetensors", "optimizer.safetensors", "rng-rank0.safetensors", "state.json", "optimizer.json")


def write_checkpoints(folder: Path, steps: tuple[int, ...] = (2, 4)) -> dict[int, dict[str, torch.Tensor]]:
    """Checkpoints of a small model and its AdamW state written through CheckpointDir, as the
    trainer writes them; returns the weights saved at each step."""
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    checkpoints = CheckpointDir(folder)
    checkpoints.start({"teacher": "t", "processes": 1})
    saved = {}
    for step in range(1, max(steps) + 1):
        model(torch.randn(3, 8)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in steps:
            tmp = checkpoints.staging(step)
            checkpoints.write_rng(tmp, 0)
            tensors, meta = optimizer_tensors(optimizer)
            weights = {k: v.clone() for k, v in model.state_dict().items()}
            checkpoints.write_shared(tmp, weights, tensors, meta, TrainingState(step=step, tokens=step * 10))
            checkpoints.publish(tmp, step, keep=5)
            saved[step] = weights
    return saved


def truncate(file: Path, keep: int) -> None:
    file.write_bytes(file.read_bytes()[:keep])


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one_and_says_so(tmp_path: Path, caplog) -> None:
    saved = write_checkpoints(tmp_path / "ck")
    weights = tmp_path / "ck" / "step-0000004" / "weights.safetensors"
    truncate(weights, weights.stat().st_size // 2)
    checkpoints = CheckpointDir(tmp_path / "ck")
    with caplog.at_level(logging.WARNING, logger="squeeze"):
        found = checkpoints.load_latest(rank=0)
    assert found is not None
    folder, (loaded_weights, _, _, _, state) = found
    assert folder.name == "step-0000002" and state.step == 2
    assert loaded_weights.keys() == saved[2].keys()
    assert all(torch.equal(loaded_weights[k], saved[2][k]) for k in saved[2])
    [note] = checkpoints.notes
    assert "step-0000004" in note and "weights.safetensors" in note and "cut short" in note and "step-0000002" in note
    assert [r.getMessage() for r in caplog.records if r.name == "squeeze"] == [note]
    # the pass asks first, the trainer again: the note is made once
    assert checkpoints.latest().name == "step-0000002" and len(checkpoints.notes) == 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(FILES), cut=st.floats(0.0, 1.0), flip=st.booleans())
def test_any_file_damaged_in_the_latest_is_found_before_anything_loads(tmp_path_factory, name: str, cut: float, flip: bool) -> None:
    folder = tmp_path_factory.mktemp("ck")
    write_checkpoints(folder)
    file = folder / "step-0000004" / name
    raw = file.read_bytes()
    if flip and name.endswith(".safetensors"):
        file.write_bytes(raw[:8] + b"\x00" + raw[9:])  # the header's opening brace gone
    else:
        truncate(file, int(cut * (len(raw) - 2)))  # json: at most everything but "}\n"
    checkpoints = CheckpointDir(folder)
    assert checkpoint.checkpoint_damage(folder / "step-0000004") is not None
    assert checkpoint.checkpoint_damage(folder / "step-0000002") is None
    assert checkpoints.latest().name == "step-0000002"
    assert name in checkpoints.notes[0]


def test_every_checkpoint_damaged_is_one_line_naming_each(tmp_path: Path) -> None:
    write_checkpoints(tmp_path / "ck")
    truncate(tmp_path / "ck" / "step-0000004" / "weights.safetensors", 100)
    (tmp_path / "ck" / "step-0000002" / "optimizer.json").write_text('{"param_gro')
    checkpoints = CheckpointDir(tmp_path / "ck")
    with pytest.raises(SqueezeError) as excinfo:
        checkpoints.latest()
    message = one_line_error(excinfo)
    assert "no checkpoint" in message and "step-0000004" in message and "step-0000002" in message
    assert "weights.safetensors" in message and "optimizer.json" in message and "overwrite" in message
    with pytest.raises(SqueezeError):
        checkpoints.load_latest(rank=0)
    assert (tmp_path / "ck" / "step-0000004").is_dir()  # nothing is thrown away


def test_a_checkpoint_that_fails_to_load_falls_back_too(tmp_path: Path, monkeypatch) -> None:
    saved = write_checkpoints(tmp_path / "ck")
    real = checkpoint.load_file

    def failing(path: str):
        if "step-0000004" in path:
            raise SafetensorError("Error while deserializing header: invalid offsets")
        return real(path)

    monkeypatch.setattr(checkpoint, "load_file", failing)
    checkpoints = CheckpointDir(tmp_path / "ck")
    folder, (weights, *_rest) = checkpoints.load_latest(rank=0)
    assert folder.name == "step-0000002" and torch.equal(weights["weight"], saved[2]["weight"])
    assert "does not load" in checkpoints.notes[0] and "invalid offsets" in checkpoints.notes[0]


def test_a_damaged_run_file_is_one_line(tmp_path: Path) -> None:
    write_checkpoints(tmp_path / "ck")
    (tmp_path / "ck" / "run.json").write_text('{"teacher": ')
    with pytest.raises(SqueezeError) as excinfo:
        CheckpointDir(tmp_path / "ck").check_resumable({"teacher": "t", "processes": 1})
    assert "run.json" in one_line_error(excinfo)


def test_publishing_after_a_fallback_drops_the_damaged_newer_checkpoint(tmp_path: Path) -> None:
    write_checkpoints(tmp_path / "ck", steps=(2, 4, 6))
    truncate(tmp_path / "ck" / "step-0000006" / "state.json", 3)
    checkpoints = CheckpointDir(tmp_path / "ck")
    assert checkpoints.latest().name == "step-0000004"
    tmp = checkpoints.staging(5)
    shutil.copytree(tmp_path / "ck" / "step-0000004", tmp, dirs_exist_ok=True)
    checkpoints.publish(tmp, 5, keep=2)
    assert [p.name for p in checkpoints.complete()] == ["step-0000004", "step-0000005"]


# --- a real distillation run -----------------------------------------------------------------


def test_a_resumed_run_that_skips_a_damaged_checkpoint_ends_with_the_uninterrupted_weights(
    tiny_llama4_dir: Path, small_text: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    config = DistillConfig(steps=4, batch_size=2, lr=1e-3, checkpoint_every=1)
    options = dict(data=str(small_text), seq_len=32, evaluate=False)
    distill(str(tiny_llama4_dir), "layers:2", tmp_path / "whole", config, **options)

    with monkeypatch.context() as patch:
        patch.setattr(CheckpointDir, "clear", lambda self: None)  # keep the checkpoints, as a killed run would
        distill(str(tiny_llama4_dir), "layers:2", tmp_path / "again", config, **options)
    folder = tmp_path / "again.checkpoints"
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-0000002", "step-0000003"]
    shutil.copytree(folder, tmp_path / "all_bad")
    truncate(folder / "step-0000003" / "weights.safetensors", 1000)

    with caplog.at_level(logging.WARNING, logger="squeeze"):
        report = distill(str(tiny_llama4_dir), "layers:2", tmp_path / "again", config, **options, resume=True, overwrite=True)
    assert report.to_dict()["training"]["resumed_from_step"] == 2
    assert any("step-0000003 is damaged" in r.getMessage() and "step-0000002" in r.getMessage() for r in caplog.records)
    whole, again = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)

    for step in ("step-0000002", "step-0000003"):
        truncate(tmp_path / "all_bad" / step / "weights.safetensors", 1000)
    run = json.loads((tmp_path / "all_bad" / "run.json").read_text())
    assert run["processes"] == 1
    args = ["distill", str(tiny_llama4_dir), "layers:2", "--data", str(small_text), "--seq-len", "32", "--steps", "4",
            "--batch-size", "2", "--lr", "1e-3", "--checkpoint-every", "1", "--no-eval", "-q", "--out", str(tmp_path / "cli"),
            "--checkpoint-dir", str(tmp_path / "all_bad"), "--resume"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no checkpoint") and "--overwrite" in lines[0]
    assert not (tmp_path / "cli").exists()

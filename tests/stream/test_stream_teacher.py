"""Distillation with a streamed teacher: the cache, the student and the scores of a resident teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from squeeze.cli import app
from squeeze.distill.config import DistillConfig
from squeeze.errors import OptionError
from squeeze.passes.distill import distill

FAST = dict(seq_len=32, eval_tokens=256, generation_prompts=2)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.mark.parametrize("student", ["layers:2", "width:0.5"])
def test_a_streamed_teacher_trains_the_student_a_resident_one_does(student: str, tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    config = DistillConfig(steps=4, batch_size=2, lr=1e-3, cache_topk=16)
    runs = {}
    for mode in ("resident", "streamed"):
        runs[mode] = distill(
            str(tiny_llama4_dir), student, tmp_path / mode, config, data=str(small_text), teacher_cache=tmp_path / f"cache-{mode}",
            stream_teacher=mode == "streamed", **FAST,
        )
    a, b = tensors(tmp_path / "cache-resident"), tensors(tmp_path / "cache-streamed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the very same cache
    a, b = tensors(tmp_path / "resident"), tensors(tmp_path / "streamed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # so the very same student
    x, y = runs["resident"].accuracy, runs["streamed"].accuracy
    for field in ("perplexity_before", "perplexity_after", "kl_divergence", "top1_agreement"):
        assert getattr(y, field) == pytest.approx(getattr(x, field), rel=1e-5), field
    # the streamed teacher's greedy continuations, one block at a time for every token, are the whole teacher's
    assert y.generation_prompts == x.generation_prompts == 2
    for field in ("rouge1", "rouge2", "rougeL", "bleu", "exact_match"):
        assert getattr(y, field) == pytest.approx(getattr(x, field)), field
    assert any("streamed" in note for note in runs["streamed"].notes)


def test_a_streamed_teacher_needs_a_cache(tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="stream_teacher trains from the teacher's logits cached block by block: add teacher_cache"):
        distill(str(tiny_llama4_dir), "layers:2", tmp_path / "never", DistillConfig(steps=1), data=str(small_text), stream_teacher=True)
    result = CliRunner().invoke(app, ["distill", str(tiny_llama4_dir), "layers:2", "--stream-teacher", "--data", str(small_text), "--out", str(tmp_path / "never")])
    assert result.exit_code == 2 and "--stream-teacher trains from the teacher's logits cached block by block: add --teacher-cache" in result.output
    assert not (tmp_path / "never").exists()

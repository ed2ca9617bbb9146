"""squeeze distill end to end on tiny models: reproducible, resumable (also after a kill mid-write),
the same under torchrun with two processes, pruned students stay pruned, and the teacher cache."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from squeeze.api import distill, prune
from squeeze.distill.config import DistillConfig
from squeeze.errors import SqueezeError
from squeeze.models import load_model
from squeeze.prune.apply import PruneConfig

FAST = dict(seq_len=32, eval_tokens=256)


def run(teacher: Path, student: str, out: Path, text: Path, **options):
    kwargs = {k: options.pop(k) for k in list(options) if k in ("resume", "teacher_cache", "overwrite", "evaluate", "checkpoint_dir")}
    config = DistillConfig(**{"steps": 4, "batch_size": 2, "lr": 1e-3, **options})
    return distill(str(teacher), student, out, config, data=str(text), **FAST, **kwargs)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_layers_student_trains_and_loads_without_squeeze(tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    report = run(tiny_llama4_dir, "layers:2", out, small_text, steps=8, eval_every=4).to_dict()
    training, acc = report["training"], report["accuracy"]
    assert training["steps"] == 8 and training["tokens"] == 8 * 2 * 32
    assert training["student_parameters"] < training["teacher_parameters"]
    assert training["student_bytes"] < training["teacher_bytes"]
    assert training["loss_last"] < training["loss_first"]
    assert acc["perplexity_before"] > 1 and acc["perplexity_after"] > 1 and acc["kl_divergence"] >= 0
    assert 0 <= acc["top1_agreement"] <= 1 and training["tokens_per_second"] > 0
    curve = json.loads((out / "loss_curve.json").read_text())
    assert [e["step"] for e in curve] == list(range(1, 9))
    assert all({"kd", "ce", "loss", "lr", "grad_norm"} <= e.keys() for e in curve)
    assert [e["step"] for e in curve if "eval_perplexity" in e] == [4, 8]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| | teacher | student |" in (out / "report.md").read_text()
    assert not (tmp_path / "s.checkpoints").exists()
    # the student loads with plain transformers and computes what squeeze trained
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    ids = torch.arange(10)[None]
    again = load_model(str(out)).model
    torch.testing.assert_close(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_same_seed_same_student(tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    run(tiny_llama4_dir, "layers:2", tmp_path / "a", small_text, evaluate=False)
    run(tiny_llama4_dir, "layers:2", tmp_path / "b", small_text, evaluate=False)
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    run(tiny_llama4_dir, "layers:2", tmp_path / "c", small_text, evaluate=False, seed=1)
    assert not torch.equal(weights(tmp_path / "a")["model.layers.0.mlp.up_proj.weight"], weights(tmp_path / "c")["model.layers.0.mlp.up_proj.weight"])


_DIE_MID_CHECKPOINT = """
import os, sys
from squeeze.distill import checkpoint
original = checkpoint.CheckpointDir.write_shared
def dying(self, tmp, weights, tensors, meta, state):
    if state.step == int(os.environ["DIE_AT_STEP"]):
        checkpoint._save(weights, tmp / "weights.safetensors")  # half a checkpoint, then the process dies
        os._exit(9)
    return original(self, tmp, weights, tensors, meta, state)
checkpoint.CheckpointDir.write_shared = dying
from squeeze.cli import app
app(sys.argv[1:])
"""


def cli_args(teacher: Path, out: Path, text: Path, *extra: str) -> list[str]:
    return ["distill", str(teacher), "layers:2", "--data", str(text), "--seq-len", "32", "--eval-tokens", "256",
            "--steps", "6", "--batch-size", "2", "--lr", "1e-3", "--no-eval", "-q", "--out", str(out), *extra]  # fmt: skip


def test_resume_after_a_kill_mid_checkpoint_ends_with_the_uninterrupted_weights(tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from squeeze.cli import app

    whole = tmp_path / "whole"
    assert CliRunner().invoke(app, cli_args(tiny_llama4_dir, whole, small_text)).exit_code == 0

    out = tmp_path / "resumed"
    env = {**os.environ, "DIE_AT_STEP": "4"}
    killed = subprocess.run(
        [sys.executable, "-c", _DIE_MID_CHECKPOINT, *cli_args(tiny_llama4_dir, out, small_text, "--checkpoint-every", "2")],
        env=env, capture_output=True, text=True,
    )
    assert killed.returncode == 9, killed.stderr
    checkpoints = tmp_path / "resumed.checkpoints"
    assert not out.exists()
    names = sorted(p.name for p in checkpoints.iterdir())
    assert "step-0000002" in names and "step-0000004" not in names
    assert any(n.startswith(".step-0000004") for n in names)  # the half-written one, never published

    # without --resume the checkpoints are not silently thrown away
    refused = CliRunner().invoke(app, cli_args(tiny_llama4_dir, out, small_text, "--checkpoint-every", "2"))
    assert refused.exit_code == 2 and "--resume" in refused.stderr
    assert (checkpoints / "step-0000002").is_dir()

    result = CliRunner().invoke(app, cli_args(tiny_llama4_dir, out, small_text, "--checkpoint-every", "2", "--resume", "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["training"]["resumed_from_step"] == 2 and report["training"]["steps"] == 6
    assert_same_weights(whole, out)
    assert [e["loss"] for e in json.loads((out / "loss_curve.json").read_text())] == [
        e["loss"] for e in json.loads((whole / "loss_curve.json").read_text())
    ]
    assert not checkpoints.exists()  # removed once the run finished


def test_resume_with_other_settings_is_refused_and_keeps_the_checkpoints(tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    env = {**os.environ, "DIE_AT_STEP": "4"}
    out = tmp_path / "o"
    subprocess.run([sys.executable, "-c", _DIE_MID_CHECKPOINT, *cli_args(tiny_llama4_dir, out, small_text, "--checkpoint-every", "2")], env=env, capture_output=True)
    checkpoints = tmp_path / "o.checkpoints"
    before = sorted(p.name for p in checkpoints.iterdir())
    with pytest.raises(SqueezeError, match="other settings.*lr"):
        run(tiny_llama4_dir, "layers:2", out, small_text, steps=6, lr=5e-4, resume=True, checkpoint_every=2)
    assert sorted(p.name for p in checkpoints.iterdir()) == before
    with pytest.raises(SqueezeError, match="nothing to resume"):
        run(tiny_llama4_dir, "layers:2", tmp_path / "fresh", small_text, resume=True)


def test_two_processes_match_one_with_the_same_global_batch(tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    run(tiny_llama4_dir, "layers:2", one, small_text, steps=4, batch_size=4, evaluate=False)
    two = tmp_path / "two"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "squeeze.cli",
        *cli_args(tiny_llama4_dir, two, small_text)[:-1], str(two),
    ]
    cmd[cmd.index("--steps") + 1] = "4"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((two / "report.json").read_text())
    assert report["training"]["processes"] == 2 and report["training"]["tokens"] == 4 * 4 * 32
    curve_one = [e["loss"] for e in json.loads((one / "loss_curve.json").read_text())]
    curve_two = [e["loss"] for e in json.loads((two / "loss_curve.json").read_text())]
    assert curve_two == pytest.approx(curve_one, rel=1e-5)
    wa, wb = weights(one), weights(two)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-6)


def test_pruned_student_keeps_its_zeros(tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    pruned = tmp_path / "pruned"
    prune(str(tiny_llama4_dir), pruned, PruneConfig(method="magnitude", pattern="2:4"), data=str(small_text), evaluate=False, **FAST)
    zeros_before = {n: m.weight == 0 for n, m in load_model(str(pruned)).model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n}
    out = tmp_path / "trained"
    report = run(tiny_llama4_dir, str(pruned), out, small_text, steps=5, lr=1e-2).to_dict()
    trained = load_model(str(out)).model
    changed = 0
    for name, module in trained.named_modules():
        if name in zeros_before:
            assert torch.equal(module.weight == 0, zeros_before[name]), name  # same zeros, and no new ones
            changed += 1
    assert changed == 4 * 7
    assert any("kept their zeros" in n for n in report["notes"])
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["sparsity_structure"] == "2:4"
    assert report["loading"]  # sparse-bitmask in, sparse-bitmask out: the loader is in report.md


def test_encoder_distills_on_embeddings(tiny_bert_dir: Path, small_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "enc"
    report = run(tiny_bert_dir, "layers:1", out, small_text, steps=6, hidden_loss="cosine").to_dict()
    acc = report["accuracy"]
    assert acc["perplexity_after"] is None and -1 <= acc["embedding_cosine_mean"] <= 1
    curve = json.loads((out / "loss_curve.json").read_text())
    assert all({"embedding", "hidden"} <= e.keys() for e in curve)
    assert report["settings"]["layer_map"] == ["0:1"]
    assert transformers.AutoModel.from_pretrained(out).config.num_hidden_layers == 1


def test_narrow_student_with_projected_hidden_loss(tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    report = run(tiny_llama4_dir, "width:0.5", tmp_path / "w", small_text, hidden_loss="mse", evaluate=False).to_dict()
    assert report["settings"]["layer_map"] == ["0:0", "1:1", "2:2", "3:3"]
    assert any("projections" in n for n in report["notes"])
    state = weights(tmp_path / "w")
    assert state["model.layers.0.mlp.up_proj.weight"].shape == (64, 32)
    assert not any("projections" in k for k in state)


def test_teacher_cache_is_built_once_then_reused(tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = run(tiny_llama4_dir, "layers:2", tmp_path / "a", small_text, teacher_cache=cache, cache_topk=16, evaluate=False).to_dict()
    assert "teacher_cache" in first["timings_s"] and (cache / "cache.json").is_file()
    shards = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    second = run(tiny_llama4_dir, "layers:2", tmp_path / "b", small_text, teacher_cache=cache, cache_topk=16, evaluate=False).to_dict()
    assert "teacher_cache" not in second["timings_s"]
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")} == shards
    assert_same_weights(tmp_path / "a", tmp_path / "b")
    assert second["training"]["teacher_cache"] == str(cache)
    # a cache made for other windows is refused, not silently used
    with pytest.raises(SqueezeError, match="another run"):
        distill(str(tiny_llama4_dir), "layers:2", tmp_path / "c", DistillConfig(steps=4, batch_size=2), data=str(small_text), seq_len=16, eval_tokens=256, teacher_cache=cache)
    assert not (tmp_path / "c").exists()


def test_cached_top_k_training_follows_the_live_teacher(tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    live = run(tiny_llama4_dir, "layers:2", tmp_path / "live", small_text, alpha=1.0, evaluate=False)
    live_curve = [e["kd"] for e in json.loads((tmp_path / "live" / "loss_curve.json").read_text())]
    # every logit cached (k = vocabulary): the same training, up to the float16 storage of the log-probabilities
    run(tiny_llama4_dir, "layers:2", tmp_path / "full", small_text, alpha=1.0, evaluate=False, teacher_cache=tmp_path / "c1", cache_topk=30522, cache_samples=0)
    full_curve = [e["kd"] for e in json.loads((tmp_path / "full" / "loss_curve.json").read_text())]
    assert full_curve == pytest.approx(live_curve, rel=1e-2)
    # the random tiny teacher spreads its mass over the whole vocabulary, the worst case for a top-k cache:
    # at step 1 (same student) the top-k KL is below the full KL, and training still lowers it
    run(tiny_llama4_dir, "layers:2", tmp_path / "top", small_text, alpha=1.0, evaluate=False, teacher_cache=tmp_path / "c2", cache_topk=64, cache_samples=0)
    top_curve = [e["kd"] for e in json.loads((tmp_path / "top" / "loss_curve.json").read_text())]
    assert top_curve[0] < 0.5 * live_curve[0]
    assert live.training.steps == len(top_curve) == 4
    # draws from the rest of the distribution (the default cache) estimate the full KL without that bias
    # (step 1: the same student; later steps follow a noisier gradient)
    run(tiny_llama4_dir, "layers:2", tmp_path / "drawn", small_text, alpha=1.0, evaluate=False, teacher_cache=tmp_path / "c3")
    drawn_curve = [e["kd"] for e in json.loads((tmp_path / "drawn" / "loss_curve.json").read_text())]
    assert drawn_curve[0] == pytest.approx(live_curve[0], rel=0.25)


def test_text_shorter_than_one_batch_is_refused(tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    with pytest.raises(SqueezeError, match="fewer than one batch"):
        run(tiny_llama4_dir, "layers:2", tmp_path / "o", small_text, batch_size=100_000)
    assert list(tmp_path.iterdir()) == []


def test_gradient_accumulation_equals_the_larger_batch(tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    run(tiny_llama4_dir, "layers:2", tmp_path / "big", small_text, batch_size=4, evaluate=False)
    run(tiny_llama4_dir, "layers:2", tmp_path / "acc", small_text, batch_size=2, grad_accum=2, evaluate=False)
    big = [e["loss"] for e in json.loads((tmp_path / "big" / "loss_curve.json").read_text())]
    acc = [e["loss"] for e in json.loads((tmp_path / "acc" / "loss_curve.json").read_text())]
    assert acc == pytest.approx(big, rel=1e-5)
    wa, wb = weights(tmp_path / "big"), weights(tmp_path / "acc")
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_trains(tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    report = run(tiny_llama4_dir, "layers:2", tmp_path / "bf16", small_text, precision="bf16", evaluate=False).to_dict()
    assert report["settings"]["precision"] == "bf16 autocast"
    curve = json.loads((tmp_path / "bf16" / "loss_curve.json").read_text())
    assert all(math.isfinite(e["loss"]) for e in curve)
    assert weights(tmp_path / "bf16")["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32  # the student trains and saves in fp32


def test_fsdp_two_processes_resume_after_a_kill_and_match_one(tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    run(tiny_llama4_dir, "layers:2", one, small_text, steps=6, batch_size=4, evaluate=False)
    script = tmp_path / "die.py"
    script.write_text(_DIE_MID_CHECKPOINT)
    out = tmp_path / "fsdp"
    args = cli_args(tiny_llama4_dir, out, small_text, "--fsdp", "--checkpoint-every", "2")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIE_AT_STEP": "4"}
    killed = subprocess.run([*launch, str(script), *args], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0 and not out.exists()
    assert (tmp_path / "fsdp.checkpoints" / "step-0000002").is_dir()
    resumed = subprocess.run([*launch, "-m", "squeeze.cli", *args, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["parallelism"] == "FSDP (student sharded)" and report["training"]["resumed_from_step"] == 2
    curve_one = [e["loss"] for e in json.loads((one / "loss_curve.json").read_text())]
    curve_fsdp = [e["loss"] for e in json.loads((out / "loss_curve.json").read_text())]
    assert curve_fsdp == pytest.approx(curve_one, rel=1e-5)
    wa, wb = weights(one), weights(out)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-6)


def test_fsdp_needs_several_processes(tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    with pytest.raises(SqueezeError, match="torchrun"):
        run(tiny_llama4_dir, "layers:2", tmp_path / "o", small_text, fsdp=True)
    assert not (tmp_path / "o").exists()


def test_a_shared_checkpoint_folder_keeps_its_other_files(tiny_llama4_dir: Path, small_text: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep")
    run(tiny_llama4_dir, "layers:2", tmp_path / "a", small_text, evaluate=False, checkpoint_every=2, checkpoint_dir=folder)
    run(tiny_llama4_dir, "layers:2", tmp_path / "b", small_text, evaluate=False, checkpoint_every=2, checkpoint_dir=folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]  # checkpoints removed when done, the rest untouched

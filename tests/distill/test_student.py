"""Student specs, derived students, pruning masks, optimizer groups and the schedule."""

import math

import pytest
import torch
import transformers
from torch import nn

from squeeze.distill.config import DistillConfig, parse_layer_map
from squeeze.distill.student import (
    StudentSpec,
    check_same_vocabulary,
    derive_student,
    keep_blocks,
    parameter_groups,
    parse_student,
    pruning_masks,
    resolve_layers,
)
from squeeze.errors import SqueezeError
from squeeze.models import load_model, resolve_model


def test_layer_specs() -> None:
    assert parse_student("layers:15") == StudentSpec("layers", count=15)
    assert parse_student("layers:0,2,5").layers == (0, 2, 5)
    assert parse_student("width:0.5") == StudentSpec("width", width=0.5)
    assert parse_student("some/dir").kind == "model"
    assert parse_student("depth:0.5") == StudentSpec("layers", share=0.5)
    for bad in ("layers:0", "layers:x", "layers:3,1", "layers:2,2", "width:0", "width:1.5", "width:abc", "depth:0", "depth:2", "depth:x"):
        with pytest.raises(SqueezeError):
            parse_student(bad)


def test_layers_are_evenly_spaced_from_first_to_last() -> None:
    assert resolve_layers(parse_student("layers:15"), 30).layers == tuple(round(i * 29 / 14) for i in range(15))
    assert resolve_layers(parse_student("layers:3"), 6).layers == (0, 2, 5)
    assert resolve_layers(parse_student("layers:2"), 2).layers == (0, 1)
    assert resolve_layers(parse_student("layers:1"), 6).layers == (5,)
    with pytest.raises(SqueezeError, match="more blocks than the teacher has"):
        resolve_layers(parse_student("layers:7"), 6)
    with pytest.raises(SqueezeError, match="0..5"):
        resolve_layers(parse_student("layers:1,6"), 6)
    # depth:F is layers:round(F x depth), at least one block
    assert resolve_layers(parse_student("depth:0.5"), 30) == resolve_layers(parse_student("layers:15"), 30)
    assert resolve_layers(parse_student("depth:0.01"), 6).layers == (5,)
    assert resolve_layers(parse_student("depth:1"), 4).layers == (0, 1, 2, 3)


def test_kept_blocks_carry_the_teachers_weights(tiny_llama4_dir) -> None:
    teacher = load_model(str(tiny_llama4_dir)).model
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    whole = keep_blocks(teacher, (0, 1, 2, 3))
    torch.testing.assert_close(whole(input_ids=ids).logits, teacher(input_ids=ids).logits, rtol=0, atol=0)
    student = keep_blocks(teacher, (0, 3))
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert [b.self_attn.layer_idx for b in student.model.layers] == [0, 1]
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    assert student.model.layers[1].mlp.up_proj.weight.data_ptr() != teacher.model.layers[3].mlp.up_proj.weight.data_ptr()
    assert student.lm_head.weight is student.model.embed_tokens.weight  # still tied, to its own copy
    # generation with a KV cache uses the renumbered layers
    out = student.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 15)


def test_narrow_student_is_random_and_smaller(tiny_llama4_dir) -> None:
    teacher = load_model(str(tiny_llama4_dir)).model
    student = derive_student(teacher, parse_student("width:0.5"), seed=0)
    again = derive_student(teacher, parse_student("width:0.5"), seed=0)
    cfg = student.config
    assert cfg.hidden_size == 32 and cfg.intermediate_size == 64 and cfg.num_attention_heads == 2
    assert cfg.hidden_size // cfg.num_attention_heads == 16  # head dimension kept
    assert cfg.vocab_size == teacher.config.vocab_size
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, again.model.layers[0].mlp.up_proj.weight)  # seeded


def test_pruning_masks_leave_a_tied_head_alone(tiny_llama4_dir) -> None:
    net = load_model(resolve_model(str(tiny_llama4_dir))).model
    assert net.lm_head.weight is net.model.embed_tokens.weight
    with torch.no_grad():
        net.model.embed_tokens.weight[:, ::8] = 0  # 12.5% exact zeros in the shared matrix
        net.model.layers[0].mlp.up_proj.weight[:, ::2] = 0
    assert set(pruning_masks(net)) == {"model.layers.0.mlp.up_proj.weight"}


def test_pruning_masks_find_pruned_layers_only() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        net[0].weight[:, :4] = 0
    masks = pruning_masks(net)
    assert list(masks) == ["0.weight"]
    assert int((~masks["0.weight"]).sum()) == 32


def test_weight_decay_only_on_linear_matrices(tiny_llama4_dir) -> None:
    model = load_model(str(tiny_llama4_dir)).model.requires_grad_(True)
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    assert id(model.model.layers[0].mlp.up_proj.weight) in decayed
    assert id(model.model.embed_tokens.weight) not in decayed  # = the tied lm_head
    assert id(model.model.norm.weight) not in decayed
    total = {id(p) for p in model.parameters()}
    assert decayed | {id(p) for p in no_decay["params"]} == total  # every parameter exactly once
    assert len(decay["params"]) + len(no_decay["params"]) == len(total)


def test_vocabulary_mismatch_is_refused(minilm_tokenizer, tmp_path) -> None:
    class Cfg:
        def __init__(self, v):
            self.vocab_size = v

    check_same_vocabulary(minilm_tokenizer, minilm_tokenizer, Cfg(30522), Cfg(30522))
    with pytest.raises(SqueezeError, match="different vocabularies"):
        check_same_vocabulary(minilm_tokenizer, minilm_tokenizer, Cfg(30522), Cfg(32000))
    # same size, two tokens swapped: the ids no longer mean the same words
    vocab = sorted(minilm_tokenizer.get_vocab(), key=minilm_tokenizer.get_vocab().get)
    vocab[2000], vocab[2001] = vocab[2001], vocab[2000]
    file = tmp_path / "vocab.txt"
    file.write_text("\n".join(vocab) + "\n")
    swapped = transformers.BertTokenizerFast(vocab_file=str(file))
    with pytest.raises(SqueezeError, match="different ids"):
        check_same_vocabulary(minilm_tokenizer, swapped, Cfg(30522), Cfg(30522))


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    config = DistillConfig(steps=100, lr=1e-3, warmup=0.1, min_lr_ratio=0.1)
    assert config.warmup_steps == 10
    lrs = [config.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[10] == pytest.approx(1e-3)
    assert config.lr_at(100) == pytest.approx(1e-4)  # the cosine ends at min_lr_ratio · lr
    mid = 10 + 45
    assert lrs[mid] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_trajectory_ignores_bookkeeping() -> None:
    a = DistillConfig(checkpoint_every=5, eval_every=3)
    b = DistillConfig(checkpoint_every=50, keep_checkpoints=4)
    assert a.trajectory() == b.trajectory()
    assert DistillConfig(lr=2e-4).trajectory() != a.trajectory()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(temperature=0), "temperature"),
        (dict(alpha=1.5), "alpha"),
        (dict(steps=0), "steps"),
        (dict(warmup=1.0), "warmup"),
        (dict(hidden_loss="l1"), "unknown hidden_loss 'l1'"),
        (dict(layer_map=((0, 1),)), "set hidden_loss cosine or mse"),  # the keyword, as Python names it
        (dict(precision="fp8"), "precision"),
    ],
)
def test_bad_config(options: dict, message: str) -> None:
    with pytest.raises(SqueezeError, match=message):
        DistillConfig(**options)


def test_layer_map_parsing() -> None:
    assert parse_layer_map("0:1, 1:3") == ((0, 1), (1, 3))
    for bad in ("", "0-1", "a:b", "1:"):
        with pytest.raises(SqueezeError):
            parse_layer_map(bad)

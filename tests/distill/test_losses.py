"""The losses against their definitions, and the fused loss against autograd of the plain one."""

import math

import pytest
import torch
import torch.nn.functional as F

from squeeze.distill.losses import fused_lm_loss, hidden_loss, kd_loss, kd_loss_cached, next_token_ce, top_k_logprobs


def _logits(*shape, seed=0, scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_kd_loss_is_tau_squared_kl_of_softened_distributions() -> None:
    student, teacher = _logits(5, 11), _logits(5, 11, seed=1)
    tau = 2.5
    p = torch.softmax(teacher / tau, -1)
    q = torch.softmax(student / tau, -1)
    expected = tau**2 * (p * (p.log() - q.log())).sum(-1).mean()
    assert float(kd_loss(student, teacher, tau)) == pytest.approx(float(expected), rel=1e-6)
    assert float(kd_loss(teacher, teacher, tau)) == pytest.approx(0.0, abs=1e-6)


def test_tau_squared_keeps_the_gradient_scale_at_high_temperature() -> None:
    # for large τ, τ²·KL → (1/2V)·Σ(z_s − z_t)² up to the per-row mean: its gradient does not vanish like 1/τ²
    student = _logits(3, 7).requires_grad_(True)
    teacher = _logits(3, 7, seed=1)
    norms = []
    for tau in (10.0, 100.0):
        (grad,) = torch.autograd.grad(kd_loss(student, teacher, tau), student)
        norms.append(float(grad.norm()))
    assert norms[1] == pytest.approx(norms[0], rel=0.15)  # without τ² it would shrink 100-fold


def _top_k(teacher: torch.Tensor, k: int, tau: float = 2.0):
    return torch.log_softmax(teacher / tau, -1).topk(k, dim=-1)


def test_top_k_kd_with_the_whole_vocabulary_equals_full_kd() -> None:
    student, teacher = _logits(2, 6, 9), _logits(2, 6, 9, seed=1)
    logprobs, indices = _top_k(teacher, 9)
    assert float(kd_loss_cached(student, logprobs, indices, 2.0)) == pytest.approx(float(kd_loss(student, teacher, 2.0)), rel=1e-6)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_kd_is_the_kl_of_k_tokens_plus_the_rest(k: int) -> None:
    student, teacher = _logits(4, 20), _logits(4, 20, seed=1)
    logprobs, indices = _top_k(teacher, k)
    p = torch.softmax(teacher / 2.0, -1)
    q = torch.softmax(student / 2.0, -1)
    kept = torch.zeros_like(p, dtype=torch.bool).scatter(-1, indices, True)
    # the k + 1 outcomes: each kept token, and "any other token"
    p_coarse = torch.cat([p.gather(-1, indices), (p * ~kept).sum(-1, keepdim=True)], -1)
    q_coarse = torch.cat([q.gather(-1, indices), (q * ~kept).sum(-1, keepdim=True)], -1)
    expected = 4.0 * (p_coarse * (p_coarse.log() - q_coarse.log())).sum(-1).mean()
    value = float(kd_loss_cached(student, logprobs, indices, 2.0))
    assert value == pytest.approx(float(expected), rel=1e-5)
    assert value <= float(kd_loss(student, teacher, 2.0)) + 1e-6  # merging outcomes never increases a KL


def test_next_token_ce_predicts_the_following_token() -> None:
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    logits = torch.full((1, 4, 6), -30.0, dtype=torch.float64)
    logits[0, torch.arange(4), ids[0, 1:]] = 30.0  # a model that always knows the next token
    assert float(next_token_ce(logits, ids)) < 1e-12
    assert float(next_token_ce(torch.zeros(1, 4, 6), ids)) == pytest.approx(math.log(6))


def test_sampled_tail_gives_an_unbiased_kl_and_gradient() -> None:
    # a flat teacher (most of its mass off the head) is where a top-k cache alone falls short
    student = _logits(3, 40, scale=1.0).requires_grad_(True)
    teacher = _logits(3, 40, seed=1, scale=1.0)
    full = kd_loss(student, teacher, 2.0)
    (full_grad,) = torch.autograd.grad(full, student)
    generator = torch.Generator().manual_seed(0)
    values, grads = [], []
    for _ in range(3000):
        logprobs, indices = top_k_logprobs(teacher, 4, 2.0, samples=8, generator=generator)
        loss = kd_loss_cached(student, logprobs, indices, 2.0, sampled=8)
        values.append(float(loss.detach()))
        grads.append(torch.autograd.grad(loss, student)[0])
    mean_grad = torch.stack(grads).mean(0)
    assert sum(values) / len(values) == pytest.approx(float(full.detach()), rel=0.05)
    assert float((mean_grad - full_grad).norm() / full_grad.norm()) < 0.08  # Monte Carlo noise ~0.04 here
    # the head alone, with the rest as one outcome, falls well short here: a strict lower bound
    head, head_ids = _top_k(teacher, 4)
    assert float(kd_loss_cached(student, head, head_ids, 2.0).detach()) < 0.8 * float(full.detach())


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("topk", [False, True, "sampled"])
def test_fused_loss_equals_autograd_of_the_plain_loss(alpha: float, topk) -> None:
    # 2 x 45 positions: several chunks and a ragged last one
    student = _logits(2, 45, 50).requires_grad_(True)
    teacher = _logits(2, 45, 50, seed=1)
    ids = torch.randint(0, 50, (2, 46), generator=torch.Generator().manual_seed(2))
    sampled = 5 if topk == "sampled" else 0
    logprobs, indices = top_k_logprobs(teacher, 7, 2.0, samples=sampled, generator=torch.Generator().manual_seed(3))
    logprobs = logprobs.double()
    kd = kd_loss_cached(student, logprobs, indices, 2.0, sampled) if topk else kd_loss(student, teacher, 2.0)
    plain = alpha * kd + (1 - alpha) * next_token_ce(student, ids)
    (plain_grad,) = torch.autograd.grad(plain, student)
    teacher_kw = dict(teacher_logprobs=logprobs, teacher_indices=indices, teacher_sampled=sampled) if topk else dict(teacher_logits=teacher)
    fused, terms = fused_lm_loss(student, ids[:, 1:], 2.0, alpha, **teacher_kw)
    (fused_grad,) = torch.autograd.grad(fused * 3.0, student)  # an upstream factor flows through
    assert float(fused.detach()) == pytest.approx(float(plain.detach()), rel=1e-5)
    torch.testing.assert_close(fused_grad, 3.0 * plain_grad, rtol=1e-5, atol=1e-9)
    assert set(terms) == ({"kd"} if alpha > 0 else set()) | ({"ce"} if alpha < 1 else set())


def test_hidden_losses() -> None:
    a, b = _logits(3, 8), _logits(3, 8, seed=1)
    assert float(hidden_loss(a, a, "cosine")) == pytest.approx(0.0, abs=1e-7)
    assert float(hidden_loss(a, 2 * a, "cosine")) == pytest.approx(0.0, abs=1e-7)  # scale-free
    assert float(hidden_loss(a, -a, "cosine")) == pytest.approx(2.0)
    assert float(hidden_loss(a, b, "mse")) == pytest.approx(float(F.mse_loss(a, b)))


def test_top_k_logprobs_layout() -> None:
    logits = _logits(2, 3, 10)
    values, indices = top_k_logprobs(logits, 4, 2.0)
    assert values.dtype == torch.float16 and indices.dtype == torch.int32 and values.shape == (2, 3, 4)
    assert torch.equal(indices.long(), logits.topk(4, dim=-1).indices)
    with_draws, draw_ids = top_k_logprobs(logits, 4, 2.0, samples=6, generator=torch.Generator().manual_seed(0))
    assert with_draws.shape == (2, 3, 10) and torch.equal(draw_ids[..., :4], indices)
    head = set()
    for row, ids in zip(indices.flatten(0, 1).tolist(), draw_ids[..., 4:].flatten(0, 1).tolist()):
        head.update(set(row) & set(ids))
    assert head == set()  # draws come from off the head only
    full = torch.log_softmax(logits / 2.0, -1).topk(4, dim=-1).values
    torch.testing.assert_close(values.double(), full, rtol=1e-3, atol=1e-3)

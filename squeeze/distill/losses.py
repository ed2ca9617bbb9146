"""Distillation losses over plain tensors: temperature KD (full or top-k cached teacher logits),
next-token cross-entropy, hidden-state and embedding losses.

Every loss is a mean over token positions (rows of the flattened [tokens, ...] tensors), so two
processes that each average over half the tokens and then average their gradients get exactly the
gradient of one process averaging over all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

HIDDEN_LOSSES = ("cosine", "mse")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ)), mean over positions; logits are [..., vocab].

    The τ² factor keeps the gradient's scale independent of τ (Hinton et al., 2015), so α weighs
    KD against cross-entropy the same way at every temperature.
    """
    s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
    return temperature**2 * F.kl_div(s, t, log_target=True, reduction="batchmean")


def kd_loss_cached(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor, temperature: float, sampled: int = 0
) -> torch.Tensor:
    """:func:`kd_loss` against a teacher known by a few tokens per position (the teacher cache).

    ``teacher_logprobs`` [..., m] are log softmax(z_t/τ) over the whole vocabulary at the ids
    ``teacher_indices``. The first m − ``sampled`` are the teacher's most likely tokens (the head).

    - ``sampled == 0``: the rest of the vocabulary is one more outcome, "none of the head", with the
      teacher's remaining mass and the student's mass outside the same ids. The KL of these
      outcomes never exceeds the full KL (merging outcomes cannot increase a divergence) and equals
      it when the head holds all the teacher's mass.
    - ``sampled > 0``: the last ``sampled`` entries are draws from the teacher's distribution off
      the head, each standing for 1/``sampled`` of the remaining mass. The KL estimate and its
      gradient are then unbiased: their expectation over the draws is the full KL and its gradient.
    """
    weights, log_p, index = _sparse_teacher(teacher_logprobs, teacher_indices, sampled)
    s = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, dim=-1)
    kl = (weights * (log_p - s.gather(-1, index))).sum(-1)
    if not sampled:
        kl = kl + _rest_term(s, index, weights)[0]
    return temperature**2 * kl.mean()


def _sparse_teacher(logprobs: torch.Tensor, indices: torch.Tensor, sampled: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flattened (weights, log-probabilities, ids) of a cached teacher: a head token weighs its own
    probability, a tail draw 1/``sampled`` of the mass the head leaves."""
    log_p = logprobs.float().flatten(0, -2)
    index = indices.flatten(0, -2).long()
    weights = log_p.exp()
    if sampled:
        head = weights[:, : weights.shape[1] - sampled]
        rest = (1 - head.sum(-1, keepdim=True)).clamp_min(0)
        weights = torch.cat([head, (rest / sampled).expand(-1, sampled)], dim=-1)
    return weights, log_p, index


def _rest_term(log_q: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "none of the head" outcome: its KL term per position, the student's log-probabilities off
    the head (−inf on it) and the factor p_rest / q_rest that spreads the teacher's remaining mass
    over the student's tail."""
    p_rest = (1 - weights.sum(-1)).clamp_min(0)
    outside = log_q.scatter(-1, index, float("-inf"))
    log_q_rest = torch.logsumexp(outside, dim=-1)
    has_rest = (p_rest > 0) & torch.isfinite(log_q_rest)  # a head of the whole vocabulary leaves only rounding
    log_ratio = p_rest.clamp_min(1e-30).log() - log_q_rest
    term = torch.where(has_rest, p_rest * log_ratio, torch.zeros_like(p_rest))
    return term, outside, torch.where(has_rest, log_ratio.exp(), torch.zeros_like(p_rest))


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of position i predicting token i+1, mean over the predicted tokens.
    ``logits`` [batch, L, vocab] already cut to the first L−1 positions, ``input_ids`` [batch, L+1]."""
    return F.cross_entropy(logits.float().flatten(0, 1), input_ids[:, 1:].flatten())


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """1 − cosine (per position, then mean) or mean squared error, of two [..., hidden] tensors."""
    student, teacher = student.float(), teacher.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(student, teacher)
    raise ValueError(f"unknown hidden loss {kind!r}")


def top_k_logprobs(
    logits: torch.Tensor, k: int, temperature: float, samples: int = 0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens per position under softmax(logits/τ), then ``samples`` draws (with
    replacement) from the distribution off those k: their log-probabilities (float16) and ids
    (int32), [..., k + samples]. See :func:`kd_loss_cached` for how they are used."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    values, indices = log_p.topk(k, dim=-1)
    if samples and k < log_p.shape[-1]:
        flat = log_p.flatten(0, -2)
        tail = flat.exp().scatter_(-1, indices.flatten(0, -2), 0.0)
        # a head holding all the mass leaves nothing to draw: any draw then weighs 0
        tail += (tail.sum(-1, keepdim=True) == 0).to(tail.dtype)
        draws = torch.multinomial(tail.cpu(), samples, replacement=True, generator=generator).to(flat.device)
        values = torch.cat([values, flat.gather(-1, draws).view(*values.shape[:-1], samples)], dim=-1)
        indices = torch.cat([indices, draws.view(*indices.shape[:-1], samples)], dim=-1)
    return values.to(torch.float16), indices.to(torch.int32)


LOSS_CHUNK = 16  # positions per vocabulary-wide temporary in the fused loss: small enough to stay in cache


class _GivenGradient(torch.autograd.Function):
    """A loss whose gradient with respect to ``logits`` was already computed."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype), None, None


def fused_lm_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor | None,
    temperature: float,
    alpha: float,
    teacher_logits: torch.Tensor | None = None,
    teacher_logprobs: torch.Tensor | None = None,
    teacher_indices: torch.Tensor | None = None,
    teacher_sampled: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``α · kd + (1 − α) · ce`` with the values of :func:`kd_loss` (or :func:`kd_loss_cached`) and
    cross-entropy, computed a few hundred positions at a time with the gradient in closed form.

    The autograd version of the same loss keeps several vocabulary-wide float32 copies of every
    position alive (two log-softmaxes, their exponentials, the KL terms); here the only
    vocabulary-wide tensor that outlives a chunk is the gradient itself. Closed forms, per position,
    with q = softmax(z/τ), p the teacher's softmax(z_t/τ) and N positions:
    ∂(τ² KL(p‖q))/∂z = τ (q − p) / N and ∂CE/∂z = (softmax(z) − onehot(target)) / N. For a cached
    teacher (see :func:`kd_loss_cached`) p is the sparse target: the head tokens' probabilities, plus
    either the tail draws' weights or, without draws, the student's own tail scaled to the
    teacher's remaining mass.
    ``targets`` [..] (needed when α < 1), logits [.., vocab].
    Returns the loss (a tensor that backpropagates) and its terms as floats.
    """
    logits = student_logits.flatten(0, -2)
    n, vocab = logits.shape
    flat_targets = targets.flatten() if targets is not None else None
    teacher_flat = teacher_logits.flatten(0, -2) if teacher_logits is not None else None
    logprobs_flat = teacher_logprobs.flatten(0, -2) if teacher_logprobs is not None else None
    indices_flat = teacher_indices.flatten(0, -2) if teacher_indices is not None else None
    grad = torch.empty_like(logits)
    # the sums stay on the device (float64 where it has it, as Python floats were): no sync per chunk
    total = torch.float64 if logits.device.type != "mps" else torch.float32
    kd_sum = torch.zeros((), dtype=total, device=logits.device)
    ce_sum = torch.zeros((), dtype=total, device=logits.device)
    with torch.no_grad():
        for start in range(0, n, LOSS_CHUNK):
            span = slice(start, start + LOSS_CHUNK)
            z = logits[span].float()
            chunk_grad = torch.zeros_like(z)
            if alpha < 1:
                assert flat_targets is not None
                target = flat_targets[span]
                log_probs = F.log_softmax(z, dim=-1)
                ce_sum += (-log_probs.gather(-1, target[:, None]).sum()).to(total)
                ce_grad = log_probs.exp_()
                ce_grad.scatter_add_(-1, target[:, None], torch.full_like(target[:, None], -1, dtype=ce_grad.dtype))
                chunk_grad.add_(ce_grad, alpha=1 - alpha)
                del log_probs, ce_grad
            if alpha > 0:
                log_q = F.log_softmax(z / temperature, dim=-1)
                if teacher_flat is not None:
                    log_p = F.log_softmax(teacher_flat[span].float() / temperature, dim=-1)
                    p = log_p.exp()
                    kd_sum += (p * (log_p - log_q)).sum().to(total)
                    kd_grad = log_q.exp_().sub_(p)
                else:
                    assert logprobs_flat is not None and indices_flat is not None
                    weights, log_p, index = _sparse_teacher(logprobs_flat[span], indices_flat[span], teacher_sampled)
                    kd_sum += (weights * (log_p - log_q.gather(-1, index))).sum().to(total)
                    if teacher_sampled:
                        kd_grad = log_q.exp_()
                    else:
                        rest, outside, scale = _rest_term(log_q, index, weights)
                        kd_sum += rest.sum().to(total)
                        kd_grad = log_q.exp_().sub_(outside.exp_().mul_(scale[:, None]))
                        del outside
                    kd_grad.scatter_add_(-1, index, -weights)
                chunk_grad.add_(kd_grad, alpha=alpha * temperature)
                del log_q, kd_grad
            grad[span] = chunk_grad.div_(n)
    kd = temperature**2 * float(kd_sum) / n
    ce = float(ce_sum) / n
    value = torch.tensor(alpha * kd + (1 - alpha) * ce, dtype=torch.float32, device=logits.device)
    terms = {}
    if alpha > 0:
        terms["kd"] = kd
    if alpha < 1:
        terms["ce"] = ce
    return _GivenGradient.apply(logits, value, grad), terms

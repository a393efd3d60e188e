"""The GRPO objective as small pure functions on tensors (docs/grpo.md has the maths).

Shapes: a rollout is B prompts x G answers = N rows, flattened group by group (rows g*G .. g*G+G-1
are one prompt's answers); per-token tensors are [N, T] over the completion tokens, with `mask`
1 on the tokens an answer really has (up to and including its stop token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.train.logprobs import token_logprobs  # noqa: F401  (grpo.token_logprobs, as before)

ADV_EPS = 1e-4  # (r - mean) / (std + eps)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = ADV_EPS) -> torch.Tensor:
    """(r - mean_g) / (std_g + eps) per group of `group_size` consecutive rewards (std unbiased, as
    DeepSeekMath's GRPO and TRL). A group whose answers all score alike gets exactly 0 (a float
    mean can differ from the rewards by an ulp), so the trainer can tell it carries no signal."""
    groups = rewards.view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)
    alike = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    return torch.where(alike, 0.0, (groups - mean) / (std + eps)).reshape(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimator exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased on pi's samples)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the entries where `mask` is 1 (per row with dim=1); an empty row counts as 0."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


@dataclass
class LossParts:
    loss: torch.Tensor           # scalar, to backpropagate
    kl: torch.Tensor             # mean k3 KL per token (detached)
    clip_fraction: torch.Tensor  # share of tokens whose ratio was clipped where it mattered (detached)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                epsilon: float, beta: float = 0.0, ref_logp: torch.Tensor | None = None) -> LossParts:
    """GRPO loss: per token -min(ratio*A, clip(ratio, 1-eps, 1+eps)*A) + beta*KL, the masked mean over
    each answer's tokens, then the mean over answers (DeepSeekMath eq. 21).

    ratio = exp(logp - old_logp): `old_logp` are the log-probabilities under the policy that sampled
    the answers (equal to `logp` on the first step of a rollout, where the ratio is 1 and only its
    gradient counts). `ref_logp` (needed when beta > 0) are the reference policy's.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * adv
    per_token = -torch.min(unclipped, clipped)
    kl = torch.zeros_like(logp)
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probabilities")
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    elif ref_logp is not None:
        kl = k3_kl(logp, ref_logp)  # logged even when it does not enter the loss
    loss = masked_mean(per_token, mask, dim=1).mean()
    was_clipped = (clipped < unclipped).to(logp.dtype)  # the min picked the clipped term
    return LossParts(loss=loss, kl=masked_mean(kl.detach(), mask), clip_fraction=masked_mean(was_clipped.detach(), mask))


def completion_mask(completions: torch.Tensor, stop_ids: set[int]) -> torch.Tensor:
    """1 up to and including each row's first stop token, 0 after it (generate pads finished rows)."""
    is_stop = torch.zeros_like(completions, dtype=torch.bool)
    for stop in stop_ids:
        is_stop |= completions == stop
    # a token is kept when no stop token came strictly before it
    before = torch.cumsum(is_stop.int(), dim=1) - is_stop.int()
    return (before == 0).long()

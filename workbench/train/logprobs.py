"""Several answers to one prompt, with the prompt (and its images) run once: the forward that GRPO
(G sampled answers) and DPO (the chosen and the rejected answer) share.

The prompts' forward records each layer's post-RoPE keys and values in a `qwen.PromptKV`;
`expand(G)` repeats them and the answers' forward attends to them in front of its own tokens.
Gradients flow back through the repeat into the one prompt forward (and the ViT). Prompts are
left-padded: RoPE depends on position differences only, so a left-padded prompt and its answers
score as the unpadded sequence would (the pads are masked out).
"""

from __future__ import annotations

import torch

from workbench.model.qwen import PromptKV


def answer_hidden(lm: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                  pixel_values: torch.Tensor | None, answers: torch.Tensor, group_size: int) -> torch.Tensor:
    """The last layer's hidden states [N, T, D] that predict each answer token, for N = B * group_size
    answers [N, T] (prompt b's at rows b*G .. b*G+G-1) of B left-padded prompts [B, P] whose images
    are `pixel_values` [K, 3, S, S] (image k for the k-th image span in (row, position) order)."""
    prompts = PromptKV()
    last = lm.transformer(prompt_ids, attention_mask=prompt_mask, pixel_values=pixel_values,
                          prompt_kv=prompts).last_hidden_state[:, -1:]
    hidden = last.repeat_interleave(group_size, 0)  # predicts each answer's first token
    if answers.shape[1] > 1:  # the answers' tokens but the last predict the rest
        mask = torch.cat([prompt_mask.repeat_interleave(group_size, 0), torch.ones_like(answers[:, :-1])], 1)
        rest = lm.transformer(answers[:, :-1], attention_mask=mask, prompt_kv=prompts.expand(group_size))
        hidden = torch.cat([hidden, rest.last_hidden_state], 1)
    return hidden


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) per position, from logits [N, T, V] aligned with targets [N, T]; divided by the
    sampling temperature, so that a ratio compares the distribution answers were drawn from."""
    logits = logits.float() / temperature
    return torch.gather(logits.log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)

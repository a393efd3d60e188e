"""The DPO objective: TRL's own loss code, fed with the workbench's log-probabilities (docs/dpo.md).

TRL's DPOTrainer cannot drive Qwen-VL-Chat (docs/dpo.md says why), but its loss is what users of
TRL know, with every loss type (sigmoid, hinge, IPO, robust, RPO as sigmoid + sft, ...) and its
reward statistics. In trl 1.16 that code is the body of `DPOTrainer._compute_loss`: given a model
that returns per-token log-probabilities of [chosen..., rejected...] completion tokens and the
reference's sequence log-probabilities, it computes the loss and appends its metrics to
`self._metrics`. `trl_loss` runs exactly that function with `self` a small stand-in that holds
the settings and a `model` that hands back the log-probabilities the workbench computed with the
prompt run once for both answers (`pair_logprobs`). Nothing of TRL's is copied, so its loss types
come as they are; tests/train/test_dpo.py checks them against hand computations, so a TRL change
that broke the stand-in would fail there.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from workbench.train.logprobs import answer_hidden, token_logprobs

# the metrics TRL logs, under the names it gives them
LOGGED = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
          "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy")


@dataclass
class PairLogprobs:
    """Per answer token, rows [chosen_0 .. chosen_B-1, rejected_0 .. rejected_B-1] (TRL's order), [2B, T]."""

    logp: torch.Tensor            # log p(token), 0 where mask is 0 (with grad for the policy)
    mask: torch.Tensor            # 1 on the answers' own tokens
    entropy: torch.Tensor         # of the predicted distribution (detached, for the logs)
    mean_logits: torch.Tensor     # mean over the vocabulary (detached)
    is_top1: torch.Tensor         # whether the token was the most likely one (bool)

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence log-probabilities (chosen [B], rejected [B])."""
        return self.logp.sum(1).chunk(2)


def pair_logprobs(lm: torch.nn.Module, batch: dict[str, torch.Tensor]) -> PairLogprobs:
    """The chosen and rejected answers' token log-probabilities under `lm` (a QWenLMHeadModel), each
    prompt and its images run once for its two answers (logprobs.answer_hidden)."""
    answers, mask = batch["answers"], batch["answer_mask"]
    hidden = answer_hidden(lm, batch["prompt_ids"], batch["prompt_mask"], batch.get("pixel_values"), answers, 2)
    logits = lm.lm_head(hidden).float()
    order = torch.cat([torch.arange(0, len(answers), 2), torch.arange(1, len(answers), 2)]).to(answers.device)
    logits, answers, mask = logits[order], answers[order], mask[order]
    logp = token_logprobs(logits, answers) * mask
    with torch.no_grad():
        probs = logits.softmax(-1)
        entropy = -(probs * logits.log_softmax(-1)).sum(-1)
        is_top1 = logits.argmax(-1) == answers
    return PairLogprobs(logp, mask, entropy, logits.detach().mean(-1), is_top1)


class _OneProcess:
    """accelerate's gathers for one process (DPO runs in one, as GRPO: the forward bypasses the wrapper)."""

    def __init__(self, device: torch.device):
        self.device = device

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    gather_for_metrics = gather


def trl_loss(policy: PairLogprobs, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, beta: float,
             loss: dict[str, float], label_smoothing: float = 0.0, training: bool = True
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL's DPO loss (trl.DPOTrainer._compute_loss) and its metrics for one micro-batch.

    `loss` maps TRL loss types to weights (summed); `ref_*` are the reference's sequence
    log-probabilities [B] (computed without grad). Returns (loss, {metric: value}).
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    mode = "train" if training else "eval"
    n, t = policy.logp.shape
    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=training), accelerator=_OneProcess(policy.logp.device),
        aux_loss_enabled=False, ld_alpha=None, f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0,
        loss_types=list(loss), loss_weights=[float(w) for w in loss.values()], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, precompute_ref_logps=True,
        args=SimpleNamespace(discopop_tau=0.05), _metrics={mode: defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1, ref_model=None)
    outputs = SimpleNamespace(log_probs=policy.logp, entropy=policy.entropy, mean_logits=policy.mean_logits,
                              is_top1=policy.is_top1)
    # TRL's sequences are prompt + completion with a completion mask; column 0 stands for the prompt,
    # so that the mask shifted by one (the positions that predict a token) is the answers' own mask.
    completion = torch.cat([torch.zeros(n, 1, dtype=policy.mask.dtype, device=policy.mask.device), policy.mask], 1)
    inputs = {"input_ids": torch.zeros(n, t + 1, dtype=torch.long, device=completion.device),
              "attention_mask": completion, "completion_mask": completion,
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    value = DPOTrainer._compute_loss(stand_in, lambda **_: outputs, inputs, return_outputs=False)
    metrics = {k: sum(v) / len(v) for k, v in stand_in._metrics[mode].items() if k in LOGGED and v}
    return value, metrics


def reference_logprobs(model: Any, lm: torch.nn.Module, batch: dict[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference policy's sequence log-probabilities (chosen [B], rejected [B]): the same model
    with its adapters disabled (the base; no second copy of the weights), in eval mode, without grad."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            return pair_logprobs(lm, batch).sums()
    finally:
        model.train(was_training)

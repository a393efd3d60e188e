"""`method: grpo`: GRPO on grounding queries, on the same Trainer as SFT (workbench/train/trainer.py).

The Trainer still owns the loop, the optimizer and schedule, checkpoints, resume, trackers, the run
folder and the evaluation inside training (greedy Acc@0.5); only what one step computes changes.
A micro-batch is a list of grounding queries (the data files' `<ref>` + box turns, as
`workbench eval grounding` reads them). Its step:

1. rollout (no grad, eval mode): each prompt (prompt/ make_context through eval/grounding.py's
   `prompt_ids`, the image as pixel_values), left-padded, runs once into a KV cache that is
   repeated G times; one batched `generate` samples all answers from it (generate_groups); answers
   end at the first ChatML stop token.
2. rewards (rewards.py, on parse.py's boxes) -> group-normalised advantages (grpo.py). With
   beta = 0, prompts whose answers all scored alike leave the rollout (informative_groups).
3. log-probabilities of the answers' tokens (the prompts run once, their keys and values shared by
   the G answers: qwen.PromptKV): the policy (with grad) and the reference (the same model
   under `disable_adapter()`: the base, no second copy). The sampling policy's are the policy's
   own on the rollout's first step (the weights have not moved yet), kept with the rollout for
   the `grpo.iterations` - 1 further optimizer steps that reuse it.
4. grpo.policy_loss. Reward mean/std, KL, clip fraction and completion length are logged with the
   loss (trackers, metrics.jsonl, loss_curve.png).

QLoRA: rollouts run the 4-bit model in eval mode without grad, the pattern that on a CPU with
AVX512-BF16 makes bitsandbytes repack Linear4bit weights for an inference kernel without a
backward; adapters/quantize.py turns that path off for every layer it quantises, and this trainer
only ever uses the model apply_recipe built.

Why not TRL's GRPOTrainer: docs/grpo.md.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import DynamicCache

from workbench.model.modeling import CACHE_KWARG
from workbench.train import grpo
from workbench.train.logprobs import answer_hidden
from workbench.train.rewards import weighted_rewards
from workbench.train.workbench_trainer import WorkbenchTrainer

# logged once per logging step (the mean over the micro-batches since the last log)
LOGGED = ("reward", "reward_std", "kl", "clip_fraction", "completion_length")


def load_grpo_queries(config: Any) -> list:
    """The training queries: every `<ref>` an assistant turn answers with boxes in data.train."""
    from workbench.eval.grounding import load_queries

    return [q for f in config.data.train
            for q in load_queries(f, config.data.image_root, config.data.allow_outside_root)]


@dataclass(frozen=True)
class QueryCollator:
    """A micro-batch of queries with their images opened and preprocessed here, in the DataLoader's
    workers (as SFT's collator does), so the training step never reads a file."""

    image_size: int

    def __call__(self, batch: list) -> dict[str, Any]:
        from workbench.model.image_processing import load_image, preprocess

        images = [load_image(q.file) for q in batch]
        return {"queries": list(batch), "pixel_values": torch.stack([preprocess(im, self.image_size) for im in images]),
                "sizes": [im.size for im in images]}


def turn_off_dropout(model: torch.nn.Module) -> None:
    """GRPO trains without dropout (LoRA's, the embedding's, the attention's): the answers are
    sampled in eval mode, so the policy's train-mode forward must be that same function, or the
    ratio of a reused rollout would compare two dropout masks and the clip would act on noise.
    (RL recipes turn it off for the same reason; eval mode for the policy would also turn off
    gradient checkpointing.)"""
    from workbench.model.qwen import QWenAttention

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(module, QWenAttention):
            module.attn_dropout = 0.0


@dataclass
class Rollout:
    """B prompts with G sampled answers each: N = B*G rows, prompt b's answers at rows b*G .. b*G+G-1."""

    prompt_ids: torch.Tensor      # [B, P] left-padded
    prompt_mask: torch.Tensor     # [B, P]
    pixel_values: torch.Tensor    # [B, 3, S, S] one image per prompt
    completions: torch.Tensor     # [N, T] sampled answers (generate pads finished rows)
    mask: torch.Tensor            # [N, T] the answers' own tokens
    advantages: torch.Tensor      # [N]
    old_logp: torch.Tensor | None  # [N, T] under the sampling policy: set by the rollout's first step
    ref_logp: torch.Tensor | None  # [N, T] under the base (adapters disabled)
    stats: dict[str, float]
    loss_scale: float = 1.0       # answers kept / answers sampled (informative_groups)


def informative_groups(rollout: Rollout, group_size: int) -> Rollout:
    """The rollout without the prompts whose G answers all scored alike. Their advantages are 0, so
    with beta = 0 their tokens add exactly nothing to the loss or its gradient, and the forward and
    backward can skip them (DAPO filters such groups too); `loss_scale` keeps the loss the mean over
    all sampled answers. One group stays when none is informative, so a step always has a graph."""
    keep = rollout.advantages.view(-1, group_size).ne(0).any(1)
    if not keep.any():
        keep[0] = True
    if keep.all():
        return rollout
    rows = keep.repeat_interleave(group_size)
    return replace(rollout, prompt_ids=rollout.prompt_ids[keep], prompt_mask=rollout.prompt_mask[keep],
                   pixel_values=rollout.pixel_values[keep], completions=rollout.completions[rows],
                   mask=rollout.mask[rows], advantages=rollout.advantages[rows],
                   loss_scale=rollout.loss_scale * keep.float().mean().item())


class GRPOTrainer(WorkbenchTrainer):
    """WorkbenchTrainer whose step is a GRPO step on a rollout (see the module docstring)."""

    def __init__(self, *args: Any, tokenizer: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.spec = self.run_config.grpo
        self.tokenizer = tokenizer
        self.model_accepts_loss_kwargs = False  # the loss is a mean over answers, not label tokens
        self._rollouts: dict[int, Rollout] = {}
        self._micro = 0
        self._stats: dict[str, list[float]] = defaultdict(list)
        self._shuffle_rng = random.Random(self.run_config.train.seed)
        turn_off_dropout(self.model)

    # ---- the step --------------------------------------------------------------------------------

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        slot = self._micro % self.args.gradient_accumulation_steps
        self._micro += 1
        rollout = self._rollouts.get(slot)
        if rollout is None or self.state.global_step % self.spec.iterations == 0:
            rollout = self._rollouts[slot] = self.rollout(model, inputs["queries"], inputs["pixel_values"],
                                                          inputs["sizes"])
        logp = self.answer_logprobs(model, rollout)
        if rollout.old_logp is None:  # the rollout's first step: the weights are still the sampling policy's
            rollout.old_logp = logp.detach()
        parts = grpo.policy_loss(logp, rollout.old_logp, rollout.advantages, rollout.mask, epsilon=self.spec.epsilon,
                                 beta=self.spec.beta, ref_logp=rollout.ref_logp)
        for key, value in {**rollout.stats, "kl": parts.kl.item(), "clip_fraction": parts.clip_fraction.item()}.items():
            self._stats[key].append(value)
        loss = parts.loss * rollout.loss_scale
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._stats:  # a training log: add the GRPO metrics since the last one
            logs = {**logs, **{k: sum(v) / len(v) for k, v in self._stats.items()}}
            self._stats.clear()
        super().log(logs, start_time)

    # ---- rollout ---------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, model: torch.nn.Module, queries: list, pixel_values: torch.Tensor,
                sizes: list[tuple[int, int]]) -> Rollout:
        from workbench.eval.grounding import prompt_ids
        from workbench.prompt import get_stop_words_ids

        spec, tok, G = self.spec, self.tokenizer, self.spec.num_generations
        if spec.shuffle_images and len(queries) > 1:  # a derangement: no prompt keeps its own image
            shift = self._shuffle_rng.randrange(1, len(queries))
            pixel_values = torch.roll(pixel_values, -shift, 0)  # prompt i sees image i + shift
        prompts = [prompt_ids(tok, q.image, q.phrase, spec.prompt) for q in queries]
        width = max(len(p) for p in prompts)
        device = self.args.device
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        base = self.accelerator.unwrap_model(model)
        pixels = pixel_values.to(device)

        was_training = model.training
        model.eval()
        try:
            out = generate_groups(base, ids, attn, pixels, G, do_sample=True, temperature=spec.temperature,
                                  top_p=spec.top_p, top_k=0, max_new_tokens=spec.max_new_tokens,
                                  eos_token_id=tok.eod_id, pad_token_id=tok.pad_token_id,
                                  stop_words_ids=get_stop_words_ids(tok),
                                  # a sampled <img> would open an image span the log-prob forward refuses
                                  suppress_tokens=[tok.img_start_id, tok.img_end_id, tok.img_pad_id])
        finally:
            model.train(was_training)
        completions = out[:, width:]
        stops = {tok.eod_id, tok.im_end_id, tok.im_start_id}
        mask = grpo.completion_mask(completions, stops)
        answers = [tok.decode([t for t in row[: int(m.sum())] if t not in stops], skip_special_tokens=True,
                              keep_image_special=True).strip() for row, m in zip(completions.tolist(), mask)]
        rep = [q for q in queries for _ in range(G)]
        rewards, parts = weighted_rewards(spec.rewards, answers, rep, [s for s in sizes for _ in range(G)])
        r = torch.tensor(rewards, dtype=torch.float32, device=device)
        rollout = Rollout(prompt_ids=ids, prompt_mask=attn, pixel_values=pixels, completions=completions, mask=mask,
                          advantages=grpo.group_advantages(r, G), old_logp=None, ref_logp=None,
                          stats={"reward": r.mean().item(), "reward_std": r.view(-1, G).std(1).mean().item(),
                                 "completion_length": mask.sum(1).float().mean().item(),
                                 **{f"reward_{k}": sum(v) / len(v) for k, v in parts.items()}})
        if spec.beta == 0:  # without a KL term, a group with no advantage contributes nothing
            rollout = informative_groups(rollout, G)
        model.eval()
        try:
            with base.disable_adapter():
                rollout.ref_logp = self.answer_logprobs(model, rollout)
        finally:
            model.train(was_training)
        return rollout

    def answer_logprobs(self, model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
        lm = self.accelerator.unwrap_model(model).get_base_model()
        return answer_logprobs(lm, rollout, self.spec.num_generations, self.spec.temperature)


@torch.no_grad()
def generate_groups(model: torch.nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor,
                    pixel_values: torch.Tensor, group_size: int, **generate_kwargs: Any) -> torch.Tensor:
    """`generate` of G answers per prompt [B*G, P + T], with each prompt (and its image) run once:
    all but its last token fill a KV cache that is repeated G times, and generate continues from
    it (HF's documented re-use of a prompt cache). Rows as repeat_interleave."""
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :-1], attention_mask=attention_mask[:, :-1], pixel_values=pixel_values,
          past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(group_size)
    return model.generate(input_ids=ids.repeat_interleave(group_size, 0),
                          attention_mask=attention_mask.repeat_interleave(group_size, 0),
                          use_cache=True, **{CACHE_KWARG: cache}, **generate_kwargs)


def answer_logprobs(lm: torch.nn.Module, rollout: Rollout, group_size: int, temperature: float) -> torch.Tensor:
    """log p of each answer token [N, T] under `lm` (a QWenLMHeadModel), each prompt (and its image)
    run once for its G answers (logprobs.answer_hidden). The LM head runs on the answer positions
    only (never the prompt's 256 image slots x the vocabulary)."""
    hidden = answer_hidden(lm, rollout.prompt_ids, rollout.prompt_mask, rollout.pixel_values, rollout.completions,
                           group_size)
    return grpo.token_logprobs(lm.lm_head(hidden), rollout.completions, temperature)

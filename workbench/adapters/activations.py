"""Activation memory of one training step, from a dry run on the meta device.

Autograd keeps what each operation's backward needs; which tensors those are depends on the
recipe (LoRA dropout copies its input, a frozen linear keeps nothing for its weight, a trained
one does) and on the kernels. Rather than a hand formula per case, the pieces of the step are run
on the meta device (shapes and dtypes, no data, milliseconds) under `LiveBytes`, which sees every
tensor the step allocates and when it is freed:

  per LLM block i: S_i  bytes still alive after its forward (what backward needs + its output)
                   X_i  extra bytes alive at the peak of its backward (temporaries, input grads)
  a checkpointed block keeps only its output (B x S x hidden); its backward first recomputes S_i
  the ViT: its forward's transient peak, and what it keeps when it is trained
  the head: ln_f + the loss (the full logits, or one chunk of `loss_chunk_size` rows at a time)

  activations = embeddings + ViT kept + max( ViT forward peak,
                                             sum S + head peak,
                                             max_i [ sum_{j<=i} S_j + X_i (+ S_i if i is checkpointed) ] )

Attention is simulated with the flash kernel's memory (the log-sum-exp, no S x S matrix), which is
what SDPA runs for unpadded or packed batches on the CPU and on a GPU. Every position is assumed
supervised (an upper bound on the chunked loss's selected rows).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from workbench.schema import option


@dataclass(frozen=True)
class StepShape:
    """What one micro-batch looks like, and how the step saves memory."""

    seq_len: int = option(1024, ge=1)
    batch_size: int = option(1, ge=1)
    images_per_sample: int = option(1, ge=0)
    gradient_checkpointing: bool = True
    checkpoint_every: int = option(1, ge=1)  # with checkpointing: blocks 0, k, 2k, ... are checkpointed
    loss_chunk_size: int | None = option(1024, gt=0)

    def checkpointed(self, block: int) -> bool:
        return self.gradient_checkpointing and block % self.checkpoint_every == 0


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created inside the mode that are still alive: now and the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.now = self.peak = 0

    def _freed(self, key: int) -> None:
        self.now -= self.sizes.pop(key)

    def reset_peak(self) -> None:
        self.peak = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: only new storages are allocations.
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self.sizes and key not in inputs:
                    self.sizes[key] = storage.nbytes()
                    self.now += storage.nbytes()
                    weakref.finalize(storage, self._freed, key)
        self.peak = max(self.peak, self.now)
        return out


def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    # The meta device would pick the math kernel (an S x S matrix); the step runs the flash kernel.
    out, _lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    return out


@contextlib.contextmanager
def _flash_attention() -> Iterator[None]:
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


@dataclass
class Measured:
    kept: int  # alive after the forward
    peak_extra: int  # above `kept`, at the peak of the backward (or of the forward, with no backward)
    forward_peak: int = 0


def _measure(fn, inputs: list[torch.Tensor], backward: bool) -> Measured:
    with LiveBytes() as live:
        out = fn(*inputs)
        forward_peak, kept = live.peak, live.now
        if not backward:
            return Measured(kept, forward_peak - kept, forward_peak)
        live.reset_peak()
        out.backward(torch.ones_like(out))
        return Measured(kept, live.peak - kept, forward_peak)


def _meta(*shape: int, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def _trains(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def estimate_activations(model: nn.Module, shape: StepShape) -> dict[str, int]:
    """Peak activation bytes of one micro-batch of `model` (a meta-device QWenLMHeadModel, PEFT-wrapped
    or not, in its training dtype), with the terms it is made of."""
    from workbench.model.qwen import rotary_table

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg, llm = inner.config, inner.transformer
    dtype = llm.wte.weight.dtype
    b, s, h = shape.batch_size, shape.seq_len, cfg.hidden_size
    hidden_bytes = b * s * h * dtype.itemsize
    was_training = model.training
    model.train()
    try:
        with _flash_attention():
            positions = torch.arange(s, device="meta")[None]
            rotary = rotary_table(positions, int(cfg.kv_channels * cfg.rotary_pct), cfg.rotary_emb_base, 1.0)
            blocks = [_measure(lambda x, blk=blk: blk(x, rotary=rotary, attention_mask=None),
                               [_meta(b, s, h, dtype=dtype, grad=True)], backward=True) for blk in llm.h]
            head = _measure_head(inner, shape, dtype)
            vit = _measure_vit(llm.visual, shape, dtype)
    finally:
        model.train(was_training)
    kept = [hidden_bytes if shape.checkpointed(i) else m.kept for i, m in enumerate(blocks)]
    backward_peaks, running = [], 0
    for i, m in enumerate(blocks):
        running += kept[i]
        backward_peaks.append(running + m.peak_extra + (m.kept if shape.checkpointed(i) else 0))
    llm_peak = max(sum(kept) + head.kept + head.peak_extra, max(backward_peaks))
    total = hidden_bytes + vit.kept + max(vit.forward_peak - vit.kept, llm_peak)
    return {"activations": total, "blocks_kept": sum(kept), "block_peak": max(backward_peaks) - sum(kept),
            "head_peak": head.kept + head.peak_extra, "vit_kept": vit.kept, "vit_forward_peak": vit.forward_peak,
            "embeddings": hidden_bytes}


def _measure_head(inner: nn.Module, shape: StepShape, dtype: torch.dtype) -> Measured:
    b, s, h = shape.batch_size, shape.seq_len, inner.config.hidden_size
    ln_f, lm_head = inner.transformer.ln_f, inner.lm_head
    if shape.loss_chunk_size is None:
        labels = torch.zeros(b * (s - 1), dtype=torch.int64, device="meta")

        def full(x: torch.Tensor) -> torch.Tensor:
            logits = lm_head(ln_f(x))
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels)

        return _measure(full, [_meta(b, s, h, dtype=dtype, grad=True)], backward=True)
    rows = b * (s - 1)
    chunk = min(shape.loss_chunk_size, rows)
    y = torch.zeros(chunk, dtype=torch.int64, device="meta")

    def selected(x: torch.Tensor) -> torch.Tensor:  # ln_f and the copy of the supervised rows
        return ln_f(x)[:, :-1].flatten(0, 1)[:rows].clone()

    sel = _measure(selected, [_meta(b, s, h, dtype=dtype, grad=True)], backward=True)
    one = _measure(lambda x: F.cross_entropy(lm_head(x), y, reduction="sum"),
                   [_meta(chunk, h, dtype=dtype, grad=True)], backward=True)
    # A chunk's logits are recomputed in the backward and freed before the next chunk's.
    return Measured(sel.kept, sel.peak_extra + one.kept + one.peak_extra)


def _measure_vit(visual: nn.Module, shape: StepShape, dtype: torch.dtype) -> Measured:
    images = shape.batch_size * shape.images_per_sample
    if images == 0:
        return Measured(0, 0, 0)
    size = visual.image_size
    pixels = _meta(images, 3, size, size, dtype=torch.float32)
    if _trains(visual):
        return _measure(visual, [pixels], backward=True)
    return _measure(visual, [pixels], backward=False)  # frozen: nothing kept but the features

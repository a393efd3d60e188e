"""QWenLMHeadModel: the Qwen-VL-Chat model (docs/qwen-vl.md §5), with release parameter names.

Differences from the release that change no golden output (docs/qwen-vl.md, "workbench rule"):
* the NTK alpha is computed from the current call only and carried on the KV cache
  (`cache.ntk_alpha`) for decoding, never leaked from an earlier call into training;
* images can come as `pixel_values` [K,3,S,S] instead of paths inside the ids, or as the visual
  module's output computed beforehand, `image_features` [K,256,D] (the frozen-ViT cache);
* `segment_ids` (packing) give causal attention inside each segment (no mask is built) and
  per-segment RoPE positions;
* `loss_chunk_size` computes the loss chunk by chunk from the hidden states;
* `prompt_kv` (qwen.PromptKV) records a batch of prompts' keys and values, or continues rows
  from them: the prompts run once for G answers each (GRPO).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from workbench.model.config import QWenConfig
from workbench.model.image_processing import load_image, preprocess
from workbench.model.qwen import PromptKV, QWenBlock, RMSNorm, Segments, logn_factors, ntk_alpha, rotary_table
from workbench.model.vision import VisionTransformer

IGNORE_INDEX = -100
# transformers 5.20 renamed the KV cache's argument and output field `past_key_values` -> `cache`.
# The model takes both and answers in the installed release's name: the GPU machine and vLLM's
# environment carry releases from before the rename.
CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def kv_cache(output: BaseModelOutputWithPast) -> Cache | None:
    """The KV cache a forward returned, whichever name the installed transformers gives it."""
    return getattr(output, CACHE_KWARG)

DUMMY_IMAGE_SIZE = 224  # the release's text-only training dummy: always 224, whatever image_size is


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock", "VisualAttentionBlock"]
    _supports_sdpa = True
    _skip_keys_device_placement = "past_key_values"
    # The loss is the release's per-batch mean; the Trainer must not pass num_items_in_batch.
    accepts_loss_kwargs = False

    def _init_weights(self, module: nn.Module) -> None:
        # Only for models built from scratch without a checkpoint; tiny.py has its own init.
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def find_image_spans(input_ids: torch.Tensor, img_start_id: int) -> list[tuple[int, int, int]]:
    """(row, <img> position, </img> position) in row-major order; unequal tag counts are an error."""
    starts = (input_ids == img_start_id).nonzero().tolist()
    ends = (input_ids == img_start_id + 1).nonzero().tolist()
    if len(starts) != len(ends):
        raise ValueError(f"the batch has {len(starts)} <img> but {len(ends)} </img> ids "
                         "(was a sample truncated inside an image span?)")
    spans = []
    for (row, a), (end_row, b) in zip(starts, ends):
        if row != end_row or b <= a:
            raise ValueError(f"<img> at row {row} position {a} is not closed by a </img> in the same row")
        spans.append((row, a, b))
    return spans


def span_path(input_ids: torch.Tensor, row: int, a: int, b: int, img_pad_id: int) -> str:
    """The path bytes of a span: ids a+1 .. b-2 (255 slots, as the release reads) up to the first <imgpad>."""
    ids = input_ids[row, a + 1: b - 1].tolist()
    if img_pad_id not in ids:
        raise ValueError(f"image span at row {row} position {a} has no <imgpad> ({img_pad_id} is not in list)")
    ids = ids[: ids.index(img_pad_id)]
    if any(i > 255 for i in ids):
        raise ValueError(f"image span at row {row} position {a} holds ids >= 256, not path bytes")
    return bytes(ids).decode("utf-8")


def attention_pattern(attention_mask: torch.Tensor | None, segment_ids: torch.Tensor | None, seq_len: int,
                      past_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | Segments | None:
    """What the attention layers are given: `Segments` for a packed batch (per-segment causal
    attention, no mask at all), else the release's additive mask (None for a plain prefill)."""
    if segment_ids is None:
        return additive_mask(attention_mask, seq_len, past_len, dtype, device)
    if attention_mask is not None and bool(((attention_mask != 0) != (segment_ids > 0)).any()):
        # Segments replace the mask entirely, so a mask that says otherwise would be silently ignored.
        raise ValueError("attention_mask disagrees with segment_ids: a packed batch's mask must be 1 "
                         "exactly where segment_ids > 0 (0 marks padding in both)")
    return Segments.from_ids(segment_ids)


def additive_mask(attention_mask: torch.Tensor | None, seq_len: int, past_len: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor | None:
    """docs/qwen-vl.md §5.6: the sum of additive masks with finfo.min entries (two of them add up to -inf).

    None when plain causal attention is exact: a prefill with no padding. The attention then asks
    SDPA for `is_causal`, which lets it pick its flash kernels on the GPU (a float mask rules them
    out); an all-ones attention_mask adds nothing to the scores.
    """
    m = torch.finfo(dtype).min
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if past_len == 0 and attention_mask is None:
        return None
    mask = None
    if seq_len > 1:
        query = torch.arange(past_len, past_len + seq_len, device=device)[:, None]
        key = torch.arange(past_len + seq_len, device=device)[None, :]
        mask = torch.where(key <= query, 0.0, m).to(dtype)[None, None]
    if attention_mask is not None:
        pad = (1.0 - attention_mask.to(dtype))[:, None, None, :]
        pad = pad.masked_fill(pad != 0, m)
        mask = pad if mask is None else mask + pad
    return mask


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """RoPE positions restarting at 0 wherever the segment id changes along a row."""
    idx = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList(QWenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.visual = VisionTransformer(**config.visual)
        self.image_root: str | Path | None = None  # where relative image paths inside the ids are read
        # Set when the ViT's weights are sharded over ranks (FSDP, ZeRO-3): each rank gathers them
        # module by module in collectives, so every rank must run the ViT in every training step,
        # frozen or not, or a text-only batch on one rank deadlocks against an image on another.
        self.sharded_visual = False
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.wte = value

    def _read_images(self, input_ids: torch.Tensor, spans: list[tuple[int, int, int]]) -> torch.Tensor:
        pad_id = self.config.image_start_id + 2
        paths = [span_path(input_ids, *span, pad_id) for span in spans]
        size = self.visual.image_size
        return torch.stack([preprocess(load_image(p, self.image_root), size) for p in paths])

    def _image_features(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                        image_features: torch.Tensor | None = None
                        ) -> tuple[list[tuple[int, int, int]], torch.Tensor | None]:
        """docs/qwen-vl.md §5.7: features of every span (row-major), the training dummy, or nothing.

        `image_features` [K, 256, D] are the visual module's output computed beforehand (the
        frozen-ViT cache, data/vit_cache.py): they stand in for `self.visual(pixel_values)`."""
        spans = find_image_spans(input_ids, self.config.image_start_id)
        if pixel_values is not None and image_features is not None:
            raise ValueError("give either pixel_values or image_features, not both")
        given, name = (pixel_values, "pixel_values") if image_features is None else (image_features, "image_features")
        if given is not None and given.shape[0] != len(spans):
            raise ValueError(f"{name} holds {given.shape[0]} images but input_ids hold "
                             f"{len(spans)} <img>...</img> spans")
        if spans and image_features is not None:
            return spans, image_features
        if spans:
            pixels = pixel_values if pixel_values is not None else self._read_images(input_ids, spans)
            return spans, self.visual(pixels)
        # rev-B keeps a trainable ViT in the graph (its grads are zero tensors, not None); a frozen
        # one needs no dummy image at all, unless it is sharded.
        if self.training and (self.sharded_visual or any(p.requires_grad for p in self.visual.parameters())):
            # Built without touching a ViT weight: under ZeRO-3 reading one outside the ViT's forward
            # gathers it, on the ranks with a text-only batch alone. The ViT casts it to its dtype.
            dummy = torch.zeros(1, 3, DUMMY_IMAGE_SIZE, DUMMY_IMAGE_SIZE, device=input_ids.device)
            return [], self.visual(dummy)
        return [], None

    def _rotary(self, input_ids: torch.Tensor, past_len: int, segment_ids: torch.Tensor | None,
                alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        if segment_ids is not None:
            positions = segment_positions(segment_ids)
        else:  # position_ids are ignored: RoPE counts along the padded row, as the release
            positions = torch.arange(past_len, past_len + input_ids.shape[1], device=input_ids.device)[None]
        rot_dim = int(self.config.kv_channels * self.config.rotary_pct)
        return rotary_table(positions, rot_dim, self.config.rotary_emb_base, alpha)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, past_key_values: Cache | None = None,
                use_cache: bool | None = None, output_hidden_states: bool = False,
                segment_ids: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                prompt_kv: PromptKV | None = None, cache: Cache | None = None, **ignored) -> BaseModelOutputWithPast:
        cfg = self.config
        past_key_values = cache if cache is not None else past_key_values
        batch, seq_len = input_ids.shape
        if prompt_kv is not None:
            if past_key_values is not None or use_cache or segment_ids is not None:
                raise ValueError("prompt_kv cannot be combined with a KV cache or segment_ids")
            use_cache = False
        if use_cache is None:
            use_cache = cfg.use_cache and not self.training
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=cfg)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if prompt_kv is not None:
            past_len = prompt_kv.length
        if segment_ids is not None and past_len:
            raise ValueError("segment_ids (packing) cannot be combined with a KV cache")

        # NTK alpha: training 1; an eval prefill from its own length; decoding (and answers after a
        # PromptKV) from its prefill.
        if past_len:
            alpha = getattr(past_key_values if prompt_kv is None else prompt_kv, "ntk_alpha", 1)
        elif cfg.use_dynamic_ntk and not self.training:
            alpha = ntk_alpha(seq_len, cfg.seq_length)
        else:
            alpha = 1
        for carrier in (past_key_values, prompt_kv):
            if carrier is not None:
                carrier.ntk_alpha = alpha
        logn = None
        if cfg.use_logn_attn and not self.training and past_len + seq_len > cfg.seq_length:
            logn = logn_factors(past_len, seq_len, cfg.seq_length, input_ids.device)

        spans, images = self._image_features(input_ids, pixel_values, image_features) if past_len == 0 else ([], None)
        hidden = self.drop(self.wte(input_ids)).clone()
        if images is not None and not spans:
            hidden = hidden + images.mean() * 0
        for k, (row, a, b) in enumerate(spans):
            hidden[row, a + 1: b] = images[k].to(hidden.dtype)

        rotary = self._rotary(input_ids, past_len, segment_ids, alpha)
        mask = attention_pattern(attention_mask, segment_ids, seq_len, past_len, hidden.dtype, hidden.device)
        all_hidden = []
        for block in self.h:
            if output_hidden_states:
                all_hidden.append(hidden)
            hidden = block(hidden, rotary=rotary, attention_mask=mask, logn=logn, past_key_values=past_key_values,
                           prompt_kv=prompt_kv)
        hidden = self.ln_f(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden,
                                       **{CACHE_KWARG: past_key_values if use_cache else None},
                                       hidden_states=tuple(all_hidden) if output_hidden_states else None)


class StopWordsLogitsProcessor(LogitsProcessor):
    """Forces eos right after any stop sequence (docs/qwen-vl.md §6.2): its eos score becomes 2**15."""

    def __init__(self, stop_words_ids: list[list[int]], eos_token_id: int):
        self.stop_words_ids = [ids for ids in stop_words_ids if ids != [eos_token_id]]
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, ids in enumerate(input_ids.tolist()):
            if any(ids[-len(stop):] == stop for stop in self.stop_words_ids if len(ids) >= len(stop)):
                scores[row, self.eos_token_id] = float(2**15)
        return scores


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.loss_chunk_size: int | None = None
        self.post_init()

    @property
    def image_root(self) -> str | Path | None:
        return self.transformer.image_root

    @image_root.setter
    def image_root(self, value: str | Path | None) -> None:
        self.transformer.image_root = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                past_key_values: Cache | None = None, use_cache: bool | None = None,
                output_hidden_states: bool = False, segment_ids: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None, cache: Cache | None = None,
                **ignored) -> CausalLMOutputWithPast:
        out = self.transformer(input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                               past_key_values=cache if cache is not None else past_key_values, use_cache=use_cache,
                               output_hidden_states=output_hidden_states, segment_ids=segment_ids,
                               image_features=image_features)
        hidden = out.last_hidden_state
        logits = loss = None
        if labels is not None and self.loss_chunk_size:
            loss = self._chunked_loss(hidden, labels)
        else:
            logits = self.lm_head(hidden)  # model dtype, all vocab_size rows, as the release
            if labels is not None:
                labels = labels.to(logits.device, torch.int64)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                       ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KWARG: kv_cache(out)},
                                      hidden_states=out.hidden_states)

    def _chunked_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Same value as the plain loss, but only `loss_chunk_size` rows of logits exist at a time,
        and each chunk's logits are recomputed in the backward instead of being kept."""
        labels = labels.to(hidden.device, torch.int64)[:, 1:].flatten()
        keep = labels != IGNORE_INDEX
        hidden, labels = hidden[:, :-1].flatten(0, 1)[keep], labels[keep]

        def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.lm_head(h), y, reduction="sum")

        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, labels.numel(), self.loss_chunk_size):
            h, y = hidden[start: start + self.loss_chunk_size], labels[start: start + self.loss_chunk_size]
            part = checkpoint(chunk_loss, h, y, use_reentrant=False) if torch.is_grad_enabled() else chunk_loss(h, y)
            total = total + part.float()
        return (total / labels.numel()).to(hidden.dtype)

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, generation_config=None,
                 logits_processor: LogitsProcessorList | None = None,
                 stop_words_ids: list[list[int]] | None = None, **kwargs) -> torch.Tensor:
        """HF generate, with the release's StopWordsLogitsProcessor first when stop words are given
        (argument, or `stop_words_ids` on the generation config)."""
        config = generation_config if generation_config is not None else self.generation_config
        if stop_words_ids is None:
            stop_words_ids = getattr(config, "stop_words_ids", None)
        if stop_words_ids:
            processor = StopWordsLogitsProcessor(stop_words_ids, eos_token_id=config.eos_token_id)
            logits_processor = LogitsProcessorList([processor, *(logits_processor or [])])
        return super().generate(inputs, generation_config=generation_config,
                                logits_processor=logits_processor, **kwargs)

"""Qwen-VL-Chat (`QWenLMHeadModel`, the release's architecture name) on vLLM's own layers.

The LLM uses vLLM's tensor-parallel layers under the release's names, so release checkpoints,
`workbench merge` output and PEFT adapters on the LLM load as they are:

    transformer.wte                 VocabParallelEmbedding
    transformer.h.N.attn.c_attn     QKVParallelLinear (the release's contiguous q | k | v, with bias)
    transformer.h.N.attn.c_proj     RowParallelLinear
    transformer.h.N.mlp.gate_up_proj  MergedColumnParallelLinear of [w2; w1]: SiluAndMul computes
                                      silu(w2 x) * w1 x, the release's c_proj(w1(x) * silu(w2(x)))
    transformer.h.N.mlp.c_proj      RowParallelLinear
    transformer.ln_f, ln_1, ln_2    RMSNorm;  lm_head  ParallelLMHead
    transformer.visual              the workbench's own VisionTransformer (ViT + attn_pool resampler),
                                    replicated on every rank: plain torch, exact to the release

Images: the prompt holds `<img></img>` per image (the chat placeholder "Picture N: <img></img>\\n",
as Qwen-VL-Chat writes it); the processor replaces each by `<img>`, 256 `<imgpad>`, `</img>` (the
release's span length) and the visual features overwrite the 256 pad embeddings, as the release
overwrites the positions between `<img>` and `</img>`.

Not what vLLM computes: the release's dynamic NTK and log-n attention scaling past its 2048-token
`seq_length`; `workbench serve --engine vllm` sets `max_model_len` to `seq_length` for that reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from PIL import Image
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsLoRA, SupportsMultiModal
from vllm.model_executor.models.module_mapping import MultiModelKeys
from vllm.model_executor.models.utils import _merge_multimodal_embeddings
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)

from workbench.model.image_processing import preprocess, to_rgb
from workbench.model.tokenizer import IMG_END, IMG_PAD, IMG_START, IMG_TOKEN_SPAN
from workbench.model.vision import VisionTransformer

PLACEHOLDER = "Picture {i}: " + IMG_START + IMG_END  # Qwen-VL-Chat's own image line


class QWenAttention(nn.Module):
    def __init__(self, config, cache_config, quant_config, prefix: str):
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_world_size

        heads, self.head_dim = config.num_attention_heads, config.kv_channels
        self.heads = heads // get_tensor_model_parallel_world_size()
        self.c_attn = QKVParallelLinear(config.hidden_size, self.head_dim, heads, bias=True,
                                        quant_config=quant_config, prefix=f"{prefix}.c_attn")
        self.c_proj = RowParallelLinear(heads * self.head_dim, config.hidden_size, bias=not config.no_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.c_proj")
        rope = {"rope_theta": config.rotary_emb_base, "partial_rotary_factor": config.rotary_pct}
        self.rotary_emb = get_rope(self.head_dim, max_position=config.max_position_embeddings,
                                   is_neox_style=True, rope_parameters=rope)
        self.attn = Attention(self.heads, self.head_dim, self.head_dim**-0.5, cache_config=cache_config,
                              quant_config=quant_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.c_attn(x)
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.c_proj(self.attn(q, k, v))
        return out


class QWenMLP(nn.Module):
    def __init__(self, config, quant_config, prefix: str):
        super().__init__()
        width = config.intermediate_size // 2  # the release uses half of intermediate_size per branch
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [width] * 2, bias=not config.no_bias,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.c_proj = RowParallelLinear(width, config.hidden_size, bias=not config.no_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.c_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.c_proj(self.act_fn(gate_up))
        return out


class QWenBlock(nn.Module):
    def __init__(self, config, cache_config, quant_config, prefix: str):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config, cache_config, quant_config, f"{prefix}.attn")
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config, quant_config, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(positions, self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class QWenModel(nn.Module):
    """`transformer`: embeddings, blocks, final norm and the visual module, under the release's names."""

    def __init__(self, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        config = vllm_config.model_config.hf_config
        cache, quant = vllm_config.cache_config, vllm_config.quant_config
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList(QWenBlock(config, cache, quant, f"{prefix}.h.{i}")
                               for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.visual = VisionTransformer(**config.visual)

    def forward(self, positions: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        x = inputs_embeds
        for block in self.h:
            x = block(positions, x)
        return self.ln_f(x)


class ReleaseImageParser(MultiModalDataParser):
    """Keeps each PIL image's own mode: vLLM would composite transparent images onto white, while the
    release drops alpha (and shows a palette's transparent index in its colour); `to_rgb` does that."""

    def _parse_image_data(self, data):
        if isinstance(data, list) and all(isinstance(im, Image.Image) for im in data):
            return ImageProcessorItems(data)
        if isinstance(data, Image.Image):
            return ImageProcessorItems([data])
        return super()._parse_image_data(data)


class QWenVLProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_data_parser(self) -> MultiModalDataParser:
        return ReleaseImageParser(expected_hidden_size=self._get_expected_hidden_size())

    def image_size(self) -> int:
        return self.get_hf_config().visual["image_size"]


class QWenVLDummyInputsBuilder(BaseDummyInputsBuilder[QWenVLProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return "".join(PLACEHOLDER.format(i=i + 1) + "\n" for i in range(mm_counts.get("image", 0)))

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.image_size()
        overrides = mm_options.get("image") if mm_options else None
        return {"image": self._get_dummy_images(width=size, height=size, num_images=mm_counts.get("image", 0),
                                                overrides=overrides)}


class QWenVLMultiModalProcessor(BaseMultiModalProcessor[QWenVLProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        """The release's preprocessing (the workbench's): RGB as the release converts, bicubic to S x S, CLIP norm."""
        size = self.info.image_size()
        images = hf_data.get("images") or []
        return BatchFeature({"pixel_values": torch.stack([preprocess(to_rgb(im), size) for im in images])})

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
                              ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        vocab = self.info.get_tokenizer().get_vocab()
        start, end, pad = vocab[IMG_START], vocab[IMG_END], vocab[IMG_PAD]
        span = [start, *[pad] * IMG_TOKEN_SPAN, end]
        return [PromptReplacement(modality="image", target=[start, end],
                                  replacement=PromptUpdateDetails.select_token_id(span, embed_token_id=pad))]


@MULTIMODAL_REGISTRY.register_processor(QWenVLMultiModalProcessor, info=QWenVLProcessingInfo,
                                        dummy_inputs=QWenVLDummyInputsBuilder)
class QWenVLForCausalLM(nn.Module, SupportsMultiModal, SupportsLoRA):
    # PEFT adapters name w1 and w2; vLLM's LoRA puts them on the two halves of gate_up_proj.
    packed_modules_mapping = {"c_attn": ["c_attn"], "gate_up_proj": ["w2", "w1"]}
    # LoRA targets vLLM serves: the LLM's linear layers (an adapter on the ViT or resampler is merged instead).
    embedding_modules: dict[str, str] = {}

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return PLACEHOLDER.format(i=i)
        raise ValueError("Qwen-VL-Chat takes images only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.transformer = QWenModel(vllm_config, "transformer")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix="lm_head")
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def get_mm_mapping(self) -> MultiModelKeys:
        return MultiModelKeys.from_string_field(language_model="transformer.h", connector="transformer.visual.attn_pool",
                                                tower_model="transformer.visual.transformer")

    def get_language_model(self) -> nn.Module:
        return self.transformer

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, list):
            pixel_values = torch.stack(pixel_values)
        return list(self.transformer.visual(pixel_values))  # one [256, hidden] per image

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings: MultiModalEmbeddings | None = None,
                        *, is_multimodal: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        embeds = self.transformer.wte(input_ids)
        if multimodal_embeddings is None or len(multimodal_embeddings) == 0:
            return embeds
        return _merge_multimodal_embeddings(inputs_embeds=embeds, multimodal_embeddings=multimodal_embeddings,
                                            is_multimodal=is_multimodal)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.transformer.wte(input_ids)
        return self.transformer(positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Release names -> parameters; w2 and w1 fill the two halves of gate_up_proj."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            shard = None
            for hf, index in ((".mlp.w2.", 0), (".mlp.w1.", 1)):
                if hf in name:
                    name, shard = name.replace(hf, ".mlp.gate_up_proj."), index
            param = params[name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor) if shard is None else loader(param, tensor, shard)
            loaded.add(name)
        # attn_pool.pos_embed is a fixed table the release stores; a checkpoint without it keeps ours.
        return loaded | {n for n in params if n.endswith("attn_pool.pos_embed")}

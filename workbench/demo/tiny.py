"""A tiny random Qwen-VL-Chat model folder: the release layout at toy size, for tests and the demo.

Sizes default to the reference tiny model's (hidden 128, 2 layers, ViT width 32, image 56);
weights are drawn as the reference README describes, so the folder behaves like
../reference/tiny-qwen-vl-chat without needing it.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import GenerationConfig

from workbench.atomic import write_json
from workbench.model.checkpoint import save_model
from workbench.model.config import QWenConfig
from workbench.model.tokenizer import QWenTokenizer, write_byte_vocab

TINY_CONFIG = {
    "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "kv_channels": 32,
    "intermediate_size": 256, "fp32": True,
    "visual": {"heads": 4, "image_size": 56, "layers": 2, "mlp_ratio": 4.9231, "output_dim": 128,
               "patch_size": 14, "width": 32},
}
RELEASE_TOKENIZER_CONFIG = {
    "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
}


def _write_vocab(out_dir: Path, vocab_file: str | os.PathLike | None, words: Sequence[str]) -> QWenTokenizer:
    tmp = out_dir / ".qwen.tiktoken.tmp"
    if vocab_file is not None:
        shutil.copyfile(vocab_file, tmp)
    else:
        write_byte_vocab(tmp, words)
    tmp.replace(out_dir / "qwen.tiktoken")
    write_json(out_dir / "tokenizer_config.json", RELEASE_TOKENIZER_CONFIG)
    return QWenTokenizer.from_pretrained(out_dir)


@torch.no_grad()
def init_tiny_weights(model: torch.nn.Module, n_tokens: int, seed: int) -> None:
    """One N(0,1) draw per tensor in state_dict order, scaled as the reference tiny model's (any size)."""
    # Drawn on the model's device, so the benchmark can initialise the 9.6B model on the GPU.
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    norms = {f"{name}.weight" for name, module in model.named_modules()
             if isinstance(module, torch.nn.LayerNorm) or type(module).__name__ == "RMSNorm"}
    visual = model.config.visual
    for name, param in model.state_dict().items():
        if name.endswith("attn_pool.pos_embed"):
            continue  # the fixed sin-cos table the model already holds
        draw = torch.randn(param.shape, generator=generator, device=device)
        if name in norms:
            value = 1 + 0.1 * draw
        elif name.endswith("bias"):
            value = 0.05 * draw
        elif name == "transformer.wte.weight":
            value = draw
        elif name.endswith("visual.positional_embedding"):
            value = visual["width"] ** -0.5 * draw
        elif name.endswith("attn_pool.query"):
            value = 0.5 * draw
        elif name.endswith("visual.proj"):
            value = visual["output_dim"] ** -0.5 * draw
        else:
            value = math.prod(param.shape[1:]) ** -0.5 * draw
        param.copy_(value)
    model.lm_head.weight[n_tokens:] *= 0.01  # padding rows: greedy decoding never picks them


def make_tiny_model_dir(out_dir: str | os.PathLike, *, vocab_file: str | os.PathLike | None = None,
                        words: Sequence[str] = (), seed: int = 0, **config_overrides) -> Path:
    """Write config.json, generation_config.json, tokenizer files and model.safetensors; return the folder.

    Without `vocab_file` the vocabulary is the 256 single bytes (eod id 256), plus one token per
    entry of `words` (write_byte_vocab). vocab_size is the token count rounded up to a multiple
    of 128, as in the release.
    """
    from workbench.model.modeling import QWenLMHeadModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _write_vocab(out_dir, vocab_file, words)
    visual = {**TINY_CONFIG["visual"], "image_start_id": tok.img_start_id,
              **config_overrides.pop("visual", {})}
    settings = {**TINY_CONFIG, "vocab_size": math.ceil(len(tok) / 128) * 128, **config_overrides, "visual": visual}
    config = QWenConfig(**settings)
    config.dtype = torch.float32
    model = QWenLMHeadModel(config)
    init_tiny_weights(model, len(tok), seed)
    model.generation_config = GenerationConfig(
        chat_format="chatml", do_sample=True, eos_token_id=tok.eod_id, pad_token_id=tok.eod_id,
        max_new_tokens=512, max_window_size=6144, top_k=0, top_p=0.3)
    save_model(model, out_dir, max_shard_size="10GB")
    return out_dir

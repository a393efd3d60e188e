"""QWenConfig: the release's config.json, read and written back in its own schema.

The release file (../reference/qwen-vl-chat/config.json) is a transformers-4.31 config with a
`visual` dict. transformers 5 renames `torch_dtype` to `dtype` and stamps its own version on
save; we write the release keys back instead, so a saved (or merged) model folder keeps a
config.json that the original remote code and other tools still read unchanged.
"""

from __future__ import annotations

import json
from dataclasses import field, fields
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedConfig

from workbench.dtypes import FLAG_DTYPES
from workbench.errors import CheckpointError

# Field names owned by transformers' PreTrainedConfig that the release file also carries.
_BASE_KEYS = ("architectures", "transformers_version")
_RELEASE_AUTO_MAP = {
    "AutoConfig": "configuration_qwen.QWenConfig",
    "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
}
# Defaults are the release's (Qwen-VL-Chat bf16).
_RELEASE_VISUAL = {
    "heads": 16, "image_size": 448, "image_start_id": 151857, "layers": 48,
    "mlp_ratio": 4.9231, "output_dim": 4096, "patch_size": 14, "width": 1664,
}


class QWenConfig(PreTrainedConfig):
    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016
    layer_norm_epsilon: float = 1e-6
    rotary_emb_base: int | float = 10000
    rotary_pct: float = 1.0
    seq_length: int = 2048
    max_position_embeddings: int = 8192
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    use_flash_attn: bool | str = False
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    no_bias: bool = True
    scale_attn_weights: bool = True
    attn_dropout_prob: float = 0.0
    emb_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    onnx_safe: bool | None = None
    tokenizer_type: str = "QWenTokenizer"
    auto_map: dict = field(default_factory=lambda: dict(_RELEASE_AUTO_MAP))
    visual: dict = field(default_factory=lambda: dict(_RELEASE_VISUAL))

    def __post_init__(self, **kwargs: Any) -> None:
        # Keys transformers does not model (e.g. "_name_or_path", "quantization_config" of the
        # Int4 release) are kept verbatim so that saving reproduces the file.
        self._release_extras = {k: v for k, v in kwargs.items() if k != "torch_dtype"}
        super().__post_init__(**kwargs)
        if self.architectures is None:
            self.architectures = ["QWenLMHeadModel"]

    def to_diff_dict(self) -> dict[str, Any]:
        """The release schema: our fields, the extras read from the file, `torch_dtype`."""
        import transformers

        out = dict(self._release_extras)
        names = {f.name for f in fields(QWenConfig)} - {f.name for f in fields(PreTrainedConfig)}
        out.update({name: getattr(self, name) for name in names})
        out.update({name: getattr(self, name) for name in _BASE_KEYS})
        out["transformers_version"] = self.transformers_version or transformers.__version__
        out["model_type"] = self.model_type
        dtype = self.dtype
        out["torch_dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else "bfloat16"
        return json.loads(json.dumps(out, default=str))  # deep copy, JSON types only (a Path as text)

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def image_start_id(self) -> int:
        return self.visual["image_start_id"]


def load_config(model_dir: str | Path) -> QWenConfig:
    """Read `model_dir/config.json`; anything that is not a Qwen-VL config is a CheckpointError."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json in the model folder") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if raw.get("model_type") != "qwen":
        raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'qwen' (Qwen-VL)")
    if not isinstance(raw.get("visual"), dict):
        raise CheckpointError(f"{path}: no 'visual' block; this is a text-only Qwen config, not Qwen-VL")
    missing = sorted(set(_RELEASE_VISUAL) - {"image_start_id"} - set(raw["visual"]))
    if missing or "image_start_id" not in raw["visual"]:
        raise CheckpointError(f"{path}: visual block lacks {missing or ['image_start_id']}")
    return QWenConfig.from_dict(raw)


def precision_dtype(config: QWenConfig, config_file: str | Path = "config.json") -> torch.dtype:
    """docs/qwen-vl.md §5.9: one of bf16/fp16/fp32 decides; none set -> bf16 on capable CUDA, else fp16 (cc >= 7), else fp32."""
    flags = [name for name in FLAG_DTYPES if getattr(config, name)]
    if len(flags) > 1:
        raise CheckpointError(f"{config_file}: at most one of bf16/fp16/fp32 may be true, got {flags}")
    if flags:
        return FLAG_DTYPES[flags[0]]
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if torch.cuda.get_device_capability()[0] >= 7:
            return torch.float16
    return torch.float32

"""A vLLM plugin: Qwen-VL-Chat v1 (which vLLM dropped) as a vLLM-native model.

Installed with the workbench, it declares the entry point `vllm.general_plugins` ->
`workbench.vllm_plugin:register`, which every vLLM process (API server, workers, tensor-parallel
ranks) calls before it starts. It imports only the workbench's model pieces that run on any recent
torch and transformers (config, vision tower, image preprocessing, tokenizer constants), never the
training stack, so it works in vLLM's own environment with vLLM's torch (`make vllm`).
"""

ARCHITECTURE = "QWenLMHeadModel"  # the release's config.json `architectures`


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from workbench.model.config import QWenConfig

    # The release's config.json names remote code (auto_map); a registered local class wins without it.
    AutoConfig.register("qwen", QWenConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "workbench.vllm_plugin.model:QWenVLForCausalLM")

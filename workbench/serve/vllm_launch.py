"""`workbench serve --engine vllm`: check the model and adapters here, then start vLLM's OpenAI server.

vLLM runs in its own environment (`make vllm` builds `.venv-vllm`; vLLM pins its own torch) with the
workbench's plugin (workbench/vllm_plugin) installed. Everything that can be wrong with the user's
input is checked here first, so it ends as one line, not a traceback from inside vLLM:
the model folder (config.json of a Qwen-VL-Chat, weights, qwen.tiktoken), each adapter (a PEFT LoRA
whose targets are all LLM linears: vLLM's LoRA serves those; an adapter that also adapts the ViT or
the resampler, trains whole modules, or uses DoRA must be merged with `workbench merge` instead).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from workbench.errors import CheckpointError, WorkbenchError

LLM_LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
VLLM_VENV = Path(__file__).resolve().parents[2] / ".venv-vllm"  # `make vllm` in a source checkout


def vllm_python() -> str:
    """The interpreter that has vLLM: $WORKBENCH_VLLM_PYTHON, the checkout's .venv-vllm, or this one."""
    if os.environ.get("WORKBENCH_VLLM_PYTHON"):
        return os.environ["WORKBENCH_VLLM_PYTHON"]
    if (VLLM_VENV / "bin" / "python").is_file():
        return str(VLLM_VENV / "bin" / "python")
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise WorkbenchError("--engine vllm: no vLLM environment; build it with `make vllm` (a .venv-vllm beside "
                         "the workbench) or set WORKBENCH_VLLM_PYTHON to a python that has vllm and the workbench")


def check_model(model: str) -> dict:
    """The model folder's config.json, after checking the folder holds a Qwen-VL-Chat vLLM can load."""
    folder = Path(model)
    if not folder.is_dir():
        raise CheckpointError(f"--model {model}: not a folder (vLLM serves a local model folder: the release, "
                              "or `workbench merge` output)")
    config = _read_json(folder / "config.json", f"--model {model}", "no config.json; is this a model folder?")
    if "QWenLMHeadModel" not in (config.get("architectures") or []) or "visual" not in config:
        raise CheckpointError(f"--model {model}: config.json is not Qwen-VL-Chat's (architectures "
                              f"{config.get('architectures')}, visual {'present' if 'visual' in config else 'missing'})")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(f"--model {model}: no weights ({', '.join(WEIGHT_FILES)})")
    if not (folder / "qwen.tiktoken").is_file():
        raise CheckpointError(f"--model {model}: no qwen.tiktoken (the release's vocabulary)")
    return config


def _read_json(path: Path, where: str, missing: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{where}: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{where}: {path.name} is not valid JSON ({err})") from None


def check_adapter(name: str, folder: Path) -> int:
    """The adapter's rank, after checking that vLLM's LoRA can serve it as it is."""
    where = f"--adapter {name}={folder}"
    config = _read_json(folder / "adapter_config.json", where, "not a PEFT adapter folder (no adapter_config.json)")
    why = _not_servable(config)
    if why:
        raise WorkbenchError(f"{where}: vLLM serves LoRA on the LLM's linear layers only, and {why}; merge it "
                             "into the base (`workbench merge --base B --adapter A --out M`) and serve M")
    return int(config.get("r", 8))


def _not_servable(config: dict) -> str | None:
    """Why vLLM's LoRA cannot serve an adapter (its adapter_config.json), or None."""
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    outside = [t for t in targets if "visual" in t or not t.endswith(LLM_LORA_TARGETS)]
    if outside:
        more = f" and {len(outside) - 1} more modules outside the LLM" if len(outside) > 1 else ""
        return f"it adapts {outside[0]}{more}"
    if config.get("modules_to_save"):
        return "it trains whole modules (modules_to_save)"
    if config.get("use_dora"):
        return "it uses DoRA"
    return None


def vllm_command(args, config: dict, serving: Path, adapters: dict[str, Path], ranks: list[int]) -> list[str]:
    """The vLLM OpenAI server's command line for `workbench serve --engine vllm` arguments."""
    # The release's dynamic NTK and log-n scaling past seq_length are not what vLLM computes:
    # stay within the trained length unless the user asks for more.
    max_len = args.max_model_len or config.get("seq_length", 2048)
    cmd = [vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model),
           "--tokenizer", str(serving), "--generation-config", str(serving), "--served-model-name", args.name or Path(args.model).resolve().name,
           "--max-model-len", str(max_len), "--host", args.host, "--port", str(args.port),
           "--limit-mm-per-prompt", json.dumps({"image": args.max_images}),
           # images reach the plugin in their own mode, which it converts as the release does
           "--media-io-kwargs", json.dumps({"image": {"image_mode": None}})]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    if adapters:
        cmd += ["--enable-lora", "--max-lora-rank", str(max(ranks)), "--max-loras", str(len(adapters)),
                "--lora-modules", *(f"{name}={folder}" for name, folder in adapters.items())]
    return cmd + list(args.vllm_arg)


def launch(args) -> int:
    """Check, export the tokenizer, then replace this process with vLLM's server."""
    from workbench.serve.models import parse_adapter_specs
    from workbench.vllm_plugin.tokenizer import serving_folder

    config = check_model(args.model)
    adapters = parse_adapter_specs(args.adapter)
    ranks = [check_adapter(name, folder) for name, folder in adapters.items()]
    cmd = vllm_command(args, config, serving_folder(args.model), adapters, ranks)
    print(f"starting vLLM: {' '.join(cmd)}", file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached

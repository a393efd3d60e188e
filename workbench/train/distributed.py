"""How a run is spread over processes: FSDP on CPU processes, launch checks, and the run record's entry.

`accelerate launch --config_file configs/accelerate/fsdp.yaml` sets ACCELERATE_USE_FSDP=true and
the FSDP_* variables; accelerate then turns FSDP on only for accelerator devices (its
`AcceleratorState` checks MULTI_GPU, MULTI_XPU, ...). On CPU processes it falls back to MULTI_CPU,
which is plain DDP over gloo: the run would work, but unsharded, and nothing would say so. PyTorch's
FSDP2 (`fully_shard`) itself runs on CPU with gloo, so `enable_cpu_fsdp` marks the accelerator
state as FSDP with the plugin accelerate would have built from the same variables; from there the
Trainer and accelerate take their ordinary FSDP path (auto-wrap, activation checkpointing, sharded
optimizer state, the state dict gathered on save, FSDP checkpoints and their resume). This is what
lets the FSDP config be tested on CPU machines.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from workbench.errors import ConfigError

if TYPE_CHECKING:
    from workbench.train.config import RunConfig


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def check_launch(config: RunConfig) -> None:
    """Refuse run-config settings the launch's accelerate config contradicts, before anything loads."""
    if _env_flag("ACCELERATE_USE_FSDP") and _env_flag("FSDP_ACTIVATION_CHECKPOINTING") \
            and config.train.gradient_checkpointing:
        raise ConfigError(
            f"{config.source}: train.gradient_checkpointing: the FSDP config already checkpoints every block "
            "(fsdp_activation_checkpointing: true); add --set train.gradient_checkpointing=false")


def cpu_deepspeed_requested() -> bool:
    """A DeepSpeed launch on a machine without CUDA (DeepSpeed's CPU accelerator, gloo)."""
    return _env_flag("ACCELERATE_USE_DEEPSPEED") and not torch.cuda.is_available()


def partial_state_kwargs(cpu: bool) -> dict[str, Any]:
    """accelerate's process-group set-up: `cpu` for gloo, except DeepSpeed on CPU.

    accelerate enables DeepSpeed only when not told `cpu`; on a machine without CUDA it then finds
    no backend and would run each process alone. Naming gloo lets DeepSpeed's own
    `init_distributed` set up the group over its CPU accelerator.
    """
    return {"backend": "gloo"} if cpu_deepspeed_requested() else {"cpu": cpu}


def cpu_fsdp_requested() -> bool:
    """An FSDP launch (ACCELERATE_USE_FSDP=true) on CPU processes, which accelerate would run as DDP."""
    return (_env_flag("ACCELERATE_USE_FSDP") and not torch.cuda.is_available()
            and PartialState().distributed_type == DistributedType.MULTI_CPU)


def enable_cpu_fsdp(accelerator: Accelerator) -> None:
    """Switch a MULTI_CPU accelerator to FSDP, as accelerate does for GPUs (`AcceleratorState.__init__`)."""
    plugin = FullyShardedDataParallelPlugin()  # read from the FSDP_* variables accelerate launch sets
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # PartialState and AcceleratorState share this dict: every later reader sees FSDP.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def shards_parameters(accelerator: Accelerator) -> bool:
    """FSDP or ZeRO-3: the weights are split over ranks and gathered per module in each forward."""
    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return True
    plugin = getattr(state, "deepspeed_plugin", None)
    return state.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3


@contextlib.contextmanager
def without_checkpoint_wrappers(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model with its activation-checkpoint wrappers lifted out, for the length of a save.

    FSDP's activation checkpointing (`fsdp_activation_checkpointing`) wraps each block in a
    CheckpointWrapper, which adds `_checkpoint_wrapped_module.` to every name inside it. The
    gathered state dict leaves that out (torch canonicalises the names), while PEFT finds its
    adapter weights by module name: without this, a save under FSDP writes an empty adapter.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    lifted = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
              if isinstance(child, CheckpointWrapper)]
    for parent, name, child in lifted:
        parent._modules[name] = child._checkpoint_wrapped_module
    try:
        yield model
    finally:
        for parent, name, child in lifted:
            parent._modules[name] = child


def describe(accelerator: Accelerator) -> dict[str, Any]:
    """The run record's `distributed` entry for one session: how many processes, where, and how."""
    state = accelerator.state
    entry: dict[str, Any] = {
        "type": state.distributed_type.value, "world_size": state.num_processes,
        # torchrun (under accelerate launch) starts LOCAL_WORLD_SIZE processes on each machine
        "num_machines": state.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes)),
        "backend": state.backend, "device": accelerator.device.type,
    }
    if state.distributed_type == DistributedType.FSDP:
        plugin = state.fsdp_plugin
        entry["fsdp"] = {
            "version": plugin.fsdp_version, "state_dict_type": str(plugin.state_dict_type).rsplit(".", 1)[-1],
            "reshard_after_forward": bool(plugin.reshard_after_forward),
            "activation_checkpointing": bool(plugin.activation_checkpointing),
            "wrap": list(plugin.transformer_cls_names_to_wrap or []),
        }
    elif state.distributed_type == DistributedType.DEEPSPEED:
        plugin = state.deepspeed_plugin
        entry["deepspeed"] = {"zero_stage": plugin.zero_stage,
                              "offload_optimizer": plugin.offload_optimizer_device or "none",
                              "offload_param": plugin.offload_param_device or "none"}
    return entry

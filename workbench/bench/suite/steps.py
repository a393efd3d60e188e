"""The training step the packing and ViT-cache sections time: official-lora on random weights of the
real size (bench/run.py's model), one collated batch of the data pipeline per optimizer step."""

from __future__ import annotations

import time

import torch

from workbench.bench.suite.plan import Plan


def model_and_optimizer(plan: Plan) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.device]:
    from workbench.bench.run import build_model

    device = torch.device(plan.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model("official-lora", plan.tiny, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, betas=(0.9, 0.95), fused=device.type == "cuda")
    return model, optimizer, device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(model, optimizer, batch: dict, device: torch.device) -> tuple[float, float]:
    """One optimizer step on `batch` (already collated); (seconds until the device is done, loss)."""
    sync(device)
    start = time.perf_counter()
    loss = model(**to_device(batch, device)).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start, float(loss.detach())


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

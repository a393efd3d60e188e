"""`workbench bench`: time the training step of a recipe on random weights built on the device.

No download: the model is built from the release's config directly on the GPU (or, with
`--tiny`, the built-in tiny model on the CPU, for tests), then quantised and adapted exactly as
`workbench train` does (`adapters.apply.apply_recipe`), with the training-time settings
(gradient checkpointing, chunked loss). Each measured iteration is one optimizer step over
`grad_accum` micro-batches; the first iteration is a warm-up and is not counted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from workbench.adapters.apply import apply_recipe
from workbench.adapters.recipe import load_recipe
from workbench.bench.flops import step_flops
from workbench.bench.workload import bench_config, default_dtype, n_text_tokens, synthetic_batch
from workbench.demo.tiny import init_tiny_weights
from workbench.model.modeling import QWenLMHeadModel

GiB = 2**30
LOSS_CHUNK_SIZE = 1024  # rows of the chunked cross-entropy (train's default too)


@dataclass
class BenchResult:
    recipe: str
    seq_len: int
    s_per_it: float
    tokens_per_s: float
    peak_allocated_gib: float | None
    peak_reserved_gib: float | None
    tflops: float
    pct_of_matmul: float
    trainable_params: int


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s of this device: the ceiling the step is compared with."""
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def build_model(recipe_name: str, tiny: bool, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights of the real (or tiny) size, built on `device`, adapted as `workbench train` does."""
    config = bench_config(tiny)
    config.use_cache = False
    with torch.device(device), default_dtype(dtype):
        model = QWenLMHeadModel(config)
    model.to(dtype)  # the few tables built in float32 (attn_pool.pos_embed), as load_model's dtype does
    init_tiny_weights(model, n_text_tokens(config) + 217, seed=0)
    model.loss_chunk_size = LOSS_CHUNK_SIZE
    model = apply_recipe(model, load_recipe(recipe_name))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def run_bench(recipe_name: str, seq_lens: list[int], *, rate: float, steps: int = 3, grad_accum: int = 8,
              tiny: bool = False, device: torch.device) -> list[BenchResult]:
    """One recipe at several lengths; `rate` is `matmul_rate(device, dtype)`, measured once per run."""
    return list(iter_bench(recipe_name, seq_lens, rate=rate, steps=steps, grad_accum=grad_accum, tiny=tiny,
                           device=device))


def iter_bench(recipe_name: str, seq_lens: list[int], *, rate: float, steps: int = 3, grad_accum: int = 8,
               tiny: bool = False, device: torch.device) -> Iterator[BenchResult]:
    """`run_bench`, one result at a time as each length finishes (the GPU suite records each row at
    once and may stop between lengths when its time budget runs out)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(recipe_name, tiny, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    config = model.base_model.model.config
    for seq_len in seq_lens:
        batch = synthetic_batch(config, seq_len, device)
        times = _time_steps(model, optimizer, batch, steps, grad_accum, device, f"{recipe_name} @ {seq_len}")
        s_it = statistics.median(times)
        flops = step_flops(config, seq_len, images_per_sample=1, grad_accum=grad_accum)
        cuda = device.type == "cuda"
        yield BenchResult(
            recipe=recipe_name, seq_len=seq_len, s_per_it=s_it, tokens_per_s=seq_len * grad_accum / s_it,
            peak_allocated_gib=torch.cuda.max_memory_allocated(device) / GiB if cuda else None,
            peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GiB if cuda else None,
            tflops=flops / s_it / 1e12, pct_of_matmul=100 * flops / s_it / rate,
            trainable_params=sum(p.numel() for p in params))


def _time_steps(model, optimizer, batch: dict, steps: int, grad_accum: int, device: torch.device,
                label: str) -> list[float]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for it in tqdm(range(steps + 1), desc=label, unit="it"):
        _sync(device)
        start = time.perf_counter()
        for _ in range(grad_accum):
            loss = model(**batch).loss / grad_accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if it > 0:  # the first step warms up kernels and allocates optimizer state
            times.append(time.perf_counter() - start)
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device, rate: float) -> dict:
    """What a BENCHMARKS.md row must say: card, versions, the measured matmul ceiling."""
    import peft
    import transformers

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": card, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "matmul_tflops": rate / 1e12,
            "date": time.strftime("%Y-%m-%d")}


def as_dicts(results: list[BenchResult]) -> list[dict]:
    return [asdict(r) for r in results]


def format_table(results: list[BenchResult], rate_note: str = "") -> str:
    def gib(v: float | None) -> str:
        return f"{v:.1f}" if v is not None else "n/a"

    rows = ["| recipe | seq len | s/it (median) | tokens/s | peak alloc GiB | peak reserved GiB | TFLOP/s | % of matmul |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| {r.recipe} | {r.seq_len} | {r.s_per_it:.3f} | {r.tokens_per_s:.0f} | "
                    f"{gib(r.peak_allocated_gib)} | {gib(r.peak_reserved_gib)} | {r.tflops:.3g} | "
                    f"{r.pct_of_matmul:.1f} |")
    return "\n".join(rows) + (f"\n{rate_note}" if rate_note else "")

"""`workbench quantize`: GPTQ of the LLM's block linears, calibrated on the user's own samples,
written in the Int4 release's layout (layout.py).

How calibration inputs reach the layers (the model-specific wiring; the GPTQ maths and the packing
are GPTQModel's): each calibration sample goes through the chat template, the tokenizer, the ViT and
the resampler exactly as in training, and the hidden states entering block 0 are captured with
their rotary table and mask. Then block by block, one block's weights in memory at a time: for each
step of `SEQUENTIAL` the block is replayed on every sample while GPTQ accumulates the inputs of the
step's linears, the step is quantised (its weights replaced by their quantised values, so later
steps see the quantisation error, as AutoGPTQ's `true_sequential`), and finally the block's outputs
with all its linears quantised become the next block's inputs.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from workbench.atomic import write_json
from workbench.data.config import DataConfig
from workbench.data.dataset import SFTDataset, build_samples
from workbench.data.length import apply_length_policy
from workbench.data.records import load_conversations
from workbench.errors import CheckpointError, DataError, WorkbenchError
from workbench.gptq import quiet_library
from workbench.gptq.layout import QUANTIZED, RELEASE_FLOAT, SEQUENTIAL, GPTQSpec, plan
from workbench.model import checkpoint
from workbench.model.config import load_config
from workbench.model.shard_writer import ShardWriter

TEMP_PREFIX = ".{name}.quantizing-"  # + pid
REPORT = "quantize_report.json"


@dataclass
class Calibration:
    """Where the samples enter block 0: hidden states [1, S, D] and the block's keyword arguments."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]


class _Captured(Exception):
    """Raised by the block-0 hook: nothing after block 0's input is needed."""


def quantize(model: str | Path, data: str | Path, out: str | Path, spec: GPTQSpec, samples: int = 128,
             max_length: int = 2048, device: str = "cpu", adapter: str | Path | None = None,
             max_shard_size: str = "2GB") -> dict:
    """Quantise `model` (a 16-bit folder; with `adapter`, the adapter is merged first) into `out`."""
    quiet_library()
    model_dir, out = checkpoint.resolve_model_dir(model), Path(out)
    config = load_config(model_dir)
    _refuse(model_dir, config, spec, out)
    if adapter is not None:  # merge first, into a folder beside `out` that is removed at the end
        from workbench.merge.merge import merge_adapter

        merged = out.parent / f".{out.name}.merged-{os.getpid()}"
        merge_adapter(model_dir, adapter, merged)
        try:
            return quantize(merged, data, out, spec, samples, max_length, device, None, max_shard_size)
        finally:
            shutil.rmtree(merged, ignore_errors=True)
    samples_data = calibration_samples(model_dir, config, data, samples, max_length)
    tmp = out.parent / f"{TEMP_PREFIX.format(name=out.name)}{os.getpid()}"
    start = time.perf_counter()
    try:
        tmp.mkdir(parents=True)
        report = _quantize_into(model_dir, config, samples_data, spec, tmp, torch.device(device), max_shard_size)
        # source_fingerprint: training on this Int4 model records it, so that its adapters merge
        # onto the 16-bit source with the base check (merge/report.py).
        report.update(seconds=round(time.perf_counter() - start, 1), samples=len(samples_data),
                      peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
                      source=str(model_dir), source_fingerprint=checkpoint.fingerprint(model_dir),
                      calibration=str(data))
        write_json(tmp / REPORT, report)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def quantized_from(model_dir: Path) -> dict | None:
    """The fingerprint of the 16-bit model an Int4 folder was quantised from (its quantize report)."""
    try:
        return json.loads((Path(model_dir) / REPORT).read_text()).get("source_fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _refuse(model_dir: Path, config, spec: GPTQSpec, out: Path) -> None:
    """Everything that can be refused before any work."""
    if getattr(config, "quantization_config", None):
        raise CheckpointError(f"{model_dir}: already quantized (config.json has quantization_config); "
                              "quantize the 16-bit model it came from")
    if out.exists():
        raise WorkbenchError(f"{out} already exists; choose a new --out folder")
    from workbench.model.modeling import QWenLMHeadModel

    with torch.device("meta"):
        meta = QWenLMHeadModel(config)
    try:
        plan(meta, spec)  # a group size that does not divide a layer fails here
    except ValueError as err:
        raise WorkbenchError(f"--group-size: {err}") from None


def calibration_samples(model_dir: Path, config, data: str | Path, samples: int, max_length: int) -> list[dict]:
    """The first `samples` records of `data` as the model sees them in training: input_ids [1, S]
    and pixel_values [K, 3, H, W]. Bad records and too few of them are refused."""
    from workbench.model.tokenizer import QWenTokenizer

    tokenizer = QWenTokenizer.from_pretrained(model_dir)
    cfg = DataConfig(train=(str(data),), max_length=max_length)
    loaded = load_conversations(cfg.train, cfg)
    problems = list(loaded.problems)
    rows = build_samples(loaded.conversations, tokenizer, cfg, problems)
    if problems:  # refused, not skipped: the calibration set is the user's choice of samples
        more = f" (and {len(problems) - 1} more; `workbench data check {data}` lists them)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}")
    dataset = SFTDataset(apply_length_policy(rows, max_length, "truncate")[0], config.visual["image_size"])
    if len(dataset) < samples:
        raise DataError(f"{len(dataset)} calibration sample(s), --samples asks for {samples}; add records "
                        f"or pass --samples {len(dataset)} (GPTQ needs a few dozen to be reliable)", file=str(data))
    items = (dataset[i] for i in range(samples))
    return [{"input_ids": it["input_ids"][None], "pixel_values": it["pixel_values"]} for it in items]


def _quantize_into(model_dir: Path, config, samples: list[dict], spec: GPTQSpec, out: Path,
                   device: torch.device, max_shard_size: str) -> dict:
    from workbench.model.modeling import QWenLMHeadModel

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16  # GPTQ's Hessian wants precision
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    specs = plan(model, spec)
    blocks = [s for s in specs if s.name.startswith("transformer.h.")]
    # The unquantised rest is copied last, in the source's file order, so each file is read once.
    by_name = {s.name: s for s in specs if not s.name.startswith("transformer.h.")}
    rest = [by_name[k] for _, keys in checkpoint.shard_files(model_dir) for k in keys if k in by_name]
    writer = ShardWriter(out, blocks + rest, checkpoint.parse_size(max_shard_size))
    calib = capture_block_inputs(model, model_dir, samples, device, dtype)
    errors = {}
    for i in tqdm(range(len(model.transformer.h)), desc="quantizing blocks", unit="block"):
        prefix = f"transformer.h.{i}."
        block = _materialize(model.transformer.h[i], model_dir, prefix, device, dtype)
        packed, errors[i] = quantize_block(block, calib, spec)
        tensors = {**{f"{prefix}{k}": v for k, v in packed.items()},
                   **{f"{prefix}{k}": v for k, v in block.state_dict().items() if k.startswith("ln_")}}
        for s in (s for s in blocks if s.name.startswith(prefix)):
            writer.add(s.name, tensors[s.name].to(s.dtype).cpu())
        model.transformer.h[i] = block.to("meta")  # free the block
    for _, keys in checkpoint.shard_files(model_dir):  # one source file at a time
        wanted = [k for k in keys if k in by_name]
        for name, tensor in zip(wanted, _read_in_order(model_dir, wanted), strict=True):
            writer.add(name, tensor.to(by_name[name].dtype))
    index = writer.close()
    _write_config(model_dir, out, spec)
    return {"bits": spec.bits, "group_size": spec.group_size, "total_bytes": index["metadata"]["total_size"],
            "mean_gptq_loss_per_block": {str(i): e for i, e in errors.items()}}


def capture_block_inputs(model: nn.Module, model_dir: Path, samples: list[dict], device: torch.device,
                         dtype: torch.dtype) -> Calibration:
    """Run the embedding, ViT and resampler (read from `model_dir`) on every sample; keep what enters
    block 0. Those parts are freed afterwards (they are written later straight from the files)."""
    names = [k for k in model.state_dict() if not k.startswith(("transformer.h.", "lm_head", "transformer.ln_f"))]
    model.load_state_dict({k: t.to(device, dtype) for k, t in zip(names, _read_in_order(model_dir, names),
                                                                    strict=True)}, strict=False, assign=True)
    calib = Calibration([], [])

    def hook(_module, args, kwargs):
        calib.hidden.append(args[0])
        calib.kwargs.append(kwargs)
        raise _Captured

    handle = model.transformer.h[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for sample in tqdm(samples, desc="calibration inputs", unit="sample", disable=len(samples) < 8):
                try:
                    model.transformer(sample["input_ids"].to(device), pixel_values=sample["pixel_values"].to(device),
                                      use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    model.transformer.visual.to("meta")
    model.transformer.wte.to("meta")
    return calib


def quantize_block(block: nn.Module, calib: Calibration, spec: GPTQSpec) -> tuple[dict[str, torch.Tensor], float]:
    """GPTQ of one block's linears, step by step; returns their packed tensors (release names
    relative to the block) and the mean GPTQ loss. Replaces calib.hidden by the block's outputs."""
    from gptqmodel.quantization.gptq import GPTQ

    packed, losses = {}, []
    steps = SEQUENTIAL if spec.true_sequential else (QUANTIZED,)
    for step in steps:
        gptq = {}
        for name in step:
            gptq[name] = GPTQ(block.get_submodule(name), library_config(spec))
            gptq[name].quantizer.configure(bits=spec.bits, sym=spec.sym, perchannel=True)
        handles = [block.get_submodule(name).register_forward_hook(
            lambda _m, inp, out, g=gptq[name]: g.add_batch(inp[0].data, out.data)) for name in step]
        _replay(block, calib)
        for h in handles:
            h.remove()
        for name in step:
            scale, zero, g_idx, _secs, loss, _damp = gptq[name].hf_quantize(
                percdamp=spec.damp_percent, group_size=spec.group_size, actorder=spec.desc_act,
                static_groups=spec.static_groups)
            losses.append(float(loss))
            packed.update({f"{name}.{k}": v for k, v in pack(block.get_submodule(name), scale, zero, g_idx, spec).items()})
    calib.hidden = _replay(block, calib)
    return packed, sum(losses) / len(losses)


def pack(linear: nn.Linear, scale: torch.Tensor, zero: torch.Tensor, g_idx: torch.Tensor,
         spec: GPTQSpec) -> dict[str, torch.Tensor]:
    """The release's five tensors of one quantised linear (its weight already GPTQ's result)."""
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module
    from gptqmodel.utils.packing import hf_pack_layer

    from workbench.gptq.modules import kernel_class, new_linear

    # The packer reads weight and bias of an nn.Linear: a meta one given the CPU tensors (no random init).
    cpu = nn.Linear(linear.in_features, linear.out_features, bias=True, device="meta")
    cpu.weight = nn.Parameter(linear.weight.data.float().cpu(), requires_grad=False)
    bias = linear.bias.data.float().cpu() if linear.bias is not None else torch.zeros(linear.out_features)
    cpu.bias = nn.Parameter(bias, requires_grad=False)
    module = new_linear(kernel_class(spec, "cpu"), spec, linear.in_features, linear.out_features)
    hf_pack_layer(module, cpu, scale.cpu(), zero.cpu(), g_idx.cpu(), checkpoint_format="gptq")
    # The packer leaves the true zero points (GPTQModel's v2); the release's files hold zero - 1 (v1).
    convert_gptq_v2_to_v1_format_module(module, quantize_config=library_config(spec))
    state = module.state_dict()
    return {k: state[k] for k in ("qweight", "qzeros", "scales", "g_idx", "bias")}


def library_config(spec: GPTQSpec):
    """The spec as GPTQModel's QuantizeConfig."""
    from gptqmodel.quantization.config import QuantizeConfig

    # offload_to_disk: the library's own model loop parks modules on disk; ours never needs it.
    return QuantizeConfig(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, desc_act=spec.desc_act,
                          offload_to_disk=False)


def _replay(block: nn.Module, calib: Calibration) -> list[torch.Tensor]:
    with torch.no_grad():
        return [block(h, **kw) for h, kw in zip(calib.hidden, calib.kwargs, strict=True)]


def _materialize(block: nn.Module, model_dir: Path, prefix: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    names = [prefix + k for k in block.state_dict()]
    tensors = _read_in_order(model_dir, names)
    block.load_state_dict({n.removeprefix(prefix): t.to(device, dtype) for n, t in zip(names, tensors, strict=True)},
                          assign=True)
    return block


def _read_in_order(model_dir: Path, names: list[str]) -> list[torch.Tensor]:
    found = checkpoint.read_tensors(model_dir, names)
    return [found[n] for n in names]


def _write_config(model_dir: Path, out: Path, spec: GPTQSpec) -> None:
    """config.json as the Int4 release's: float16, quantization_config; quantize_config.json; the
    tokenizer and other small files of the source."""
    checkpoint.copy_non_weight_files(model_dir, out)
    (out / "merge_report.json").unlink(missing_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(bf16=False, fp16=True, fp32=False, torch_dtype=str(RELEASE_FLOAT).removeprefix("torch."),
                  quantization_config=spec.quantization_config())
    write_json(out / "config.json", config)
    write_json(out / "quantize_config.json", spec.quantize_config())


"""Stream a base checkpoint shard by shard, fold a LoRA adapter into it, write the release layout.

Peak memory is the mapped input shard, the tensor being merged and the one being written (reused
scratch buffers), and the adapter: a 9.6B model merges on a 24 GiB machine at about the speed of
copying its files (BENCHMARKS.md). Output
weights are safetensors shards + index (the release's pytorch_model-*.bin layout is read, not
written: safetensors loads without unpickling). The maths runs in float32 and is cast once to the
output dtype; tensors the adapter does not touch are passed through untouched (bit for bit
unless --dtype).
The output is built in a hidden folder next to OUT and renamed at the end, so an interrupted
merge never leaves a partial OUT.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from workbench.atomic import write_json
from workbench.dtypes import FLAG_DTYPES, dtype_flag
from workbench.errors import CheckpointError, WorkbenchError, first_line
from workbench.merge.adapter import Adapter, LoraDelta, read_adapter
from workbench.merge.combine import Combine, combine_adapters, model_key_order
from workbench.merge.export import write_adapter_files, write_combined_adapter
from workbench.merge.report import BaseCheck, build_report, write_report
from workbench.model import checkpoint, digests
from workbench.model.config import load_config
from workbench.model.shard_writer import ShardWriter

TEMP_PREFIX = ".{name}.merging-"  # + the pid of the merge that writes it


def remove_stale_temp_folders(out: Path) -> list[Path]:
    """Delete the temporary folders of merges into `out` whose process is gone (killed, crashed)."""
    removed = []
    for folder in out.parent.glob(f"{TEMP_PREFIX.format(name=out.name)}*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def merge_adapter(base: str | Path, adapter: str | Path, out: str | Path, **options) -> dict:
    """Write base + adapter as one merged checkpoint in `out`; returns the merge report."""
    return merge_adapters(base, [adapter], out, **options)


def merge_adapters(base: str | Path, adapters: Sequence[str | Path], out: str | Path, *,
                   combine: Combine | None = None, adapter_out: bool = False, dtype: torch.dtype | None = None,
                   max_shard_size: int | str = "2GB", force: bool = False, overwrite: bool = False,
                   verify: bool = False, device: str = "cpu") -> dict:
    """Write base + the adapters (combined by `combine`) as one checkpoint in `out`, or with
    `adapter_out` the combined adapter alone; returns the merge report.

    One adapter without `combine` merges as it is; several are combined (default: cat).
    Everything that can be refused (paths, adapters, the combination, a base recorded differently
    by two adapters) is refused before anything is written.
    """
    try:
        max_shard_size = checkpoint.parse_size(max_shard_size)
    except ValueError as err:
        raise WorkbenchError(f"--max-shard-size: {err}") from None
    base_dir = checkpoint.resolve_model_dir(base)
    adapter_dirs, out = [Path(a) for a in adapters], Path(out)
    device = str(merge_device(device))
    if adapter_out and (verify or dtype is not None):
        raise WorkbenchError("--adapter-out writes an adapter, not merged weights: --verify and --dtype do not apply")
    if combine is None and (len(adapter_dirs) > 1 or adapter_out):
        combine = Combine()  # one adapter to --adapter-out: rewritten as PEFT's linear of one (no rank patterns)
    if combine is not None:
        combine.check(len(adapter_dirs))  # a wrong --weights count fails before any adapter is read
    _check_paths(base_dir, adapter_dirs, out, overwrite)
    if getattr(load_config(base_dir), "quantization_config", None):
        raise WorkbenchError(f"--base {base}: a quantised checkpoint; merge into the 16-bit model it came from "
                             "(then `workbench quantize` the merged model to ship it in Int4)")
    base_keys = set(checkpoint.weight_map(base_dir))
    sources = [read_adapter(d, base_keys) for d in adapter_dirs]
    lora = sources[0] if combine is None else combine_adapters(
        sources, combine, model_key_order(base_dir), force=force, device=device)
    base_check = BaseCheck(sources, base_dir, force)
    base_fingerprint = {"config_sha256": digests.sha256_file(base_dir / "config.json"), "weights": {}}
    base_check.config(base_fingerprint["config_sha256"])  # a wrong base fails here, before any weight is read

    remove_stale_temp_folders(out)
    tmp = out.parent / f"{TEMP_PREFIX.format(name=out.name)}{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        if adapter_out:
            report = write_combined_adapter(tmp, lora, sources, combine, base_dir, base_fingerprint, base_check)
        else:
            written = stream_merge(base_dir, lora, tmp, dtype, max_shard_size, base_check,
                                   base_fingerprint["weights"], device)
            checkpoint.copy_non_weight_files(base_dir, tmp)
            if dtype is not None:
                _set_config_dtype(tmp / "config.json", dtype)
            report = build_report(base_dir, base_fingerprint, sources, lora, combine, written, dtype,
                                  base_check.outcome)
            if verify:
                report["verify"] = _verify(base_dir, lora, sources, combine, tmp, device)
        write_report(tmp, report)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def merge_device(name: str | torch.device) -> torch.device:
    """The device the merge maths run on, with its index (`cuda` -> `cuda:0`); refused if absent."""
    try:
        return torch.empty(0, device=name).device
    except (RuntimeError, AssertionError) as err:
        raise WorkbenchError(f"--device {name}: {first_line(err)}") from None


def _verify(base_dir: Path, lora: Adapter, sources: list[Adapter], combine: Combine | None, merged: Path,
            device: str) -> dict:
    """--verify against PEFT: the adapter itself, or the combined adapter written out for PEFT to load."""
    from workbench.merge.verify import verify_merge

    if combine is None:
        return verify_merge(base_dir, lora.path, merged, device=device)
    reference = merged / ".combined-adapter"
    try:
        write_adapter_files(reference, lora)
        return verify_merge(base_dir, reference, merged, device=device)
    finally:
        shutil.rmtree(reference, ignore_errors=True)


def stream_merge(base_dir: Path, lora: Adapter, out_dir: Path, dtype: torch.dtype | None, max_shard_size: int,
                 base_check: BaseCheck, weight_digests: dict[str, str], device: str = "cpu") -> dict[str, str]:
    """Merge every base tensor into `out_dir`; returns {key: what was done} for the touched keys.

    One pass over the base: while file i is merged, a thread hashes file i+1 (sha256 releases the
    GIL), which also pulls it into the page cache, so the merge reads it from memory; a file whose
    digest is remembered (digests.py: hashed before, unchanged since) is only read. Base files
    are mapped, not read (`mmap=True`); the writer streams each tensor to its shard as it comes, so
    the process holds the mapped input file and the tensor being merged, nothing more.
    """
    files = checkpoint.shard_files(base_dir)
    names = [str(path.relative_to(base_dir)) for path, _ in files]
    base_check.files(names)
    specs = [replace(s, dtype=_out_dtype(s.dtype, dtype)) for s in checkpoint.tensor_specs(base_dir)]
    writer = ShardWriter(out_dir, specs, max_shard_size)
    lora = _to_device(lora, device)
    scratch = Scratch()  # two outputs in turn: the writer below holds at most one while the next is computed
    done: dict[str, str] = {}
    bar = tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, desc="merging",
               disable=len(files) < 2)
    # One thread hashes (and so reads ahead), one writes: the merge maths of tensor k+1 runs while
    # tensor k goes to disk, and at most one merged tensor waits for the disk. While the hasher is
    # busy the maths take one thread, not two: on two cores, three busy threads slow all of them
    # (BENCHMARKS.md: less CPU and a faster hash for the same merge).
    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(max_workers=1) as hasher, ThreadPoolExecutor(max_workers=1) as io, bar:
            pending, writing = hasher.submit(digest_ahead, files[0][0]), None
            for i, ((path, keys), name) in enumerate(zip(files, names, strict=True)):
                weight_digests[name] = pending.result()
                base_check.weight(name, weight_digests[name])
                if i + 1 < len(files):
                    pending = hasher.submit(digest_ahead, files[i + 1][0])
                shard = checkpoint.load_weight_file(path, mmap=True)
                for key in keys:
                    torch.set_num_threads(threads if pending.done() else max(1, threads - 1))
                    # pop: hold no reference of our own, so each mapped input tensor goes once written
                    tensor, action = merge_tensor(key, shard.pop(key), lora, dtype, device, scratch)
                    checkpoint.check_finite({key: tensor}, f"merged output (from {base_dir})")  # every tensor written
                    if writing is not None:
                        writing.result()
                    writing = io.submit(writer.add, key, tensor)
                    bar.update(tensor.numel() * tensor.element_size())
                    if action:
                        done[key] = action
                    del tensor
                del shard
            if writing is not None:
                writing.result()
    finally:
        torch.set_num_threads(threads)
    writer.close()
    missing = (set(lora.deltas) | set(lora.bias_deltas) | set(lora.replacements)) - set(done)
    if missing:  # weight_map and the shards disagree: the base folder is inconsistent
        raise CheckpointError(f"{base_dir}: keys {sorted(missing)} are in the index but in no shard")
    return done


def digest_ahead(path: Path) -> str:
    """The file's sha256, with the file read into the page cache: hashing reads it, and a file
    whose digest is remembered is read through without hashing."""
    remembered = digests.remembered_sha256(path)
    if remembered is None:
        return digests.hash_and_remember(path)
    checkpoint.read_through(path)  # fadvise(WILLNEED) would read only read_ahead_kb (a few MB) of it
    return remembered


def _to_device(lora: Adapter, device: str | torch.device) -> Adapter:
    """The adapter with its LoRA factors on the merge's device, moved once (each is cast to float32
    when used: float32 copies of all factors of the release's adapter would hold 0.5 GB)."""
    device = torch.device(device)
    if device.type == "cpu":
        return lora
    deltas = {k: replace(d, A=d.A.to(device), B=d.B.to(device),
                         magnitude=None if d.magnitude is None else d.magnitude.to(device))
              for k, d in lora.deltas.items()}
    return replace(lora, deltas=deltas)


def _out_dtype(base: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and base.is_floating_point else base


# Rows of float32 the CPU maths take per step: W's rows are converted, updated and cast back while
# they sit in the cache, where a whole float32 copy of a 200 MB weight would go through memory
# three times (BENCHMARKS.md, "The maths in row blocks": less CPU, the same bits).
BLOCK_BYTES = 4 << 20


class Scratch:
    """Two reused CPU output buffers, taken in turn: one is being written while the next is computed.

    A fresh 200 MB tensor per merged weight costs the kernel a page fault and a zeroed page per
    4 KiB: about 10 s of system time over the release's 5 billion merged values, as much as the
    maths itself (BENCHMARKS.md). Reused buffers are faulted in once.
    """

    def __init__(self) -> None:
        self._outs = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
        self._turn = 0

    def out(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        self._turn = 1 - self._turn
        nbytes = shape.numel() * dtype.itemsize
        if self._outs[self._turn].numel() < nbytes:
            self._outs[self._turn] = torch.empty(nbytes, dtype=torch.uint8)
        return self._outs[self._turn][:nbytes].view(dtype).view(shape)


def merge_tensor(key: str, tensor: torch.Tensor, lora: Adapter, dtype: torch.dtype | None,
                 device: str | torch.device = "cpu", scratch: Scratch | None = None
                 ) -> tuple[torch.Tensor, str | None]:
    """(merged tensor on the CPU, action or None) for one base tensor; LoRA maths on `device`.

    With `scratch` (CPU maths only), a merged weight lives in a scratch buffer that the call after
    next reuses: it must be written out before then.
    """
    out_dtype = _out_dtype(tensor.dtype, dtype)
    if key in lora.replacements:
        new = lora.replacements[key]
        if new.shape != tensor.shape:
            raise CheckpointError(f"{lora.where}: trained '{key}' has shape {tuple(new.shape)}, "
                                  f"base has {tuple(tensor.shape)}")
        return new.to(out_dtype), "trained"
    if key in lora.deltas:
        device = torch.device(device)
        # cast where the maths ran: from a GPU, half the bytes come back
        out = (scratch.out(tensor.shape, out_dtype) if scratch is not None and device.type == "cpu"
               else torch.empty(tensor.shape, dtype=out_dtype, device=device))
        return _apply_delta(key, tensor, lora.deltas[key], lora, out).cpu(), "lora"
    if key in lora.bias_deltas:
        return (tensor.float() + lora.bias_deltas[key]).to(out_dtype), "lora_bias"
    return tensor.to(out_dtype), None


def _apply_delta(key: str, weight: torch.Tensor, delta: LoraDelta, lora: Adapter, out: torch.Tensor) -> torch.Tensor:
    """`out` (W's shape, the output dtype, on the maths' device) = W + scale * B @ A, DoRA's row
    rescale after it, in float32 a block of rows at a time (the whole tensor at once on a GPU).
    The (mapped) base tensor is only read."""
    device = out.device
    # B.flatten(1) @ A.flatten(1) covers nn.Linear ([out,r] @ [r,in]) and PEFT's Conv2d LoRA
    # (1x1 B, A with the layer's kernel), whose product reshapes to the weight's shape.
    B, A = delta.B.to(device, torch.float32).flatten(1), delta.A.to(device, torch.float32).flatten(1)
    if B.shape[0] * A.shape[1] != weight.numel():
        raise CheckpointError(f"{lora.where}: LoRA on '{delta.module}' gives a delta of "
                              f"{(B.shape[0], A.shape[1])} for '{key}' of shape {tuple(weight.shape)}")
    # W as rows x cols += left @ right; lora_embedding_A [r, vocab] and B [dim, r] give W [vocab, dim]
    # the transposed product, A^T @ B^T.
    left, right = (A.T, B.T) if delta.embedding else (B, A)
    rows, cols = left.shape[0], right.shape[1]
    w, o = weight.reshape(rows, cols), out.view(rows, cols)
    step = max(1, BLOCK_BYTES // (4 * cols)) if device.type == "cpu" else rows
    work = torch.empty(min(step, rows), cols, device=device)
    magnitude = None if delta.magnitude is None else delta.magnitude.to(device, torch.float32)
    for i in range(0, rows, step):
        block = work[:min(step, rows - i)].copy_(w[i:i + step])
        block.addmm_(left[i:i + step], right, alpha=delta.scale)
        if magnitude is not None:  # DoRA: each output row rescaled to its magnitude over the norm of W + ΔW
            block.mul_((magnitude[i:i + step] / torch.linalg.norm(block, dim=1)).unsqueeze(1))
        o[i:i + step].copy_(block)
    return out


def _check_paths(base_dir: Path, adapter_dirs: list[Path], out: Path, overwrite: bool) -> None:
    out_r = out.resolve()
    for name, path in (("BASE", base_dir.resolve()), *(("ADAPTER", a.resolve()) for a in adapter_dirs)):
        if out_r == path or path in out_r.parents or out_r in path.parents:
            raise WorkbenchError(f"--out {out} overlaps {name} {path}; choose a separate folder")
    if out.exists() and not overwrite:
        raise WorkbenchError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"{out} exists and is not a folder")


def _publish(tmp: Path, out: Path) -> None:
    # Move the old OUT aside first so that OUT is always either the old or the complete new merge.
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def _set_config_dtype(config_path: Path, dtype: torch.dtype) -> None:
    """Record the new dtype: `torch_dtype`, and move a forced bf16/fp16/fp32 flag with it.

    All three flags false means "pick by hardware" (docs/qwen-vl.md §5.9); that choice is left alone.
    """
    config = json.loads(config_path.read_text())
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if any(config.get(flag) for flag in FLAG_DTYPES):
        for flag in FLAG_DTYPES:
            config[flag] = flag == dtype_flag(dtype)
    write_json(config_path, config)


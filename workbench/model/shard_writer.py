"""Writing weights in shards at disk speed: plan the shards from the tensors' specs, then stream.

A safetensors file is an 8-byte little-endian header length, a JSON header naming every tensor's
dtype, shape and byte range, then the raw bytes. Knowing every tensor's dtype and shape up front
(`TensorSpec`), the writer puts the header down first and appends each tensor's bytes the moment
it is handed over, so nothing is collected or copied: a merge holds one tensor, not one output
shard. The `.bin` layout (torch.save of a dict) cannot be streamed and collects one shard.

Shards are written under hidden temporary names and renamed to the release's names
(`model-00001-of-0000N.safetensors`, `pytorch_model-00001-of-0000N.bin`) by `close()`, which
then writes the index; a lone shard is `model.safetensors` / `pytorch_model.bin` with no index,
as transformers writes it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from workbench.atomic import write_json
from workbench.errors import CheckpointError

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

# safetensors' dtype names (its format spec); a dtype missing here cannot be written.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
DTYPES_BY_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor will be, before it exists: enough to lay out a safetensors header."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name, tensor.dtype, tuple(tensor.shape))

    @property
    def nbytes(self) -> int:
        numel = 1
        for n in self.shape:
            numel *= n
        return numel * self.dtype.itemsize


def plan_shards(specs: Iterable[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy, in order: a new shard when the next tensor would overflow (a bigger tensor goes alone)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or (shards[-1] and size + spec.nbytes > max_shard_size):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards or [[]]


def safetensors_header(specs: list[TensorSpec]) -> bytes:
    """The length-prefixed JSON header of a safetensors file holding `specs` in this order."""
    entries: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        if spec.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{spec.name}: dtype {spec.dtype} cannot be stored in safetensors")
        entries[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes (aligned tensor data)
    return struct.pack("<Q", len(header)) + header


def read_safetensors_specs(path: Path) -> list[TensorSpec]:
    """The tensors of a safetensors file from its header alone (no tensor bytes are read)."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return [TensorSpec(name, DTYPES_BY_NAME[h["dtype"]], tuple(h["shape"])) for name, h in items]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor in C order, without a copy when it is already contiguous."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


class ShardWriter:
    """Writes the planned tensors, handed over one by one in plan order, into release-named shards."""

    def __init__(self, out_dir: str | os.PathLike, specs: Iterable[TensorSpec], max_shard_size: int,
                 layout: str = "safetensors"):
        if layout not in ("safetensors", "bin"):
            raise ValueError(f"layout must be 'safetensors' or 'bin', not {layout!r}")
        self.out_dir, self.layout = Path(out_dir), layout
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.plan = plan_shards(specs, max_shard_size)
        self._queue = [(i, spec) for i, shard in enumerate(self.plan) for spec in shard]
        self._next = 0  # position in _queue
        self._file: BinaryIO | None = None
        self._collected: dict[str, torch.Tensor] = {}  # the .bin layout's current shard
        self.written: list[Path] = []  # finished shards, under their temporary names

    def _tmp(self, shard: int) -> Path:
        return self.out_dir / f".tmp-shard-{shard + 1:05d}.{'safetensors' if self.layout == 'safetensors' else 'bin'}"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._queue):
            raise ValueError(f"{name}: more tensors than planned ({len(self._queue)})")
        shard, spec = self._queue[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (spec.name, spec.dtype, spec.shape):
            raise ValueError(f"expected {spec.name} {spec.dtype} {list(spec.shape)} next, "
                             f"got {name} {tensor.dtype} {list(tensor.shape)}")
        if self.layout == "bin":
            # clone: torch.save would otherwise write whole parent storages of views
            self._collected[name] = tensor.detach().to("cpu").contiguous().clone()
        else:
            if self._file is None:
                self._file = self._tmp(shard).open("wb")
                self._file.write(safetensors_header(self.plan[shard]))
            self._file.write(tensor_bytes(tensor))
        self._next += 1
        if self._next == len(self._queue) or self._queue[self._next][0] != shard:
            self._finish(shard)

    def _finish(self, shard: int) -> None:
        tmp = self._tmp(shard)
        if self.layout == "bin":
            torch.save(self._collected, tmp)
            self._collected = {}
        else:
            if self._file is None:  # a planned shard with no tensors: an empty model
                self._file = tmp.open("wb")
                self._file.write(safetensors_header([]))
            self._file.close()
            self._file = None
        self.written.append(tmp)

    def close(self) -> dict:
        """Rename the shards to the release names and write the index; returns the index dict."""
        if self._next < len(self._queue):
            missing = [spec.name for _, spec in self._queue[self._next:]]
            raise ValueError(f"{len(missing)} planned tensor(s) never written, e.g. {missing[:3]}")
        if not self.written:
            self._finish(0)
        n = len(self.plan)
        stem, ext = ("model", "safetensors") if self.layout == "safetensors" else ("pytorch_model", "bin")
        weight_map: dict[str, str] = {}
        for i, (tmp, shard) in enumerate(zip(self.written, self.plan, strict=True), start=1):
            name = f"{stem}.{ext}" if n == 1 else f"{stem}-{i:05d}-of-{n:05d}.{ext}"
            tmp.replace(self.out_dir / name)
            weight_map.update(dict.fromkeys((s.name for s in shard), name))
        index = {"metadata": {"total_size": sum(s.nbytes for shard in self.plan for s in shard)},
                 "weight_map": dict(sorted(weight_map.items()))}
        if n > 1:
            write_json(self.out_dir / (SAFE_INDEX if self.layout == "safetensors" else BIN_INDEX), index)
        return index

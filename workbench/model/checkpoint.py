"""Model folders: resolve, read weights shard by shard, write sharded copies, fingerprint.

Three weight layouts are read (docs/qwen-vl.md §8.4), first match wins: `model.safetensors`,
`model.safetensors.index.json` + shards, `pytorch_model.bin.index.json` + `.bin` shards
(torch-saved plain dicts; also a lone `pytorch_model.bin`). `load_model` builds the model on
the meta device and assigns each shard's tensors as it is read, so the 9.6B release never
exists twice in memory.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm
from transformers.utils.hub import convert_file_size_to_int

from workbench.atomic import write_json
from workbench.dtypes import TORCH_DTYPES
from workbench.errors import CheckpointError, first_line
from workbench.model.config import QWenConfig, load_config, precision_dtype
from workbench.model.digests import sha256_file, weight_sha256
from workbench.model.shard_writer import (
    BIN_INDEX,
    BIN_SINGLE,
    SAFE_INDEX,
    SAFE_SINGLE,
    ShardWriter,
    TensorSpec,
    read_safetensors_specs,
)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = (SAFE_INDEX, BIN_INDEX)


# The small files (config.json, generation_config.json) of the releases, shipped with the package so
# that `inspect` works offline; hub folder names as huggingface_hub caches them (Qwen--Qwen-VL-Chat).
RELEASES_DIR = Path(__file__).resolve().parent / "releases"
HUB_HOST = ("huggingface.co", 443)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_dir(path_or_repo: str | os.PathLike) -> Path:
    """A local folder as is; a hub repo id from the local cache, else downloaded.

    Fails within seconds, with one line saying what to do, when the name is neither a folder nor a
    repo id, when the hub is unreachable, or offline (HF_HUB_OFFLINE=1) with nothing cached.
    """
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: is a file; a model folder (config.json + weights) is expected")
    repo = str(path_or_repo)
    cached = _cached_snapshot(repo)
    if cached is not None:
        return cached
    _check_hub(repo)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo))
    except Exception as e:  # unknown repo, gated, network lost mid-way: all mean "no such model" here
        raise CheckpointError(f"{repo}: downloading it from the hub failed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def resolve_config_dir(path_or_repo: str | os.PathLike) -> tuple[Path, str | None]:
    """A folder with the model's config.json, and a note when it is the package's copy of a release.

    Needs no weights: a local folder, a cached hub snapshot, the shipped release configs, or a
    download of the repo's small JSON files.
    """
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path, None
    repo = str(path_or_repo)
    cached = _cached_snapshot(repo)
    if cached is not None:
        return cached, None
    shipped = RELEASES_DIR / repo.replace("/", "--")
    if (shipped / "config.json").is_file():
        return shipped, f"using the config.json of {repo} shipped with the workbench (no weights are read)"
    return resolve_model_dir(repo), None


def _cached_snapshot(repo: str) -> Path | None:
    if not _REPO_ID.fullmatch(repo):
        return None
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # not cached (or a partial cache): not an error yet
        return None
    return folder if (folder / "config.json").is_file() else None


def _check_hub(repo: str) -> None:
    """Refuse at once what cannot be downloaded, instead of minutes of hub retries."""
    if not _REPO_ID.fullmatch(repo) or repo.startswith((".", "~")):
        raise CheckpointError(f"{repo}: no such model folder (and not a hub repo id like Qwen/Qwen-VL-Chat)")
    from huggingface_hub import constants

    fix = (f"download it where there is network (huggingface-cli download {repo} --local-dir DIR) "
           "and point model: at DIR")
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"{repo}: not in the local hub cache and HF_HUB_OFFLINE is set; {fix}")
    try:
        socket.create_connection(HUB_HOST, timeout=3).close()
    except OSError as err:
        raise CheckpointError(f"{repo}: not in the local hub cache and the hub ({HUB_HOST[0]}) is unreachable "
                              f"({err.strerror or err}); {fix}") from None


def _read_index(path: Path) -> dict[str, Path]:
    try:
        index = json.loads(path.read_text())
        return {key: path.parent / file for key, file in index["weight_map"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a valid weight index ({type(e).__name__}: {e})") from None


def weight_map(model_dir: str | os.PathLike) -> dict[str, Path]:
    """key -> weight file, for whichever layout the folder holds."""
    model_dir = Path(model_dir)
    if (model_dir / SAFE_SINGLE).is_file():
        path = model_dir / SAFE_SINGLE
        try:
            with safe_open(path, framework="pt") as f:
                return dict.fromkeys(f.keys(), path)
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    for name in WEIGHT_INDEXES:
        if (model_dir / name).is_file():
            return _read_index(model_dir / name)
    if (model_dir / BIN_SINGLE).is_file():
        return dict.fromkeys(load_weight_file(model_dir / BIN_SINGLE), model_dir / BIN_SINGLE)
    raise CheckpointError(f"{model_dir}: no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX} or {BIN_INDEX})")


def load_weight_file(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors or .bin file (on the CPU); a corrupt file is a CheckpointError.

    mmap=True maps a .bin file instead of reading it: tensors are backed by the file's pages, read
    on first touch and dropped by the kernel under memory pressure (they are clean), so loading the
    release costs its weight bytes once and merging streams it. Files saved before torch's zip
    format cannot be mapped and are read whole.
    """
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "zipfile" not in str(err):
                    raise
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: weight file listed in the index is missing") from None
    except pickle.UnpicklingError as e:  # weights-only loading refused a Python object: nothing ran
        raise CheckpointError(f"{path}: holds pickled Python objects, not only tensors, and was not loaded "
                              f"({first_line(e, 120)}); convert it to safetensors where it came from") from None
    except Exception as e:  # truncated or corrupt: safetensors/pickle errors of many types
        raise CheckpointError(f"{path}: cannot read weight file, truncated or corrupt? "
                              f"({type(e).__name__}: {first_line(e)})") from None


def shard_files(model_dir: str | os.PathLike) -> list[tuple[Path, list[str]]]:
    """(file, its keys in index order) per weight file, in the order the files first appear."""
    by_file: dict[Path, list[str]] = {}
    for key, path in weight_map(model_dir).items():
        by_file.setdefault(path, []).append(key)
    return list(by_file.items())


def iter_shards(model_dir: str | os.PathLike, mmap: bool = False
                ) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """(file, {key: tensor}) one weight file at a time; each file must hold the keys the index gives it.

    With mmap, a thread reads the next file into the page cache while the caller works on this one:
    touching mapped pages one fault at a time reads at a fraction of the disk's sequential speed.
    """
    files = shard_files(model_dir)
    with ThreadPoolExecutor(max_workers=1) as reader:
        ahead = reader.submit(read_through, files[0][0]) if mmap else None
        for i, (path, keys) in enumerate(files):
            if ahead is not None:
                ahead.result()
                ahead = reader.submit(read_through, files[i + 1][0]) if i + 1 < len(files) else None
            # No local keeps the shard while the caller holds it: a consumer that pops its tensors
            # frees each one as soon as it is done with it.
            yield path, _shard(load_weight_file(path, mmap=mmap), keys, path)


def read_through(path: Path) -> None:
    """Bring a file into the page cache (a missing file is left for the loader to report).

    sendfile to /dev/null reads the file into the cache without copying a byte to this process:
    no user buffer, a tenth of the system time of read() (BENCHMARKS.md, merge and load).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        with open(os.devnull, "wb") as null:
            offset, size = 0, os.fstat(fd).st_size
            while offset < size:
                sent = os.sendfile(null.fileno(), fd, offset, min(1 << 30, size - offset))
                if sent == 0:  # the file shrank under us: the loader will say what is wrong
                    break
                offset += sent
    except OSError:  # a file system without sendfile: read it the plain way
        buf = bytearray(1 << 24)
        os.lseek(fd, 0, os.SEEK_SET)
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)


def read_tensors(model_dir: str | os.PathLike, names: list[str]) -> dict[str, torch.Tensor]:
    """Only the named tensors (on the CPU, stored dtype): single tensors of a safetensors file, or
    picked from a mapped .bin file, so a block of the 9.6B model costs that block's bytes."""
    where = weight_map(model_dir)
    unknown = [n for n in names if n not in where]
    if unknown:
        raise CheckpointError(f"{model_dir}: no tensor {unknown[0]} in its weights")
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(where[name], []).append(name)
    out = {}
    for path, keys in by_file.items():
        if path.suffix == ".safetensors":
            try:
                with safe_open(path, framework="pt") as f:
                    out.update({k: f.get_tensor(k) for k in keys})
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read tensors ({type(e).__name__}: {first_line(e)})") from None
        else:
            out.update(_shard(load_weight_file(path, mmap=True), keys, path))
    return out


def tensor_specs(model_dir: str | os.PathLike) -> list[TensorSpec]:
    """Name, dtype and shape of every weight in `iter_shards` order, reading no tensor data."""
    specs: list[TensorSpec] = []
    for path, keys in shard_files(model_dir):
        if path.suffix == ".safetensors":
            try:
                found = {s.name: s for s in read_safetensors_specs(path)}
            except FileNotFoundError:
                raise CheckpointError(f"{path}: weight file listed in the index is missing") from None
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: unreadable safetensors header ({type(e).__name__}: {e})") from None
        else:
            found = {k: TensorSpec.of(k, t) for k, t in load_weight_file(path, mmap=True).items()}
        missing = [k for k in keys if k not in found]
        if missing:
            raise CheckpointError(f"{path}: lacks {len(missing)} key(s) the index assigns to it, e.g. {missing[:3]}")
        specs += [found[k] for k in keys]
    return specs


def _shard(tensors: dict[str, torch.Tensor], keys: list[str], path: Path) -> dict[str, torch.Tensor]:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise CheckpointError(f"{path}: lacks {len(missing)} key(s) the index assigns to it, e.g. {missing[:3]}")
    return {k: tensors.pop(k) for k in keys}


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = TORCH_DTYPES.get(str(dtype).removeprefix("torch."))
    if value is None:
        raise CheckpointError(f"unknown dtype {dtype!r} (use {', '.join(TORCH_DTYPES)})")
    return value


def _check_keys(model_dir: Path, expected: dict[str, torch.Size], found: dict[str, Path]) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:5])}")
        raise CheckpointError(f"{model_dir}: weights do not match the config: {'; '.join(parts)}")


def load_model(path_or_repo: str | os.PathLike, dtype: torch.dtype | str | None = None,
               device: str | torch.device = "cpu"):
    """QWenLMHeadModel from a model folder (or hub id), strict, in eval mode.

    `dtype` wins over the config's bf16/fp16/fp32 flags; None lets them decide (docs/qwen-vl.md §5.9).
    """
    from transformers import GenerationConfig

    from workbench.model.modeling import QWenLMHeadModel

    model_dir = resolve_model_dir(path_or_repo)
    config = load_config(model_dir)
    dtype = _as_dtype(dtype) or precision_dtype(config, model_dir / "config.json")
    config.dtype = dtype
    # The name as given (a path or a hub id): PEFT records it as the adapter's base_model_name_or_path,
    # which AutoPeftModelForCausalLM loads the base from.
    config._name_or_path = str(path_or_repo)
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    packed = _swap_in_gptq(model, config, model_dir, device, dtype)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_keys(model_dir, expected, weight_map(model_dir))
    shards = list(dict.fromkeys(weight_map(model_dir).values()))
    for path, tensors in tqdm(iter_shards(model_dir, mmap=True), total=len(shards), desc="loading weights",
                              unit="shard", disable=len(shards) < 2):
        for key, tensor in tensors.items():
            if tensor.shape != expected[key]:
                raise CheckpointError(f"{path}: {key} has shape {list(tensor.shape)}, "
                                      f"the config expects {list(expected[key])}")
        check_finite(tensors, path)
        # A GPTQ linear's tensors keep their stored dtypes (int32 codes, float16 scales).
        tensors = {k: t.to(device=device, dtype=None if k in packed else dtype) for k, t in tensors.items()}
        model.load_state_dict(tensors, strict=False, assign=True)
    if packed:
        from workbench.gptq.modules import finish

        finish(model)
    if (model_dir / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
        except Exception as err:  # malformed JSON or values GenerationConfig refuses
            raise CheckpointError(f"{model_dir / 'generation_config.json'}: cannot be read ({first_line(err)}); "
                                  "fix it or delete it to use the defaults") from None
    return model.eval()


def _swap_in_gptq(model, config: QWenConfig, model_dir: Path, device: str | torch.device,
                  dtype: torch.dtype) -> set[str]:
    """For a GPTQ checkpoint (quantization_config in config.json): put GPTQModel's quantised linears
    in the meta model and return the names of their tensors; an empty set for a 16-bit model."""
    from workbench.gptq.layout import PACKED_BUFFERS, GPTQSpec, quantized_linears

    try:
        spec = GPTQSpec.from_config(config)
        if spec is None:
            return set()
        from workbench.gptq.modules import swap_in

        swap_in(model, spec, device, dtype)
    except ValueError as err:
        raise CheckpointError(f"{model_dir / 'config.json'}: quantization_config: {err}") from None
    return {f"{name}.{buffer}" for name in quantized_linears(model) for buffer in PACKED_BUFFERS}


def check_finite(tensors: dict[str, torch.Tensor], path: Path | str) -> None:
    """A NaN or inf in a weight is an error naming the tensor (it would poison every output silently)."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise CheckpointError(f"{path}: tensor {key} holds NaN or inf values; the file is damaged "
                                  "(or was saved from a diverged run)")


def _all_finite(tensor: torch.Tensor, chunk: int = 1 << 24) -> bool:
    # A sum is finite only if every element is (inf, -inf and NaN all poison it), and a sum runs at
    # memory speed where isfinite does not (80M bf16 values/s on a 2-core CPU: two minutes for the
    # release). A finite tensor whose sum overflows (large fp16 weights) takes the exact path.
    if bool(torch.isfinite(tensor.sum())):
        return True
    # In chunks: isfinite makes a bool copy, and the embedding alone is 622M values in the release.
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def parse_size(size: int | str) -> int:
    """2GB / 500MB / 1GiB / 1000 -> bytes, as transformers reads max_shard_size (GB = 10**9)."""
    try:
        return convert_file_size_to_int(size.strip().upper() if isinstance(size, str) else size)
    except (ValueError, TypeError):
        raise ValueError(f"cannot read shard size {size!r} (e.g. 2GB, 500MB)") from None


def save_model(model_or_state_dict, out_dir: str | os.PathLike, max_shard_size: int | str = "2GB",
               dtype: torch.dtype | str | None = None, layout: str = "safetensors") -> dict:
    """Write the weights (release names) in shards; for a model also config.json and generation_config.json."""
    out_dir = Path(out_dir)
    dtype = _as_dtype(dtype)
    is_model = isinstance(model_or_state_dict, torch.nn.Module)
    state = model_or_state_dict.state_dict() if is_model else model_or_state_dict

    def stored_dtype(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    specs = [TensorSpec(k, stored_dtype(t), tuple(t.shape)) for k, t in state.items()]
    writer = ShardWriter(out_dir, specs, parse_size(max_shard_size), layout=layout)
    for name, tensor in tqdm(state.items(), desc="saving weights", unit="tensor", disable=len(state) < 100):
        writer.add(name, tensor.to(stored_dtype(tensor)))  # one cast tensor at a time
    index = writer.close()
    if is_model:
        config: QWenConfig = model_or_state_dict.config
        saved = QWenConfig.from_dict(config.to_diff_dict())
        saved.dtype = dtype or next(iter(state.values())).dtype
        write_json(out_dir / "config.json", saved.to_diff_dict())
        generation_config = getattr(model_or_state_dict, "generation_config", None)
        if generation_config is not None:
            write_json(out_dir / "generation_config.json", generation_config.to_diff_dict())
    return index


def fingerprint(model_dir: str | os.PathLike) -> dict:
    """sha256 of config.json and of every weight file (weight files' digests remembered while unchanged:
    digests.py)."""
    model_dir = resolve_model_dir(model_dir)
    files = sorted(set(weight_map(model_dir).values()))
    weights = {str(p.relative_to(model_dir)): weight_sha256(p)
               for p in tqdm(files, desc="hashing weights", unit="file", disable=len(files) < 2)}
    return {"config_sha256": sha256_file(model_dir / "config.json"), "weights": weights}


def copy_non_weight_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy config, generation config, tokenizer and code files (everything but weights and indexes)."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(src_dir.iterdir()):
        if not path.is_file() or path.suffix in WEIGHT_SUFFIXES or path.name in WEIGHT_INDEXES:
            continue
        tmp = dst_dir / f".{path.name}.tmp"
        shutil.copyfile(path, tmp)
        tmp.replace(dst_dir / path.name)
        copied.append(path.name)
    return copied

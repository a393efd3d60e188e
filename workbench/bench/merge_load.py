"""Merge and load of the full-size release against copying and reading the same files.

`write_release` lays down a random Qwen-VL-Chat in the release's exact layout: the shipped
`pytorch_model.bin.index.json` assigns the 853 keys to its ten `.bin` files, shapes come from the
model built on the meta device from the release's config, values are bf16 N(0, 0.02). An
official-lora adapter (r 64, alpha 16 on c_attn, attn.c_proj, w1, w2: what `adapters/official-lora`
trains) is written beside it in PEFT's own format.

Every timed phase starts from a cold page cache for the files it touches (fsync, then
posix_fadvise DONTNEED) and ends with the written data on disk (sync), so the ratios compare disk
work with disk work. Merge and load run in child processes (the merge as `workbench merge`, what a
user runs): their peak RSS comes from the kernel (wait4's ru_maxrss, which counts mapped file pages
the process touched).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from workbench.model.checkpoint import BIN_INDEX, RELEASES_DIR, shard_files

RELEASE = RELEASES_DIR / "Qwen--Qwen-VL-Chat"
LORA_TARGETS = ["c_attn", "attn.c_proj", "w1", "w2"]
RANK, ALPHA = 64, 16
PROBE = "transformer.h.0.attn.c_attn.weight"  # a merged tensor the bench checks by hand
UNTOUCHED = "transformer.wte.weight"


def model_shapes(model_dir: Path) -> dict[str, torch.Size]:
    """Every state-dict key of the model a folder's config.json describes, with its shape (meta device)."""
    from workbench.model.config import load_config
    from workbench.model.modeling import QWenLMHeadModel

    with torch.device("meta"):
        model = QWenLMHeadModel(load_config(model_dir))
    return {k: v.shape for k, v in model.state_dict().items()}


def release_shapes() -> dict[str, torch.Size]:
    return model_shapes(RELEASE)


def write_release(base: Path, seed: int = 0, device: str = "cpu") -> Path:
    """The random release (about 19.3 GB); kept and reused when a previous call completed it.
    `device` draws the values there (a GPU draws 9.6B values in a moment; the CPU takes minutes)."""
    done = base / ".complete"
    if done.exists():
        return base
    base.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", BIN_INDEX):
        shutil.copyfile(RELEASE / name, base / name)
    shapes = release_shapes()
    generator = torch.Generator(device=device).manual_seed(seed)
    files = shard_files(base)
    for path, keys in tqdm(files, desc="writing the random release", unit="file"):
        shard = {k: torch.empty(shapes[k], dtype=torch.bfloat16, device=device).normal_(0, 0.02, generator=generator)
                 .cpu() for k in keys}
        torch.save(shard, path)
        del shard
    done.touch()
    return base


def write_adapter(out: Path, seed: int = 1, shapes: dict[str, torch.Size] | None = None) -> Path:
    """An official-lora adapter folder for the release (or for the model of `shapes`), as PEFT saves
    one (random A and B)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    shapes = shapes or release_shapes()
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in shapes.items():
        module = key.removesuffix(".weight")
        if key.startswith("transformer.h.") and key.endswith(".weight") and module.endswith(tuple(LORA_TARGETS)):
            out_f, in_f = shape
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, in_f, generator=generator).mul(0.01).bfloat16()
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, RANK, generator=generator).mul(0.01).bfloat16()
    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=LORA_TARGETS, task_type="CAUSAL_LM").save_pretrained(out)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".safetensors"))


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (written pages are synced first)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_copy(src: Path, dst: Path) -> float:
    """Seconds to copy the weight files (sendfile, as cp does) and get them onto the disk."""
    files = weight_files(src)
    evict(files)
    dst.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for path in files:
        shutil.copyfile(path, dst / path.name)
    os.sync()
    return time.perf_counter() - start


def timed_read(folder: Path) -> float:
    """Seconds to read the weight files once, cold, with read() into a 16 MiB buffer (as cat does)."""
    files = weight_files(folder)
    evict(files)
    buf = bytearray(1 << 24)
    start = time.perf_counter()
    for path in files:
        with path.open("rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def timed_child(code: str, evict_paths: list[Path], source: Path | None = None,
                cpu: dict | None = None, digest_cache: Path | None = None) -> tuple[float, float]:
    """(seconds, peak RSS in bytes) of `python -c code`, from a cold cache, synced at the end;
    with `source`, the workbench imported from that source tree (an earlier version). `cpu`
    receives the child's CPU seconds (user + system, all threads): on shared cores the work done
    compares better than the wall time, which depends on what else runs. `digest_cache` is the
    child's XDG_CACHE_HOME: where it finds (and leaves) remembered weight digests."""
    evict(evict_paths)
    # -P: `python -c` would put the working folder first on sys.path, and from a checkout that is
    # this workbench, whatever PYTHONPATH names; the child imports the tree it is given, ahead of
    # what PYTHONPATH already holds (the GPU suite's carried packages).
    tree = str(source or Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH")) if p)}
    if digest_cache is not None:
        env["XDG_CACHE_HOME"] = str(digest_cache)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-P", "-c", code], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    os.sync()
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"child failed ({os.waitstatus_to_exitcode(status)}): {code}")
    if cpu is not None:
        cpu.update(user_s=usage.ru_utime, system_s=usage.ru_stime)
    return seconds, usage.ru_maxrss * 1024


def check_merge(base: Path, adapter: Path, merged: Path) -> dict:
    """The probe tensor equals W + alpha/r B@A computed in float32 and rounded to the base's dtype
    (bf16 for the release; the merge's maths, written out by hand); an untouched tensor is
    bit-equal to the base's."""
    from safetensors import safe_open

    from workbench.model.checkpoint import load_weight_file, weight_map

    base_map, merged_map = weight_map(base), weight_map(merged)
    w = load_weight_file(base_map[PROBE], mmap=True)[PROBE]
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        prefix = f"base_model.model.{PROBE.removesuffix('.weight')}"
        a, b = f.get_tensor(f"{prefix}.lora_A.weight"), f.get_tensor(f"{prefix}.lora_B.weight")
    expected = (w.float() + (ALPHA / RANK) * (b.float() @ a.float())).to(w.dtype)
    with safe_open(merged_map[PROBE], "pt") as f:
        got = f.get_tensor(PROBE)
    with safe_open(merged_map[UNTOUCHED], "pt") as f:
        untouched = f.get_tensor(UNTOUCHED)
    original = load_weight_file(base_map[UNTOUCHED], mmap=True)[UNTOUCHED]
    # On a GPU the float32 sum runs in another order than the CPU's: a few values may round to the
    # neighbouring bf16 number, which the largest difference shows.
    return {"probe_equal": bool(torch.equal(got, expected)),
            "probe_max_abs_diff": float((got.float() - expected.float()).abs().max()),
            "untouched_bit_equal": bool(torch.equal(untouched, original))}


# `options`: extra keyword arguments as source text ("" for a tree older than merge's `device`).
MERGE_CODE = ("from workbench.merge import merge_adapter; "
              "merge_adapter({base!r}, {adapter!r}, {out!r}, overwrite=True{options})")
# What a user runs: `workbench merge` (the command sets up the process for the merge before torch loads).
MERGE_CLI = ("import sys; from workbench.cli.main import main; "
             "sys.exit(main(['merge', '--base', {base!r}, '--adapter', {adapter!r}, '--out', {out!r}, '--overwrite']))")
LOAD_CODE = ("import time; from workbench import load_model; t = time.perf_counter(); "
             "m = load_model({base!r}, dtype='bfloat16'); "
             "print(f'load_model: {{time.perf_counter() - t:.1f}} s', flush=True)")
IMPORT_CODE = "import workbench, workbench.merge, torch"


def run_merge_load(folder: Path, keep: bool = False, before: dict[str, Path] | None = None, rounds: int = 1) -> dict:
    """Write (or reuse) the random release and adapter under `folder`, time everything, return a dict.

    Each round copies the files, then merges with every source tree: `before` maps a label to a
    source tree of an earlier workbench (e.g. `git archive` of main), merged in turn before this
    checkout ("current"). Each tree merges twice: on a base it has never hashed (an empty digest
    cache: it hashes every file while merging), then again with the digests the first left behind,
    as a merge after `workbench train` finds them (digests.py: the base is only read; a tree that
    does not remember digests hashes again). Every merge is checked by hand. The machine's state
    moves the times by tens of percent from one round to the next, so ratios are taken within a
    round and summarised by their median over the rounds. Read and load are timed once, after the rounds.
    """
    base = write_release(folder / "base")
    adapter = write_adapter(folder / "adapter")
    base_files = weight_files(base)
    weight_bytes = sum(p.stat().st_size for p in base_files)
    largest = max(p.stat().st_size for p in base_files)
    results: dict = {"weight_bytes": weight_bytes, "largest_shard_bytes": largest, "files": len(base_files)}
    results["import_s"], results["import_rss"] = timed_child(IMPORT_CODE, [])
    trees = {**(before or {}), CURRENT: None}
    results["rounds"] = [merge_round(folder, base, adapter, trees, keep and i == rounds - 1)
                         for i in tqdm(range(rounds), desc="merge rounds", unit="round", disable=rounds < 2)]
    results["medians"] = {label: {phase: statistics.median(r["merges"][label][phase]["over_copy"]
                                                           for r in results["rounds"]) for phase in PHASES}
                          for label in trees}
    results["read_s"] = timed_read(base)
    results["load_s"], results["load_rss"] = timed_child(LOAD_CODE.format(base=str(base)), base_files)
    results["load_over_read"] = results["load_s"] / results["read_s"]
    results["load_rss_over_weights"] = results["load_rss"] / weight_bytes
    return results


CURRENT = "current"  # this checkout, among the source trees a round merges with
PHASES = ("never_hashed", "remembered")  # each tree's two merges, in the order a round runs them


def merge_round(folder: Path, base: Path, adapter: Path, trees: dict[str, Path | None], keep: bool) -> dict:
    """One copy and the merges after it, each from a cold page cache: {"merges": {tree: {phase: numbers}}}.
    `trees` maps labels to source trees (None: this checkout); `keep` keeps the last merged folder."""
    base_files = weight_files(base)
    largest = max(p.stat().st_size for p in base_files)
    result: dict = {"load_average": {"start": os.getloadavg()[0]}, "merges": {}}
    result["copy_s"] = timed_copy(base, folder / "copy")
    shutil.rmtree(folder / "copy")  # disk: the release fits three times on a 73 GB disk, not four
    merged, digest_cache = folder / "merged", folder / "digest-cache"
    code = MERGE_CLI.format(base=str(base), adapter=str(adapter), out=str(merged))
    for label, tree in trees.items():
        shutil.rmtree(digest_cache, ignore_errors=True)  # each tree meets the base for the first time
        for phase in PHASES:
            cpu: dict = {}
            seconds, rss = timed_child(code, base_files, tree, cpu, digest_cache=digest_cache)
            result["merges"].setdefault(label, {})[phase] = {
                "s": seconds, "over_copy": seconds / result["copy_s"], "rss": rss, "rss_over_bound": rss / (largest + 2e9),
                "cpu": cpu, **check_merge(base, adapter, merged)}
            result["load_average"][f"{label} {phase}"] = os.getloadavg()[0]
            if not (keep and (label, phase) == (list(trees)[-1], PHASES[-1])):
                shutil.rmtree(merged)
    return result


def format_results(r: dict) -> str:
    gb = 1e9

    def merge_line(label: str, phase: str, m: dict) -> str:
        cpu = m["cpu"]
        name = f"{label}, {phase.replace('_', ' ')}"
        return (f"  {name:30s} {m['s']:6.1f} s = {m['over_copy']:.2f}x copy; CPU {cpu['user_s'] + cpu['system_s']:.1f} s "
                f"(user {cpu['user_s']:.1f}, system {cpu['system_s']:.1f}); peak RSS {m['rss'] / gb:.2f} GB; "
                f"W + scale BA by hand: {m['probe_equal']}, untouched bit-equal: {m['untouched_bit_equal']}")

    lines = [f"release: {r['files']} files, {r['weight_bytes'] / gb:.2f} GB (largest {r['largest_shard_bytes'] / gb:.2f} GB; "
             f"peak RSS bound: largest + 2 GB = {(r['largest_shard_bytes'] + 2e9) / gb:.2f} GB)"]
    for i, rnd in enumerate(r["rounds"], start=1):
        loads = " ".join(f"{v:.1f}" for v in rnd["load_average"].values())
        lines.append(f"round {i}: copy {rnd['copy_s']:.1f} s (load average at the start and after each merge: {loads})")
        lines += [merge_line(label, phase, m) for label, phases in rnd["merges"].items() for phase, m in phases.items()]
    medians = [f"{label} {phase.replace('_', ' ')} {v:.2f}x" for label, phases in r["medians"].items()
               for phase, v in phases.items()]
    lines.append("median over rounds, merge / copy: " + "; ".join(medians))
    lines += [
        f"read   {r['read_s']:7.1f} s",
        f"load   {r['load_s']:7.1f} s  = {r['load_over_read']:.2f}x read   peak RSS {r['load_rss'] / gb:.2f} GB "
        f"= {r['load_rss_over_weights']:.3f}x the weight bytes",
        f"(merge and load include starting Python: a child that only imports the workbench takes {r['import_s']:.1f} s "
        f"and peaks at {r['import_rss'] / gb:.2f} GB RSS)",
    ]
    return "\n".join(lines)


def environment() -> dict:
    import platform

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), "machine": platform.machine()}


def as_json(results: dict) -> str:
    return json.dumps({"environment": environment(), "results": results}, indent=2)


def main(argv: list[str] | None = None) -> int:
    """`python -m workbench.bench.merge_load DIR --before LABEL=SRC ...`: `workbench bench --merge-load DIR`
    with the merges of earlier source trees timed in the same rounds."""
    import argparse

    from workbench.atomic import write_text

    p = argparse.ArgumentParser(prog="python -m workbench.bench.merge_load", description=main.__doc__)
    p.add_argument("folder", type=Path)
    p.add_argument("--before", action="append", default=[], metavar="LABEL=SRC",
                   help="an earlier source tree, merged in the same rounds under LABEL (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the merged folder")
    p.add_argument("--rounds", type=int, default=3, help="copy-and-merges rounds (medians are reported)")
    args = p.parse_args(argv)
    before = {}
    for item in args.before:
        label, sep, src = item.partition("=")
        if not sep or not label or label == CURRENT or not (Path(src) / "workbench").is_dir():
            p.error(f"--before {item}: expected LABEL=SRC, SRC a folder holding a workbench/ source tree "
                    f"and LABEL not {CURRENT!r}")
        before[label] = Path(src)
    results = run_merge_load(args.folder, keep=args.keep, before=before, rounds=args.rounds)
    print(format_results(results))
    if args.out is not None:
        write_text(args.out, as_json(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

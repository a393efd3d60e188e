"""Fetch what the lent GPU machine lacks into the two folders a run carries; run it here, with network.

    python -m workbench.bench.suite.prepare [--wheels .wheels] [--original .original] [--revision master]

The GPU machine (Python 3.12, torch 2.11 for CUDA 13.0, transformers 5, peft, accelerate; no
network) lacks what two sections need:

  .wheels    bitsandbytes for the qlora rows. Its wheel (41 MiB) holds one library per CUDA and
             ROCm version; the copy kept here holds only the CUDA 13.0 and CPU ones (about 2 MiB),
             so that it fits the run's 64 MiB beside the original.
  .original  the original recipe, which the repository does not hold:
             finetune.py             QwenLM/Qwen-VL's, at --revision
             Qwen-VL-Chat/           the release's remote code, config and tokenizer, no weights
                                     (the suite builds random weights on the GPU)
             wheels/                 transformers 4.32 (the version Qwen-VL pins) and what
                                     finetune.py imports that the machine lacks or has too new:
                                     huggingface_hub, accelerate, peft of its time, DeepSpeed
                                     (finetune.py imports it; built here from its sdist) with
                                     hjson and pydantic, transformers_stream_generator (the
                                     remote code's import check asks for it)

The suite installs both on first use (`pip --no-index --no-deps --target`, into .wheels/site and
.original/site). Versions: the ones the CPU check of the original ran with (BENCHMARKS.md).
The working tree plus both folders must stay under the 64 MiB a run can carry; the sizes are
printed at the end, and an error says so when they do not fit.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

CARRY_LIMIT_MIB = 64
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
          *[a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                        "manylinux_2_17_x86_64", "manylinux2014_x86_64") for a in ("--platform", p)]]
WORKBENCH_WHEELS = ("bitsandbytes==0.50.2",)
BNB_KEEP = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so")  # torch 2.11+cu130 on the lent machines
ORIGINAL_WHEELS = ("transformers==4.32.0", "huggingface_hub==0.17.3", "accelerate==0.21.0", "peft==0.5.0",
                   "hjson==3.1.0", "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0",
                   "typing-inspection==0.4.5")
BUILT_WHEELS = ("deepspeed==0.15.4", "transformers_stream_generator==0.0.4")  # sdists only: pure-Python wheels
RELEASE = "Qwen/Qwen-VL-Chat"
RELEASE_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "qwen.tiktoken",
                 "configuration_qwen.py", "modeling_qwen.py", "visual.py", "qwen_generation_utils.py",
                 "tokenization_qwen.py")
FINETUNE_URL = "https://raw.githubusercontent.com/QwenLM/Qwen-VL/{revision}/finetune.py"
MODEL_DIR = "Qwen-VL-Chat"  # original.py's MODEL_DIR: the name holds "chat" (finetune.py's Chat recipe)


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args], check=True)


def slim_wheel(wheel: Path, keep: tuple[str, ...]) -> Path:
    """Rewrite bitsandbytes' wheel without the native libraries it will not load there (and their
    RECORD lines)."""
    def dropped(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return base.startswith("libbitsandbytes_") and base not in keep

    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if dropped(item.filename):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not dropped(line.split(b",")[0].decode()))
            dst.writestr(item, data)
    slim.replace(wheel)
    return wheel


def workbench_wheels(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pip("download", "--no-deps", *TARGET, "-d", str(folder), *WORKBENCH_WHEELS)
    for wheel in folder.glob("bitsandbytes-*.whl"):
        slim_wheel(wheel, BNB_KEEP)


def check_network(hosts: tuple[str, ...]) -> None:
    """Fail within seconds, saying which host, where there is no network (pip and the hub retry for minutes)."""
    for host in hosts:
        try:
            socket.create_connection((host, 443), timeout=5).close()
        except OSError as err:
            raise SystemExit(f"error: {host} is unreachable ({err.strerror or err}); run prepare where there "
                             "is network, then carry the folders it writes") from None


def original_folder(folder: Path, revision: str) -> None:
    from huggingface_hub import hf_hub_download

    wheels, model = folder / "wheels", folder / MODEL_DIR
    wheels.mkdir(parents=True, exist_ok=True)
    pip("download", "--no-deps", *TARGET, "-d", str(wheels), *ORIGINAL_WHEELS)
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), *BUILT_WHEELS)
    urllib.request.urlretrieve(FINETUNE_URL.format(revision=revision), folder / "finetune.py")
    for name in RELEASE_FILES:
        hf_hub_download(RELEASE, name, local_dir=model)
    if ".clone()" not in (model / "modeling_qwen.py").read_text():
        print(f"warning: {model / 'modeling_qwen.py'} predates the release's fix for LoRA training "
              "(QwenLM/Qwen-VL issue 120: 'a view of a leaf Variable ... in-place'): finetune.py will fail on it",
              file=sys.stderr)


def mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def tree_mib(repo: Path) -> float:
    """What the run sends besides the carried folders: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, capture_output=True,
                         check=True).stdout
    return sum((repo / n).stat().st_size for n in out.decode().split("\0") if n and (repo / n).is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench.bench.suite.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--wheels", type=Path, default=Path(".wheels"))
    p.add_argument("--original", type=Path, default=Path(".original"))
    p.add_argument("--revision", default="master", help="QwenLM/Qwen-VL's branch or commit for finetune.py")
    p.add_argument("--skip", choices=["wheels", "original"], action="append", default=[])
    args = p.parse_args(argv)
    check_network(("pypi.org",) + (() if "original" in args.skip else ("raw.githubusercontent.com", "huggingface.co")))
    if "wheels" not in args.skip:
        workbench_wheels(args.wheels)
    if "original" not in args.skip:
        original_folder(args.original, args.revision)
    repo = Path(__file__).resolve().parents[3]
    sizes = {"working tree": tree_mib(repo), str(args.wheels): mib(args.wheels) if args.wheels.exists() else 0.0,
             str(args.original): mib(args.original) if args.original.exists() else 0.0}
    for name, size in sizes.items():
        print(f"{name:<14} {size:6.1f} MiB")
    total = sum(sizes.values())
    print(f"{'in all':<14} {total:6.1f} MiB of the {CARRY_LIMIT_MIB} MiB a run can carry")
    return 0 if total <= CARRY_LIMIT_MIB else 1


if __name__ == "__main__":
    raise SystemExit(main())

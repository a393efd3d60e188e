#!/usr/bin/env bash
# Int4 on CUDA (docs/int4.md): `workbench quantize` on the GPU, the export loaded with GPTQModel's
# CUDA kernel and served by `workbench serve`; tokens/s and peak GPU memory against bf16
# (python -m workbench.bench.int4 prints the rows and writes int4_bench.json). Two models: one with
# the 9.6B release's LLM layer shapes (4 blocks, random weights: nothing to download), and `make
# demo`'s trained model (an Acc@0.5 that means something). Needs .venv with gptqmodel and
# transformers >= 5.20.2: a machine without network needs their wheels carried (BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-int4-gpu}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$py" -m workbench.bench.int4 --wide 4 --out "$out/wide" --samples 32 --device cuda --serve
[ -d runs/demo/merged ] || "$py" -m workbench demo --out runs/demo
"$py" -m workbench.bench.int4 --model runs/demo/merged --data runs/demo/data/train.jsonl \
    --eval runs/demo/data/eval.jsonl --out "$out/demo" --device cuda --serve

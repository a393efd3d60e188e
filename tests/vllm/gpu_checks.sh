#!/usr/bin/env bash
# The vLLM checks on CUDA, for a GPU machine: greedy tokens and logprobs against the workbench
# (8 prompts), the LLM-only LoRA adapter against its merge, and the demo model served with its box,
# at tensor parallel 1 and, where the machine has two GPUs, 2. Needs `make vllm` to have built
# .venv-vllm with the CUDA `vllm` package (the Makefile picks it when nvidia-smi exists), which a
# machine without network cannot download: copy a built .venv-vllm there.
set -euo pipefail
cd "$(dirname "$0")/../.."
make .venv/.installed .venv-vllm/.installed
gpus=$(nvidia-smi -L | wc -l)
for tp in 1 2; do
  if [ "$tp" -gt "$gpus" ]; then echo "tensor parallel $tp: skipped ($gpus GPU)"; continue; fi
  echo "tensor parallel $tp"
  WORKBENCH_VLLM_TP=$tp timeout 300 .venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/vllm
done

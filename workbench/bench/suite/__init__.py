"""The GPU suite (`workbench bench --gpu-suite OUT`): every GPU check of the workbench in one run.

A GPU is lent only at times and for minutes, so the suite is prepared and dry-run on the CPU
(`--cpu-dry-run`: the same sections on the built-in tiny model, a test) and spends its GPU minutes
measuring. Each section (plan.SECTIONS) runs in its own process under its own time budget, so one
that fails, lacks a package or overruns is recorded with its reason and the others still run:

  runner.py     the run: the planned budget, one child process per section, the JSON and the rows
  plan.py       what runs: sections, budgets, sizes on the GPU and in the dry run
  recorder.py   how a section reports: JSON lines written as it goes (rows survive a stop)
  child.py      the entry point of a section's process
  environment.py, training.py, original.py, packing.py, vit_cache.py, merge.py, serving.py, int4.py
                the sections; each has `available(plan) -> reason | None` (cheap, in the parent)
                and `run(plan, rec)` (in the child)
  original_launcher.py  runs the original finetune.py in its own environment (transformers 4.32)
  grounding.py  grounding-length samples with their images (packing and ViT-cache sections)
  compare.py    workbench vs original side by side, ratios from the same run
  report.py     the rows for BENCHMARKS.md
  prepare.py    fetches what the GPU machine lacks into the carried folders (.wheels, .original)
"""

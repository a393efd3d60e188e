"""`workbench bench`: s/it, tokens/s, peak memory and TFLOP/s of a recipe's training step."""

from __future__ import annotations

import argparse

from workbench.cli.args import whole


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark a recipe's training step on random weights of the real size")
    p.add_argument("--recipe", default="official-lora",
                   help="comma-separated recipe names from adapters/ (e.g. official-lora,qlora,all-components)")
    p.add_argument("--seq-len", default="384,512,1024,2048", help="comma-separated sequence lengths")
    p.add_argument("--steps", type=whole(1), default=3, help="measured optimizer steps per length (after 1 warm-up)")
    p.add_argument("--grad-accum", type=whole(1), default=8, help="micro-batches per optimizer step")
    p.add_argument("--tiny", action="store_true", help="the built-in tiny model on the CPU (for tests)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default="bench.json", help="where to write the results as JSON")
    p.add_argument("--merge-load", metavar="DIR", default=None,
                   help="instead of a training step: write a random full-size release (19.3 GB, reused when "
                        "present) and an official-lora adapter under DIR, and time merge and load_model "
                        "against copying and reading the same files")
    p.add_argument("--keep", action="store_true", help="with --merge-load: keep the merged folder")
    p.add_argument("--rounds", type=whole(1), default=3,
                   help="with --merge-load: rounds of copy and merges (ratios within a round, medians reported)")
    p.add_argument("--gpu-suite", metavar="OUT", default=None,
                   help="instead of one benchmark: every GPU check in one run of at most 8 minutes (training "
                        "steps of three recipes against the original finetune.py, memory estimate, packing, "
                        "ViT cache, merge, vLLM, Int4); writes OUT/gpu_suite.json and OUT/rows.md")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="with --gpu-suite: every section on the built-in tiny model on the CPU (the suite's test)")
    p.add_argument("--original", metavar="DIR", default=None,
                   help="with --gpu-suite: the original finetune.py's folder, made by "
                        "`python -m workbench.bench.suite.prepare` (without it: 'original: not carried')")
    p.add_argument("--wheels", metavar="DIR", default=None,
                   help="with --gpu-suite: a folder of carried wheels (prepare.py's .wheels), installed into "
                        "DIR/site for the sections")
    p.add_argument("--only", default=None, help="with --gpu-suite: comma-separated section names")
    p.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                   help="with --gpu-suite: another time budget for a section (repeatable)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.merge_load:
        return run_merge_load(args)
    if args.gpu_suite:
        return run_gpu_suite(args)

    import torch

    from workbench.atomic import write_json
    from workbench.bench.run import as_dicts, environment, format_table, matmul_rate, run_bench
    from workbench.errors import ConfigError

    try:
        seq_lens = [int(v) for v in args.seq_len.split(",")]
    except ValueError:
        raise ConfigError(f"--seq-len: expected comma-separated integers, got {args.seq_len!r}") from None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    rate = matmul_rate(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    results = []
    for recipe in args.recipe.split(","):
        results += run_bench(recipe, seq_lens, rate=rate, steps=args.steps, grad_accum=args.grad_accum,
                             tiny=args.tiny, device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    env = environment(device, rate)
    print(format_table(results, f"{env['device']}, measured matmul rate {env['matmul_tflops']:.3g} TFLOP/s, "
                                f"torch {env['torch']}, transformers {env['transformers']}, {env['date']}"))
    write_json(args.out, {"environment": env, "results": as_dicts(results)})
    print(f"wrote {args.out}")
    return 0


def run_merge_load(args: argparse.Namespace) -> int:
    from pathlib import Path

    from workbench.atomic import write_text
    from workbench.bench import merge_load

    results = merge_load.run_merge_load(Path(args.merge_load), keep=args.keep, rounds=args.rounds)
    print(merge_load.format_results(results))
    write_text(args.out, merge_load.as_json(results))
    print(f"wrote {args.out}")
    return 0


def run_gpu_suite(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from workbench.bench.suite.plan import SECTION_NAMES, dry_run_plan, gpu_plan
    from workbench.bench.suite.runner import install_wheels, run_suite
    from workbench.errors import ConfigError

    only = args.only.split(",") if args.only else None
    unknown = sorted(set(only or []) - set(SECTION_NAMES))
    if unknown:
        raise ConfigError(f"--only: unknown section {unknown[0]!r}; sections: {', '.join(SECTION_NAMES)}")
    budgets = {}
    for spec in args.budget:
        name, _, seconds = spec.partition("=")
        try:
            budgets[name] = float(seconds)
        except ValueError:
            raise ConfigError(f"--budget: expected SECTION=SECONDS, got {spec!r}") from None
    setup = {"wheels": [], "site": None}
    if args.wheels:
        wheels = Path(args.wheels).resolve()
        if not wheels.is_dir():
            raise ConfigError(f"--wheels: {args.wheels} is not a folder")
        setup = install_wheels(wheels, wheels / "site")
    if not args.cpu_dry_run:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--gpu-suite needs a CUDA GPU (torch sees none); --cpu-dry-run runs it on the CPU "
                              "with the tiny model")
    command = shlex.join(["workbench", "bench", "--gpu-suite", args.gpu_suite,
                          *(["--cpu-dry-run"] if args.cpu_dry_run else []),
                          *(["--original", args.original] if args.original else []),
                          *(["--wheels", args.wheels] if args.wheels else []),
                          *(["--only", args.only] if args.only else []),
                          *[a for spec in args.budget for a in ("--budget", spec)]])
    make = dry_run_plan if args.cpu_dry_run else gpu_plan
    try:
        plan = make(str(Path(args.gpu_suite).resolve()), command,
                    str(Path(args.original).resolve()) if args.original else None, setup["site"], budgets)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    run_suite(plan, only, setup)
    return 0

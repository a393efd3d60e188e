"""Two domains, one adapter each, and the adapters combined by `workbench merge` (issue 33).

    python -m workbench.demo.merge_domains R [--steps 1000] [--seed 0] [--methods cat linear ties dare_ties]
                                             [--weights 1 1] [--start-steps 0] [--lr R]

The demo's shapes (workbench.demo.synthetic) split by colour into two domains: "warm" phrases
name red or yellow shapes, "cool" ones green or blue shapes. R gets the demo's base model
(runner.make_demo_base_model), one training set and one held-out set of the generator split into
the two domains (data/), an adapter per domain trained with configs/demo.yaml for `--steps`
steps (adapter-warm/, adapter-cool/), each combination merged into full weights by
`merge_adapters` (merged-<method>/), and merge_domains.json + merge_domains.png: Acc@0.5 of the
base, of each adapter and of each combination on both domains' held-out queries. A second call on
the same R reuses the base, data, adapters and their scores (the adapters are kept as trained)
and adds the combinations with other `--weights` to the same JSON and plot.

With `--start-steps N`, both adapters start from a model that already grounds, as Qwen-VL-Chat
does: the demo recipe (embedding, output layer and resampler trained whole, as `make demo`) trains
N steps on both domains together, is merged into the base (start/), and the domain adapters and
their combinations are trained and merged on that start. Without it, each adapter has to teach
the random base the box syntax itself.

The demo recipe trains the embedding, the output layer and the resampler's queries and norms
whole; two adapters that both train a tensor whole cannot be combined, so here both adapters
are LoRA only (same components, ranks and rates as the demo recipe, `modules_to_save` and
`train` emptied), and each learns the box syntax through its LoRA alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from workbench.atomic import atomic_path, write_json, write_text

DOMAINS = {"warm": ("red", "yellow"), "cool": ("green", "blue")}
N_TRAIN, N_EVAL, SHAPES_PER_IMAGE = 600, 120, (1, 2)
LORA_ONLY = "adapter_overrides={modules_to_save: [], resampler: {train: []}}"
COMBINE = {  # method: Combine options besides the weights
    "cat": {}, "linear": {}, "ties": {"density": 0.5}, "dare_ties": {"density": 0.5},
}


def domain_of(phrase: str) -> str:
    return next(name for name, colours in DOMAINS.items() if any(f" {c} " in f" {phrase} " for c in colours))


def split_by_domain(jsonl: Path) -> dict[str, Path]:
    """`<stem>-warm.jsonl` and `<stem>-cool.jsonl` beside `jsonl` (the images stay where they are)."""
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    files = {}
    for name in DOMAINS:
        keep = [r for r in records if domain_of(r["objects"][0]["ref"]) == name]
        files[name] = jsonl.with_name(f"{jsonl.stem}-{name}.jsonl")
        write_text(files[name], "".join(json.dumps(r) + "\n" for r in keep))
    return files


def train_adapter(base: Path, train_file: Path, out: Path, steps: int, seed: int, lora_only: bool = True,
                  lr: float | None = None) -> Path:
    from workbench.demo.runner import DEMO_CONFIG
    from workbench.errors import WorkbenchError
    from workbench.train.config import load_run_config
    from workbench.train.trainer import train

    overrides = [f"model={base}", f"data.train={train_file}", f"train.output_dir={out}", f"train.seed={seed}",
                 f"train.max_steps={steps}", f"train.logging_steps={max(1, steps // 50)}",
                 *([LORA_ONLY] if lora_only else []), *([f"train.lr={lr}"] if lr is not None else [])]
    result = train(load_run_config(DEMO_CONFIG, overrides))
    if result.status != "completed":
        raise WorkbenchError(f"{out}: training stopped ({result.status}); see its workbench_run.json")
    return Path(result.output_dir)


def accuracy(model, tokenizer, queries: dict[str, list], out: Path) -> dict[str, float]:
    from workbench.demo.runner import MAX_NEW_TOKENS
    from workbench.eval.grounding import evaluate_grounding

    return {name: evaluate_grounding(model.eval(), tokenizer, qs, prompt="chat", batch_size=16,
                                     max_new_tokens=MAX_NEW_TOKENS, out_dir=out / name, n_images=0)
            ["metrics"]["acc@0.5"] for name, qs in queries.items()}


def run(folder: Path, steps: int, seed: int, methods: list[str], weights: tuple[float, float] = (1.0, 1.0),
        start_steps: int = 0, lr: float | None = None) -> dict:
    from peft import PeftModel

    from workbench.api import load_model, load_tokenizer
    from workbench.demo.runner import make_demo_base_model
    from workbench.demo.synthetic import make_shapes_dataset
    from workbench.eval.grounding import load_queries
    from workbench.merge.combine import Combine
    from workbench.merge.merge import merge_adapters

    started = time.time()
    base = folder / "base"
    if not (base / "config.json").exists():
        make_demo_base_model(base, seed)
    all_train = make_shapes_dataset(folder / "data", N_TRAIN, shapes_per_image=SHAPES_PER_IMAGE, seed=seed,
                                    name="train")
    train = split_by_domain(all_train)
    held_out = make_shapes_dataset(folder / "data", N_EVAL, shapes_per_image=SHAPES_PER_IMAGE, seed=seed + 1,
                                   name="eval")
    queries = {name: [q for q in load_queries(held_out) if domain_of(q.phrase) == name] for name in DOMAINS}
    tokenizer = load_tokenizer(base)
    previous = folder / "merge_domains.json"
    results: dict = json.loads(previous.read_text()) if previous.exists() else {
        "steps": steps, "seed": seed, "start_steps": start_steps, "lr": lr, "queries": {k: len(v) for k, v in queries.items()},
        "train_queries": {k: len(v.read_text().splitlines()) for k, v in train.items()},
        "acc@0.5": {}, "train_seconds": {}, "seconds": 0.0}
    if "base" not in results["acc@0.5"]:
        results["acc@0.5"]["base"] = accuracy(load_model(base, dtype=torch.float32), tokenizer, queries,
                                              folder / "eval" / "base")
    if start_steps and "start" not in results["acc@0.5"]:
        t = time.time()
        start_run = train_adapter(base, all_train, folder / "adapter-start", start_steps, seed, lora_only=False)
        merge_adapters(base, [start_run], folder / "start", overwrite=True)
        results["train_seconds"]["start"] = round(time.time() - t, 1)
        results["acc@0.5"]["start"] = accuracy(load_model(folder / "start", dtype=torch.float32), tokenizer,
                                               queries, folder / "eval" / "start")
    if start_steps:
        base = folder / "start"  # the adapters train on, and merge into, the model that already grounds
    adapters = {name: folder / f"adapter-{name}" for name in train}
    for name, file in train.items():
        if f"adapter {name}" in results["acc@0.5"]:  # trained and scored by an earlier call
            continue
        t = time.time()
        train_adapter(base, file, adapters[name], steps, seed, lr=lr)
        results["train_seconds"][name] = round(time.time() - t, 1)
        model = PeftModel.from_pretrained(load_model(base, dtype=torch.float32), adapters[name])
        results["acc@0.5"][f"adapter {name}"] = accuracy(model, tokenizer, queries, folder / "eval" / name)
    tag = "/".join(f"{w:g}" for w in weights)
    for method in methods:
        out = folder / f"merged-{method}-{tag.replace('/', '_')}"
        combine = Combine(method, tuple(weights), seed=seed, **COMBINE[method])
        merge_adapters(base, list(adapters.values()), out, combine=combine, overwrite=True)
        results["acc@0.5"][f"{method} {tag}"] = accuracy(load_model(out, dtype=torch.float32), tokenizer,
                                                         queries, folder / "eval" / out.name)
    results["seconds"] = round(results["seconds"] + time.time() - started, 1)
    write_json(folder / "merge_domains.json", results)
    plot(results, folder / "merge_domains.png")
    return results


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["acc@0.5"])
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(models)), 3.8))
    width = 0.38
    for i, domain in enumerate(DOMAINS):
        values = [results["acc@0.5"][m][domain] for m in models]
        bars = ax.bar([x + (i - 0.5) * width for x in range(len(models))], values, width,
                      label=f"{domain} held-out ({results['queries'][domain]} queries: "
                            f"{' / '.join(DOMAINS[domain])})")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(models)), models, fontsize=8, rotation=20)
    ax.set_ylabel("Acc@0.5")
    start = (f", from a start trained {results['start_steps']} steps on both"
             if results.get("start_steps") else "")
    lr = f", lr {results['lr']:g}" if results.get("lr") else ""
    ax.set_title(f"One adapter per domain ({results['steps']} steps each{lr}{start}) and their combinations "
                 "(method weight_warm/weight_cool)", fontsize=10)
    ax.set_ylim(0, max(0.1, *(v for acc in results["acc@0.5"].values() for v in acc.values())) * 1.25)
    ax.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def summary(results: dict) -> str:
    rows = [f"{'model':24s} " + " ".join(f"{d:>6s}" for d in DOMAINS)]
    rows += [f"{m:24s} " + " ".join(f"{acc[d]:6.3f}" for d in DOMAINS) for m, acc in results["acc@0.5"].items()]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench.demo.merge_domains", description=__doc__.split("\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=list(COMBINE), choices=list(COMBINE))
    p.add_argument("--weights", type=float, nargs=2, default=[1.0, 1.0], metavar=("WARM", "COOL"))
    p.add_argument("--start-steps", type=int, default=0,
                   help="first train the demo recipe this many steps on both domains and merge it: the start")
    p.add_argument("--lr", type=float, default=None, help="the domain adapters' learning rate (default: the demo's)")
    args = p.parse_args(argv)
    results = run(args.folder, args.steps, args.seed, args.methods, tuple(args.weights), args.start_steps, args.lr)
    print(summary(results))
    print(f"{args.folder / 'merge_domains.json'}, {args.folder / 'merge_domains.png'} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

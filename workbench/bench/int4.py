"""16-bit against its Int4 export, side by side: Acc@0.5, generation tokens/s and memory (issue 31).

    python -m workbench.bench.int4 --model MERGED --data CALIB.jsonl --eval EVAL.jsonl --out DIR \\
        [--device cuda] [--serve]

Quantises MODEL with `workbench quantize` in a child process (its time and peak RSS come from the
quantize report), then loads each model in turn on --device (bfloat16 activations for both), scores
grounding on the eval queries, times greedy generation, and with --serve measures `workbench serve`
on each at a few concurrent clients. Writes DIR/int4_bench.json and prints markdown rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from workbench.cli.args import whole

GEN_TOKENS = 32
REPEATS = 3  # generation is timed 3 times, the median reported


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def measure_model(folder: Path, queries: list, device: str, max_new_tokens: int) -> dict:
    from workbench.api import load_model, load_tokenizer
    from workbench.eval.grounding import evaluate_grounding, generate_answers, prompt_ids
    from workbench.model.image_processing import load_image

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    model, tokenizer = load_model(folder, dtype=torch.bfloat16, device=device), load_tokenizer(folder)
    report = evaluate_grounding(model, tokenizer, queries, prompt="chat", batch_size=8, max_new_tokens=max_new_tokens)
    batch = queries[:8]
    prompts = [prompt_ids(tokenizer, q.image, q.phrase, "chat") for q in batch]
    images = [load_image(q.file) for q in batch]
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        answers = generate_answers(model, tokenizer, prompts, images, max_new_tokens=GEN_TOKENS,
                                   min_new_tokens=GEN_TOKENS, stop_words=False)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    out = {"acc@0.5": report["metrics"]["acc@0.5"], "mean_iou": report["metrics"]["mean_iou"],
           "weights_gb": round(model_bytes(model) / 1e9, 4),
           "generate_tokens_per_s": round(len(answers) * GEN_TOKENS / seconds, 1)}
    if device.startswith("cuda"):
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def serve_rate(folder: Path, image: str, device: str) -> float:
    from workbench.serve.bench import _workload, measure

    workload = _workload([folder.name], clients=8, requests=2, max_tokens=GEN_TOKENS, image=image)
    result, _ = measure(["--model", str(folder), "--dtype", "bfloat16", "--device", device], 8, workload, None)
    return round(result["tokens_per_s"], 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench.bench.int4", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="16-bit model folder (e.g. the demo's merged model)")
    p.add_argument("--data", required=True, help="calibration data (e.g. the demo's train.jsonl)")
    p.add_argument("--eval", required=True, help="held-out grounding queries (e.g. the demo's eval.jsonl)")
    p.add_argument("--out", required=True, help="folder for the Int4 export and the results (must not exist)")
    p.add_argument("--samples", type=whole(1), default=128)
    p.add_argument("--group-size", type=whole(-1), default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--serve", action="store_true", help="also measure `workbench serve` on both models")
    args = p.parse_args(argv)
    from workbench.eval.grounding import load_queries

    out = Path(args.out)
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "workbench", "quantize", "--model", args.model, "--data", args.data,
           "--out", str(out / "int4"), "--samples", str(args.samples), "--group-size", str(args.group_size),
           "--device", args.device]
    subprocess.run(cmd, check=True)
    quantized = json.loads((out / "int4" / "quantize_report.json").read_text())
    queries = load_queries(args.eval)
    rows = {}
    for name, folder in (("bf16", Path(args.model)), ("int4", out / "int4")):
        rows[name] = measure_model(folder, queries, args.device, 48)
        if args.serve:
            rows[name]["serve_tokens_per_s"] = serve_rate(folder, str(queries[0].file), args.device)
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
              "queries": len(queries), "quantize_seconds": quantized["seconds"],
              "quantize_peak_rss_gb": quantized["peak_rss_gb"], "samples": quantized["samples"], **rows}
    (out / "int4_bench.json").write_text(json.dumps(result, indent=2))
    keys = [k for k in rows["bf16"]]
    print("| model | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(str(row[k]) for k in keys) + " |")
    print(f"quantize: {quantized['seconds']} s, peak RSS {quantized['peak_rss_gb']} GB, {quantized['samples']} samples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

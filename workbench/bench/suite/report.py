"""The GPU suite's rows for BENCHMARKS.md, made from its JSON (every number in them is in the JSON).

Workbench and original side by side per recipe and length, the ratio from the same run, the
memory estimate's error per row, then one table per other section and the list of what was not
measured, each with its reason.
"""

from __future__ import annotations

DASH = "-"


def num(value: float | int | None, fmt: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, fmt)


def table(header: list[str], rows: list[list[str]], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _rows(report: dict, name: str) -> list[dict]:
    return report["sections"][name].get("rows", [])


def header(report: dict) -> list[str]:
    suite, sections = report["suite"], report["sections"]
    env = (_rows(report, "environment") or [{}])[0]
    versions = env.get("versions", {})
    train = sections["training"].get("data", {})
    orig = sections["original"]
    carried = orig.get("data", {}).get("versions") or {}
    title = "GPU suite" if not suite["dry_run"] else "GPU suite, CPU dry run on the tiny model"
    gpus = f" x {env['gpus']}" if env.get("gpus") else ""
    lines = [f"### {title}: {suite['date']}", ""]
    if suite["dry_run"]:
        lines += ["**A dry run: these numbers check that every section's code runs; they measure nothing "
                  "about the 9.6B model.**", ""]
    if orig.get("status") == "ok":
        names = ", ".join(f"{k} {carried[k]}" for k in ("transformers", "peft", "accelerate", "deepspeed") if k in carried)
        original = f"the original: finetune.py with {names or 'the packages of this environment'}"
    else:
        original = orig.get("reason") or "original: not run"
    lines += [
        f"Device: {env.get('device', '?')}{gpus} (driver {env.get('driver', '?')}, CUDA "
        f"{env.get('cuda') or 'n/a'}), Python {env.get('python', '?')}, torch {versions.get('torch', '?')}, "
        f"transformers {versions.get('transformers', '?')}, peft {versions.get('peft', '?')}, bitsandbytes "
        f"{versions.get('bitsandbytes', '?')}; {original}. Measured {train.get('dtype', '?')} matmul rate "
        f"{num(train.get('matmul_tflops'), '.3g')} TFLOP/s (datasheet {num(train.get('datasheet_tflops'), '.1f')}); "
        f"{train.get('steps', '?')} timed steps of {train.get('grad_accum', '?')} micro-batches after one warm-up "
        f"per length; commit {env.get('commit', '?')}.",
        "",
        f"Command: `{suite['command']}` ({suite['seconds']:.0f} s of its {suite['budget_s']:.0f} s budget).",
        "",
    ]
    return lines


def training_table(rows: list[dict]) -> list[str]:
    body = []
    for r in rows:
        wb, orig = r["workbench"], r["original"]
        body.append([
            r["recipe"], str(r["seq_len"]),
            num(wb and wb["s_per_it"], ".3f", r["workbench_note"]),
            num(orig and orig["s_per_it"], ".3f", r["original_note"]),
            num(r["speedup"], ".2f", DASH),
            num(wb and wb["tokens_per_s"], ".0f", DASH), num(orig and orig["tokens_per_s"], ".0f", DASH),
            num(wb and wb["mfu_pct"], ".1f", DASH), num(orig and orig["mfu_pct"], ".1f", DASH),
            num(wb and wb["trainable_params"], ",", DASH), num(orig and orig["trainable_params"], ",", DASH),
        ])
    return table(["recipe", "seq len", "workbench s/it", "original s/it", "original / workbench",
                  "workbench tokens/s", "original tokens/s", "workbench MFU %", "original MFU %",
                  "workbench trainable", "original trainable"], body, right_from=2)


def memory_table(rows: list[dict], cpu: bool) -> list[str]:
    measured = "n/a (CPU)" if cpu else DASH
    body = []
    for r in rows:
        wb, orig = r["workbench"], r["original"]
        body.append([
            r["recipe"], str(r["seq_len"]),
            num(wb and wb["peak_allocated_gib"], ".2f", measured), num(wb and wb["peak_reserved_gib"], ".2f", measured),
            num(orig and orig["peak_allocated_gib"], ".2f", measured if orig else DASH),
            num(orig and orig["peak_reserved_gib"], ".2f", measured if orig else DASH),
            num(r["memory_ratio"], ".2f", DASH), num(r["estimate_gib"], ".2f", DASH),
            num(r["estimate_error_pct"], "+.1f", measured),
        ])
    return table(["recipe", "seq len", "workbench peak allocated GiB", "workbench peak reserved GiB",
                  "original peak allocated GiB", "original peak reserved GiB", "original / workbench reserved",
                  "estimate GiB (`inspect --seq-len`)", "estimate error %"], body, right_from=2)


def packing_table(report: dict) -> list[str]:
    rows = _rows(report, "packing")
    if not rows:
        return []
    body = [[r["mode"], str(r["samples"]), str(r["steps"]), str(r["rows_per_step"]) + (
        f" x {r['row_tokens']}" if r["row_tokens"] else ""), str(r["real_tokens"]), f"{r['padding_pct']:.1f} %",
             f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.0f}"] for r in rows]
    by_mode = {r["mode"]: r["tokens_per_s"] for r in rows}
    ratio = (by_mode["packed"] / by_mode["padded"]) if {"packed", "padded"} <= set(by_mode) else None
    return ["Packed vs padded, official-lora, grounding-length samples (batches collated before the clock):", "",
            *table(["arm", "samples", "steps", "rows per step", "real tokens", "padding", "seconds", "tokens/s"],
                   body),
            "", f"Packed / padded tokens/s: {num(ratio, '.2f')}.", ""]


def vit_cache_table(report: dict) -> list[str]:
    section = report["sections"]["vit_cache"]
    rows, data = section.get("rows", []), section.get("data", {})
    if not rows:
        return []
    body = [[r["mode"], str(r["steps"]), str(r["samples_per_step"]), f"{r['step_s']:.3f}", f"{r['collate_s']:.3f}",
             f"{r['step_and_collate_s']:.3f}"] for r in rows]
    by_mode = {r["mode"]: r["step_s"] for r in rows}
    ratio = by_mode["uncached"] / by_mode["cached"] if {"cached", "uncached"} <= set(by_mode) else None
    return ["ViT cache, official-lora, grounding-length samples:", "",
            *table(["epoch", "steps", "samples per step", "step s (median)", "collate s (median)",
                    "step + collate s"], body),
            "", f"Uncached / cached step: {num(ratio, '.2f')}; the cache's pre-pass took "
                f"{num(data.get('prepass_s'), '.1f')} s for {data.get('images', '?')} images; first-batch loss "
                f"difference between the two paths {num(data.get('loss_abs_diff'), '.2e')}.", ""]


def merge_table(report: dict) -> list[str]:
    section = report["sections"]["merge"]
    rows, data = section.get("rows", []), section.get("data", {})
    if not rows:
        return []
    copy = next((r["seconds"] for r in rows if r["phase"] == "copy"), None)
    body = []
    for r in rows:
        check = (f"equal: {r['probe_equal']} (max diff {r['probe_max_abs_diff']:.2e}), untouched bit-equal: "
                 f"{r['untouched_bit_equal']}" if r["phase"] == "merge" else DASH)
        body.append([r["phase"], f"{r['seconds']:.1f}", num(copy and r["seconds"] / copy, ".2f", DASH),
                     num(r.get("peak_rss_gb"), ".2f", DASH), num(r.get("cpu_s"), ".1f", DASH), check])
    return [f"Merge of an official-lora adapter on {data.get('device', '?')} ({data.get('files', '?')} weight files, "
            f"{num(data.get('weight_bytes') and data['weight_bytes'] / 1e9, '.2f')} GB):", "",
            *table(["phase", "seconds", "x copy", "peak RSS GB", "CPU s", "merged tensor by hand"], body), ""]


def serving_table(report: dict) -> list[str]:
    rows = _rows(report, "serving")
    if not rows:
        return []
    body = []
    for r in rows:
        if r["part"] == "equality":
            body.append([f"vLLM equality, tp {r['tensor_parallel']}", DASH, DASH, DASH, DASH, DASH, r["summary"]])
        else:
            body.append([r["engine"], str(r["clients"]), str(r["requests"]), f"{r['seconds']:.1f}",
                         f"{r['tokens_per_s']:.1f}", f"{r['requests_per_s']:.2f}", f"median latency {r['p50_s']:.2f} s"])
    return ["Serving:", "", *table(["engine / check", "clients", "requests", "seconds", "tokens/s", "requests/s",
                                    "notes"], body), ""]


def int4_table(report: dict) -> list[str]:
    rows = _rows(report, "int4")
    if not rows:
        return []
    body = [[r["model"], num(r["generate_tokens_per_s"], ".1f"), num(r["peak_allocated_gib"], ".2f"),
             num(r["weights_gb"], ".2f"), num(r.get("quantize_s"), ".0f", DASH)] for r in rows]
    return ["Int4 export on GPTQModel's CUDA kernels vs bf16 (`python -m workbench.bench.int4`, greedy generation):",
            "", *table(["model", "generation tokens/s", "peak allocated GiB", "weights GB", "quantize s"], body), ""]


def not_measured(report: dict) -> list[str]:
    lines = []
    for name, section in report["sections"].items():
        reason = section.get("reason") or ""
        if section["status"] != "ok":  # a reason may name its section already ("original: not carried")
            lines.append(f"- {reason if reason.startswith(name + ':') else f'{name}: {reason}'} ({section['status']})")
        lines += [f"- {name}: {s['what']}: {s['reason']}" for s in section.get("skipped", [])]
    return ["Not measured in this run:", "", *lines, ""] if lines else []


def markdown(report: dict) -> str:
    rows = report["comparison"]
    cpu = report["suite"]["device"] == "cpu"
    parts = [
        *header(report),
        "Training step, workbench vs the original (random weights of the real size; original / workbench > 1: "
        "the workbench is faster):", "",
        *training_table(rows), "",
        "Peak memory per row, and `workbench inspect --seq-len N --batch-size 1`'s estimate against "
        "`torch.cuda.max_memory_allocated` (error = (estimate - measured) / measured):", "",
        *memory_table(rows, cpu), "",
        *packing_table(report), *vit_cache_table(report), *merge_table(report), *serving_table(report),
        *int4_table(report), *not_measured(report),
    ]
    return "\n".join(parts).rstrip() + "\n"

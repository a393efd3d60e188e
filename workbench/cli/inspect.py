"""`workbench inspect CONFIG`: what a run's adapter recipe adapts, trains and quantises, and its memory."""

from __future__ import annotations

import argparse
import json

GIB = 1024**3


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="show what a run config's adapter recipe adapts, trains and quantises",
        description="Builds the model from its config.json on the meta device (no weights are read) "
                    "and applies the recipe, so the counts are PEFT's own.")
    p.add_argument("config", help="run config YAML (model, dtype, adapter, adapter_overrides, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set adapter_overrides.llm.r=16")
    p.add_argument("--devices", type=_positive_int, default=None, metavar="N",
                   help="also estimate the memory per device when FSDP / ZeRO-3 shard the run over N devices")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of devices (1 or more), not {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> int:
    from workbench.adapters.inspect import inspect_recipe
    from workbench.train.config import load_run_config

    config = load_run_config(args.config, args.set)
    report = inspect_recipe(config.model, config.recipe, config.dtype, devices=args.devices)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def format_report(report: dict) -> str:
    rows = [("component", "modules", "layers", "adapted", "r/alpha", "LoRA params", "trained", "quantised",
             "lr x")]
    for name, c in report["components"].items():
        ra = f"{c['r']}/{c['alpha']:g}" if c["r"] else "-"
        lr = f"{c['lr_scale']:g}" if c["lr_scale"] is not None else "frozen"
        rows.append((name, " ".join(c["modules"]) or "-", c["layers"] or "-", str(c["adapted_modules"]), ra,
                     f"{c['lora_params']:,}", f"{c['trained_params']:,}", str(c["quantized_modules"]), lr))
    saved = report["modules_to_save"]
    if saved["modules"]:
        rows.append(("to_save", " ".join(saved["modules"]), "-", "-", "-", "0", f"{saved['params']:,}", "0", "llm"))
    t = report["totals"]
    rows.append(("total", "", "", "", "", f"{t['lora_params']:,}", f"{t['trained_params']:,}",
                 str(t["quantized_modules"]), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    m, q = report["memory_bytes"], report["quantization"]
    qdesc = (f"{q['bits']}-bit {q['quant_type'] if q['bits'] == 4 else 'int8'} of {q['modules']} linears"
             + ("" if q["applied"] else ", if the recipe quantised"))
    lines = [
        *([f"note: {report['config_note']}"] if report.get("config_note") else []),
        f"recipe {report['recipe']} on {report['model']} ({report['dtype']}, "
        f"{t['base_params']:,} base parameters)",
        report["description"], "", *table, "",
        f"trainable parameters: {t['trainable_params']:,}",
        f"GPU memory estimate: weights {m['weights'] / GIB:.2f} GiB {report['dtype']} / "
        f"{m['weights_4bit'] / GIB:.2f} GiB with {qdesc}; trainable + grads + AdamW {m['trainable'] / GIB:.2f} GiB; "
        f"total {m['total'] / GIB:.2f} / {m['total_4bit'] / GIB:.2f} GiB",
        f"  ({report['memory_formula']})",
    ]
    if "memory_per_device" in report:
        d = report["memory_per_device"]
        lines += [
            f"sharded over {d['devices']} devices (FSDP / ZeRO-3): {d['per_device'] / GIB:.2f} GiB per device = "
            f"{d['divided'] / GIB:.2f} GiB divided (weights, grads, AdamW / {d['devices']}) + "
            f"{d['gathered'] / GIB:.2f} GiB gathered in full while computing",
            f"  ({d['formula']}; activations excluded)",
        ]
    return "\n".join(lines)

"""`workbench inspect CONFIG`: what a run's adapter recipe adapts, trains and quantises, and its memory."""

from __future__ import annotations

import argparse
import json

from workbench.cli.args import whole

GIB = 1024**3


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="show what a run config's adapter recipe adapts, trains and quantises",
        description="Builds the model from its config.json on the meta device (no weights are read) "
                    "and applies the recipe, so the counts are PEFT's own.")
    p.add_argument("config", help="run config YAML (model, dtype, adapter, adapter_overrides, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set adapter_overrides.llm.r=16")
    p.add_argument("--devices", type=whole(1), default=None, metavar="N",
                   help="also estimate the memory per device when FSDP / ZeRO-3 shard the run over N devices")
    p.add_argument("--seq-len", type=whole(1), default=None, metavar="N",
                   help="also estimate the activations of a micro-batch of N tokens per sample (under the "
                        "config's checkpointing, checkpoint_every and loss_chunk_size)")
    p.add_argument("--batch-size", type=whole(1), default=None, metavar="B",
                   help="samples per micro-batch for --seq-len (default: the config's train.batch_size)")
    p.add_argument("--images-per-sample", type=whole(0), default=1, metavar="K", help="images per sample for --seq-len")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)



def run(args: argparse.Namespace) -> int:
    from workbench.adapters.activations import StepShape
    from workbench.adapters.inspect import inspect_recipe
    from workbench.train.config import load_run_config

    config = load_run_config(args.config, args.set)
    step = None
    if args.seq_len is not None:
        t = config.train
        step = StepShape(seq_len=args.seq_len, batch_size=args.batch_size or t.batch_size,
                         images_per_sample=args.images_per_sample, gradient_checkpointing=t.gradient_checkpointing,
                         checkpoint_every=t.checkpoint_every, loss_chunk_size=t.loss_chunk_size)
    report = inspect_recipe(config.model, config.recipe, config.dtype, devices=args.devices, step=step)
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
    m, q, g, e = report["memory_bytes"], report["quantization"], report["gptq"], report["export_bytes"]
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
    if e["int4"] is not None:
        lines += [f"on a GPTQ Int4 base ({g['bits']}-bit, group {g['group_size']}"
                  f"{'' if g['base_is_gptq'] else ', as after workbench quantize'}): weights "
                  f"{m['weights_gptq'] / GIB:.2f} GiB, total {m['total_gptq'] / GIB:.2f} GiB",
                  f"checkpoint sizes: 16-bit {e['16bit'] / 1e9:.2f} GB, Int4 {e['int4'] / 1e9:.2f} GB"]
    if "activations" in m:
        st, a = report["step"], report["activation_terms"]
        ckpt = (f"checkpointing every {st['checkpoint_every']} block(s)" if st["gradient_checkpointing"]
                else "no checkpointing")
        lines += [
            f"one micro-batch of {st['batch_size']} x {st['seq_len']} tokens ({st['images_per_sample']} image(s) "
            f"per sample, {ckpt}, loss chunk {st['loss_chunk_size'] or 'off'}): activations "
            f"{m['activations'] / GIB:.2f} GiB, step total {m['step_total'] / GIB:.2f} GiB",
            f"  (blocks keep {a['blocks_kept'] / GIB:.2f} GiB, a block's backward adds {a['block_peak'] / GIB:.2f}, "
            f"the loss head {a['head_peak'] / GIB:.2f}, the ViT's forward peaks at {a['vit_forward_peak'] / GIB:.2f}; "
            "measured on the meta device, flash attention)",
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

"""`workbench quantize`: GPTQ of the LLM's linears, calibrated on your own samples, written in the
Int4 release's layout (docs/int4.md)."""

from __future__ import annotations

import argparse

from workbench.cli.args import number, whole


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="GPTQ-quantise a (merged or base) model's LLM to 4 bits in the Int4 release's layout",
        description="Calibrates on the first --samples records of --data as the model sees them in training "
                    "(chat template, images through the ViT and the resampler), quantises the LLM's block "
                    "linears block by block with GPTQModel's GPTQ, and writes OUT as Qwen/Qwen-VL-Chat-Int4 is "
                    "laid out (ViT, resampler, embeddings in float16). Nothing is written until it is complete.")
    p.add_argument("--model", required=True, help="16-bit model folder (a merged model or the base) or hub id")
    p.add_argument("--adapter", default=None, help="merge this adapter into --model first")
    p.add_argument("--data", required=True, help="calibration data file (any format `workbench train` reads)")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--bits", type=int, choices=(2, 4, 8), default=4, help="bits per weight (default 4)")
    p.add_argument("--group-size", type=whole(-1), default=128,
                   help="inputs sharing one scale and zero point; -1 for one group per row (default 128)")
    p.add_argument("--samples", type=whole(1), default=128, help="calibration samples (default 128)")
    p.add_argument("--max-length", type=whole(16), default=2048, help="longest calibration sample in tokens")
    p.add_argument("--damp-percent", type=number(gt=0, le=0.5), default=0.01, help="GPTQ's Hessian dampening (default 0.01)")
    p.add_argument("--device", default="cpu", help="where GPTQ runs (cpu, cuda)")
    p.add_argument("--max-shard-size", default="2GB", help="largest output shard, e.g. 2GB")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from workbench.errors import WorkbenchError
    from workbench.gptq.layout import GPTQSpec
    from workbench.gptq.quantize import quantize

    try:
        spec = GPTQSpec(bits=args.bits, group_size=args.group_size, damp_percent=args.damp_percent)
    except ValueError as err:  # GPTQSpec names the field: "group_size: 0 must be ..."
        key, _, message = str(err).partition(": ")
        raise WorkbenchError(f"--{key.replace('_', '-')}: {message}") from None
    report = quantize(args.model, args.data, args.out, spec, samples=args.samples, max_length=args.max_length,
                      device=args.device, adapter=args.adapter, max_shard_size=args.max_shard_size)
    print(f"wrote {args.out}: {spec.bits}-bit GPTQ, group size {spec.group_size}, "
          f"{report['total_bytes'] / 1e9:.3g} GB of weights, {report['samples']} calibration samples, "
          f"{report['seconds']} s, peak RSS {report['peak_rss_gb']} GB")
    return 0

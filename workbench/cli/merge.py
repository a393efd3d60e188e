"""`workbench merge`: fold one or several LoRA adapters into the base weights (release layout),
or combine several into one adapter (`--adapter-out`)."""

from __future__ import annotations

import argparse
import os

from workbench.cli.args import number, whole
from workbench.dtypes import DTYPE_NAMES
from workbench.errors import WorkbenchError

COMBINE_METHODS = ("cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                   "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")  # = merge.combine.METHODS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge", help="merge LoRA/QLoRA adapters into the base model (streaming, shard by shard)",
        description="Writes OUT with the release's key names, sharding and non-weight files, plus "
                    "merge_report.json. With --dtype, config.json's torch_dtype (and a forced "
                    "bf16/fp16/fp32 flag) follow the new dtype. Several --adapter are combined module by "
                    "module with PEFT's add_weighted_adapter maths (--combine); --adapter-out writes the "
                    "combined adapter instead of full weights.")
    p.add_argument("--base", required=True, help="base model folder or hub repo id")
    p.add_argument("--adapter", required=True, action="append",
                   help="PEFT adapter folder (workbench train or finetune.py); repeat to combine several")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="output folder for the merged model (must not exist unless --overwrite)")
    where.add_argument("--adapter-out", metavar="DIR",
                       help="write the combined adapter (a PEFT adapter folder) instead of merged weights")
    p.add_argument("--combine", choices=COMBINE_METHODS, default=None,
                   help="how several adapters combine (PEFT's combination_type; default cat: the exact sum of "
                        "the weighted deltas, any ranks)")
    p.add_argument("--weights", default=None,
                   help="one weight per --adapter, comma-separated, e.g. 0.6,0.4 (default 1 each)")
    p.add_argument("--density", type=number(gt=0, le=1), default=None,
                   help="fraction of values kept by ties, dare_* and magnitude_prune")
    p.add_argument("--majority-sign", choices=("total", "frequency"), default="total",
                   help="ties / dare_ties sign election")
    p.add_argument("--svd-rank", type=whole(1), default=None, help="rank of the *svd methods' result")
    p.add_argument("--seed", type=whole(0), default=0, help="seed of dare's random pruning")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="output dtype (default: keep each base tensor's dtype)")
    p.add_argument("--max-shard-size", default="2GB", help="largest output shard, e.g. 2GB, 500MB")
    p.add_argument("--verify", action="store_true",
                   help="compare merged vs base+adapter logits on a probe batch with an image")
    p.add_argument("--device", default="cpu", help="device for the merge maths and --verify (cpu, cuda)")
    p.add_argument("--force", action="store_true", help="merge although the adapters' recorded base differs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(run=run)


def parse_weights(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(w) for w in text.split(","))
    except ValueError:
        raise WorkbenchError(f"--weights: '{text}' is not a comma-separated list of numbers") from None


def run(args: argparse.Namespace) -> int:
    # Before torch (and its OpenMP) loads: OpenMP threads that spin between the merge's matrix
    # products take the cores the base's reader and the writer need (4.5-6 s of CPU over the
    # release on 2 cores, BENCHMARKS.md); sleeping costs a few microseconds per product.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from workbench.dtypes import TORCH_DTYPES
    from workbench.merge.combine import Combine
    from workbench.merge.merge import merge_adapters

    combining = len(args.adapter) > 1 or args.combine is not None or args.weights is not None
    combine = Combine(args.combine or "cat", parse_weights(args.weights), args.density, args.majority_sign,
                      args.svd_rank, args.seed) if combining else None
    report = merge_adapters(args.base, args.adapter, args.out or args.adapter_out, combine=combine,
                            adapter_out=args.adapter_out is not None, dtype=TORCH_DTYPES.get(args.dtype),
                            max_shard_size=args.max_shard_size, force=args.force, overwrite=args.overwrite,
                            verify=args.verify, device=args.device)
    if combine is not None:
        weights = ", ".join(f"{a['path']} x {a['weight']:g}" for a in report["adapters"])
        print(f"combined ({combine.method}): {weights}")
    if args.adapter_out:
        a = report["adapter_out"]
        print(f"wrote the combined adapter (r={a['r']}, {a['modules']} LoRA modules) to {args.adapter_out}")
        return 0
    print(f"merged {len(report['merged_modules'])} LoRA modules and "
          f"{len(report['trained_params_written'])} trained tensors into {args.out}")
    for note in report["notes"]:
        print(f"note: {note}")
    if "verify" in report:
        v = report["verify"]
        print(f"verify: max |logit diff| {v['max_abs_logit_diff']:.3g} <= tolerance {v['tolerance']:.3g} "
              f"({v['dtype']})")
    return 0

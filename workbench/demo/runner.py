"""`workbench demo`: the whole workbench on a laptop CPU, with nothing downloaded.

One report folder gets: a synthetic grounding set (coloured shapes, `data/`), a tiny
Qwen-VL-Chat-layout base model with a byte-level qwen.tiktoken vocabulary (`base/`), the LoRA
adapter trained with configs/demo.yaml (`adapter/`, with its loss_curve.png), Acc@0.5 before and
after (`eval_before/`, `eval_after/`: report.json + box PNGs), the merged model checked with
verify (`merged/`), one grounding answer of the reloaded merged model drawn on its image
(`answer.png`) and `metrics.json` with the numbers.

The base model is synthetic: random weights (workbench.demo.tiny), except the vision side,
which is set by hand (workbench.demo.tiny_vision) to stand in for Qwen-VL's pretrained ViT and
resampler: its image tokens say which colour is where. The random LLM learns to read them.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from workbench.builtin import builtin_dir
from workbench.errors import WorkbenchError

DEMO_CONFIG = builtin_dir("configs") / "demo.yaml"
GRPO_CONFIG = DEMO_CONFIG.with_name("demo-grpo.yaml")
DPO_CONFIG = DEMO_CONFIG.with_name("demo-dpo.yaml")
# 224 px with 14 px patches is a 16 x 16 grid: one patch per resampler query (tiny_vision.py).
BASE_SIZES = {"hidden_size": 128, "num_hidden_layers": 2,
              "visual": {"image_size": 224, "width": 64, "layers": 2, "heads": 4}}
N_TRAIN, N_EVAL, SHAPES_PER_IMAGE = 600, 48, (1, 2)
MAX_NEW_TOKENS = 64   # `<ref>the yellow triangle</ref><box>(123,456),(789,999)</box>` is 26 ids


def make_demo_base_model(out_dir: Path, seed: int) -> Path:
    """The tiny random model of workbench.demo.tiny with the hand-set vision side of tiny_vision.py.

    The LLM is random: it has never seen an image token or a box, which is what training teaches.
    The byte-level vocabulary has one token per word of the shapes' phrases (synthetic.WORDS), so
    the colour is one token, not 3-6 bytes that a 2-layer LLM would first have to put together.
    """
    from workbench.api import load_model
    from workbench.demo.synthetic import COLOURS, WORDS
    from workbench.demo.tiny import make_tiny_model_dir
    from workbench.demo.tiny_vision import set_shape_vision
    from workbench.model.checkpoint import save_model

    make_tiny_model_dir(out_dir, seed=seed, words=WORDS, **BASE_SIZES)
    model = load_model(out_dir, dtype=torch.float32)
    set_shape_vision(model, COLOURS)
    save_model(model, out_dir, max_shard_size="10GB")  # same file names: replaces the random weights
    return out_dir


def _evaluate(model, tokenizer, queries: list, out_dir: Path) -> dict:
    from workbench.eval.grounding import evaluate_grounding

    report = evaluate_grounding(model, tokenizer, queries, prompt="chat", batch_size=16,
                                max_new_tokens=MAX_NEW_TOKENS, out_dir=out_dir)
    return {k: report["metrics"][k] for k in ("n", "acc@0.5", "mean_iou", "parse_failure_rate")}


def _ask(model, tokenizer, query, out_png: Path) -> dict:
    """One grounding question the way `workbench chat --draw` asks it; the answer's boxes drawn."""
    from workbench.eval.chat import ChatSession, draw_answer
    from workbench.eval.draw import save_png
    from workbench.prompt import load_task_template

    question = load_task_template("grounding").user[0].replace("<image>", "").replace(
        "<ref-object>", f"<ref>{query.phrase}</ref>")
    session = ChatSession(model, tokenizer, str(query.file), max_new_tokens=MAX_NEW_TOKENS)
    answer = session.ask(question)
    # Without a box in the answer the PNG is the bare image, so the report always has one.
    boxed = draw_answer(answer, session.image, out_png) is not None
    if not boxed:
        save_png(session.image, out_png)
    return {"image": str(query.file), "phrase": query.phrase, "truth": query.gt, "question": question,
            "answer": answer, "png": str(out_png), "box_drawn": boxed}


def _grpo_stage(out: Path, base: Path, train_file: Path, sft_adapter: Path, seed: int, steps: int | None,
                tokenizer, queries: list) -> dict:
    """GRPO (configs/demo-grpo.yaml) continuing the SFT adapter, then Acc@0.5 of base + GRPO adapter."""
    from peft import PeftModel

    from workbench.api import load_model
    from workbench.train.config import load_run_config
    from workbench.train.trainer import train

    overrides = [f"model={base}", f"data.train={train_file}", f"train.output_dir={out / 'grpo'}",
                 f"grpo.init_from={sft_adapter}", f"train.seed={seed}"]
    if steps:  # at least one logged point, so a short run still has its curves
        overrides += [f"train.max_steps={steps}", f"train.logging_steps={max(1, min(5, steps // 20))}"]
    result = train(load_run_config(GRPO_CONFIG, overrides))
    if result.status != "completed":
        raise WorkbenchError(f"{out / 'grpo'}: GRPO stopped ({result.status}); see its workbench_run.json")
    model = PeftModel.from_pretrained(load_model(base, dtype=torch.float32), result.output_dir).eval()
    return {**_evaluate(model, tokenizer, queries, out / "eval_after_grpo"), "steps": result.global_step}


def run_demo(out_dir: str | Path, steps: int | None = None, seed: int = 0, grpo: bool = False,
             grpo_steps: int | None = None) -> dict:
    """Data -> base model -> eval -> LoRA training -> merge + verify -> eval + one drawn answer
    (-> with `grpo`, GRPO from the SFT adapter -> eval)."""
    from workbench.api import load_model, load_tokenizer
    from workbench.atomic import write_json
    from workbench.demo.synthetic import make_shapes_dataset
    from workbench.eval.grounding import load_queries
    from workbench.merge.merge import merge_adapter
    from workbench.train.config import load_run_config
    from workbench.train.trainer import train

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise WorkbenchError(f"{out}: the demo's report folder exists and is not empty (choose another --out)")
    started = time.time()
    print(f"[1/5] synthetic shapes and a tiny base model in {out}")
    train_file = make_shapes_dataset(out / "data", N_TRAIN, shapes_per_image=SHAPES_PER_IMAGE, seed=seed,
                                     name="train")
    eval_file = make_shapes_dataset(out / "data", N_EVAL, shapes_per_image=SHAPES_PER_IMAGE, seed=seed + 1,
                                    name="eval")
    base = make_demo_base_model(out / "base", seed)
    tokenizer = load_tokenizer(base)
    queries = load_queries(eval_file)

    print(f"[2/5] Acc@0.5 of the base model on {len(queries)} held-out queries")
    before = _evaluate(load_model(base, dtype=torch.float32), tokenizer, queries, out / "eval_before")

    print(f"[3/5] LoRA training with {DEMO_CONFIG.name}")
    overrides = [f"model={base}", f"data.train={train_file}", f"train.output_dir={out / 'adapter'}",
                 f"train.seed={seed}"]
    if steps:  # log about 100 points, and at least one, so a short run still has a loss curve
        overrides += [f"train.max_steps={steps}", f"train.logging_steps={max(1, steps // 100)}"]
    config = load_run_config(DEMO_CONFIG, overrides)
    result = train(config)
    if result.status != "completed":
        raise WorkbenchError(f"{out / 'adapter'}: training stopped ({result.status}); see its workbench_run.json")

    print("[4/5] merging the adapter into the base model (with --verify)")
    merge = merge_adapter(base, result.output_dir, out / "merged", verify=True)

    print("[5/5] Acc@0.5 and one grounding answer of the reloaded merged model")
    merged = load_model(out / "merged", dtype=torch.float32)
    after = _evaluate(merged, tokenizer, queries, out / "eval_after")
    example = _ask(merged, tokenizer, queries[0], out / "answer.png")

    if grpo:
        print(f"[6/6] GRPO with {GRPO_CONFIG.name} from the SFT adapter, then Acc@0.5")
    after_grpo = _grpo_stage(out, base, train_file, result.output_dir, seed, grpo_steps, tokenizer,
                             queries) if grpo else None
    metrics = {"before": before, "after": after, **({"after_grpo": after_grpo} if grpo else {}),
               "steps": result.global_step, "seed": seed,
               "train_queries": len(train_file.read_text().splitlines()), "merge_verify": merge["verify"],
               "example": example, "seconds": round(time.time() - started, 1)}
    write_json(out / "metrics.json", metrics)
    return metrics


def summary(metrics: dict, out_dir: str | Path) -> str:
    out = Path(out_dir)
    b, a = metrics["before"], metrics["after"]
    return "\n".join([
        f"Acc@0.5 {b['acc@0.5']:.3f} -> {a['acc@0.5']:.3f}, mean IoU {b['mean_iou']:.3f} -> {a['mean_iou']:.3f} "
        f"({a['n']} held-out queries, {metrics['steps']} steps, {metrics['seconds']:.0f} s)",
        *([f"Acc@0.5 before {b['acc@0.5']:.3f}, after SFT {a['acc@0.5']:.3f}, after GRPO "
            f"{metrics['after_grpo']['acc@0.5']:.3f} ({metrics['after_grpo']['steps']} GRPO steps; "
            f"eval_after_grpo/, grpo/loss_curve.png)"] if "after_grpo" in metrics else []),
        f"question: {metrics['example']['question']}",
        f"answer:   {metrics['example']['answer']}",
        f"report folder: {out}",
        f"  metrics.json, adapter/loss_curve.png, answer.png, eval_before/ and eval_after/ "
        f"(report.json, samples/*.png), merged/ (verified: max |logit diff| "
        f"{metrics['merge_verify']['max_abs_logit_diff']:.2g})",
    ])

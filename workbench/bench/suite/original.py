"""Section `original`: the original finetune.py (official LoRA) at the workbench's lengths, same card, same run.

The original is not part of the repository: `--original DIR` names a folder that prepare.py fills
(DIR/finetune.py from QwenLM/Qwen-VL, DIR/Qwen-VL-Chat with the release's remote code, config and
tokenizer but no weights, DIR/wheels with transformers 4.32 and what finetune.py imports besides),
installed on first use into DIR/site. Without it the section, the JSON and the rows say "original: not carried".

Each length is one run of finetune.py with finetune/finetune_lora_single_gpu.sh's settings (batch
1, gradient accumulation 8, bf16, gradient checkpointing, LoRA r 64 / alpha 16, AdamW, lr 1e-5,
cosine) for steps + 1 optimizer steps, through original_launcher.py (random weights, one line per
step, the peaks). The data is the benchmark's sample in finetune.py's format: one 640x480 image
and text that fills the length (finetune.py truncates it there), the first half the prompt.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from workbench.bench.suite.original_launcher import MARK
from workbench.bench.suite.plan import Plan
from workbench.bench.suite.recorder import Recorder

GiB = 2**30
LAUNCHER = Path(__file__).with_name("original_launcher.py")
REPO_ROOT = Path(__file__).resolve().parents[3]
# The model folder's name holds "chat": finetune.py trains wte and lm_head in full unless
# --model_name_or_path names a Chat model, and the official recipe is the Chat one.
MODEL_DIR = "Qwen-VL-Chat"
REQUIRED = ("finetune.py", f"{MODEL_DIR}/config.json", f"{MODEL_DIR}/qwen.tiktoken")
# finetune/finetune_lora_single_gpu.sh of QwenLM/Qwen-VL, with a fixed number of steps and no saving.
FIXED_ARGS = ("--fix_vit", "True", "--per_device_train_batch_size", "1", "--learning_rate", "1e-5",
              "--weight_decay", "0.1", "--adam_beta2", "0.95", "--warmup_ratio", "0.01",
              "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--report_to", "none",
              "--lazy_preprocess", "True", "--gradient_checkpointing", "--use_lora", "--save_strategy", "no")
FILLER = " the"
# Known failures of the original's environment, and what to do about them.
HINTS = (
    ("a view of a leaf Variable", "the release's modeling_qwen.py predates its fix for LoRA training (QwenLM/Qwen-VL "
                                  "issue 120); prepare.py fetches the current one"),
    ("No module named", "finetune.py imports a package the machine lacks: add its wheel to DIR/wheels (prepare.py)"),
)


def available(plan: Plan) -> str | None:
    if plan.original is None:
        return "original: not carried (no --original folder)"
    missing = [name for name in REQUIRED if not (Path(plan.original) / name).exists()]
    if missing:
        return f"original: not carried ({plan.original} has no {', '.join(missing)}; see BENCHMARKS.md, GPU section)"
    return None


@dataclass
class OriginalRun:
    """What one finetune.py run printed: the launcher's lines and the Trainer's log dicts."""

    step_times: list[float] = field(default_factory=list)
    begin_time: float | None = None
    trainable_params: int | None = None
    params: int | None = None
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    logs: list[dict] = field(default_factory=list)  # the Trainer's {'loss': ...} and {'train_runtime': ...}

    @property
    def step_seconds(self) -> list[float]:
        """Each optimizer step after the first (the warm-up), end to end."""
        return [b - a for a, b in zip(self.step_times, self.step_times[1:])]

    @property
    def losses(self) -> list[float]:
        return [log["loss"] for log in self.logs if isinstance(log.get("loss"), float) and math.isfinite(log["loss"])]

    @property
    def train_runtime(self) -> float | None:
        return next((log["train_runtime"] for log in self.logs if "train_runtime" in log), None)


def parse_output(text: str) -> OriginalRun:
    """The launcher's lines and the Trainer's log dicts, wherever they sit on a line (tqdm's progress
    bar redraws with carriage returns and no newline, so a line may begin with it)."""
    run = OriginalRun()
    for line in text.replace("\r", "\n").splitlines():
        if MARK in line:
            event = json.loads(line[line.index(MARK) + len(MARK):])
            if event["event"] == "begin":
                run.begin_time, run.trainable_params, run.params = event["time"], event["trainable_params"], event["params"]
            elif event["event"] == "step":
                run.step_times.append(event["time"])
            elif event["event"] == "end":
                run.peak_allocated, run.peak_reserved = event["peak_allocated"], event["peak_reserved"]
        elif "{'" in line and line.rstrip().endswith("}"):
            try:  # the Trainer prints its logs as Python dicts (transformers 5: of strings)
                logs = ast.literal_eval(line[line.index("{'"):].rstrip())
            except (ValueError, SyntaxError):  # e.g. a nan
                continue
            run.logs.append({k: _number(v) for k, v in logs.items()})
    return run


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def failure_line(text: str) -> str:
    """The line that says why a run failed: the last exception's, with the first missing module (the
    usual cause in a carried environment, often wrapped by transformers' lazy imports)."""
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", ln)]
    missing = [ln for ln in errors if ln.startswith(("ModuleNotFoundError", "ImportError"))]
    line = (errors or lines or ["no output"])[-1]
    if missing and missing[0] != line:
        line += f" (first: {missing[0]})"
    hints = [hint for needle, hint in HINTS if needle in line]
    return line[:400] + "".join(f"; {h}" for h in hints)


def write_data(folder: Path, tokenizer_dir: Path, seq_len: int, records: int) -> Path:
    """finetune.py's JSON: `records` copies of one conversation that fills `seq_len` tokens."""
    from workbench.bench.workload import random_image
    from workbench.model.tokenizer import QWenTokenizer
    from workbench.prompt.template import default_system  # finetune.py's preprocess uses the same message

    folder.mkdir(parents=True, exist_ok=True)
    image = folder / "image.png"
    random_image(0).save(image)
    tok = QWenTokenizer.from_pretrained(tokenizer_dir)

    def count(text: str) -> int:
        return len(tok.encode(text, allowed_special="all"))

    per_word = count(FILLER * 64) / 64
    picture = f"Picture 1: <img>{image}</img>\n"
    frame = (f"<|im_start|>system\n{default_system()}<|im_end|>\n<|im_start|>user\n{picture}Describe it."
             "<|im_end|>\n<|im_start|>assistant\n")
    prompt_words = max(0, math.ceil((seq_len // 2 - count(frame)) / per_word))
    question = picture + "Describe it." + FILLER * prompt_words
    answer_words = math.ceil((seq_len - count(frame) - prompt_words * per_word + 16) / per_word)
    conversation = [{"from": "user", "value": question}, {"from": "assistant", "value": FILLER.strip() + FILLER * answer_words}]
    data = folder / f"data-{seq_len}.json"
    data.write_text(json.dumps([{"id": f"bench-{i}", "conversations": conversation} for i in range(records)]))
    return data


def site_dir(plan: Plan) -> Path | None:
    """DIR/site with the carried wheels installed (once); None when the folder brings no wheels."""
    folder = Path(plan.original)
    wheels = sorted((folder / "wheels").glob("*.whl"))
    site = folder / "site"
    if wheels and not (site / ".installed").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "--target", str(site), *map(str, wheels)], check=True)
        (site / ".installed").write_text("\n".join(w.name for w in wheels) + "\n")
    return site if site.is_dir() else None


def site_versions(site: Path | None) -> dict[str, str]:
    """Versions of the original's own packages, from their dist-info folders in the site."""
    if site is None:
        return {}
    versions = {}
    for info in site.glob("*.dist-info"):
        name, _, version = info.name.removesuffix(".dist-info").rpartition("-")
        versions[name] = version
    return versions


def command(plan: Plan, data: Path, out_dir: Path, seq_len: int) -> list[str]:
    folder = Path(plan.original)
    cuda = plan.device == "cuda"
    return [sys.executable, str(LAUNCHER), "--finetune", str(folder / "finetune.py"), "--device", plan.device,
            "--dtype", "bfloat16" if cuda else "float32", "--",
            "--model_name_or_path", str(folder / MODEL_DIR), "--data_path", str(data), "--output_dir", str(out_dir),
            "--model_max_length", str(seq_len), "--max_steps", str(plan.steps + 1),
            "--gradient_accumulation_steps", str(plan.grad_accum), "--bf16", str(cuda), *FIXED_ARGS]


def environment(plan: Plan, site: Path | None) -> dict[str, str]:
    paths = [str(p) for p in (site, REPO_ROOT) if p is not None]  # the original's packages first
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "WANDB_DISABLED": "true", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_DEVICE_MAX_CONNECTIONS": "1"}  # as finetune_lora_single_gpu.sh
    if plan.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0")
    return env


def run(plan: Plan, rec: Recorder) -> None:
    from workbench.bench.flops import step_flops
    from workbench.bench.workload import bench_config

    start = time.monotonic()
    site = site_dir(plan)
    rec.data(site=str(site) if site else None, site_install_s=time.monotonic() - start,
             versions=site_versions(site), finetune=str(Path(plan.original) / "finetune.py"))
    config = bench_config(plan.tiny)
    folder = plan.work / "original"
    run_s = 0.0
    for i, seq_len in enumerate(plan.seq_lens):
        # A run is mostly its start (imports, building the model): the next one takes about as long,
        # plus its longer steps.
        expected = 1.5 * run_s
        if not rec.fits(expected):
            for rest in plan.seq_lens[i:]:
                rec.skip(f"original @ {rest}", rec.over_budget(expected))
            return
        began = time.monotonic()
        row = _one_length(plan, rec, folder, seq_len, site)
        run_s = time.monotonic() - began
        if row is None:
            continue
        flops = step_flops(config, seq_len, images_per_sample=1, grad_accum=plan.grad_accum)
        rec.row(**row, tflops=flops / row["s_per_it"] / 1e12, seconds=run_s)
        print(f"original @ {seq_len}: {row['s_per_it']:.3f} s/it", flush=True)


def _one_length(plan: Plan, rec: Recorder, folder: Path, seq_len: int, site: Path | None) -> dict | None:
    data = write_data(folder, Path(plan.original) / MODEL_DIR, seq_len, records=plan.grad_accum * (plan.steps + 1))
    log = folder / f"finetune-{seq_len}.log"
    cmd = command(plan, data, folder / f"out-{seq_len}", seq_len)
    (folder / f"command-{seq_len}.txt").write_text(" ".join(cmd) + "\n")
    with log.open("w") as out:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=environment(plan, site),
                                  cwd=folder, timeout=max(rec.seconds_left() - 5, 1))
        except subprocess.TimeoutExpired:
            rec.skip(f"original @ {seq_len}", "over the section's budget: finetune.py was stopped")
            return None
    text = log.read_text(errors="replace")
    run = parse_output(text)
    if proc.returncode != 0 or len(run.step_seconds) < 1:
        rec.skip(f"original @ {seq_len}", f"finetune.py exit status {proc.returncode}, {len(run.step_times)} "
                                          f"steps printed: {failure_line(text)} (log: {log})")
        return None
    s_it = statistics.median(run.step_seconds)
    return {"seq_len": seq_len, "s_per_it": s_it, "tokens_per_s": seq_len * plan.grad_accum / s_it,
            "steps_timed": len(run.step_seconds),
            "peak_allocated_gib": run.peak_allocated / GiB if run.peak_allocated is not None else None,
            "peak_reserved_gib": run.peak_reserved / GiB if run.peak_reserved is not None else None,
            "trainable_params": run.trainable_params, "params": run.params, "losses": run.losses,
            "train_runtime_s": run.train_runtime, "log": str(log.relative_to(plan.out))}

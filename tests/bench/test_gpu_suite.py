"""The GPU suite (`workbench bench --gpu-suite`): its CPU dry run goes through every section, so the
script cannot rot between the rare GPU runs; the parsing, ratios and rows are checked on their own."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from workbench.bench.flops import datasheet_peak
from workbench.bench.suite.compare import side_by_side
from workbench.bench.suite.original import FIXED_ARGS, failure_line, parse_output
from workbench.bench.suite.original_launcher import MARK
from workbench.bench.suite.plan import (
    SECTION_NAMES,
    SECTIONS,
    TOTAL_BUDGET_S,
    Plan,
    dry_run_plan,
    gpu_plan,
    share_spare,
)
from workbench.bench.suite.report import markdown
from workbench.cli.main import main

# Stands in for QwenLM/Qwen-VL's finetune.py, which the repository does not hold: the same command
# line (its four argument dataclasses), AutoConfig / AutoModelForCausalLM.from_pretrained, PEFT LoRA
# and an HF Trainer, on the tiny workbench model; what it prints is what finetune.py's Trainer
# prints. It runs through original_launcher.py exactly as the original does.
STAND_IN = r'''
import json
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import Trainer

import workbench.model  # registers the Qwen Auto classes: the release's remote code stands here
from workbench.model.tokenizer import QWenTokenizer


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default="Qwen/Qwen-7B")


@dataclass
class DataArguments:
    data_path: str = field(default=None)
    eval_data_path: str = field(default=None)
    lazy_preprocess: bool = False


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: Optional[str] = field(default=None)
    optim: str = field(default="adamw_torch")
    model_max_length: int = field(default=8192)
    warmup_ratio: float = 0.0  # transformers 4.32's argument, which 5 dropped
    use_lora: bool = False
    fix_vit: bool = True


@dataclass
class LoraArguments:
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: List[str] = field(default_factory=lambda: ["c_attn", "attn.c_proj", "w1", "w2"])
    lora_weight_path: str = ""
    lora_bias: str = "none"
    q_lora: bool = False


class Conversations(torch.utils.data.Dataset):
    """finetune.py's data format; the suite's samples fill model_max_length (finetune.py truncates there)."""

    def __init__(self, path, tokenizer, max_len):
        self.records, self.tokenizer, self.max_len = json.load(open(path)), tokenizer, max_len

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):  # finetune.py's preprocess: ChatML with its system message
        text = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + "".join(
            f"<|im_start|>{turn['from']}\n{turn['value']}<|im_end|>\n" for turn in self.records[i]["conversations"])
        ids = self.tokenizer.encode(text, allowed_special="all")[: self.max_len]
        assert len(ids) == self.max_len, f"the suite's data should fill the length: {len(ids)}"
        ids = torch.tensor(ids)
        labels = ids.clone()
        labels[: self.max_len // 2] = -100
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def train():
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LoraArguments))
    model_args, data_args, training_args, lora_args = parser.parse_args_into_dataclasses()
    assert training_args.use_lora and training_args.gradient_checkpointing and training_args.max_steps > 1
    config = transformers.AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
    config.use_cache = False
    model = transformers.AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, config=config,
                                                              trust_remote_code=True)
    tokenizer = QWenTokenizer.from_pretrained(model_args.model_name_or_path)
    lora = LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
                      target_modules=lora_args.lora_target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.enable_input_require_grads()
    data = Conversations(data_args.data_path, tokenizer, training_args.model_max_length)
    Trainer(model=model, args=training_args, train_dataset=data).train()
    raise SystemExit("the launcher ends the run when training ends, before finetune.py saves")


if __name__ == "__main__":
    train()
'''


def parse_tables(markdown_text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table as a list of {header: cell} rows."""
    tables, lines = [], markdown_text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| ") and i + 1 < len(lines) and re.fullmatch(r"\| (-+:? \| )*-+:? \|", lines[i + 1]):
            header = [c.strip() for c in line.strip("|").split(" | ")]
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("| "):
                    break
                cells = [c.strip() for c in row.strip("|").split(" | ")]
                assert len(cells) == len(header), row
                rows.append(dict(zip(header, cells)))
            tables.append(rows)
    return tables


def positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and v > 0 for v in values)


@pytest.mark.slow
def test_cpu_dry_run_runs_every_section(tmp_path):
    from workbench.demo.tiny import make_tiny_model_dir

    original = tmp_path / "original"
    make_tiny_model_dir(original / "Qwen-VL-Chat")
    (original / "finetune.py").write_text(STAND_IN)
    out = tmp_path / "suite"
    assert main(["bench", "--gpu-suite", str(out), "--cpu-dry-run", "--original", str(original)]) == 0
    report = json.loads((out / "gpu_suite.json").read_text())
    plan = Plan.load(out / "plan.json")
    sections = report["sections"]

    # Every section is there, with measured rows or the reason it has none.
    assert list(sections) == list(SECTION_NAMES)
    expected = {name: "ok" for name in SECTION_NAMES}
    expected["int4"] = "not available"  # GPTQModel's CUDA kernels: GPU only
    for name, section in sections.items():
        assert section["status"] in ("ok", "not available", "failed", "over budget", "not run")
        if section["status"] == "ok":
            assert section["rows"], name
        else:
            assert isinstance(section["reason"], str) and section["reason"], name
    assert {name: s["status"] for name, s in sections.items()} == expected

    env = sections["environment"]["rows"][0]
    assert env["device"] == "cpu" and env["versions"]["torch"] and env["driver"]

    # Training: every recipe at every length, numbers consistent with each other, an estimate per row.
    rows = {(r["recipe"], r["seq_len"]): r for r in sections["training"]["rows"]}
    assert set(rows) == {(r, n) for r in plan.recipes for n in plan.seq_lens}
    for (_, seq_len), r in rows.items():
        assert positive(r["s_per_it"], r["tflops"], r["trainable_params"], r["estimate_gib"])
        assert r["tokens_per_s"] == pytest.approx(seq_len * plan.grad_accum / r["s_per_it"])
        assert r["peak_allocated_gib"] is None and r["estimate_error_pct"] is None  # no CUDA here

    # The original's path: launched, its Trainer's output parsed, one row per length.
    original_rows = {r["seq_len"]: r for r in sections["original"]["rows"]}
    assert set(original_rows) == set(plan.seq_lens)
    for r in original_rows.values():
        assert positive(r["s_per_it"], r["tflops"], r["trainable_params"], r["train_runtime_s"])
        assert r["steps_timed"] == plan.steps and len(r["losses"]) == plan.steps + 1
    assert (out / original_rows[plan.seq_lens[0]]["log"]).exists()

    # Ratios are computed from the numbers beside them, in the JSON and in the rows.
    comparison = {(r["recipe"], r["seq_len"]): r for r in report["comparison"]}
    for seq_len in plan.seq_lens:
        c = comparison[("official-lora", seq_len)]
        assert c["speedup"] == original_rows[seq_len]["s_per_it"] / rows[("official-lora", seq_len)]["s_per_it"]
        assert c["workbench"]["s_per_it"] == rows[("official-lora", seq_len)]["s_per_it"]
    assert comparison[("qlora", plan.seq_lens[0])]["speedup"] is None
    assert "counterpart" in comparison[("qlora", plan.seq_lens[0])]["original_note"]

    tables = parse_tables((out / "rows.md").read_text())
    speed = next(t for t in tables if t and "original / workbench" in t[0])
    assert len(speed) == len(plan.recipes) * len(plan.seq_lens)
    for row in speed:
        c = comparison[(row["recipe"], int(row["seq len"]))]
        assert row["workbench s/it"] == f"{c['workbench']['s_per_it']:.3f}"
        if c["speedup"] is not None:
            assert row["original s/it"] == f"{c['original']['s_per_it']:.3f}"
            assert row["original / workbench"] == f"{c['speedup']:.2f}"
            assert float(row["original / workbench"]) == pytest.approx(
                float(row["original s/it"]) / float(row["workbench s/it"]), abs=0.01 + 0.005 * c["speedup"])
        else:
            assert row["original / workbench"] == "-" and "counterpart" in row["original s/it"]
    memory = next(t for t in tables if t and "estimate error %" in t[0])
    for row in memory:
        c = comparison[(row["recipe"], int(row["seq len"]))]
        assert row["estimate GiB (`inspect --seq-len`)"] == f"{c['estimate_gib']:.2f}"
        assert row["estimate error %"] == "n/a (CPU)"

    # The other sections measured what they say.
    packing = {r["mode"]: r for r in sections["packing"]["rows"]}
    assert packing["padded"]["real_tokens"] == packing["packed"]["real_tokens"] > 0
    assert packing["packed"]["padding_pct"] <= packing["padded"]["padding_pct"]
    assert positive(packing["padded"]["tokens_per_s"], packing["packed"]["tokens_per_s"])
    vit = sections["vit_cache"]
    assert {r["mode"] for r in vit["rows"]} == {"cached", "uncached"} and vit["data"]["loss_abs_diff"] < 1e-5
    merge = {r["phase"]: r for r in sections["merge"]["rows"]}
    assert merge["merge"]["untouched_bit_equal"] and merge["merge"]["probe_max_abs_diff"] < 1e-5
    assert positive(merge["merge"]["seconds"], merge["copy"]["seconds"])
    serving = sections["serving"]
    assert [r["clients"] for r in serving["rows"]] == list(plan.serve_concurrency)
    assert all(r["engine"] == "workbench" and r["tokens"] > 0 for r in serving["rows"])
    assert [s["what"] for s in serving["skipped"]] == ["vllm"]
    assert "Not measured in this run:" in (out / "rows.md").read_text()


def test_section_over_its_budget_is_stopped_and_recorded(tmp_path):
    out = tmp_path / "suite"
    assert main(["bench", "--gpu-suite", str(out), "--cpu-dry-run", "--only", "training,original",
                 "--budget", "training=2"]) == 0
    report = json.loads((out / "gpu_suite.json").read_text())
    training = report["sections"]["training"]
    assert training["status"] == "over budget" and "2 s budget" in training["reason"]
    assert training["seconds"] < 30
    assert report["sections"]["packing"]["status"] == "not run"
    assert report["sections"]["original"]["reason"].startswith("original: not carried")
    rows = (out / "rows.md").read_text()
    assert "original: not carried" in rows and "- training: stopped at its 2 s budget (over budget)" in rows


def test_bad_suite_flags_are_one_line_errors(tmp_path, capsys):
    for flags, message in ((["--only", "trainign"], "--only: unknown section 'trainign'"),
                           (["--budget", "merg=3"], "--budget: unknown section 'merg'"),
                           (["--budget", "merge"], "--budget: expected SECTION=SECONDS, got 'merge'"),
                           (["--wheels", str(tmp_path / "none")], "--wheels: ")):
        assert main(["bench", "--gpu-suite", str(tmp_path / "out"), "--cpu-dry-run", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_gpu_budgets_fit_eight_minutes_and_plans_round_trip(tmp_path):
    assert sum(s.budget_s for s in SECTIONS) <= TOTAL_BUDGET_S == 480
    plan = gpu_plan(str(tmp_path), "cmd", None, None, {"merge": 60})
    assert plan.seq_lens == (384, 512, 1024, 2048) and plan.grad_accum == 8 and plan.budgets["merge"] == 60
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    assert dry_run_plan(str(tmp_path), "cmd", None, None).device == "cpu"
    # Without vLLM and the Int4 export (the lent machine today), their 70 s go to the others, pro rata,
    # except to a section whose budget was set by --budget.
    unavailable = {"serving": "no vLLM", "int4": "no export"}
    assert sum(share_spare(gpu_plan(str(tmp_path), "cmd", None, None), unavailable, {}).values()) == pytest.approx(480)
    shared = share_spare(plan, unavailable, {})
    assert shared["serving"] == shared["int4"] == 0
    assert shared["merge"] == 60 and shared["training"] == pytest.approx(140 + 70 * 140 / (480 - 70 - 90))
    assert share_spare(plan, unavailable, {"original": "--only"})["original"] == 0


def test_original_output_parsed():
    # What finetune.py prints through the launcher: its Trainer's dicts (one with a nan), tqdm's
    # carriage-return progress, and the launcher's lines.
    def mark(event, t, **fields):
        return MARK + json.dumps({"event": event, "time": t, **fields})

    text = "\n".join([
        "Loading data...", mark("begin", 10.0, trainable_params=112197632, params=9_700_000_000),
        " 0%|          | 0/4 [00:00<?, ?it/s]\r25%|##5       | 1/4 [00:04<00:12,  4.00s/it]",
        mark("step", 14.0, step=1), "{'loss': 12.25, 'learning_rate': 1e-05, 'epoch': 0.25}",
        mark("step", 16.5, step=2), "{'loss': nan, 'learning_rate': 9e-06, 'epoch': 0.5}",
        mark("step", 19.0, step=3), "{'loss': 11.5, 'learning_rate': 5e-06, 'epoch': 0.75}",
        # transformers 5 prints the values as strings, after the progress bar on the same line
        "75%|#######5  | 3/4 [00:09<00:02,  2.50s/it]" + mark("step", 21.6, step=4),
        "100%|##########| 4/4 [00:11<00:00,  2.50s/it]   {'loss': '11.75', 'grad_norm': '2.0', 'epoch': '1'}",
        "{'train_runtime': 11.6, 'train_samples_per_second': 2.76, 'train_steps_per_second': 0.345, "
        "'train_loss': 11.8, 'epoch': 1.0}",
        mark("end", 21.7, peak_allocated=22 * 2**30, peak_reserved=24 * 2**30),
    ])
    run = parse_output(text)
    assert run.step_seconds == pytest.approx([2.5, 2.5, 2.6])
    assert run.trainable_params == 112197632 and run.losses == [12.25, 11.5, 11.75] and run.train_runtime == 11.6
    assert run.peak_allocated == 22 * 2**30 and run.peak_reserved == 24 * 2**30
    failed = ("Traceback\n  File x\nModuleNotFoundError: No module named 'pydantic'\n\nRuntimeError: Failed to import "
              "transformers.trainer_callback\n  0%|   | 0/4 [00:00<?, ?it/s]\r")
    assert failure_line(failed) == ("RuntimeError: Failed to import transformers.trainer_callback (first: "
                                    "ModuleNotFoundError: No module named 'pydantic'); finetune.py imports a package "
                                    "the machine lacks: add its wheel to DIR/wheels (prepare.py)")
    # finetune_lora_single_gpu.sh's settings, with no saving
    assert "--use_lora" in FIXED_ARGS and FIXED_ARGS[FIXED_ARGS.index("--save_strategy") + 1] == "no"


def gpu_report() -> dict:
    """A report as a GPU run would write it (numbers made up), for the comparison and the rows."""
    plan = {"recipes": ["official-lora", "qlora"], "seq_lens": [384, 2048]}
    training_rows = [{"recipe": r, "seq_len": n, "s_per_it": 1.0 + n / 1000, "tokens_per_s": n * 8 / (1.0 + n / 1000),
                      "tflops": 300.0, "pct_of_matmul": 38.0, "mfu_pct": 30.3, "peak_allocated_gib": 20.0,
                      "peak_reserved_gib": 21.0, "trainable_params": 112197632, "estimate_gib": 21.0,
                      "estimate_error_pct": 5.0} for r in plan["recipes"] for n in plan["seq_lens"] if (r, n) != ("qlora", 2048)]
    original_rows = [{"seq_len": 384, "s_per_it": 2.43, "tokens_per_s": 1264.2, "tflops": 150.0,
                      "peak_allocated_gib": 19.5, "peak_reserved_gib": 20.7, "trainable_params": 112197632}]
    sections = {name: {"status": "not available", "reason": f"{name} absent"} for name in SECTION_NAMES}
    sections["environment"] = {"status": "ok", "rows": [{"device": "NVIDIA H100 80GB HBM3", "gpus": 1, "driver": "580",
                                                         "cuda": "13.0", "python": "3.12.3", "versions": {}}]}
    sections["training"] = {"status": "ok", "rows": training_rows, "data": {"matmul_tflops": 790.0,
                            "datasheet_tflops": 989.4, "dtype": "bfloat16", "steps": 3, "grad_accum": 8},
                            "skipped": [{"what": "qlora @ 2048", "reason": "over the section's budget"}]}
    sections["original"] = {"status": "ok", "rows": original_rows, "data": {"versions": {"transformers": "4.32.0"}},
                            "skipped": [{"what": "original @ 2048", "reason": "finetune.py exit status 1"}]}
    report = {"suite": {"command": "workbench bench --gpu-suite out", "date": "2026-12-06", "dry_run": False,
                        "device": "cuda", "budget_s": 480, "seconds": 470, "plan": plan}, "sections": sections}
    report["comparison"] = side_by_side(report)
    return report


def test_comparison_and_rows_of_a_gpu_run():
    report = gpu_report()
    rows = {(r["recipe"], r["seq_len"]): r for r in report["comparison"]}
    first = rows[("official-lora", 384)]
    assert first["speedup"] == 2.43 / 1.384 and first["memory_ratio"] == 20.7 / 21.0
    assert first["original"]["mfu_pct"] == pytest.approx(100 * 150 / 989.4)
    assert first["original"]["pct_of_matmul"] == pytest.approx(100 * 150 / 790)
    assert rows[("official-lora", 2048)]["original_note"] == "finetune.py exit status 1"
    assert rows[("qlora", 2048)]["workbench"] is None and rows[("qlora", 2048)]["workbench_note"] == "over the section's budget"
    md = markdown(report)
    speed, memory = parse_tables(md)[:2]
    assert speed[0]["original / workbench"] == "1.76" and speed[0]["original MFU %"] == "15.2"
    assert speed[0]["workbench MFU %"] == "30.3" and speed[0]["original trainable"] == "112,197,632"
    assert memory[0]["estimate error %"] == "+5.0" and memory[0]["original / workbench reserved"] == "0.99"
    assert speed[3]["workbench s/it"] == "over the section's budget"
    assert "NVIDIA H100 80GB HBM3 x 1" in md and "finetune.py with transformers 4.32.0" in md
    assert "- int4: int4 absent" in md


def test_int4_rows_from_bench_int4():
    from workbench.bench.suite.int4 import rows_of

    result = {"quantize_seconds": 210.5, "samples": 8,
              "bf16": {"acc@0.5": 0.0, "weights_gb": 19.3, "generate_tokens_per_s": 250.0, "peak_allocated_gib": 19.9},
              "int4": {"acc@0.5": 0.0, "weights_gb": 9.7, "generate_tokens_per_s": 180.0, "peak_allocated_gib": 10.4}}
    report = gpu_report()
    report["sections"]["int4"] = {"status": "ok", "rows": rows_of(result)}
    table = parse_tables(markdown(report))[-1]
    assert [(r["model"], r["generation tokens/s"], r["peak allocated GiB"], r["quantize s"]) for r in table] == [
        ("bf16", "250.0", "19.90", "-"), ("int4", "180.0", "10.40", "210")]


def test_datasheet_peaks_match_the_specific_name_first():
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert datasheet_peak("NVIDIA H100 NVL") == 835e12 and datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert datasheet_peak("NVIDIA H200") == 989.4e12 and datasheet_peak("cpu") is None


def test_launcher_is_standalone():
    # It runs in the original's environment (transformers 4.32 first on the path): nothing of the
    # workbench may be imported by it.
    source = (Path(__file__).parents[2] / "workbench" / "bench" / "suite" / "original_launcher.py").read_text()
    assert "workbench" not in "".join(line for line in source.splitlines() if line.startswith(("import", "from")))


def test_bitsandbytes_wheel_slimmed_to_the_machines_library(tmp_path):
    import zipfile

    from workbench.bench.suite.prepare import BNB_KEEP, slim_wheel

    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    names = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cuda118.so",
             "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cpu.so"]
    with zipfile.ZipFile(wheel, "w") as z:
        for name in names:
            z.writestr(name, b"x")
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "".join(f"{n},sha256=x,1\n" for n in names))
    slim_wheel(wheel, BNB_KEEP)
    with zipfile.ZipFile(wheel) as z:
        kept = [n for n in names if n in z.namelist()]
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert kept == [names[0], names[2], names[3]]
    assert [line.split(",")[0] for line in record.splitlines()] == kept

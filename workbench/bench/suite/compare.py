"""The workbench and the original side by side, per recipe and length, with ratios from the same run.

One row per (recipe, length) of the plan, whether measured or not: what was measured on each side,
and for what was not, the reason (skipped part, section status). The original has a counterpart
only for official-lora: finetune.py's Q-LoRA trains on the GPTQ Int4 release (another model and
kernels), and it has no recipe that adapts the ViT or the resampler.
"""

from __future__ import annotations

ORIGINAL_RECIPE = "official-lora"
NO_COUNTERPART = {
    "qlora": "no finetune.py counterpart (its Q-LoRA trains the GPTQ Int4 release)",
    "all-components": "no finetune.py counterpart (it adapts only the LLM)",
}
SIDE_FIELDS = ("s_per_it", "tokens_per_s", "tflops", "peak_allocated_gib", "peak_reserved_gib", "trainable_params")


def _why_missing(section: dict, what: str) -> str:
    for skip in section.get("skipped", []):
        if skip["what"] == what:
            return skip["reason"]
    if section.get("status") != "ok":
        return section.get("reason") or section.get("status", "not run")
    return "not measured"


def _side(row: dict | None, matmul: float | None, datasheet: float | None) -> dict | None:
    if row is None:
        return None
    side = {k: row.get(k) for k in SIDE_FIELDS}
    side["pct_of_matmul"] = 100 * row["tflops"] / matmul if matmul else None
    side["mfu_pct"] = 100 * row["tflops"] / datasheet if datasheet else None
    return side


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def side_by_side(report: dict) -> list[dict]:
    """Rows of the suite's comparison table, from `report['sections']` and the plan's recipes and lengths."""
    plan = report["suite"]["plan"]
    training, original = report["sections"]["training"], report["sections"]["original"]
    data = training.get("data", {})
    matmul, datasheet = data.get("matmul_tflops"), data.get("datasheet_tflops")
    ours = {(r["recipe"], r["seq_len"]): r for r in training.get("rows", [])}
    theirs = {r["seq_len"]: r for r in original.get("rows", [])}
    rows = []
    for recipe in plan["recipes"]:
        for seq_len in plan["seq_lens"]:
            wb = ours.get((recipe, seq_len))
            orig = theirs.get(seq_len) if recipe == ORIGINAL_RECIPE else None
            wb_side, orig_side = _side(wb, matmul, datasheet), _side(orig, matmul, datasheet)
            if recipe != ORIGINAL_RECIPE:
                orig_note = NO_COUNTERPART.get(recipe, "no finetune.py counterpart")
            else:
                orig_note = None if orig else _why_missing(original, f"original @ {seq_len}")
            rows.append({
                "recipe": recipe, "seq_len": seq_len,
                "workbench": wb_side, "workbench_note": None if wb else _why_missing(training, f"{recipe} @ {seq_len}"),
                "original": orig_side, "original_note": orig_note,
                # original / workbench: > 1 where the workbench is faster, or reserves less memory
                "speedup": _ratio(orig and orig["s_per_it"], wb and wb["s_per_it"]),
                "memory_ratio": _ratio(orig and orig["peak_reserved_gib"], wb and wb["peak_reserved_gib"]),
                "estimate_gib": wb["estimate_gib"] if wb else None,
                "estimate_error_pct": wb["estimate_error_pct"] if wb else None,
            })
    return rows

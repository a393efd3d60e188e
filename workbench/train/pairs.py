"""`workbench data pairs`: preference pairs for grounding from the model's own answers (docs/dpo.md).

For every grounding question of a data file, sample N answers (each prompt and image run once,
its cache repeated N times: grpo_trainer.generate_groups), score each by IoU with the true box
(an answer without a usable box scores NO_BOX, below every box), and write the best as `chosen`
and the worst as `rejected`. Questions whose answers all score alike are skipped: they hold no
preference. Each record names the model and adapter it came from (`meta.pairs`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.errors import DataError

NO_BOX = -1.0  # an answer whose box cannot be parsed: worse than any box, even one that misses


@dataclass
class PairsReport:
    questions: int = 0
    pairs: int = 0
    alike: int = 0          # skipped: every answer scored the same

    def summary(self, out: Path) -> str:
        return (f"{out}: {self.pairs} pairs from {self.questions} grounding questions "
                f"({self.alike} skipped: all answers scored alike)")


def answer_score(answer: str, query: Any, size: tuple[int, int]) -> float:
    """IoU of the answer's box with the true box (as the evaluation picks and scores it); NO_BOX without one."""
    from workbench.eval.parse import parse_boxes, pick_box
    from workbench.train.rewards import iou_reward

    if pick_box(parse_boxes(answer), query.phrase) is None:
        return NO_BOX
    return iou_reward(answer, query, size)


def best_and_worst(answers: list[str], scores: list[float]) -> tuple[int, int] | None:
    """Indices of the best and the worst answer, or None when all scored alike."""
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    return None if scores[best] == scores[worst] else (best, worst)


def record_for(query: Any, image: str, chosen: str, rejected: str, scores: tuple[float, float],
               source: dict[str, Any]) -> dict[str, Any]:
    """A structured preference record: the chat grounding prompt on the query's image and phrase."""
    from workbench.prompt import load_task_template

    prompt = load_task_template("grounding").user[0]
    return {"messages": [{"role": "user", "content": prompt}], "images": [image],
            "objects": [{"ref": query.phrase}], "chosen": chosen, "rejected": rejected,
            "meta": {"pairs": {**source, "chosen_iou": round(scores[0], 4), "rejected_iou": round(scores[1], 4)}}}


def image_path(query: Any, out: Path, image_root: str | None) -> str:
    """The image as the pairs file must name it: as written in the data with an image root, else
    relative to the pairs file's folder (the data section's default root)."""
    if image_root is not None:
        return query.image
    rel = os.path.relpath(query.file, out.resolve().parent)
    if rel.startswith(".."):
        raise DataError(f"image {query.file} is not under the folder of --out {out}: write the pairs file "
                        "next to the data (or above its images), or pass --image-root", field="--out")
    return rel


@torch.no_grad()
def sample_answers(model: Any, tokenizer: Any, queries: list, samples: int, temperature: float, top_p: float,
                   max_new_tokens: int) -> list[list[str]]:
    """N sampled answers per query, each prompt and image run once (eval mode, no grad)."""
    from workbench.eval.grounding import prompt_ids
    from workbench.model.image_processing import load_image, preprocess
    from workbench.prompt import get_stop_words_ids
    from workbench.train import grpo
    from workbench.train.grpo_trainer import generate_groups

    tok = tokenizer
    prompts = [prompt_ids(tok, q.image, q.phrase, "chat") for q in queries]
    width = max(map(len, prompts))
    device = next(model.parameters()).device
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    size = model.config.visual["image_size"]
    pixels = torch.stack([preprocess(load_image(q.file), size) for q in queries]).to(device)
    out = generate_groups(model, ids, attn, pixels, samples, do_sample=True, temperature=temperature, top_p=top_p,
                          top_k=0, max_new_tokens=max_new_tokens, eos_token_id=tok.eod_id,
                          pad_token_id=tok.pad_token_id, stop_words_ids=get_stop_words_ids(tok),
                          suppress_tokens=[tok.img_start_id, tok.img_end_id, tok.img_pad_id])
    stops = {tok.eod_id, tok.im_end_id, tok.im_start_id}
    completions = out[:, width:]
    mask = grpo.completion_mask(completions, stops)
    texts = [tok.decode([t for t in row[: int(m.sum())] if t not in stops], skip_special_tokens=True,
                        keep_image_special=True).strip() for row, m in zip(completions.tolist(), mask)]
    return [texts[i * samples:(i + 1) * samples] for i in range(len(queries))]


def mine_pairs(model: Any, tokenizer: Any, queries: list, out: Path, *, source: dict[str, Any], samples: int,
               temperature: float, top_p: float = 1.0, max_new_tokens: int = 64, batch_size: int = 8,
               image_root: str | None = None, progress: bool = True) -> PairsReport:
    """Sample, score and write the pairs file (JSONL, written whole at the end: atomic)."""
    import json

    from tqdm import tqdm

    from workbench.atomic import write_text
    from workbench.model.image_processing import read_image_size

    report = PairsReport(questions=len(queries))
    rows = []
    paths = [image_path(q, out, image_root) for q in queries]  # refused before any sampling
    bar = tqdm(total=len(queries), desc="pairs", unit=" questions", file=sys.stderr, disable=not progress or None)
    for start in range(0, len(queries), batch_size):
        batch = queries[start:start + batch_size]
        for i, (query, answers) in enumerate(zip(batch, sample_answers(model, tokenizer, batch, samples, temperature,
                                                                       top_p, max_new_tokens))):
            size = read_image_size(query.file)
            scores = [answer_score(a, query, size) for a in answers]
            picked = best_and_worst(answers, scores)
            if picked is None:
                report.alike += 1
                continue
            best, worst = picked
            rows.append(record_for(query, paths[start + i], answers[best], answers[worst],
                                   (scores[best], scores[worst]), source))
            report.pairs += 1
        bar.update(len(batch))
        bar.set_postfix(pairs=report.pairs)
    bar.close()
    write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    return report

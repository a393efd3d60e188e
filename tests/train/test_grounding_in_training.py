"""train.eval_grounding: Acc@0.5 measured while training, the best checkpoint kept, early stopping."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file


def _tensorboard_series(run_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _logged(run_dir, key: str) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m[key] for m in lines if key in m}


@pytest.fixture
def shapes(tmp_path):
    from workbench.demo.synthetic import make_shapes_dataset

    return make_shapes_dataset(tmp_path / "shapes", 6, shapes_per_image=(1, 1), size_range=(56, 64), name="eval")


def test_best_checkpoint_is_kept_and_early_stopping_ends_the_run(tmp_path, run_config, shapes, monkeypatch):
    """The Trainer's wiring, with the evaluator's answers scripted: Acc 0.2, 0.6, 0.4, 0.3 at steps 2-8."""
    from workbench.train import grounding_eval
    from workbench.train.config import load_run_config
    from workbench.train.trainer import train

    series = {2: 0.2, 4: 0.6, 6: 0.4, 8: 0.3, 10: 0.9, 12: 0.95}
    seen = []

    def scripted(self, model, step, draw):
        seen.append(step)
        return {"grounding_acc@0.5": series[step], "grounding_mean_iou": series[step] / 2,
                "grounding_parse_failure_rate": 0.0}

    monkeypatch.setattr(grounding_eval.GroundingEvaluator, "__call__", scripted)
    path = run_config(folder=tmp_path / "cfg", max_steps=12, save_steps=2, save_total_limit=None,
                      report_to="tensorboard", metric_for_best="grounding_acc@0.5", early_stopping_patience=2,
                      eval_grounding={"data": str(shapes), "every": 2})
    result = train(load_run_config(path))
    out = result.output_dir
    assert seen == [2, 4, 6, 8]  # two evaluations without a gain after the best: stopped at step 8
    assert result.global_step == 8 and result.best_checkpoint.endswith("checkpoint-4")
    assert _logged(out, "eval_grounding_acc@0.5") == {2: 0.2, 4: 0.6, 6: 0.4, 8: 0.3}
    board = _tensorboard_series(out, "eval/grounding_acc@0.5")
    assert [s for s, _ in board] == [2, 4, 6, 8] and [v for _, v in board] == pytest.approx([0.2, 0.6, 0.4, 0.3])
    # The final adapter is the best checkpoint's.
    final, best = (load_file(p / "adapter_model.safetensors") for p in (out, out / "checkpoint-4"))
    later = load_file(out / "checkpoint-8" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], best[k]) for k in best)
    assert any(not torch.equal(later[k], best[k]) for k in best)
    record = json.loads((out / "workbench_run.json").read_text())
    assert record["result"]["best_checkpoint"].endswith("checkpoint-4")


@pytest.mark.slow
def test_real_grounding_eval_while_training(tmp_path):
    """The demo's model and shapes: the logged Acc@0.5 series, its PNGs, and the kept checkpoint
    re-evaluated by `workbench eval grounding`'s code gives the logged value at its step."""
    from workbench.demo.runner import DEMO_CONFIG, make_demo_base_model
    from workbench.demo.synthetic import make_shapes_dataset
    from workbench.eval.chat import load_for_inference
    from workbench.eval.grounding import evaluate_grounding, load_queries
    from workbench.train.config import load_run_config
    from workbench.train.trainer import train

    one = {"shapes_per_image": (1, 1)}
    train_file = make_shapes_dataset(tmp_path / "data", 200, seed=1, name="train", **one)
    eval_file = make_shapes_dataset(tmp_path / "data", 12, seed=2, name="eval", **one)
    base = make_demo_base_model(tmp_path / "base", seed=0)
    out = tmp_path / "run"
    config = load_run_config(DEMO_CONFIG, [
        f"model={base}", f"data.train={train_file}", f"train.output_dir={out}", "train.max_steps=180",
        "train.save_steps=60", "train.save_total_limit=null", "train.report_to=tensorboard",
        "train.metric_for_best=grounding_mean_iou",
        f"train.eval_grounding={{data: {eval_file}, every: 60, batch_size: 12, images: 2}}"])
    result = train(config)
    assert result.status == "completed"
    ious = _logged(out, "eval_grounding_mean_iou")
    accs = _logged(out, "eval_grounding_acc@0.5")
    assert sorted(ious) == [60, 120, 180] and sorted(accs) == sorted(ious)
    assert [s for s, _ in _tensorboard_series(out, "eval/grounding_acc@0.5")] == sorted(accs)
    assert len(list((out / "grounding" / "step-60" / "samples").glob("*.png"))) == 2
    best_step = int(result.best_checkpoint.rsplit("-", 1)[1])
    assert ious[best_step] == max(ious.values())
    model, tokenizer = load_for_inference(str(base), result.best_checkpoint, device="cpu")
    again = evaluate_grounding(model, tokenizer, load_queries(eval_file), prompt="chat", batch_size=12)
    assert again["metrics"]["mean_iou"] == pytest.approx(ious[best_step], abs=1e-6)
    assert again["metrics"]["acc@0.5"] == pytest.approx(accs[best_step], abs=1e-6)

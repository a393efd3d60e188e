"""Second-epoch step time with and without the frozen-ViT cache (data.vit_cache), on CPU.

`python -m workbench.bench.vit_cache [--out DIR]` builds a small random model whose ViT is a
visible share of a step (LLM hidden 256 x 2 layers; ViT width 256 x 6 layers at 224 px, 256
patches), 32 samples with one distinct image each, and trains the same LoRA run (LLM only, the
ViT frozen) for two epochs twice: without the cache, then with it. Each optimizer step is timed;
the median of the second epoch is printed for both, with the losses' largest difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import TrainerCallback

MODEL = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "kv_channels": 64,
         "intermediate_size": 1024,
         "visual": {"heads": 4, "image_size": 224, "layers": 6, "mlp_ratio": 4.0, "output_dim": 256,
                    "patch_size": 14, "width": 256}}
SAMPLES, BATCH, EPOCHS = 32, 4, 2


class StepTimer(TrainerCallback):
    def __init__(self):
        self.seconds: list[float] = []

    def on_step_begin(self, args, state, control, **kw):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.seconds.append(time.perf_counter() - self.started)


def _data(root: Path) -> Path:
    from PIL import Image

    (root / "img").mkdir(parents=True)
    with (root / "train.jsonl").open("w") as f:
        for i in range(SAMPLES):
            Image.new("RGB", (64 + 8 * i, 48), (8 * i, 255 - 8 * i, 7 * i)).save(root / "img" / f"{i}.png")
            f.write(json.dumps({"images": [f"img/{i}.png"],
                                "messages": [{"role": "user", "content": f"<image>Describe picture {i}."},
                                             {"role": "assistant", "content": "A plain square of one colour."}]}) + "\n")
    return root / "train.jsonl"


def _run(root: Path, model: Path, data: Path, cached: bool) -> tuple[list[float], dict[int, float]]:
    from workbench.train.callbacks import read_metrics
    from workbench.train.config import load_run_config
    from workbench.train.trainer import train

    name = "cached" if cached else "uncached"
    (root / "recipe.yaml").write_text(yaml.safe_dump({"llm": {"modules": ["c_attn", "attn.c_proj", "w1", "w2"],
                                                              "r": 8, "alpha": 16}}))
    config = {"model": str(model), "dtype": "float32", "adapter": str(root / "recipe.yaml"),
              "data": {"train": str(data), "max_length": 384, "num_workers": 0, "vit_cache": cached,
                       "vit_cache_dir": str(root / "vit-cache")},
              "train": {"output_dir": str(root / name), "lr": 1e-3, "epochs": EPOCHS, "batch_size": BATCH,
                        "gradient_accumulation_steps": 1,
                        "save_steps": 1000, "logging_steps": 1, "seed": 1, "report_to": "none",
                        "gradient_checkpointing": False}}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    timer = StepTimer()
    result = train(load_run_config(path), callbacks=[timer])
    losses = {m["step"]: m["loss"] for m in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in m}
    return timer.seconds, losses


def main() -> None:
    from workbench.demo.tiny import make_tiny_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.out or Path(tempfile.mkdtemp(prefix="vit-cache-bench-"))
    model = make_tiny_model_dir(root / "model", **MODEL)
    data = _data(root / "data")
    per_epoch = SAMPLES // BATCH
    results = {}
    for cached in (False, True):
        seconds, losses = _run(root, model, data, cached)
        results[cached] = (statistics.median(seconds[per_epoch:]), losses)
    diff = max(abs(results[True][1][s] - results[False][1][s]) for s in results[False][1])
    print(f"torch {torch.__version__}, 1 thread; second-epoch median step: "
          f"uncached {results[False][0]:.3f} s, cached {results[True][0]:.3f} s "
          f"({results[False][0] / results[True][0]:.2f}x); largest loss difference {diff:.2e}")


if __name__ == "__main__":
    main()

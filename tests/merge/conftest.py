"""Fixtures for the merge tests: a tiny base model and PEFT adapters made from recipes on it.

Adapters are built the way `workbench train` builds them (apply_recipe + save_adapter + a run
record), with every trainable tensor moved off its initial value, so that a merge that drops or
mis-scales anything changes the logits by far more than the 1e-5 the tests allow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

LLM = {"modules": ["c_attn", "attn.c_proj", "w1", "w2", "mlp.c_proj"], "r": 8, "alpha": 16}
VIT = {"modules": ["attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"], "r": 4, "alpha": 8}
RESAMPLER = {"modules": ["kv_proj", "attn"], "r": 4, "alpha": 8, "train": ["query", "ln_q", "ln_kv"]}
RECIPES = {
    "llm": {"llm": LLM},
    "vit": {"vit": {**VIT, "use_rslora": True}},
    "resampler": {"resampler": RESAMPLER},
    "all": {"vit": {**VIT, "layers": "last 1", "train": ["ln_pre"]}, "resampler": RESAMPLER,
            "llm": {**LLM, "train": ["ln_f"]}, "modules_to_save": ["lm_head"]},
    "dora": {"llm": {**LLM, "use_dora": True}},
    "qlora": {"llm": {**LLM, "modules": ["c_attn", "w1", "w2"]},
              "quantization": {"bits": 4, "quant_type": "nf4", "compute_dtype": "float32"}},
}


def make_adapter(base_dir: Path, out_dir: Path, recipe: dict, seed: int = 0) -> Path:
    """Apply `recipe` to the base, perturb every trainable tensor (one SGD step for QLoRA), save."""
    from workbench import load_model
    from workbench.adapters.apply import apply_recipe, save_adapter
    from workbench.adapters.recipe import load_recipe
    from workbench.model.checkpoint import fingerprint

    out_dir.mkdir(parents=True)
    (out_dir / "recipe.yaml").write_text(yaml.safe_dump({"description": "test", **recipe}))
    loaded = load_recipe(out_dir / "recipe.yaml")
    model = apply_recipe(load_model(base_dir, dtype=torch.float32), loaded)
    gen = torch.Generator().manual_seed(seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trainable:
            p.add_(0.03 * torch.randn(p.shape, generator=gen))
    if loaded.quantization is not None:  # a real step through the 4-bit layers
        ids = torch.randint(0, 200, (1, 12), generator=gen)
        model.train()(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            for p in trainable:
                p.sub_(0.1 * p.grad)
    save_adapter(model, out_dir)
    record = {"base_model": {"path": str(base_dir), "fingerprint": fingerprint(base_dir)},
              "recipe": loaded.to_dict()}
    (out_dir / "workbench_run.json").write_text(json.dumps(record))
    return out_dir


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workbench.demo.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    """adapters[name] -> adapter folder, built on first use."""
    root, made = tmp_path_factory.mktemp("adapters"), {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = make_adapter(tiny_base, root / name, RECIPES[name])
        return made[name]

    return get

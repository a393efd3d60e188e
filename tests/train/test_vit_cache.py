"""The frozen-ViT cache (data.vit_cache, workbench/data/vit_cache.py) on the tiny model, CPU, float32."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from workbench.data import vit_cache
from workbench.errors import ConfigError, DataError
from workbench.model.vision import VisionTransformer
from workbench.train.callbacks import read_metrics
from workbench.train.config import load_run_config

COLOURS = ["red", "green", "blue", "white"]


@pytest.fixture
def count_vit(monkeypatch):
    """How many times any VisionTransformer.forward ran (pre-pass and training alike)."""
    calls = []
    forward = VisionTransformer.forward

    def counted(self, x):
        calls.append(x.shape[0])
        return forward(self, x)
    monkeypatch.setattr(VisionTransformer, "forward", counted)
    return calls


def _cached(cache_dir: Path) -> list[str]:
    return ["data.vit_cache=true", f"data.vit_cache_dir={cache_dir}"]


def _metrics(run_dir: Path) -> dict[tuple[int, str], float]:
    return {(m["step"], key): m[key] for m in read_metrics(run_dir / "metrics.jsonl")
            for key in ("loss", "eval_loss") if key in m}


@pytest.mark.slow
def test_cached_run_equals_uncached_over_two_epochs_and_a_second_run_computes_nothing(tmp_path, run_config, count_vit):
    from workbench.train.trainer import train

    settings = {"max_steps": -1, "epochs": 2, "save_steps": 100, "eval_steps": 4}
    cache_dir = tmp_path / "cache"
    plain = train(load_run_config(run_config(folder=tmp_path / "plain", eval_data=True, **settings)))
    assert count_vit  # the uncached run sends images through the ViT
    count_vit.clear()
    runs = {}
    for name in ("cached", "reused"):
        path = run_config(folder=tmp_path / name, eval_data=True, **settings)
        runs[name] = train(load_run_config(path, _cached(cache_dir)))
        record = json.loads((runs[name].output_dir / "workbench_run.json").read_text())
        runs[name + "_record"] = record["sessions"][-1]["vit_cache"]
        runs[name + "_calls"] = list(count_vit)
        count_vit.clear()

    # Four distinct images (the eval image repeats a train image): one pre-pass batch, then no ViT at all.
    assert runs["cached_calls"] == [4] and runs["cached_record"]["computed"] == 4
    assert runs["reused_calls"] == [] and runs["reused_record"] == {**runs["cached_record"], "computed": 0, "reused": 4}
    expected = _metrics(plain.output_dir)
    assert plain.global_step == 8 and {k for _, k in expected} == {"loss", "eval_loss"}
    for name in ("cached", "reused"):
        got = _metrics(runs[name].output_dir)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-6, rel=0), (name, key)


@pytest.mark.parametrize("name, recipe, part", [
    ("ViT LoRA", {"vit": {"modules": ["attn.in_proj"], "r": 4, "alpha": 8}}, "vit"),
    ("resampler query trained in place", {"resampler": {"train": ["query"]}}, "resampler"),
])
def test_a_recipe_training_the_visual_side_is_refused(tmp_path, run_config, name, recipe, part):
    path = run_config()
    config = yaml.safe_load(path.read_text())
    recipe_file = tmp_path / "visual-recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({**recipe, "llm": {"modules": ["c_attn"], "r": 4, "alpha": 8}}))
    config["adapter"] = str(recipe_file)
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=rf"run.yaml: data.vit_cache: the recipe trains the {part} .*{part}"):
        load_run_config(path, ["data.vit_cache=true"])
    load_run_config(path)  # without the cache the recipe is fine


@pytest.fixture(scope="module")
def visual(tiny_ref_dir):
    from workbench import load_model

    return load_model(tiny_ref_dir, dtype=torch.float32).transformer.visual


@pytest.fixture
def images(toy_data) -> list[Path]:
    return [toy_data / "img" / f"{c}.png" for c in COLOURS]


def _fill(visual, images, folder, fingerprint="f" * 16):
    from contextlib import nullcontext

    return vit_cache.fill_cache(visual, images, folder / fingerprint, fingerprint, 56, nullcontext, progress=False)


def _wrong_metadata(file: Path) -> None:
    tensors = {k: v.clone() for k, v in load_file(file).items()}
    save_file(tensors, file, metadata={"format": "1", "fingerprint": "0" * 16})


@pytest.mark.parametrize("name, spoil", [
    ("wrong metadata", _wrong_metadata),
    ("truncated file", lambda file: file.write_bytes(file.read_bytes()[:100])),
    ("missing file", lambda file: file.unlink()),
])
def test_a_bad_entry_is_recomputed_and_refused_on_read(tmp_path, visual, images, count_vit, name, spoil):
    first = _fill(visual, images + images[:1], tmp_path)  # a repeated image is computed once
    assert (first.computed, first.reused, count_vit) == (4, 0, [4])
    file, meta = first.entries[str(images[1])]
    good = vit_cache.read_features(Path(file), meta)
    with torch.no_grad():
        torch.testing.assert_close(good, visual(torch.stack([_pixels(images[1])]))[0], rtol=1e-6, atol=1e-6)
    spoil(Path(file))
    with pytest.raises(DataError, match="ViT cache entry .* does not match this run"):
        vit_cache.read_features(Path(file), meta)
    count_vit.clear()
    again = _fill(visual, images, tmp_path)
    assert (again.computed, again.reused, count_vit) == (1, 3, [1])
    torch.testing.assert_close(vit_cache.read_features(Path(file), meta), good, rtol=0, atol=0)


def test_the_fingerprint_follows_the_visual_weights_size_and_precision(visual):
    base = vit_cache.visual_fingerprint(visual, 56, "fp32")
    assert len(base) == 16 and base == vit_cache.visual_fingerprint(visual, 56, "fp32")
    assert base != vit_cache.visual_fingerprint(visual, 112, "fp32")
    assert base != vit_cache.visual_fingerprint(visual, 56, "bf16")
    with torch.no_grad():
        visual.proj[0, 0] += 1
        try:
            assert base != vit_cache.visual_fingerprint(visual, 56, "fp32")
        finally:
            visual.proj[0, 0] -= 1


def test_the_model_takes_image_features_or_pixels_never_both(tiny_ref_dir):
    from workbench import load_model
    from workbench.model.modeling import find_image_spans

    model = load_model(tiny_ref_dir, dtype=torch.float32)
    model.image_root = tiny_ref_dir
    ids = load_file(tiny_ref_dir / "cases.safetensors")["case4.input_ids"]
    pixels = model.transformer._read_images(ids, find_image_spans(ids, model.config.image_start_id))
    assert pixels.shape[0] >= 1
    with torch.no_grad():
        from_pixels = model(ids, pixel_values=pixels).logits
        features = model.transformer.visual(pixels)
        torch.testing.assert_close(model(ids, image_features=features).logits, from_pixels, rtol=0, atol=0)
        with pytest.raises(ValueError, match="either pixel_values or image_features"):
            model(ids, pixel_values=pixels, image_features=features)
        with pytest.raises(ValueError, match="image_features holds"):
            model(ids, image_features=features[:0])


def _pixels(path: Path) -> torch.Tensor:
    from workbench.model.image_processing import load_image, preprocess

    return preprocess(load_image(path), 56)

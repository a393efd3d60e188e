"""Fixtures for the server tests: the tiny model, adapters on it, servers on 127.0.0.1, images.

Adapters are made the way the merge tests make them (a recipe applied, every trainable tensor
moved off its initial value): `llm` and `llm2` put LoRA on the LLM only (PEFT can mix them in one
batch), `all` also on the ViT and resampler and trains norms fully (batched per adapter, its
norms swapped in and out of the base).
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.merge.conftest import RECIPES, make_adapter
from workbench.data.boxes import format_box, normalize_box


def data_url(image: Image.Image, fmt: str = "PNG", **save) -> str:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user(*parts) -> list[dict]:
    """A one-message conversation: strings are text parts, data URLs (or other URLs) image parts."""
    content = [{"type": "image_url", "image_url": {"url": p[1]}} if isinstance(p, tuple) else {"type": "text", "text": p}
               for p in parts]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from workbench.demo.tiny import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("serve-tiny") / "tiny")


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory, tiny_dir) -> dict[str, Path]:
    root, made = tmp_path_factory.mktemp("serve-adapters"), {}
    for name, recipe, seed in [("llm", "llm", 1), ("llm2", "llm", 2), ("all", "all", 3)]:
        torch.manual_seed(seed)  # PEFT draws lora_A from the global generator: the same adapters every run
        made[name] = make_adapter(tiny_dir, root / name, RECIPES[recipe], seed=seed)
    return made


@pytest.fixture(scope="session")
def images_dir(tmp_path_factory) -> Path:
    """red.png 40x30 and stripes.png 64x48 (RGB, no EXIF: the server sees what chat sees)."""
    root = tmp_path_factory.mktemp("serve-images")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "red.png")
    stripes = Image.new("RGB", (64, 48), (20, 160, 30))
    for x in range(0, 64, 8):
        stripes.paste((240, 240, 20), (x, 0, x + 4, 48))
    stripes.save(root / "stripes.png")
    return root


def start_server(model_dir, adapters=None, *, name="tiny", start_engine=True, max_batch=8, max_queue=64,
                 **settings):
    from workbench.serve.app import Settings, create_app
    from workbench.serve.engine import Engine
    from workbench.serve.images import ImageLimits
    from workbench.serve.models import ServedModel
    from workbench.serve.server import BackgroundServer

    if "images" in settings:
        settings["images"] = ImageLimits(**settings["images"])
    served = ServedModel.load(str(model_dir), adapters, device="cpu", name=name)
    engine = Engine(served, max_batch=max_batch, max_queue=max_queue)
    return BackgroundServer(create_app(served, engine, Settings(**settings)), engine, start_engine=start_engine)


@pytest.fixture(scope="session")
def mixed_server(tiny_dir, adapter_dirs):
    """base `tiny` + adapters `llm`, `llm2` (LLM-only LoRA: one mixed batch)."""
    with start_server(tiny_dir, {k: adapter_dirs[k] for k in ("llm", "llm2")}) as server:
        yield server


@pytest.fixture(scope="session")
def grouped_server(tiny_dir, adapter_dirs):
    """base `tiny` + adapters `all` (vision LoRA, replaced norms) and `llm`: batches per adapter."""
    with start_server(tiny_dir, {k: adapter_dirs[k] for k in ("all", "llm")}) as server:
        yield server


@pytest.fixture
def client_for():
    from openai import OpenAI

    def make(server, **kwargs):
        return OpenAI(base_url=server.url + "/v1", api_key=kwargs.pop("api_key", "unused"), timeout=60,
                      max_retries=0, **kwargs)

    return make


def make_box_writer(out_dir: Path, ref: str, box_word: str) -> Path:
    """The demo's base model (224 px, hand-set vision side) whose LLM is set by hand to answer every
    question with `<ref>{ref}</ref><box>{box_word}</box>`: a bigram chain `\\n` -> <ref> -> the ->
    colour -> shape -> </ref> -> <box> -> box_word (one token) -> </box> -> <|im_end|>, with the
    blocks' outputs zeroed so that each next token depends on the current one only."""
    from workbench.api import load_model, load_tokenizer
    from workbench.demo.runner import BASE_SIZES
    from workbench.demo.synthetic import COLOURS, WORDS
    from workbench.demo.tiny import make_tiny_model_dir
    from workbench.demo.tiny_vision import set_shape_vision
    from workbench.model.checkpoint import save_model

    make_tiny_model_dir(out_dir, words=(*WORDS, box_word), **BASE_SIZES)
    model, tok = load_model(out_dir, dtype=torch.float32), load_tokenizer(out_dir)
    set_shape_vision(model, COLOURS)
    chain = [tok.encode("\n")[0], tok.ref_start_id, *tok.encode(ref), tok.ref_end_id, tok.box_start_id,
             tok.mergeable_ranks[box_word.encode()], tok.box_end_id, tok.im_end_id]
    assert len(set(chain)) == len(chain) == 10, chain  # each word one token, none repeated
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        model.transformer.ln_f.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for i, (token, successor) in enumerate(zip(chain, chain[1:])):
            model.transformer.wte.weight[token] = torch.nn.functional.one_hot(torch.tensor(i), 128).float()
            model.lm_head.weight[successor, i] = 1.0
    save_model(model, out_dir, max_shard_size="10GB")
    return out_dir


@dataclass(frozen=True)
class DemoSample:
    """One image of the demo's synthetic shapes set, one of its shapes, and the answer that finds it."""

    image: Path
    ref: str
    grid: tuple[int, int, int, int]

    @property
    def answer(self) -> str:
        return f"<ref>{self.ref}</ref>{format_box(self.grid)}"


@pytest.fixture(scope="session")
def demo_sample(tmp_path_factory) -> DemoSample:
    from workbench.demo.synthetic import make_shapes_dataset

    root = tmp_path_factory.mktemp("serve-shapes")
    records = [json.loads(line) for line in
               make_shapes_dataset(root, 1, shapes_per_image=(2, 2), seed=4, name="demo").read_text().splitlines()]
    record = next((r for r in records if "red" in r["objects"][0]["ref"]), records[0])  # the box shows on red
    image, obj = root / record["images"][0], record["objects"][0]
    return DemoSample(image, obj["ref"], normalize_box(obj["bbox"], *Image.open(image).size))


@pytest.fixture(scope="session")
def box_server(tmp_path_factory, demo_sample):
    """The demo model that writes the box of `demo_sample`'s shape, served as `demo`."""
    x1, y1, x2, y2 = demo_sample.grid
    model = make_box_writer(tmp_path_factory.mktemp("serve-box") / "demo", demo_sample.ref, f"({x1},{y1}),({x2},{y2})")
    with start_server(model, name="demo") as server:
        yield server

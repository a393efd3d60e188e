"""The demo model's hand-set vision side (workbench/demo/tiny_vision.py), checked on drawn images.

A red square whose patches are known: its image tokens say "red, here", the background's say
nothing, every token depends on its own patch only, and training the resampler's norms and
queries (as the demo and grounding recipes do) cannot move that attention.
"""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image, ImageDraw

from workbench.api import load_model
from workbench.demo.runner import BASE_SIZES
from workbench.demo.synthetic import COLOURS
from workbench.demo.tiny import make_tiny_model_dir
from workbench.demo.tiny_vision import GATED, N_POS, PRESENCE, position_code, set_shape_vision
from workbench.errors import WorkbenchError
from workbench.model.image_processing import preprocess

PATCH = 14


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    model = load_model(make_tiny_model_dir(tmp_path_factory.mktemp("base"), **BASE_SIZES))
    set_shape_vision(model, COLOURS)
    return model.eval()


@pytest.fixture(scope="module")
def visual(model):
    return model.transformer.visual


def _image(shapes: dict[str, tuple[int, int, int, int]]) -> torch.Tensor:
    """224 px, a striped grey background, filled squares in patch units (col1, row1, col2, row2)."""
    image = Image.new("RGB", (224, 224), (120, 120, 120))
    draw = ImageDraw.Draw(image)
    for x in range(0, 224, 9):
        draw.line([(x, 0), (x, 223)], fill=(140, 140, 140), width=2)
    for colour, (c1, r1, c2, r2) in shapes.items():
        draw.rectangle([c1 * PATCH, r1 * PATCH, c2 * PATCH - 1, r2 * PATCH - 1], fill=COLOURS[colour])
    return preprocess(image, 224)[None]


def _mask(c1: int, r1: int, c2: int, r2: int) -> torch.Tensor:
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[r1:r2, c1:c2] = True
    return mask.flatten()


def test_patches_say_which_colour_is_where(visual) -> None:
    red, blue = (2, 3, 6, 7), (9, 10, 14, 15)
    with torch.no_grad():
        feats = visual.patch_features(_image({"red": red, "blue": blue}))[0]
    presence = feats[:, PRESENCE:PRESENCE + len(COLOURS)]
    on_red, on_blue = _mask(*red), _mask(*blue)
    colours = list(COLOURS)
    assert torch.allclose(presence[on_red, colours.index("red")], torch.ones(16), atol=0.02)
    assert torch.allclose(presence[on_blue, colours.index("blue")], torch.ones(25), atol=0.02)
    others = presence.clone()
    others[on_red, colours.index("red")] = 0
    others[on_blue, colours.index("blue")] = 0
    assert others.abs().max() < 0.03  # no colour on grey stripes, no cross-talk between colours
    gated = feats[:, GATED:GATED + N_POS]
    code = position_code(16)
    on_shape = on_red | on_blue
    # where they are, within the few per cent that the colour features add to the LayerNorms' std
    assert torch.allclose(gated[on_shape], code[on_shape], atol=0.05)
    assert gated[~on_shape].abs().max() < 0.02  # the background: nowhere


def test_each_image_token_depends_on_its_own_patch_only(visual) -> None:
    with torch.no_grad():
        a = visual(_image({"red": (2, 3, 6, 7)}))[0]
        b = visual(_image({"red": (2, 3, 6, 7), "yellow": (10, 10, 13, 13)}))[0]
    changed = (a - b).norm(dim=-1) > 1e-3
    assert torch.equal(changed, _mask(10, 10, 13, 13))
    background = ~(_mask(2, 3, 6, 7) | _mask(10, 10, 13, 13))
    assert torch.allclose(a[background], a[background][0].expand_as(a[background]), atol=0.02)  # one constant
    assert torch.allclose(a.norm(dim=-1), torch.full((256,), math.sqrt(128)), atol=1e-2)  # ln_post, proj = I


def test_training_norms_and_queries_keeps_the_attention_local(visual) -> None:
    pool = visual.attn_pool
    with torch.no_grad():
        x = visual.patch_features(_image({"red": (2, 3, 6, 7), "green": (8, 1, 15, 8), "yellow": (1, 9, 5, 13)}))
    params = dict(pool.named_parameters())
    saved = {name: p.detach().clone() for name, p in params.items()}
    try:
        with torch.no_grad():
            # The values' norm is free by design (q and k drop those dims); the queries and ln_q
            # get more drift than 1500 demo steps at the resampler's rate (2.5e-4) could add.
            params["ln_kv.weight"].mul_(3).add_(torch.randn(128))
            params["ln_kv.bias"].add_(torch.randn(128))
            for name in ("ln_q.weight", "ln_q.bias", "query"):
                params[name].add_(0.05 * torch.randn_like(params[name]))
            kv = pool.ln_kv(pool.kv_proj(x)).permute(1, 0, 2)
            q = (pool.ln_q(pool.query) + pool.pos_embed).unsqueeze(1)
            _, attn = pool.attn(q, kv + pool.pos_embed.unsqueeze(1), kv, need_weights=True)
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
    assert attn.shape == (1, 256, 256)
    assert attn[0].diagonal().min() > 0.99  # query i still reads patch i


def test_wrong_sizes_are_refused(model, tmp_path) -> None:
    with pytest.raises(WorkbenchError, match="width 64 with 2 blocks"):
        set_shape_vision(load_model(make_tiny_model_dir(tmp_path / "narrow", **{**BASE_SIZES, "visual": {
            **BASE_SIZES["visual"], "width": 32}})), COLOURS)
    with pytest.raises(WorkbenchError, match="no colour score for \\['purple'\\]"):
        set_shape_vision(model, {"purple": (128, 0, 128)})


def test_shapes_dataset_is_a_function_of_its_seed(tmp_path):
    """Same seed, same images, whatever ran before in the process (xdist runs tests in any order)."""
    from workbench.demo.synthetic import make_shapes_dataset

    first, again, other = (make_shapes_dataset(tmp_path / name, 3, seed=seed)
                           for name, seed in (("a", 7), ("b", 7), ("c", 8)))
    assert first.read_text() == again.read_text() != other.read_text()
    for i in range(3):
        a, b = (Image.open(path.parent / "images" / f"train-{i:04d}.png").tobytes() for path in (first, again))
        assert a == b

"""The model against the goldens of the original code (CPU, float32).

One reference model is loaded per module; tests that switch to train mode restore eval mode.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from workbench.errors import WorkbenchError
from workbench.model.checkpoint import load_model
from workbench.model.modeling import segment_positions


def close(actual, expected, tol):
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


@pytest.fixture(scope="module")
def cases(tiny_ref_dir):
    return load_file(tiny_ref_dir / "cases.safetensors")


@pytest.fixture(scope="module")
def model(tiny_ref_dir):
    model = load_model(tiny_ref_dir, dtype=torch.float32)
    model.image_root = tiny_ref_dir
    return model


@pytest.fixture
def train_mode(model):
    model.train()
    yield model
    model.eval()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["a", "b", "c", "d"])
def test_image_features(model, cases, name):
    with torch.no_grad():
        close(model.transformer.visual(cases[f"pixel_values.{name}"]), cases[f"image_features.{name}"], 1e-5)


@pytest.mark.parametrize("case", ["case1", "case2", "case3"])
def test_eval_forward_with_paths_in_ids(model, cases, case):
    with torch.no_grad():
        out = model(cases[f"{case}.input_ids"], output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    close(out.hidden_states[-1], cases[f"{case}.hidden"], 1e-4)
    close(out.logits, cases[f"{case}.logits"], 1e-4)
    close(out.logits.logsumexp(-1), cases[f"{case}.logsumexp"], 1e-4)


def test_pixel_values_equal_paths_from_an_empty_cwd(model, cases, golden, tmp_path, monkeypatch):
    """Both input forms give case3; relative paths resolve against image_root, not the cwd."""
    monkeypatch.chdir(tmp_path)
    ids = cases["case3.input_ids"]
    pixels = torch.cat([cases["pixel_values.b"], cases["pixel_values.c"]])
    with torch.no_grad():
        by_pixels = model(ids, pixel_values=pixels).logits
        by_paths = model(ids).logits
    close(by_pixels, by_paths, 1e-6)
    close(by_pixels, cases["case3.logits"], 1e-4)


def test_image_errors(model, cases, golden, tmp_path, tiny_ref_dir):
    ids = cases["case2.input_ids"]
    with torch.no_grad(), pytest.raises(ValueError, match="holds 2 images but input_ids hold 1"):
        model(ids, pixel_values=cases["pixel_values.a"].repeat(2, 1, 1, 1))
    # a sample truncated inside an image span: 3 <img> but 2 </img> (golden case8_truncation_inside_image)
    truncated = torch.tensor([golden["case8_truncation_inside_image"]["input_ids"]])
    with torch.no_grad(), pytest.raises(ValueError, match="3 <img> but 2 </img>"):
        model(truncated)
    # a 256-byte path leaves no <imgpad> in the span: the original says "727 is not in list"
    no_pad = ids.clone()
    no_pad[0, 28:284] = ord("p")
    with torch.no_grad(), pytest.raises(ValueError, match="727 is not in list"):
        model(no_pad)
    model.image_root = tmp_path
    try:
        with torch.no_grad(), pytest.raises(WorkbenchError, match=r"image not found: images/a\.png"):
            model(ids)
    finally:
        model.image_root = tiny_ref_dir


def test_case5_long_eval_uses_ntk_and_logn(model, cases):
    with torch.no_grad():
        out = model(cases["case5.input_ids"], output_hidden_states=True)
    logits = out.logits
    close(logits[:, -8:], cases["case5.logits_last8"], 1e-4)
    close(logits[:, :8], cases["case5.logits_first8"], 1e-4)
    close(out.hidden_states[-1][:, -8:], cases["case5.hidden_last8"], 1e-4)
    close(logits.logsumexp(-1), cases["case5.logsumexp"], 1e-4)
    # an off-by-one log-n index moves these by 3.4e-5
    close(logits[:, cases["case5.boundary_positions"]], cases["case5.logits_boundary"], 1e-5)


def test_case10_train_mode_has_no_ntk_and_no_logn(model, cases, train_mode):
    """Runs after case5's eval forward on the same instance: no alpha leaks into training."""
    with torch.no_grad():
        out = train_mode(cases["case10.input_ids"], labels=cases["case10.labels"])
    close(out.loss.reshape(1), cases["case10.loss"], 1e-5)
    lse = out.logits.logsumexp(-1)[:, cases["case10.positions"]]
    close(lse, cases["case10.logsumexp_at_positions"], 1e-5)


@pytest.mark.parametrize("optimised", [False, True], ids=["plain", "chunked-loss+checkpointing"])
def test_case4_training_loss_and_gradients(model, cases, golden, train_mode, optimised):
    """The golden loss and gradients, also with the training-time optimisations on."""
    if optimised:
        train_mode.loss_chunk_size = 16
        train_mode.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        out = train_mode(cases["case4.input_ids"], attention_mask=cases["case4.attention_mask"],
                         labels=cases["case4.labels"], output_hidden_states=True)
        out.loss.backward()
    finally:
        train_mode.loss_chunk_size = None
        train_mode.gradient_checkpointing_disable()
    close(out.loss.reshape(1), cases["case4.loss"], 1e-5)
    if not optimised:  # the chunked loss never builds the full logits
        close(out.logits, cases["case4.logits"], 1e-4)  # incl. the finite pad rows of row 2
        close(out.hidden_states[-1], cases["case4.hidden"], 1e-4)
    params = dict(train_mode.named_parameters())
    for name, norm in golden["case4"]["grad_norms"].items():
        if norm is None:  # attn_pool.pos_embed is frozen
            assert params[name].grad is None and not params[name].requires_grad
        else:
            assert params[name].grad.norm().item() == pytest.approx(norm, rel=1e-4), name
    saved = [k for k in cases if k.startswith("case4.grad.")]
    assert len(saved) == 5
    for key in saved:
        close(params[key.removeprefix("case4.grad.")].grad, cases[key], 1e-4)


def test_text_only_training_batch_gives_zero_visual_grads(model, golden, train_mode):
    sample = golden["case4_text_only_train"]
    out = train_mode(torch.tensor(sample["input_ids"]), labels=torch.tensor(sample["labels"]))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(sample["loss"], rel=1e-5)
    visual = [(n, p) for n, p in train_mode.named_parameters() if ".visual." in n and p.requires_grad]
    expected = [n for n, norm in golden["case4"]["grad_norms"].items() if ".visual." in n and norm is not None]
    assert [n for n, _ in visual] == expected  # all 41, none missing
    for name, param in visual:
        assert param.grad is not None and not param.grad.any(), name


def test_int32_labels_and_chunked_loss(model, cases):
    ids, mask, labels = cases["case4.input_ids"], cases["case4.attention_mask"], cases["case4.labels"]
    with torch.no_grad():
        plain = model(ids, attention_mask=mask, labels=labels.int()).loss
        model.loss_chunk_size = 7
        try:
            chunked = model(ids, attention_mask=mask, labels=labels)
        finally:
            model.loss_chunk_size = None
    assert chunked.logits is None
    close(chunked.loss, plain, 1e-5)


def test_chunked_loss_gradients_match(model, cases, train_mode):
    ids, mask, labels = cases["case4.input_ids"], cases["case4.attention_mask"], cases["case4.labels"]
    train_mode(ids, attention_mask=mask, labels=labels).loss.backward()
    expected = train_mode.lm_head.weight.grad.clone()
    train_mode.zero_grad(set_to_none=True)
    train_mode.loss_chunk_size = 16
    try:
        train_mode(ids, attention_mask=mask, labels=labels).loss.backward()
    finally:
        train_mode.loss_chunk_size = None
    close(train_mode.lm_head.weight.grad, expected, 1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_grads(model, golden, train_mode):
    sample = golden["case4_text_only_train"]
    ids, labels = torch.tensor(sample["input_ids"]), torch.tensor(sample["labels"])
    train_mode(ids, labels=labels).loss.backward()
    expected = train_mode.transformer.h[0].attn.c_attn.weight.grad.clone()
    train_mode.zero_grad(set_to_none=True)
    train_mode.gradient_checkpointing_enable()
    try:
        assert train_mode.transformer.h[0].gradient_checkpointing
        loss = train_mode(ids, labels=labels).loss
        loss.backward()
    finally:
        train_mode.gradient_checkpointing_disable()
    assert loss.item() == pytest.approx(sample["loss"], rel=1e-5)
    close(train_mode.transformer.h[0].attn.c_attn.weight.grad, expected, 1e-6)


def test_left_padded_batch_first_step(model, cases):
    with torch.no_grad():
        out = model(cases["case6.batch_input_ids"], attention_mask=cases["case6.batch_attention_mask"])
    close(out.logits[:, -1], cases["case6.batch_first_step_logits_last"], 1e-5)


def test_segment_positions():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_packed_row_equals_separate_samples(model, cases):
    """Two samples packed in one row (+ padding) give each sample's own logits."""
    a, b = cases["case1.input_ids"][0, :30], cases["case1.input_ids"][0, 10:50]
    pad = torch.full((5,), 511)
    ids = torch.cat([a, b, pad])[None]
    segments = torch.tensor([[1] * 30 + [2] * 40 + [0] * 5])
    with torch.no_grad():
        packed = model(ids, attention_mask=(segments > 0).long(), segment_ids=segments).logits
        alone_a, alone_b = model(a[None]).logits, model(b[None]).logits
    assert torch.isfinite(packed).all()
    close(packed[:, :30], alone_a, 1e-5)
    close(packed[:, 30:70], alone_b, 1e-5)

"""Combining adapters: the streaming merge against PEFT's add_weighted_adapter + merge_and_unload.

Two adapters of the tiny model with different ranks on different components (and one module,
c_attn, that both adapt at the same rank, where the methods really combine):

  first:  LLM c_attn, w1, w2 at r 8 (alpha 16); resampler kv_proj + attn (nn.MultiheadAttention) at r 4
  second: LLM c_attn, attn.c_proj at r 8 (alpha 32); ViT attn.in_proj, mlp.c_fc at r 2

Both have a largest rank of 8, which PEFT's linear / ties / dare_* need.

dare draws random masks. PEFT's add_weighted_adapter first initialises the new adapter's A
matrices (random draws of their own, which a streaming merge never makes), then, in
`_freeze_adapter`, freezes it, and then combines module by module. The reference reseeds torch's
generator right after `_freeze_adapter`, so both sides draw the masks from the same generator
state; equality then also shows that the modules, and A before B, are visited in PEFT's order.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tests.merge.conftest import make_adapter
from workbench import load_model
from workbench.errors import CheckpointError, WorkbenchError
from workbench.merge.combine import METHODS, Combine
from workbench.merge.merge import merge_adapters
from workbench.model import checkpoint

FIRST = {"llm": {"modules": ["c_attn", "w1", "w2"], "r": 8, "alpha": 16},
         "resampler": {"modules": ["kv_proj", "attn"], "r": 4, "alpha": 8}}
SECOND = {"llm": {"modules": ["c_attn", "attn.c_proj"], "r": 8, "alpha": 32},
          "vit": {"modules": ["attn.in_proj", "mlp.c_fc"], "r": 2, "alpha": 4}}
SEED = 1234


@pytest.fixture(scope="module")
def pair(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return make_adapter(tiny_base, root / "first", FIRST, seed=1), make_adapter(tiny_base, root / "second", SECOND, seed=2)


def peft_combined(base, adapters, weights, method, monkeypatch, **options) -> dict[str, torch.Tensor]:
    """PEFT's own: all adapters loaded, add_weighted_adapter, the combination merged and unloaded."""
    import peft.tuners.lora.model as lora_model

    freeze = lora_model._freeze_adapter

    def freeze_then_seed(*args, **kwargs):  # see the module docstring
        freeze(*args, **kwargs)
        torch.manual_seed(SEED)

    monkeypatch.setattr(lora_model, "_freeze_adapter", freeze_then_seed)
    model = PeftModel.from_pretrained(load_model(base, dtype=torch.float32), adapters[0], adapter_name="a0")
    for i, adapter in enumerate(adapters[1:], 1):
        model.load_adapter(adapter, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    model.add_weighted_adapter(names, weights, "combined", combination_type=method, **options)
    model.set_adapter("combined")
    return model.merge_and_unload().state_dict()


def merged_state(out) -> dict[str, torch.Tensor]:
    return {k: v for p in sorted(set(checkpoint.weight_map(out).values())) for k, v in load_file(p).items()}


CASES = {  # method: (weights, PEFT options, tolerance)
    "linear": ([0.6, 0.4], {}, 1e-6),
    "cat": ([0.7, 1.3], {}, 1e-6),
    "ties": ([1.0, 0.5], {"density": 0.5}, 1e-6),
    "dare_ties": ([0.8, 0.6], {"density": 0.7}, 1e-6),
    "dare_linear": ([1.0, -0.5], {"density": 0.6}, 1e-6),
    "magnitude_prune": ([0.5, 0.5], {"density": 0.4}, 1e-6),
    # float32 SVD: the same LAPACK call on the same matrix on both sides, bounded by its precision
    "svd": ([1.0, 1.0], {"svd_rank": 6}, 1e-5),
    "ties_svd": ([1.0, 0.7], {"density": 0.5}, 1e-5),
}


@pytest.mark.parametrize("method", CASES)
def test_streaming_combination_equals_peft(method, pair, tiny_base, tmp_path, monkeypatch):
    weights, options, tolerance = CASES[method]
    expected = peft_combined(tiny_base, pair, weights, method, monkeypatch, **options)
    combine = Combine(method, tuple(weights), options.get("density"), svd_rank=options.get("svd_rank"), seed=SEED)
    report = merge_adapters(tiny_base, pair, tmp_path / "out", combine=combine)
    got, base = merged_state(tmp_path / "out"), merged_state(tiny_base)
    assert set(got) == set(base) == set(expected)
    changed = set()
    for key in base:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=tolerance, msg=key)
        if not torch.equal(got[key], base[key]):
            changed.add(key)
    # every component of both adapters changed, and only LoRA-targeted weights did
    assert changed == {m["key"] for m in report["merged_modules"]}
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.w2.weight",
            "transformer.h.1.attn.c_proj.weight", "transformer.visual.attn_pool.attn.out_proj.weight",
            "transformer.visual.transformer.resblocks.0.mlp.c_fc.weight"} <= changed
    assert [a["weight"] for a in report["adapters"]] == weights
    assert [a["path"] for a in report["adapters"]] == [str(p) for p in pair]
    assert report["combine"]["method"] == method


def test_dare_seed_decides_the_masks(pair, tiny_base, tmp_path):
    key = "transformer.h.0.attn.c_attn.weight"
    states = []
    for seed in (0, 0, 1):
        out = tmp_path / f"seed{len(states)}"
        merge_adapters(tiny_base, pair, out, combine=Combine("dare_linear", density=0.5, seed=seed))
        states.append(merged_state(out)[key])
    assert torch.equal(states[0], states[1]) and not torch.equal(states[0], states[2])


def test_cat_is_the_exact_weighted_sum_of_the_deltas(pair, tiny_base, tmp_path):
    """cat stacks the factors: W + 0.7 ΔW1 + 1.3 ΔW2 exactly, whatever the ranks (here 8 + 8)."""
    def delta(adapter):
        out = tmp_path / f"single-{adapter.name}"
        merge_adapters(tiny_base, [adapter], out)
        return merged_state(out)

    base, one, two = merged_state(tiny_base), delta(pair[0]), delta(pair[1])
    merge_adapters(tiny_base, pair, tmp_path / "cat", combine=Combine("cat", (0.7, 1.3)))
    got = merged_state(tmp_path / "cat")
    for key in base:
        by_hand = base[key] + 0.7 * (one[key] - base[key]) + 1.3 * (two[key] - base[key])
        torch.testing.assert_close(got[key], by_hand, rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("method", ["cat", "ties"])
def test_adapter_out_loads_in_peft_and_matches_the_merge(method, pair, tiny_base, tmp_path):
    combine = Combine(method, (0.6, 0.9), 0.5 if method == "ties" else None)
    report = merge_adapters(tiny_base, pair, tmp_path / "adapter", combine=combine, adapter_out=True)
    merge_adapters(tiny_base, pair, tmp_path / "merged", combine=combine)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == report["adapter_out"]["r"] == (16 if method == "cat" else 8)
    assert not config["rank_pattern"] and not config["alpha_pattern"]
    peft_merged = PeftModel.from_pretrained(load_model(tiny_base, dtype=torch.float32), tmp_path / "adapter")
    expected = peft_merged.merge_and_unload().state_dict()
    got = merged_state(tmp_path / "merged")
    for key, tensor in got.items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=1e-6, msg=key)
    record = json.loads((tmp_path / "adapter" / "workbench_run.json").read_text())
    assert record["base_model"]["fingerprint"] == checkpoint.fingerprint(tiny_base)
    assert [a["weight"] for a in record["combine"]["adapters"]] == [0.6, 0.9]
    assert record["combine"]["method"] == method
    # the combined adapter merges again like any adapter, its base checked from its record
    again = merge_adapters(tiny_base, [tmp_path / "adapter"], tmp_path / "again")
    assert again["base_fingerprint_check"] == "match"


def test_verify_of_a_combination(pair, tiny_base, tmp_path):
    report = merge_adapters(tiny_base, pair, tmp_path / "out", combine=Combine("ties", (1.0, 1.0), 0.6), verify=True)
    assert report["verify"]["passed"] and report["verify"]["max_abs_logit_diff"] <= 1e-4
    assert not (tmp_path / "out" / ".combined-adapter").exists()


def _refused(call, match, tmp_path):
    before = set(tmp_path.parent.iterdir()) | set(tmp_path.iterdir())
    with pytest.raises(WorkbenchError, match=match):
        call()
    assert set(tmp_path.parent.iterdir()) | set(tmp_path.iterdir()) == before  # nothing written, not even a temp folder


def test_adapters_from_different_bases_are_refused_before_writing(pair, tiny_base, tmp_path):
    from workbench.demo.tiny import make_tiny_model_dir

    other = make_adapter(make_tiny_model_dir(tmp_path / "other-base", seed=7), tmp_path / "other", SECOND)
    out = tmp_path / "out"
    _refused(lambda: merge_adapters(tiny_base, [pair[0], other], out),
             r"other/workbench_run\.json: trained on a different base than .*first.*--force", tmp_path)
    _refused(lambda: merge_adapters(tiny_base, [pair[0], other], out, adapter_out=True),
             "trained on a different base", tmp_path)


@pytest.mark.parametrize("combine, match", [
    (Combine("cat", (0.5, 0.3, 0.2)), r"--weights: 3 weights for 2 adapters"),
    (Combine("cats"), r"--combine: unknown method 'cats'; did you mean 'cat'\?"),
    (Combine("ties"), r"--density: --combine ties prunes"),
    (Combine("linear", density=0.5), r"--density: only"),
    (Combine("ties", density=1.5), r"--density: must be in \(0, 1\]"),
    (Combine("cat", (1.0, float("nan"))), r"--weights: .* finite"),
    (Combine("cat", svd_rank=4), r"--svd-rank"),
])
def test_bad_combinations_are_refused_before_writing(combine, match, pair, tiny_base, tmp_path):
    _refused(lambda: merge_adapters(tiny_base, pair, tmp_path / "out", combine=combine), match, tmp_path)


def test_ranks_that_a_method_cannot_add_are_refused_and_cat_takes_them(tiny_base, tmp_path):
    low = make_adapter(tiny_base, tmp_path / "low", {"llm": {"modules": ["c_attn"], "r": 4, "alpha": 8}})
    high = make_adapter(tiny_base, tmp_path / "high", {"llm": {"modules": ["c_attn", "w1"], "r": 8, "alpha": 8}})
    with pytest.raises(CheckpointError, match=r"high: 'transformer.h.0.attn.c_attn' has rank 8, .*low rank 4; "
                                              r"--combine linear adds A and B matrices and needs one rank"):
        merge_adapters(tiny_base, [low, high], tmp_path / "out", combine=Combine("linear"))
    report = merge_adapters(tiny_base, [low, high], tmp_path / "out", combine=Combine("cat"))
    assert {m["rank"] for m in report["merged_modules"]} == {12, 8}  # c_attn 4 + 8, w1 8


@pytest.mark.parametrize("name", ["dora", "all"])
def test_what_cannot_combine_is_refused(name, adapters, pair, tiny_base, tmp_path):
    # DoRA magnitudes do not combine; "all" trains lm_head whole, and so does a copy of it.
    match = "DoRA adapters cannot be combined" if name == "dora" else "trains '.*' whole, and so does"
    other = pair[0] if name == "dora" else adapters(name)
    _refused(lambda: merge_adapters(tiny_base, [adapters(name), other], tmp_path / "out"), match, tmp_path)


def test_cli_combines_and_names_every_adapter(pair, tiny_base, tmp_path, capsys):
    from workbench.cli.main import main
    from workbench.cli.merge import COMBINE_METHODS

    assert COMBINE_METHODS == METHODS  # the CLI lists them without importing PEFT
    out = tmp_path / "out"
    code = main(["merge", "--base", str(tiny_base), "--adapter", str(pair[0]), "--adapter", str(pair[1]),
                 "--weights", "0.6,0.4", "--combine", "dare_ties", "--density", "0.5", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "merge_report.json").read_text())
    assert [(a["path"], a["weight"]) for a in report["adapters"]] == [(str(pair[0]), 0.6), (str(pair[1]), 0.4)]
    assert report["combine"] == {"method": "dare_ties", "weights": [0.6, 0.4], "density": 0.5,
                                 "majority_sign_method": "total", "svd_rank": None, "seed": 0}
    assert "combined (dare_ties)" in capsys.readouterr().out
    code = main(["merge", "--base", str(tiny_base), "--adapter", str(pair[0]), "--adapter", str(pair[1]),
                 "--weights", "0.6", "--out", str(tmp_path / "bad")])
    assert code == 2 and "--weights: 1 weights for 2 adapters" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_missing_device_is_refused_before_writing(pair, tiny_base, tmp_path):
    _refused(lambda: merge_adapters(tiny_base, pair, tmp_path / "out", device="cuda"), r"--device cuda: ", tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("method", ["cat", "ties"])
def test_merge_maths_on_cuda_equal_cpu(method, pair, tiny_base, tmp_path):
    combine = Combine(method, (0.6, 0.4), 0.5 if method == "ties" else None)
    merge_adapters(tiny_base, pair, tmp_path / "cpu", combine=combine)
    merge_adapters(tiny_base, pair, tmp_path / "cuda", combine=combine, device="cuda")
    cpu, cuda = merged_state(tmp_path / "cpu"), merged_state(tmp_path / "cuda")
    for key, tensor in cpu.items():
        torch.testing.assert_close(cuda[key], tensor, rtol=0, atol=1e-5, msg=key)


def test_combined_adapter_is_served_like_the_merge(pair, tiny_base, tmp_path):
    from workbench.merge.verify import merged_logits, probe_batch
    from workbench.serve.models import ServedModel

    combine = Combine("cat", (0.6, 0.9))
    merge_adapters(tiny_base, pair, tmp_path / "adapter", combine=combine, adapter_out=True)
    merge_adapters(tiny_base, pair, tmp_path / "merged", combine=combine)
    served = ServedModel.load(str(tiny_base), {"both": tmp_path / "adapter"}, dtype="float32", device="cpu")
    assert served.names == [served.name, "both"]
    batch = probe_batch(tiny_base, 56)
    with torch.no_grad():
        got = served.model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    expected = merged_logits(tmp_path / "merged", batch, torch.float32, "cpu")
    base = merged_logits(tiny_base, batch, torch.float32, "cpu")
    assert (expected - base).abs().max() > 1e-2  # the combination changes the model
    assert (got - expected).abs().max() <= 1e-4


def test_one_adapter_to_adapter_out_is_the_same_adapter(pair, tiny_base, tmp_path):
    """PEFT's linear of one adapter at weight 1: its rank patterns folded away, the merge unchanged."""
    merge_adapters(tiny_base, [pair[0]], tmp_path / "plain", adapter_out=True)
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and not config["rank_pattern"]
    merge_adapters(tiny_base, [pair[0]], tmp_path / "direct")
    merge_adapters(tiny_base, [tmp_path / "plain"], tmp_path / "again")
    direct, again = merged_state(tmp_path / "direct"), merged_state(tmp_path / "again")
    for key, tensor in direct.items():
        torch.testing.assert_close(again[key], tensor, rtol=0, atol=1e-6, msg=key)
    _refused(lambda: merge_adapters(tiny_base, pair, tmp_path / "x", adapter_out=True, verify=True),
             "--adapter-out writes an adapter", tmp_path)

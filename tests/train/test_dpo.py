"""DPO (issue 32): TRL's loss on the workbench's log-probabilities against hand computations, the
preference data's checks, and short runs with every kind of recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from workbench.errors import ConfigError, DataError
from workbench.train.callbacks import read_metrics
from workbench.train.config import load_run_config

BETA = 0.3


def write_pairs(folder: Path, rows: list[dict], name: str = "pairs.jsonl") -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for colour in ("red", "blue"):
        Image.new("RGB", (64, 48), colour).save(folder / f"{colour}.png")
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


LONG = "<ref>the red square</ref><box>(10,20),(300,400)</box> and it is a red square, quite large and plain"
PAIRS = [
    # two images in one prompt; the chosen answer is the one cut at max_length below
    {"messages": [{"role": "user", "content": "<image><image>Where is <ref-object> in the second picture?"}],
     "images": ["red.png", "blue.png"], "objects": [{"ref": "the red square"}],
     "chosen": LONG, "rejected": {"role": "assistant", "content": "<ref>the red square</ref><box>(1,1),(2,2)</box>"}},
    {"messages": [{"role": "user", "content": "<image>Where is the blue square?"}], "images": ["blue.png"],
     "chosen": "<ref>the blue square</ref><box>(0,0),(999,999)</box>", "rejected": "I cannot tell."},
]


def cfg_for(path: Path, **data):
    from workbench.data.config import DataConfig

    return DataConfig.from_dict({"train": str(path), "num_workers": 0, **data})


@pytest.fixture(scope="module")
def pair_batch(tiny_ref_dir, tmp_path_factory):
    """The two pairs above through the data pipeline and the collator, with max_length set so that
    the first pair's chosen answer is cut (and its rejected one is not)."""
    from workbench.api import load_tokenizer
    from workbench.data.preference import PreferenceCollator, load_preference_data

    tok = load_tokenizer(tiny_ref_dir)
    path = write_pairs(tmp_path_factory.mktemp("pairs"), PAIRS)
    size = json.loads((tiny_ref_dir / "config.json").read_text())["visual"]["image_size"]
    whole = load_preference_data(cfg_for(path, max_length=4096), tok, size).train.samples
    first = whole[0]
    max_length = len(first.prompt_ids) + len(first.rejected_ids) + 3
    assert len(first.chosen_ids) > len(first.rejected_ids) + 3 and len(whole[1].prompt_ids) < len(first.prompt_ids)
    data = load_preference_data(cfg_for(path, max_length=max_length), tok, size)
    samples = data.train.samples
    assert data.report.cut == 1 and samples[0].chosen_ids == first.chosen_ids[:len(first.rejected_ids) + 3]
    assert samples[0].chosen_ids[-1] != tok.im_end_id and samples[0].rejected_ids[-1] == tok.im_end_id
    assert len(samples[0].images) == 2 and samples[1] == whole[1]
    batch = PreferenceCollator(tok.pad_token_id)([data.train[i] for i in range(2)])
    return samples, batch, data.train


def peft_model(tiny_ref_dir, **lora):
    from peft import LoraConfig, get_peft_model

    from workbench.model.checkpoint import load_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=["c_attn", "w1", "attn.in_proj"], **lora)
    return get_peft_model(load_model(tiny_ref_dir, dtype=torch.float32), config)


def direct_logps(model, samples, dataset, answer: str) -> list[torch.Tensor]:
    """The plain way, pair by pair: prompt + answer as one unpadded row with the prompt's images,
    the log-probability of each answer token read off the model's logits."""
    out = []
    for i, s in enumerate(samples):
        ids = getattr(s, f"{answer}_ids")
        row = torch.tensor([s.prompt_ids + ids])
        logits = model(row, pixel_values=dataset[i]["pixel_values"]).logits[0].float()
        logp = logits[len(s.prompt_ids) - 1:-1].log_softmax(-1)
        out.append(logp[torch.arange(len(ids)), torch.tensor(ids)])
    return out


def hand_loss(kind: str, pc, pr, rc, rr, chosen_tokens, n_c, n_r):
    """Per pair: TRL's formulas written out (trl/trainer/dpo_trainer.py, _compute_loss)."""
    if kind == "rpo":  # sigmoid + 0.5 x the SFT loss: minus the mean over all chosen tokens of the batch
        return hand_loss("sigmoid", pc, pr, rc, rr, chosen_tokens, n_c, n_r) - 0.5 * torch.cat(chosen_tokens).mean()
    losses = []
    for b in range(len(pc)):
        delta = (pc[b] - rc[b]) - (pr[b] - rr[b])
        if kind == "sigmoid":
            losses.append(-torch.nn.functional.logsigmoid(BETA * delta))
        elif kind == "hinge":
            losses.append(torch.relu(1 - BETA * delta))
        elif kind == "ipo":
            losses.append(((pc[b] - rc[b]) / n_c[b] - (pr[b] - rr[b]) / n_r[b] - 1 / (2 * BETA)) ** 2)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("kind,loss", [
    ("sigmoid", {"sigmoid": 1.0}),
    ("hinge", {"hinge": 1.0}),
    ("ipo", {"ipo": 1.0}),
    ("rpo", {"sigmoid": 1.0, "sft": 0.5}),
])
def test_dpo_loss_gradient_and_rewards_equal_a_direct_computation(tiny_ref_dir, pair_batch, kind, loss):
    from workbench.train import dpo

    samples, batch, dataset = pair_batch
    model = peft_model(tiny_ref_dir)
    model.train()
    lm = model.get_base_model()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("visual" in n for n in lora)

    # the workbench: one forward of each prompt for both answers, TRL's loss
    ref_c, ref_r = dpo.reference_logprobs(model, lm, batch)
    policy = dpo.pair_logprobs(lm, batch)
    got, metrics = dpo.trl_loss(policy, ref_c, ref_r, beta=BETA, loss=loss)
    got.backward()
    grads = {n: p.grad.clone() for n, p in lora.items()}
    model.zero_grad(set_to_none=True)

    # by hand: each answer in its own forward, the formula written out
    with torch.no_grad(), model.disable_adapter():
        rc = [x.sum() for x in direct_logps(model, samples, dataset, "chosen")]
        rr = [x.sum() for x in direct_logps(model, samples, dataset, "rejected")]
    chosen_tokens = direct_logps(model, samples, dataset, "chosen")
    rejected_tokens = direct_logps(model, samples, dataset, "rejected")
    pc, pr = [x.sum() for x in chosen_tokens], [x.sum() for x in rejected_tokens]
    n_c, n_r = [len(s.chosen_ids) for s in samples], [len(s.rejected_ids) for s in samples]
    expected = hand_loss(kind, pc, pr, rc, rr, chosen_tokens, n_c, n_r)
    expected.backward()

    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_c, torch.stack(rc), atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, lora[name].grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "visual" in n)  # through the ViT too

    reward_c = [BETA * (pc[b] - rc[b]).item() for b in range(2)]
    reward_r = [BETA * (pr[b] - rr[b]).item() for b in range(2)]
    assert metrics["rewards/chosen"] == pytest.approx(sum(reward_c) / 2, abs=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(sum(reward_r) / 2, abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx((sum(reward_c) - sum(reward_r)) / 2, abs=1e-5)
    assert metrics["rewards/accuracies"] == pytest.approx(sum(c > r for c, r in zip(reward_c, reward_r)) / 2)
    assert metrics["logps/chosen"] == pytest.approx(sum(x.item() for x in pc) / 2, abs=1e-4)


def test_the_reference_is_the_base_model(tiny_ref_dir, pair_batch):
    """Adapters disabled = the base model's own log-probabilities (a model loaded without adapters)."""
    from workbench.model.checkpoint import load_model
    from workbench.train import dpo

    samples, batch, dataset = pair_batch
    model = peft_model(tiny_ref_dir)
    ref_c, ref_r = dpo.reference_logprobs(model, model.get_base_model(), batch)
    base = load_model(tiny_ref_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want_c = torch.stack([x.sum() for x in direct_logps(base, samples, dataset, "chosen")])
        want_r = torch.stack([x.sum() for x in direct_logps(base, samples, dataset, "rejected")])
        on = torch.stack([x.sum() for x in direct_logps(model, samples, dataset, "chosen")])
    torch.testing.assert_close(ref_c, want_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_r, want_r, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(on, want_c, atol=1e-3)  # the adapters do change the model


# ---- bad preference data: refused before training, naming file, line and field ---------------------

GOOD = {"messages": [{"role": "user", "content": "<image>Where is the red square?"}], "images": ["red.png"],
        "chosen": "<ref>the red square</ref><box>(0,0),(500,500)</box>", "rejected": "nowhere"}


@pytest.mark.parametrize("change,fld,words", [
    ({"rejected": None}, "rejected", "missing: a preference record needs a chosen and a rejected answer"),
    ({"rejected": GOOD["chosen"]}, "rejected", "equal to chosen"),
    ({"rejected": "<img>blue.png</img><box>(0,0),(1,1)</box>"}, "rejected", "the answers hold images"),
    ({"chosen": "<image> here", "rejected": "<img>blue.png</img>"}, "rejected", "share the prompt's images"),
    ({"rejected": 7}, "rejected", "expected the answer's text"),
    ({"messages": [{"role": "user", "content": "<image>" + "Where is it? " * 40}]}, "messages",
     "no room for the answers"),
    ({"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "x"}]}, "messages",
     "must end with a user turn"),
    ({"images": ["green.png"]}, "images[0]", "green.png"),
])
def test_bad_preference_records_are_refused_with_file_line_and_field(tmp_path, tiny_ref_dir, change, fld, words):
    from workbench.api import load_tokenizer
    from workbench.data.preference import load_preference_data

    row = {**GOOD, **change}
    row = {k: v for k, v in row.items() if v is not None}
    path = write_pairs(tmp_path, [GOOD, row])
    path.write_text(path.read_text().replace("\n", "\n\n", 1))  # a blank line: line 3 holds record 1
    with pytest.raises(DataError) as err:
        load_preference_data(cfg_for(path, max_length=300), load_tokenizer(tiny_ref_dir), 224)
    assert f"file {path}, line 3, record 1, field '{fld}'" in str(err.value) and words in str(err.value)


def test_preference_records_are_not_read_as_conversations(tmp_path, tiny_ref_dir):
    from workbench.api import load_tokenizer
    from workbench.data.dataset import load_sft_data

    path = write_pairs(tmp_path, [GOOD])
    with pytest.raises(DataError, match="a preference record .*method: dpo"):
        load_sft_data(cfg_for(path), load_tokenizer(tiny_ref_dir), 224)


@pytest.mark.parametrize("section,key,words", [
    ({"loss": {"sigmoud": 1.0}}, "dpo.loss.sigmoud", "did you mean 'sigmoid'"),
    ({"loss": {"sigmoid": "x"}}, "dpo.loss.sigmoid", "finite number"),
    ({"loss": {}}, "dpo.loss", "at least one"),
    ({"beta": 0}, "dpo.beta", "> 0"),
    ({"bta": 0.1}, "dpo.bta", "did you mean 'beta'"),
    ({"loss": {"exo_pair": 1.0}}, "dpo.label_smoothing", "needs a label_smoothing"),
])
def test_dpo_config_errors_name_the_yaml_key(tmp_path, tiny_model, section, key, words):
    path = dpo_config(tmp_path, tiny_model, write_pairs(tmp_path / "d", [GOOD]), "lora", section)
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert f"{path}: {key}:" in str(err.value) and words in str(err.value)


# ---- short runs ------------------------------------------------------------------------------------


def dpo_config(folder: Path, model: Path, data: Path, recipe: str, section: dict | None = None, **train) -> Path:
    from tests.train.conftest import write_recipe

    settings = {"output_dir": str(folder / "run"), "lr": 1e-2, "schedule": "constant", "warmup_ratio": 0.0,
                "weight_decay": 0.0, "max_steps": 3, "batch_size": 2, "gradient_accumulation_steps": 1,
                "gradient_checkpointing": False, "save_steps": 10, "logging_steps": 1, "seed": 3,
                "report_to": "none", **train}
    config = {"model": str(model), "dtype": "float32", "adapter": str(write_recipe(folder, recipe)),
              "method": "dpo", "dpo": {"beta": 0.5, **(section or {})},
              "data": {"train": str(data), "max_length": 384, "num_workers": 0}, "train": settings}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize("recipe", ["lora", "qlora", "all3"])
def test_dpo_runs_with_every_recipe_and_raises_the_margin(tmp_path, tiny_model, recipe):
    from workbench.train.trainer import train

    if recipe == "qlora":
        pytest.importorskip("bitsandbytes")
    rows = [{**GOOD, "chosen": f"<ref>the red square</ref><box>(0,0),({100 + i},500)</box>"} for i in range(4)]
    result = train(load_run_config(dpo_config(tmp_path, tiny_model, write_pairs(tmp_path / "d", rows), recipe)))
    assert result.status == "completed" and result.global_step == 3
    logged = [m for m in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3]
    for m in logged:
        assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"], abs=1e-5)
        assert 0 <= m["rewards/accuracies"] <= 1
    # step 1: the adapters start as the base (LoRA B = 0) -- rewards 0, loss log 2
    if recipe != "all3":  # all3 also trains the resampler's query in place, which starts as the base too
        assert logged[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"]
    run = json.loads((result.output_dir / "workbench_run.json").read_text())
    assert run["config"]["method"] == "dpo" and run["method"]["pairs"] == 4


def test_dpo_init_from_an_sft_run_and_grounding_eval(tmp_path, tiny_model, toy_data):
    """dpo.init_from continues an SFT adapter (step 1's policy is the SFT model: rewards are not 0)."""
    from tests.train.conftest import write_run_config
    from workbench.demo.synthetic import make_shapes_dataset
    from workbench.train.trainer import train

    sft = train(load_run_config(write_run_config(tmp_path / "sft", tiny_model, toy_data, "lora", eval_data=False,
                                                 max_steps=2)))
    shapes = make_shapes_dataset(tmp_path / "shapes", 2, shapes_per_image=(1, 1), seed=5)
    path = dpo_config(tmp_path, tiny_model, write_pairs(tmp_path / "d", [GOOD, GOOD]), "lora",
                      {"init_from": str(sft.output_dir)}, max_steps=2, save_steps=2,
                      eval_grounding={"data": [str(shapes)], "every": 2, "max_samples": 2, "images": 0,
                                      "max_new_tokens": 8})
    result = train(load_run_config(path))
    logged = read_metrics(result.output_dir / "metrics.jsonl")
    first = next(m for m in logged if "loss" in m)
    assert first["rewards/chosen"] != 0 and first["loss"] != pytest.approx(math.log(2), abs=1e-4)
    assert any("eval_grounding_acc@0.5" in m for m in logged)


def test_dpo_evaluates_held_out_pairs(tmp_path, tiny_model):
    """data.eval with preference pairs: the DPO loss and reward statistics on them, as eval_*."""
    from workbench.train.trainer import train

    rows = [{**GOOD, "chosen": f"<ref>the red square</ref><box>(0,0),({100 + i},500)</box>"} for i in range(4)]
    path = dpo_config(tmp_path, tiny_model, write_pairs(tmp_path / "d", rows), "lora", max_steps=2, eval_steps=2,
                      save_steps=2)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["eval"] = str(write_pairs(tmp_path / "d", rows[:2], "held.jsonl"))
    path.write_text(yaml.safe_dump(raw))
    result = train(load_run_config(path))
    evals = [m for m in read_metrics(result.output_dir / "metrics.jsonl") if "eval_loss" in m]
    assert len(evals) == 1 and evals[0]["step"] == 2
    assert evals[0]["eval_rewards/margins"] == pytest.approx(
        evals[0]["eval_rewards/chosen"] - evals[0]["eval_rewards/rejected"], abs=1e-5)
    trained = [m for m in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in m]
    assert all(not any(k.startswith("eval_") for k in m) for m in trained)


def test_data_check_reads_a_preference_file(tmp_path, tiny_ref_dir, capsys):
    from workbench.cli.main import main

    path = write_pairs(tmp_path, [GOOD, GOOD])
    assert main(["data", "check", str(path), "--model", str(tiny_ref_dir)]) == 0
    assert "2 preference records read, 0 bad; 2 pairs" in capsys.readouterr().out
    write_pairs(tmp_path, [GOOD, {**GOOD, "rejected": GOOD["chosen"]}])
    assert main(["data", "check", str(path)]) == 2
    out = capsys.readouterr()
    assert f"file {path}, line 2, record 1, field 'rejected': equal to chosen" in out.out + out.err

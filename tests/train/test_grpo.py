"""GRPO (issue 20): the loss against a hand computation, the config, and short runs on shapes data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from workbench.errors import ConfigError, WorkbenchError
from workbench.train import grpo
from workbench.train.callbacks import read_metrics
from workbench.train.config import load_run_config

# ---- the maths on fixed numbers ------------------------------------------------------------------

EPS = 0.2


def hand_token_loss(logp: float, old: float, ref: float, adv: float, beta: float) -> tuple[float, float, bool]:
    """One token's -min(r A, clip(r) A) + beta k3, written out with floats."""
    r = math.exp(logp - old)
    r_clip = min(max(r, 1 - EPS), 1 + EPS)
    kl = math.exp(ref - logp) - (ref - logp) - 1
    return -min(r * adv, r_clip * adv) + beta * kl, kl, r_clip * adv < r * adv


# (logp, old) per token: ratio inside, above 1+eps, below 1-eps; advantage sign decides which clip bites
TOKENS = [(-1.0, -1.1), (-0.5, -1.0), (-2.0, -1.5)]   # ratios 1.105, 1.649, 0.607
REF = [-1.2, -0.7, -1.9]


@pytest.mark.parametrize("adv,beta,clipped", [
    (1.5, 0.0, [False, True, False]),    # A > 0: only the ratio above 1+eps is clipped
    (-0.8, 0.0, [False, False, True]),   # A < 0: only the ratio below 1-eps is clipped
    (1.5, 0.1, [False, True, False]),    # the KL term added
    (0.0, 0.5, [False, False, False]),   # no advantage: the loss is the KL alone
])
def test_policy_loss_equals_hand_computation(adv, beta, clipped):
    # two answers: the first has the three tokens, the second only the first (mask), with -adv
    logp = torch.tensor([[t[0] for t in TOKENS], [TOKENS[0][0], 0.0, 0.0]], dtype=torch.float64)
    old = torch.tensor([[t[1] for t in TOKENS], [TOKENS[0][1], 0.0, 0.0]], dtype=torch.float64)
    ref = torch.tensor([REF, [REF[0], 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    parts = grpo.policy_loss(logp, old, torch.tensor([adv, -adv], dtype=torch.float64), mask,
                             epsilon=EPS, beta=beta, ref_logp=ref)

    row1 = [hand_token_loss(lp, o, r, adv, beta) for (lp, o), r in zip(TOKENS, REF)]
    row2 = hand_token_loss(TOKENS[0][0], TOKENS[0][1], REF[0], -adv, beta)
    expected = (sum(t[0] for t in row1) / 3 + row2[0]) / 2   # per answer mean, then mean over answers
    assert parts.loss.item() == pytest.approx(expected, abs=1e-12)
    kls = [t[1] for t in row1] + [row2[1]]
    assert parts.kl.item() == pytest.approx(sum(kls) / 4, abs=1e-12)
    assert [t[2] for t in row1] == clipped
    assert parts.clip_fraction.item() == pytest.approx((sum(clipped) + row2[2]) / 4)


def test_ratio_one_gives_the_policy_gradient():
    """On a rollout's first step (old = logp detached) the loss is -A and its gradient is -A/|o| d logp."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    parts = grpo.policy_loss(logp, logp.detach(), adv, mask, epsilon=EPS)
    parts.loss.backward()
    assert parts.loss.item() == pytest.approx(-(2.0 - 1.0) / 2)
    assert logp.grad.flatten().tolist() == pytest.approx([-2.0 / 2 / 2, -2.0 / 2 / 2, 1.0 / 2, 0.0])


@pytest.mark.parametrize("rewards,expected", [
    ([1.0, 0.0, 0.5, 0.5], None),            # hand formula below
    ([0.3, 0.3, 0.3, 0.3], [0, 0, 0, 0]),    # all alike: no signal
])
def test_group_advantages(rewards, expected):
    adv = grpo.group_advantages(torch.tensor(rewards), group_size=2).tolist()
    if expected is None:
        std = math.sqrt(((1 - 0.5) ** 2 + (0 - 0.5) ** 2) / 1)  # unbiased, n - 1 = 1
        expected = [0.5 / (std + grpo.ADV_EPS), -0.5 / (std + grpo.ADV_EPS), 0.0, 0.0]
    assert adv == pytest.approx(expected, abs=1e-6)


def test_a_group_scored_alike_gets_exactly_zero():
    """The trainer drops such groups by testing the advantage for 0; a float mean of 8 x 0.1 is
    not 0.1, so (r - mean) alone would leave a tiny nonzero advantage."""
    rewards = torch.full((8,), 0.1)
    assert (rewards - rewards.mean()).abs().max() > 0
    assert grpo.group_advantages(rewards, group_size=8).tolist() == [0.0] * 8


def test_completion_mask_keeps_the_stop_token_and_drops_the_padding():
    rows = torch.tensor([[5, 6, 9, 0, 0], [5, 9, 9, 9, 9], [5, 6, 7, 8, 4]])
    assert grpo.completion_mask(rows, {9}).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


@pytest.mark.parametrize("name,answer,value", [
    ("iou", "<ref>the red square</ref><box>(0,0),(500,500)</box>", 1.0),
    ("iou", "<ref>the red square</ref><box>(0,0),(500,999)</box>", 2500 / 4995),  # 50 x 99.9 px
    ("acc@0.5", "<ref>the red square</ref><box>(0,0),(500,999)</box>", 1.0),
    ("acc@0.5", "<ref>the red square</ref><box>(0,0),(400,999)</box>", 0.0),
    ("format", "<box>(0,0),(400,999)</box>", 1.0),
    ("format", "<box>(400,0),(0,999)</box>", 0.0),   # inverted: not a usable box
    ("format", "nothing", 0.0),
])
def test_builtin_rewards(name, answer, value):
    from workbench.eval.grounding import Query
    from workbench.train.rewards import resolve_reward

    query = Query(image="x.png", file=Path("x.png"), phrase="the red square", gt=[(0, 0, 50, 50)])
    assert resolve_reward(name)(answer, query, (100, 100)) == pytest.approx(value)


# ---- log-probabilities with the prompt run once per group ---------------------------------------


def shared_prompt_rollout(model, G: int = 3, T: int = 5):
    """Two left-padded prompts with an image each (different lengths) and G random answers each."""
    from workbench.train.grpo_trainer import Rollout

    start = model.config.visual["image_start_id"]
    gen = torch.Generator().manual_seed(0)
    image = [start, *[start + 2] * 256, start + 1]
    prompts = [[5, 6, *image, 7, 8, 9], [11, *image, 12]]
    P, B = max(map(len, prompts)), len(prompts)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    size = model.config.visual["image_size"]
    return Rollout(prompt_ids=ids, prompt_mask=mask, pixel_values=torch.randn(B, 3, size, size, generator=gen),
                   completions=torch.randint(20, 400, (B * G, T), generator=gen), mask=torch.ones(B * G, T),
                   advantages=torch.zeros(B * G), old_logp=None, ref_logp=None, stats={})


def full_logprobs(model, r, G: int):
    """The plain way: every answer's row holds its whole prompt and image."""
    ids = torch.cat([r.prompt_ids.repeat_interleave(G, 0), r.completions], 1)
    mask = torch.cat([r.prompt_mask.repeat_interleave(G, 0), torch.ones_like(r.completions)], 1)
    logits = model(ids, attention_mask=mask, pixel_values=r.pixel_values.repeat_interleave(G, 0)).logits
    return grpo.token_logprobs(logits[:, r.prompt_ids.shape[1] - 1:-1], r.completions, 0.7)


def test_generate_groups_equals_generate_on_repeated_prompts(tiny_ref_dir):
    from workbench.model.checkpoint import load_model
    from workbench.train.grpo_trainer import generate_groups

    model = load_model(tiny_ref_dir, dtype=torch.float32).eval()
    r, G = shared_prompt_rollout(model), 3
    greedy = {"do_sample": False, "max_new_tokens": 8, "eos_token_id": 9999, "pad_token_id": 0}
    plain = model.generate(input_ids=r.prompt_ids.repeat_interleave(G, 0),
                           attention_mask=r.prompt_mask.repeat_interleave(G, 0),
                           pixel_values=r.pixel_values.repeat_interleave(G, 0), **greedy)
    shared = generate_groups(model, r.prompt_ids, r.prompt_mask, r.pixel_values, G, **greedy)
    assert shared.shape == (6, r.prompt_ids.shape[1] + 8) and torch.equal(shared, plain)
    assert not torch.equal(shared[0], shared[3])  # the two prompts' answers differ: rows are not mixed up


@pytest.mark.parametrize("mode", ["eval", "train", "train+checkpointing"])
def test_shared_prompt_logprobs_and_grads_equal_the_full_forward(tiny_ref_dir, mode):
    from workbench.model.checkpoint import load_model
    from workbench.train.grpo_trainer import answer_logprobs

    model = load_model(tiny_ref_dir, dtype=torch.float32)
    model.train(mode != "eval")
    if "checkpointing" in mode:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    r, G = shared_prompt_rollout(model), 3
    weights = torch.randn(r.completions.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for fn in (lambda: full_logprobs(model, r, G), lambda: answer_logprobs(model, r, G, 0.7)):
        model.zero_grad(set_to_none=True)
        logp = fn()
        (logp * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        grads[-1]["logp"] = logp.detach()
    full, shared = grads
    torch.testing.assert_close(shared["logp"], full["logp"], atol=1e-5, rtol=1e-5)
    assert set(shared) == set(full) and any("visual" in n for n in full)  # the ViT and the LLM get grads
    for name in full:
        torch.testing.assert_close(shared[name], full[name], atol=1e-5, rtol=1e-4, msg=name)


def test_dropping_groups_without_advantage_keeps_the_loss_and_its_gradient(tiny_ref_dir):
    """With beta = 0 the step runs only the groups with signal; the loss and every gradient are the
    full rollout's (prompt 1's answers all scored alike here)."""
    from dataclasses import replace

    from workbench.model.checkpoint import load_model
    from workbench.train.grpo_trainer import answer_logprobs, informative_groups

    model = load_model(tiny_ref_dir, dtype=torch.float32)
    G = 3
    r = replace(shared_prompt_rollout(model, G), advantages=torch.tensor([1.2, -0.4, -0.8, 0.0, 0.0, 0.0]))
    results = []
    for rollout in (r, informative_groups(r, G)):
        model.zero_grad(set_to_none=True)
        logp = answer_logprobs(model, rollout, G, 1.0)
        loss = grpo.policy_loss(logp, logp.detach(), rollout.advantages, rollout.mask, epsilon=EPS).loss
        (loss * rollout.loss_scale).backward()
        results.append((loss * rollout.loss_scale, {n: p.grad.clone() for n, p in model.named_parameters()
                                                     if p.grad is not None}, rollout))
    (full, full_grads, _), (kept, kept_grads, small) = results
    assert small.prompt_ids.shape[0] == 1 and small.completions.shape[0] == G and small.loss_scale == 0.5
    torch.testing.assert_close(kept, full, atol=1e-7, rtol=1e-6)
    assert set(kept_grads) == set(full_grads) and any("visual" in n for n in full_grads)
    for name in full_grads:
        torch.testing.assert_close(kept_grads[name], full_grads[name], atol=1e-7, rtol=1e-5, msg=name)
    # nothing informative: one group stays (a zero loss with a graph), not an empty batch
    none = informative_groups(replace(r, advantages=torch.zeros(6)), G)
    assert none.completions.shape[0] == G and none.loss_scale == 0.5


def test_grpo_turns_off_dropout_so_train_mode_logprobs_equal_the_sampling_policys(tiny_ref_dir):
    """Answers are sampled in eval mode: the policy's train-mode forward must be the same function."""
    from peft import LoraConfig, get_peft_model

    from workbench.model.checkpoint import load_model
    from workbench.train.grpo_trainer import answer_logprobs, turn_off_dropout

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["c_attn"], init_lora_weights=False)
    model = get_peft_model(load_model(tiny_ref_dir, dtype=torch.float32), config)
    r, lm = shared_prompt_rollout(model.get_base_model()), model.get_base_model()
    with torch.no_grad():
        model.eval()
        sampling = answer_logprobs(lm, r, 3, 1.0)
        model.train()
        assert not torch.allclose(answer_logprobs(lm, r, 3, 1.0), sampling, atol=1e-3)  # dropout is on
        turn_off_dropout(model)
        torch.testing.assert_close(answer_logprobs(lm, r, 3, 1.0), sampling, atol=1e-6, rtol=1e-6)


# ---- config --------------------------------------------------------------------------------------


def config_file(folder: Path, model: Path, data: Path, recipe: str = "lora", grpo_section: dict | None = None,
                method: str = "grpo", **train: object) -> Path:
    from tests.train.conftest import write_recipe

    folder.mkdir(parents=True, exist_ok=True)
    settings = {"output_dir": str(folder / "run"), "lr": 1e-3, "schedule": "constant", "warmup_ratio": 0.0,
                "weight_decay": 0.0, "max_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 1,
                "gradient_checkpointing": False, "save_steps": 2, "logging_steps": 1, "seed": 3,
                "report_to": "none", **train}
    section = None if grpo_section is None and method == "sft" else {"num_generations": 2, "max_new_tokens": 6, "beta": 0.04, "iterations": 2,
               "rewards": {"iou": 1.0, "format": 0.1}, **(grpo_section or {})}
    grpo_keys = {"method": method, **({"grpo": section} if section is not None else {})}
    config = {"model": str(model), "dtype": "float32", "adapter": str(write_recipe(folder, recipe)),
              **grpo_keys,
              "data": {"train": str(data), "max_length": 384, "num_workers": 0}, "train": settings}
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from workbench.demo.synthetic import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), 4, shapes_per_image=(1, 1), seed=5)


@pytest.mark.parametrize("section,key,words", [
    ({"rewards": {"iuo": 1.0}}, "grpo.rewards.iuo", "unknown reward"),
    ({"rewards": {"nosuchmodule_x:fn": 1.0}}, "grpo.rewards.nosuchmodule_x:fn", "cannot load"),
    ({"rewards": {"iou": "high"}}, "grpo.rewards.iou", "finite number"),
    ({"rewards": {}}, "grpo.rewards", "at least one"),
    ({"num_generations": 1}, "grpo.num_generations", ">= 2"),
    ({"epsilon": 1.5}, "grpo.epsilon", "< 1"),
    ({"temprature": 1.0}, "grpo.temprature", "did you mean 'temperature'"),
])
def test_config_errors_name_the_yaml_key(tmp_path, tiny_model, shapes, section, key, words):
    path = config_file(tmp_path, tiny_model, shapes, grpo_section=section)
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert f"{path}: {key}:" in str(err.value) and words in str(err.value)


def test_grpo_section_needs_method_grpo_and_entry_points_load(tmp_path, tiny_model, shapes):
    with pytest.raises(ConfigError, match="grpo: given, but method is 'sft'"):
        load_run_config(config_file(tmp_path, tiny_model, shapes, method="sft", grpo_section={}))
    config = load_run_config(config_file(tmp_path, tiny_model, shapes,
                                         grpo_section={"rewards": {"workbench.train.rewards:iou_reward": 2.0}}))
    assert config.method == "grpo" and config.grpo.rewards == {"workbench.train.rewards:iou_reward": 2.0}
    assert config.to_dict()["method"] == "grpo" and config.to_dict()["grpo"]["num_generations"] == 2


# ---- short runs on the tiny model ----------------------------------------------------------------


def run_grpo(path: Path, resume: bool = False):
    from workbench.train.trainer import train

    return train(load_run_config(path), resume=resume)


def test_grpo_steps_log_metrics_and_resume(tmp_path, tiny_model, shapes):
    path = config_file(tmp_path, tiny_model, shapes, max_steps=2, save_steps=2)
    result = run_grpo(path)
    assert result.status == "completed" and result.global_step == 2
    logged = [m for m in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2]
    for m in logged:
        assert {"reward", "reward_std", "kl", "clip_fraction", "completion_length", "reward_iou"} <= set(m)
        assert 0 <= m["clip_fraction"] <= 1 and m["kl"] >= 0 and 1 <= m["completion_length"] <= 6
    assert (result.output_dir / "loss_curve.png").exists() and (result.output_dir / "checkpoint-2").is_dir()
    # resume: two more steps on the same run folder
    path = config_file(tmp_path, tiny_model, shapes, max_steps=4, save_steps=2, allow_schedule_change_on_resume=True)
    resumed = run_grpo(path, resume=True)
    assert resumed.status == "completed" and resumed.global_step == 4
    steps = [m["step"] for m in read_metrics(resumed.output_dir / "metrics.jsonl") if "loss" in m]
    assert steps == [1, 2, 3, 4]
    run = json.loads((resumed.output_dir / "workbench_run.json").read_text())
    assert run["config"]["method"] == "grpo" and len(run["sessions"]) == 2
    # a GRPO run folder is not resumed as SFT
    sft = config_file(tmp_path, tiny_model, shapes, method="sft", grpo_section=None, max_steps=6)
    with pytest.raises(WorkbenchError, match="was 'grpo'"):
        run_grpo(sft, resume=True)


def length_reward(answer: str, query, size) -> float:
    """A reward the random tiny model's answers differ in (IoU is 0 for all of them): its length."""
    return len(answer) / 10


def test_a_reused_rollout_keeps_the_sampling_policys_logprobs(tmp_path, tiny_model, shapes):
    """iterations: 2 -- step 1 (fresh rollout) has ratio 1, so nothing is clipped; step 2 reuses the
    rollout after an optimizer step at a large rate, so its ratio (against step 1's log-probabilities,
    kept with the rollout) moves past 1 +- epsilon and the clip bites."""
    path = config_file(tmp_path, tiny_model, shapes, max_steps=2, save_steps=10, lr=0.05, batch_size=4,
                       grpo_section={"rewards": {"tests.train.test_grpo:length_reward": 1.0}, "num_generations": 4})
    logged = [m for m in read_metrics(run_grpo(path).output_dir / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2]
    assert logged[0]["clip_fraction"] == 0 and logged[1]["clip_fraction"] > 0
    assert logged[0]["reward"] == logged[1]["reward"]  # the same rollout's answers


def test_qlora_step_trains_the_lora_weights_after_rollouts(tmp_path, tiny_model, shapes):
    pytest.importorskip("bitsandbytes")
    path = config_file(tmp_path, tiny_model, shapes, recipe="qlora", max_steps=2, save_steps=10,
                       grpo_section={"rewards": {"tests.train.test_grpo:length_reward": 1.0}})
    config = load_run_config(path)
    from workbench.train.trainer import train

    result = train(config)
    assert result.status == "completed"
    quantised = [m for m in result.model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantised
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    # LoRA B starts at zero: a step that moved it had gradients through the 4-bit layers
    assert any(p.abs().sum() > 0 for p in lora_b)


# ---- a shortened GRPO on the demo's data ---------------------------------------------------------

SFT_STEPS, GRPO_STEPS = 200, 48


def left_reward(answer: str, query, size) -> float:
    """How far left the answer's box starts (0 without a box): a reward every sampled group spreads
    and GRPO can move in a few dozen steps. Held-out Acc@0.5 needs minutes of GRPO to move beyond
    its noise; BENCHMARKS.md measures that one."""
    from workbench.eval.parse import parse_boxes, pick_box

    box = pick_box(parse_boxes(answer), query.phrase)
    return 0.0 if box is None else 1 - box[0] / 1000


@pytest.mark.slow
def test_grpo_after_a_short_sft_raises_the_mean_reward(tmp_path):
    """The demo's pipeline in small: SFT until the model writes boxes, then GRPO from its adapter."""
    from workbench.demo.runner import DEMO_CONFIG, GRPO_CONFIG, make_demo_base_model
    from workbench.demo.synthetic import make_shapes_dataset
    from workbench.train.trainer import train

    data = make_shapes_dataset(tmp_path / "data", 200, shapes_per_image=(1, 1), seed=1)
    base = make_demo_base_model(tmp_path / "base", seed=0)
    sft = train(load_run_config(DEMO_CONFIG, [f"model={base}", f"data.train={data}", f"train.max_steps={SFT_STEPS}",
                                              f"train.output_dir={tmp_path / 'sft'}"]))
    assert sft.status == "completed"
    result = train(load_run_config(GRPO_CONFIG, [
        f"model={base}", f"data.train={data}", f"grpo.init_from={sft.output_dir}", f"train.max_steps={GRPO_STEPS}",
        f"train.output_dir={tmp_path / 'grpo'}", "train.logging_steps=1", "train.batch_size=8",
        "grpo.rewards={tests.train.test_grpo:left_reward: 1.0}"]))  # otherwise configs/demo-grpo.yaml (lr 1e-4)
    assert result.status == "completed"
    rewards = [m["reward"] for m in read_metrics(result.output_dir / "metrics.jsonl") if "reward" in m]
    third = len(rewards) // 3
    first, last = sum(rewards[:third]) / third, sum(rewards[-third:]) / third
    print(f"mean reward {first:.3f} (first {third} steps) -> {last:.3f} (last {third})")
    assert last > first + 0.1, rewards  # measured 0.304 -> 0.500

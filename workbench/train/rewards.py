"""GRPO rewards: one number per sampled answer, from the answer text and its query's true boxes.

A reward is `fn(answer: str, query: Query, size: tuple[int, int]) -> float` (`size` is the image's
width and height in pixels, for de-normalising the answer's grid box). Built-ins, by name:

  iou      IoU of the answer's box (parse.pick_box, as the evaluation picks it) with the true box
  acc@0.5  1.0 when that IoU is >= 0.5, else 0.0 (the evaluation's Acc@0.5, per answer)
  format   1.0 when the answer holds a usable box (closed, in order, on the grid), else 0.0

Any other name must be a `module:function` entry point with the same signature. The run config's
`grpo.rewards` maps names to weights; the reward of an answer is the weighted sum.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from workbench.eval.metrics import ACC_IOU, score
from workbench.eval.parse import parse_boxes, pick_box
from workbench.schema import Invalid

Reward = Callable[[str, Any, tuple[int, int]], float]


def iou_reward(answer: str, query: Any, size: tuple[int, int]) -> float:
    return score(pick_box(parse_boxes(answer), query.phrase), query.gt, *size, ref=query.phrase, answer=answer).iou


def acc_reward(answer: str, query: Any, size: tuple[int, int]) -> float:
    return float(iou_reward(answer, query, size) >= ACC_IOU)


def format_reward(answer: str, query: Any, size: tuple[int, int]) -> float:
    return float(pick_box(parse_boxes(answer), query.phrase) is not None)


BUILTINS: dict[str, Reward] = {"iou": iou_reward, "acc@0.5": acc_reward, "format": format_reward}


def resolve_reward(name: str) -> Reward:
    """A built-in by name or a `module:function` entry point; raises LookupError saying why not."""
    if name in BUILTINS:
        return BUILTINS[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise LookupError(f"unknown reward; the built-ins are {', '.join(BUILTINS)}, or give module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise LookupError(f"cannot load the entry point ({err})") from None
    if not callable(fn):
        raise LookupError(f"{name} is not a function")
    return fn


def check_reward_spec(rewards: Mapping[str, Any]) -> None:
    """Every name resolves and every weight is a finite number (raises schema.Invalid at the key)."""
    if not rewards:
        raise Invalid("rewards", "needs at least one reward (e.g. {iou: 1.0})")
    for name, weight in rewards.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight != weight \
                or abs(weight) == float("inf"):
            raise Invalid(f"rewards.{name}", f"the weight must be a finite number, got {weight!r}")
        try:
            resolve_reward(str(name))
        except LookupError as err:
            raise Invalid(f"rewards.{name}", str(err)) from None


def weighted_rewards(rewards: Mapping[str, float], answers: list[str], queries: list[Any],
                     sizes: list[tuple[int, int]]) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted sum per answer, and each named reward's values (for logging)."""
    parts = {name: [float(resolve_reward(name)(a, q, s)) for a, q, s in zip(answers, queries, sizes)]
             for name in rewards}
    total = [sum(float(rewards[name]) * parts[name][i] for name in rewards) for i in range(len(answers))]
    return total, parts

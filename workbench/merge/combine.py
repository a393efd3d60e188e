"""Combine several LoRA adapters into one, module by module, with PEFT's own combination maths.

`PeftModel.add_weighted_adapter` needs every adapter loaded onto the whole model. Here each
targeted module's combined A and B are built from the adapter files alone, before the base is
streamed, by the code PEFT runs for that module:

* linear, ties, dare_linear, dare_ties, magnitude_prune: PEFT's
  `LoraModel._generalized_task_arithmetic_weighted_adapter` (A and B combined separately by
  `peft.utils.merge_utils`, weight x scaling split as a square root onto A and B);
* svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd:
  `LoraModel._svd_generalized_task_arithmetic_weighted_adapter` (the weighted deltas combined,
  then cut to the new rank by SVD);
* cat: A rows and B columns stacked, A times weight x scaling. add_weighted_adapter does this
  inline, so its three lines are repeated in `_cat`.

Both helper methods read only the layer they are handed (`self` is unused), so they run on
`_Layer`, a stand-in holding one module's A, B and scaling per adapter. The combined adapter is
the one PEFT makes: r = lora_alpha = the new rank and every other option from the first adapter,
so its scaling is 1 (sqrt(r) when the first adapter has use_rslora: PEFT keeps that flag).
tests/merge/test_combine.py compares the result with add_weighted_adapter + merge_and_unload.

Random methods (dare_*): PEFT draws each pruning mask from torch's global generator, module by
module in the model's module order, the A masks then the B masks, adapters in the given order.
`combine_adapters` visits the modules in the same order from `torch.manual_seed(seed)` (in a
forked RNG state: the caller's stream is left as it was). CUDA tensors draw from CUDA's
generator, so a seed fixes the result per device type.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from workbench.errors import CheckpointError, WorkbenchError, nearest
from workbench.merge.adapter import Adapter, LoraDelta

METHODS = ("cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
           "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
# Methods that add A and B matrices entry by entry: adapters meeting at a module need one rank there.
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING = tuple(m for m in METHODS if m.startswith(("ties", "dare", "magnitude")))
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class Combine:
    """How several adapters become one (`--combine`, `--weights`, `--density`, ...)."""

    method: str = "cat"
    weights: tuple[float, ...] | None = None  # one per adapter, in order; None: 1.0 each
    density: float | None = None  # the fraction kept by ties / dare / magnitude_prune
    majority_sign_method: str = "total"
    svd_rank: int | None = None  # *svd: the new rank (default: the largest adapter rank)
    seed: int = 0  # dare_*: the pruning masks' seed

    def check(self, n_adapters: int) -> None:
        """Refuse settings that do not fit the method or the adapters, naming the flag."""
        if self.method not in METHODS:
            raise WorkbenchError(f"--combine: unknown method '{self.method}'; {nearest(self.method, METHODS)}")
        if self.weights is not None and len(self.weights) != n_adapters:
            raise WorkbenchError(f"--weights: {len(self.weights)} weights for {n_adapters} adapters; "
                                 "give one per --adapter, in the same order")
        if self.weights is not None and not all(math.isfinite(w) for w in self.weights):
            raise WorkbenchError(f"--weights: {list(self.weights)} must be finite numbers")
        if self.method in PRUNING and self.density is None:
            raise WorkbenchError(f"--density: --combine {self.method} prunes; give the fraction to keep, e.g. 0.5")
        if self.method not in PRUNING and self.density is not None:
            raise WorkbenchError(f"--density: only {', '.join(PRUNING)} prune; --combine {self.method} does not")
        if self.density is not None and not 0 < self.density <= 1:
            raise WorkbenchError(f"--density: must be in (0, 1], got {self.density}")
        if self.majority_sign_method not in SIGN_METHODS:
            raise WorkbenchError(f"--majority-sign: '{self.majority_sign_method}'; valid: {', '.join(SIGN_METHODS)}")
        if self.svd_rank is not None and (not self.method.endswith("svd") or self.svd_rank < 1):
            raise WorkbenchError(f"--svd-rank: a rank >= 1 for the *svd methods, got {self.svd_rank} "
                                 f"with --combine {self.method}")

    def weights_for(self, n_adapters: int) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * n_adapters

    def to_dict(self) -> dict:
        return asdict(self)


def combine_adapters(adapters: list[Adapter], combine: Combine, order: list[str], *, force: bool = False,
                     device: str | torch.device = "cpu") -> Adapter:
    """One adapter whose every module is PEFT's combination of the adapters' A and B there.

    `order` lists the base's keys in the model's module order (the order PEFT draws dare's masks
    in). Everything is checked before anything is computed; nothing is written.
    """
    combine.check(len(adapters))
    # PEFT: "if there is only one adapter, we can only use linear merging".
    method = "linear" if len(adapters) == 1 else combine.method
    check_combinable(adapters, method, force)
    weights = combine.weights_for(len(adapters))
    new_rank = new_adapter_rank(adapters, method, combine.svd_rank)
    config = combined_config(adapters, new_rank)
    scale = new_rank / math.sqrt(new_rank) if config.get("use_rslora") else 1.0  # PEFT's lora_alpha / r
    position = {key: i for i, key in enumerate(order)}
    keys = sorted({k for a in adapters for k in a.deltas}, key=lambda k: (position.get(k, len(position)), k))
    label = "the combination of " + ", ".join(str(a.path) for a in adapters)
    result = Adapter(adapters[0].path, adapters[0].weights_file, config, label=label)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(combine.seed)
        for key in keys:
            parts = [(f"a{i}", w, a.deltas[key]) for i, (a, w) in enumerate(zip(adapters, weights, strict=True))
                     if key in a.deltas]
            parts = [(name, w, _on(d, device)) for name, w, d in parts]
            A, B = _combine_module(method, parts, combine, new_rank)
            first = parts[0][2]
            result.deltas[key] = LoraDelta(first.module, A, B, A.shape[0], float(new_rank), scale * first.factor,
                                           first.embedding, factor=first.factor)
    for a in adapters:
        result.replacements.update(a.replacements)
    return result


def check_combinable(adapters: list[Adapter], method: str, force: bool = False) -> None:
    """Refuse, with the adapter's folder and the reason, what the method cannot combine."""
    _same_base(adapters, force)
    owner: dict[str, Adapter] = {}
    for a in adapters:
        for d in a.deltas.values():
            if d.magnitude is not None or d.lora_bias:
                kind = "DoRA" if d.magnitude is not None else "lora_bias"
                raise CheckpointError(f"{a.path}: {kind} adapters cannot be combined (PEFT's add_weighted_adapter "
                                      f"makes plain LoRA); merge it alone")
            if method.endswith("svd") and d.A.dim() != 2:
                raise CheckpointError(f"{a.path}: '{d.module}' is a Conv2d LoRA, which --combine {method} cannot "
                                      "cut by SVD here; use cat or linear")
        for key in a.replacements:
            other = owner.get(key) or next((b for b in adapters if key in b.deltas), None)
            if other is not None:
                raise CheckpointError(f"{a.path}: trains '{key}' whole, and so does {other.path} (or it has LoRA "
                                      "there); such tensors cannot be combined")
            owner[key] = a
    if method in SAME_RANK:
        _same_ranks(adapters, method)


def _same_base(adapters: list[Adapter], force: bool) -> None:
    recorded = [(a, fingerprint_of(a)) for a in adapters]
    recorded = [(a, f) for a, f in recorded if f is not None]
    for a, f in recorded[1:]:
        if f != recorded[0][1] and not force:
            raise CheckpointError(f"{a.run_record_file}: trained on a different base than {recorded[0][0].path} "
                                  f"(base fingerprints differ in {recorded[0][0].run_record_file}); "
                                  "pass --force to combine anyway")


def fingerprint_of(adapter: Adapter) -> dict | None:
    """The base fingerprint the adapter's run record holds, or None."""
    record = adapter.run_record or {}
    return (record.get("base_model") or {}).get("fingerprint", record.get("base_fingerprint"))


def _same_ranks(adapters: list[Adapter], method: str) -> None:
    for key in sorted({k for a in adapters for k in a.deltas}):
        there = [(a, a.deltas[key]) for a in adapters if key in a.deltas]
        for a, d in there[1:]:
            if d.A.shape != there[0][1].A.shape:
                raise CheckpointError(
                    f"{a.path}: '{d.module}' has rank {d.rank}, {there[0][0].path} rank {there[0][1].rank}; "
                    f"--combine {method} adds A and B matrices and needs one rank (cat and svd take any)")


def new_adapter_rank(adapters: list[Adapter], method: str, svd_rank: int | None) -> int:
    """The combined adapter's r, as add_weighted_adapter sets it from each adapter's largest rank."""
    ranks = [max([a.config["r"], *(a.config.get("rank_pattern") or {}).values()]) for a in adapters]
    if method == "cat":
        return sum(ranks)
    if method.endswith("svd"):
        return svd_rank or max(ranks)
    return max(ranks)  # PEFT asks for one r here; modules are checked one by one instead (_same_ranks)


def combined_config(adapters: list[Adapter], new_rank: int) -> dict:
    """PEFT's `replace(first adapter's config, r=, lora_alpha=, target_modules=union, patterns={})`;
    modules_to_save is the union too (PEFT keeps the first adapter's)."""
    config = dict(adapters[0].config)
    targets = [a.config.get("target_modules") for a in adapters]
    if all(isinstance(t, list | tuple | set) for t in targets):
        union: list | str = sorted({m for t in targets for m in t})
    else:  # PEFT joins regex strings; a list becomes the regex of its names (PEFT's suffix match)
        union = "|".join(f"({t})" if isinstance(t, str) else
                         r"(.*\.)?(" + "|".join(re.escape(m) for m in sorted(t or [])) + ")" for t in targets)
    saved = sorted({m for a in adapters for m in a.config.get("modules_to_save") or []})
    config.update(r=new_rank, lora_alpha=new_rank, target_modules=union, rank_pattern={}, alpha_pattern={},
                  modules_to_save=saved or None)
    return config


def _on(delta: LoraDelta, device: torch.device) -> LoraDelta:
    """The delta's A and B as float32 on the merge's device (the maths' precision)."""
    return LoraDelta(delta.module, delta.A.to(device, torch.float32), delta.B.to(device, torch.float32), delta.rank,
                     delta.alpha, delta.scale, delta.embedding, factor=delta.factor)


class _Layer:
    """What PEFT's two combination helpers read from a LoRA layer: A, B and scaling per adapter."""

    fan_in_fan_out = False  # refused at read time (adapter.UNSUPPORTED_OPTIONS)

    def __init__(self, parts: list[tuple[str, float, LoraDelta]]):
        self.lora_A, self.lora_B, self.lora_embedding_A, self.lora_embedding_B = {}, {}, {}, {}
        self.scaling = {name: d.scale / d.factor for name, _, d in parts}  # PEFT's own, without the MHA factor
        self.deltas = {name: d for name, _, d in parts}
        for name, _, d in parts:
            if d.embedding:  # PEFT keeps embedding LoRA as bare parameters, linear LoRA as layers
                self.lora_embedding_A[name], self.lora_embedding_B[name] = d.A, d.B
            else:
                self.lora_A[name], self.lora_B[name] = SimpleNamespace(weight=d.A), SimpleNamespace(weight=d.B)

    def get_delta_weight(self, name: str) -> torch.Tensor:
        # PEFT's Linear / MultiheadAttention / Embedding get_delta_weight: scaling * B @ A,
        # transposed for an embedding (its LoRA stores W^T's factors).
        d = self.deltas[name]
        delta = (d.B.flatten(1) @ d.A.flatten(1)) * self.scaling[name]
        return delta.T if d.embedding else delta


def _combine_module(method: str, parts: list[tuple[str, float, LoraDelta]], combine: Combine,
                    new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one module's combined LoRA, by the code add_weighted_adapter runs for it."""
    names, weights = [name for name, _, _ in parts], [w for _, w, _ in parts]
    layer = _Layer(parts)
    if method == "cat":
        return _cat(layer, names, weights)
    # imported here: importing PEFT takes seconds, and a plain merge needs none of it
    from peft.tuners.lora.model import LoraModel

    if method.endswith("svd"):
        A, B = LoraModel._svd_generalized_task_arithmetic_weighted_adapter(
            None, method, names, weights, new_rank, layer, None, None, combine.density,
            combine.majority_sign_method)
        return A.contiguous(), B.contiguous()
    A, B = LoraModel._generalized_task_arithmetic_weighted_adapter(
        None, method, names, weights, layer, combine.density, combine.majority_sign_method)
    return A, B


def _cat(layer: _Layer, names: list[str], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    # add_weighted_adapter's cat branch: A_i * weight_i * scaling_i stacked, B_i side by side.
    loras_A, loras_B = [], []
    for name, weight in zip(names, weights, strict=True):
        if name in layer.lora_A:
            A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
        else:
            A, B = layer.lora_embedding_A[name], layer.lora_embedding_B[name]
        loras_A.append(A.data * weight * layer.scaling[name])
        loras_B.append(B.data)
    return torch.cat(loras_A, dim=0), torch.cat(loras_B, dim=1)


def model_key_order(base_dir: Path) -> list[str]:
    """The base's keys in the model's module order: the order PEFT visits LoRA layers in."""
    from workbench.model.config import load_config
    from workbench.model.modeling import QWenLMHeadModel

    with torch.device("meta"):
        model = QWenLMHeadModel(load_config(base_dir))
    return list(model.state_dict())

"""Merge a LoRA adapter into the base weights, streaming shard by shard (`workbench merge`)."""

from workbench.merge.merge import merge_adapter

__all__ = ["merge_adapter"]

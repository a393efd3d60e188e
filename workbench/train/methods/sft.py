"""`method: sft` (the default): supervised fine-tuning on conversations; `Method`'s defaults."""

from __future__ import annotations

from workbench.train.methods.base import Method

METHOD = Method()

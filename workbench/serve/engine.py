"""The batching scheduler: one thread runs the model; requests become rows of a running batch.

Rows that arrive together (within `batch_wait_s` of an idle engine) are left-padded into one
batch and prefilled in one forward; the batch then decodes one token per row per forward with
the KV cache, and each row stops on its own (a stop id, a stop string, max_tokens, a cancel):
it leaves the batch and its cache rows are dropped. A row that arrives while a batch runs joins
it at the next step when it fits: its prompt is left-padded to the cache's length and prefilled
alone, and the two caches are concatenated row-wise.

Every row's answer is the one it gets alone. Qwen's RoPE counts along the padded row, and
attention only sees position differences, so left padding moves nothing; the dynamic NTK factor
and logn scaling depend on absolute lengths past the training length (`seq_length`), so rows
share a batch only while the batch's width plus its longest answer stays within it (a longer
request runs alone, as it would anyway). A row that cannot join waits for the batch to end, and
while it waits nobody joins ahead of it.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from workbench.model.modeling import kv_cache
from workbench.serve.models import ServedModel

log = logging.getLogger("workbench.serve")


class QueueFull(Exception):
    """The bounded queue has no room for the request (the server answers 503)."""


GREEDY_BELOW = 1e-4  # a temperature this small is greedy (logits / temperature would overflow)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0     # 0 (or below GREEDY_BELOW): greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(eq=False)
class Row:
    """One choice of one request. `emit` is called from the engine thread with
    ("delta", text), ("done", finish_reason) or ("error", message)."""

    ids: list[int]
    pixel_values: torch.Tensor | None     # [k,3,S,S], one per image span of `ids`, in order
    adapter: str | None
    sampling: Sampling
    emit: Callable[[tuple], None]
    key: str = ""
    tokens: list[int] = field(default_factory=list)
    text: str = ""                        # the answer so far, as emitted
    finish: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None


class Engine:
    def __init__(self, served: ServedModel, *, max_batch: int = 8, max_queue: int = 64,
                 batch_wait_s: float = 0.01):
        self.served, self.tokenizer = served, served.tokenizer
        self.max_batch, self.max_queue, self.batch_wait_s = max_batch, max_queue, batch_wait_s
        self.seq_length = served.base.config.seq_length
        self.device = next(served.model.parameters()).device
        self.stop_ids = {self.tokenizer.im_end_id, self.tokenizer.im_start_id, self.tokenizer.eod_id}
        self._pending: list[Row] = []
        self._running: list[Row] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = {"batches": 0, "rows": 0, "joined": 0, "cancelled": 0, "max_rows": 0, "mixed_batches": 0}

    # ---- the request side (any thread) -----------------------------------------------------------

    def submit(self, rows: list[Row]) -> None:
        """Queue the rows of one request, all or none; QueueFull when the queue has no room."""
        for row in rows:
            row.key = self.served.batch_key(row.adapter)
            if row.sampling.temperature >= GREEDY_BELOW:
                row.generator = torch.Generator(self.device)
                seed = row.sampling.seed if row.sampling.seed is not None else secrets.randbits(63)
                row.generator.manual_seed(seed)
        with self._cond:
            if len(self._pending) + len(rows) > self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._pending)} rows are queued (--max-queue "
                                f"{self.max_queue}); retry later")
            self._pending.extend(rows)
            self._cond.notify()

    def cancel(self, rows: list[Row]) -> None:
        """The client went away: queued rows leave the queue, running rows leave at the next step."""
        with self._cond:
            for row in rows:
                if row.finish is None and not row.cancelled:
                    row.cancelled = True
                    self.stats["cancelled"] += 1
            self._pending = [r for r in self._pending if not r.cancelled]

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="workbench-serve-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        for row in self._pending + self._running:
            row.emit(("error", "the server is shutting down"))

    # ---- the engine thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        batch: Batch | None = None
        while True:
            with self._cond:
                while not self._stopping and not self._pending and batch is None:
                    self._cond.wait()
                if self._stopping:
                    return
            if batch is None:
                time.sleep(self.batch_wait_s)  # let the requests that arrive together gather
            rows = self._take(batch)
            try:
                with torch.inference_mode():
                    if rows:
                        batch = settle(self._prefill(rows, batch))
                    if batch is not None:
                        batch = settle(self._step(batch))
            except Exception as err:  # a bug or out of memory: fail these rows, keep serving
                log.exception("generation failed")
                for row in (batch.rows if batch else []) + rows:
                    if row.finish is None and not row.cancelled:
                        row.finish = "error"
                        row.emit(("error", f"generation failed ({type(err).__name__}); see the server log"))
                batch = None
            with self._cond:
                self._running = batch.rows if batch else []

    def _take(self, batch: Batch | None) -> list[Row]:
        """Pending rows for a new batch (FIFO, the oldest row's key) or to join `batch`."""
        with self._cond:
            self._pending = [r for r in self._pending if not r.cancelled]
            taken: list[Row] = []
            free = self.max_batch - (len(batch.rows) if batch else 0)
            for row in self._pending:
                if len(taken) == free:
                    break
                if batch is not None:
                    if not self._can_join(row, batch):
                        break  # nobody overtakes a row that waits for this batch to end
                elif taken and (row.key != taken[0].key or not self._fits([*taken, row])):
                    continue
                taken.append(row)
            self._pending = [r for r in self._pending if r not in taken]
            return taken

    def _fits(self, rows: list[Row]) -> bool:
        width = max(len(r.ids) for r in rows)
        return width + max(r.sampling.max_tokens for r in rows) <= self.seq_length

    def _can_join(self, row: Row, batch: Batch) -> bool:
        length = batch.mask.shape[1]
        return row.key == batch.key and len(row.ids) <= length and length + row.sampling.max_tokens <= self.seq_length

    def _forward(self, key: str, rows: list[Row], **inputs):
        extra = self.served.activate(key, [r.adapter for r in rows])
        out = self.served.model(**inputs, **extra, use_cache=True)
        return out.logits[:, -1].float(), kv_cache(out)

    def _prefill(self, rows: list[Row], batch: Batch | None) -> Batch:
        width = batch.mask.shape[1] if batch is not None else max(len(r.ids) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r.ids)) + r.ids for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows], device=self.device)
        pixels = [r.pixel_values for r in rows if r.pixel_values is not None]
        pixel_values = torch.cat(pixels).to(self.device) if pixels else None  # float32, as chat passes them
        logits, cache = self._forward(rows[0].key, rows, input_ids=input_ids, attention_mask=mask,
                                      pixel_values=pixel_values)
        self.stats["rows"] += len(rows)
        new = Batch(rows, cache, mask, rows[0].key)
        self._push(new, self._pick(logits, rows))
        if batch is None:
            self.stats["batches"] += 1
            self.stats["mixed_batches"] += len({r.adapter for r in rows}) > 1
            return new
        self.stats["joined"] += len(rows)
        batch.extend(new)
        return batch

    def _step(self, batch: Batch) -> Batch | None:
        if settle(batch) is None:  # cancelled since the last step
            return None
        self.stats["max_rows"] = max(self.stats["max_rows"], len(batch.rows))
        last = torch.tensor([[r.tokens[-1]] for r in batch.rows], device=self.device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        logits, batch.cache = self._forward(batch.key, batch.rows, input_ids=last, attention_mask=batch.mask,
                                            past_key_values=batch.cache)
        self._push(batch, self._pick(logits, batch.rows))
        return batch

    def _pick(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        """The next token of each row: greedy, or sampled with its temperature / top_p / generator."""
        logits[:, len(self.tokenizer):] = float("-inf")  # vocab_size pads the tokenizer's ids up
        picked = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if row.sampling.temperature >= GREEDY_BELOW:
                picked[i] = sample(logits[i], row.sampling.temperature, row.sampling.top_p, row.generator)
        return picked

    def _push(self, batch: Batch, tokens: list[int]) -> None:
        for row, token in zip(batch.rows, tokens):
            if row.finish is None and not row.cancelled:
                self._advance(row, token)

    def _advance(self, row: Row, token: int) -> None:
        """Add one generated token to a row: emit the new text, or finish the row."""
        row.tokens.append(token)
        stop = "stop" if token in self.stop_ids else None
        generated = row.tokens[:-1] if token in self.stop_ids else row.tokens
        text = self.tokenizer.decode(generated, skip_special_tokens=True, errors="ignore", keep_image_special=True)
        for s in row.sampling.stop:
            cut = text.find(s, max(0, len(row.text) - len(s)))
            if cut >= 0:
                text, stop = text[:cut], "stop"
        if stop is None and len(row.tokens) >= row.sampling.max_tokens:
            stop = "length"
        # Text that may be the start of a stop string is held back until it is known not to be.
        hold = 0 if stop else max((len(s) - 1 for s in row.sampling.stop), default=0)
        shown = text[:len(text) - hold] if hold else text
        if shown.startswith(row.text) and len(shown) > len(row.text):
            row.emit(("delta", shown[len(row.text):]))
            row.text = shown
        if stop:
            row.finish = stop
            row.emit(("done", stop))


def settle(batch: Batch | None) -> Batch | None:
    """Drop the rows that finished or were cancelled; None once no row is left."""
    if batch is not None:
        batch.drop([r for r in batch.rows if r.finish is not None or r.cancelled])
    return batch if batch is not None and batch.rows else None


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from softmax(logits / temperature), limited to the top_p nucleus."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs   # the mass of the tokens ranked above
        sorted_probs[before >= top_p] = 0.0               # the smallest set reaching top_p stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class Batch:
    """The running rows, their KV cache and attention mask (all rows the same length, left-padded)."""

    def __init__(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor, key: str):
        self.rows, self.cache, self.mask, self.key = rows, cache, mask, key

    def drop(self, gone: list[Row]) -> None:
        if not gone:
            return
        keep = [i for i, r in enumerate(self.rows) if r not in gone]
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask[index]
        if keep:
            self.cache.batch_select_indices(index)

    def extend(self, other: Batch) -> None:
        """Append the rows of a batch prefilled at this batch's length (one cache, row-wise)."""
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.rows += other.rows
        self.mask = torch.cat([self.mask, other.mask])

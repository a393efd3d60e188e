"""QWenTokenizer: the release's tiktoken BPE, special tokens and 258-id image spans (docs/qwen-vl.md §2).

A plain class on top of `tiktoken.Encoding` (not a transformers PreTrainedTokenizer, whose
internals transformers 5 reworked). Every id is derived from `qwen.tiktoken`: the special
tokens are numbered upward from the number of mergeable ranks in the release's fixed order,
so the same code serves the release vocabulary (eod 151643) and the tiny one (eod 511).
"""

from __future__ import annotations

import base64
import json
import unicodedata
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Literal

import tiktoken
import torch
from transformers import BatchEncoding

from workbench.atomic import write_bytes, write_json
from workbench.errors import CheckpointError, DataError

VOCAB_FILE = "qwen.tiktoken"
CONFIG_FILE = "tokenizer_config.json"

PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
QUAD_START, QUAD_END = "<quad>", "</quad>"
IMG_START, IMG_END, IMG_PAD = "<img>", "</img>", "<imgpad>"
IMAGE_ST = (REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD)
SPECIAL_TOKENS = (ENDOFTEXT, IMSTART, IMEND, *EXTRAS, *IMAGE_ST)

# An image span is <img>, 256 path-byte/pad ids, </img>. A 256-byte path fills all 256 slots and
# leaves no <imgpad>, which the model needs to find the path's end, so 255 bytes is the real limit.
IMG_TOKEN_SPAN = 256
MAX_IMAGE_PATH_BYTES = IMG_TOKEN_SPAN - 1
RELEASE_MODEL_MAX_LENGTH = 8192


class ImageSpanError(DataError):
    """An `<img>path</img>` span that cannot be encoded (too long, unclosed, special token inside)."""


def load_tiktoken_bpe(path: str | Path) -> dict[bytes, int]:
    """Read `base64(token) rank` lines; ranks must be 0..n-1 and include all 256 single bytes."""
    ranks = {}
    for lineno, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise CheckpointError(f"{path}: line {lineno} is not 'base64 rank': {line[:80]!r}") from err
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} single bytes have no rank (first: {missing[0]})")
    return ranks


def write_tiktoken_bpe(ranks: dict[bytes, int], path: str | Path) -> Path:
    path = Path(path)
    lines = (base64.b64encode(token) + b" " + str(rank).encode() for token, rank in
             sorted(ranks.items(), key=lambda item: item[1]))
    write_bytes(path, b"".join(line + b"\n" for line in lines))
    return path


def write_byte_vocab(path: str | Path, words: Sequence[str] = ()) -> Path:
    """Write a byte-level vocab: byte b at rank b, then one merge chain per word; any UTF-8 text round-trips.

    A word's chain is its prefixes of 2, 3, ... bytes at increasing ranks, so BPE builds the
    word left to right into one token (`" green"`: " g", " gr", ..., " green"), as long as it
    is one piece of the pre-tokenizer (letters with at most one leading space).
    """
    ranks = {bytes([b]): b for b in range(256)}
    for word in words:
        data = word.encode("utf-8")
        for end in range(2, len(data) + 1):
            ranks.setdefault(data[:end], len(ranks))
    return write_tiktoken_bpe(ranks, path)


class QWenTokenizer:
    """Qwen-VL tokenizer: `encode`/`__call__` -> ids, `decode` -> text, release special ids."""

    IMAGE_ST = IMAGE_ST

    def __init__(self, mergeable_ranks: dict[bytes, int], *, model_max_length: int = RELEASE_MODEL_MAX_LENGTH,
                 padding_side: Literal["left", "right"] = "right", errors: str = "replace"):
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = {tok: i for i, tok in enumerate(SPECIAL_TOKENS, start=len(mergeable_ranks))}
        self.encoding = tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.errors = errors
        self._config: dict = {}  # tokenizer_config.json as loaded; save_pretrained writes it back

        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IMSTART]
        self.im_end_id = self.special_tokens[IMEND]
        self.ref_start_id, self.ref_end_id = self.special_tokens[REF_START], self.special_tokens[REF_END]
        self.box_start_id, self.box_end_id = self.special_tokens[BOX_START], self.special_tokens[BOX_END]
        self.quad_start_id, self.quad_end_id = self.special_tokens[QUAD_START], self.special_tokens[QUAD_END]
        self.img_start_id, self.img_end_id = self.special_tokens[IMG_START], self.special_tokens[IMG_END]
        self.img_pad_id = self.special_tokens[IMG_PAD]
        # ref/box/quad open+close: what decode(keep_image_special=True) keeps when skipping specials.
        self.image_special_tokens = {self.special_tokens[t] for t in IMAGE_ST[:6]}
        self.pad_token_id = self.eos_token_id = self.eod_id
        self._id_to_special = {i: tok for tok, i in self.special_tokens.items()}
        self._id_to_bytes = {i: tok for tok, i in mergeable_ranks.items()}

    # ---- files ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *args, **overrides) -> QWenTokenizer:
        """Load `qwen.tiktoken` (+ `tokenizer_config.json` if present) from a model folder.

        Keyword arguments other than model_max_length / padding_side / errors are the loader options
        transformers' AutoTokenizer passes along (`_from_auto`, `trust_remote_code`, ...): ignored.
        """
        overrides = {k: v for k, v in overrides.items() if k in ("model_max_length", "padding_side", "errors")}
        model_dir = Path(model_dir)
        vocab = model_dir / VOCAB_FILE
        if not vocab.is_file():
            raise CheckpointError(f"{model_dir}: no {VOCAB_FILE} (the Qwen-VL tokenizer vocabulary)")
        config = cls._read_config(model_dir / CONFIG_FILE)
        kwargs = {k: config[k] for k in ("model_max_length", "padding_side", "errors") if k in config}
        tok = cls(load_tiktoken_bpe(vocab), **{**kwargs, **overrides})
        tok._config = config
        return tok

    @staticmethod
    def _read_config(path: Path) -> dict:
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: not valid JSON ({err})") from err

    def save_pretrained(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write `qwen.tiktoken` and `tokenizer_config.json` (release keys kept) into `out_dir`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # Keep whatever the loaded config carried (tokenizer_class, auto_map) so the original
        # remote code can still load the folder.
        config = {"tokenizer_class": "QWenTokenizer", **self._config,
                  "model_max_length": self.model_max_length, "padding_side": self.padding_side}
        config_path = out_dir / CONFIG_FILE
        write_json(config_path, config, indent=1)
        return write_tiktoken_bpe(self.mergeable_ranks, out_dir / VOCAB_FILE), config_path

    # ---- sizes ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.encoding.n_vocab

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    # ---- encode ---------------------------------------------------------------------------------

    def encode(self, text: str, allowed_special: Literal["all"] | Collection[str] = "all",
               disallowed_special: Literal["all"] | Collection[str] = ()) -> list[int]:
        """NFC-normalise, BPE-encode, then rewrite every `<img>path</img>` to exactly 258 ids."""
        if allowed_special != "all":
            allowed_special = set(allowed_special)
        ids = self.encoding.encode(unicodedata.normalize("NFC", text), allowed_special=allowed_special,
                                   disallowed_special=disallowed_special)
        return self._encode_image_spans(ids, text)

    def _encode_image_spans(self, ids: list[int], text: str) -> list[int]:
        out, pos = [], 0
        while (start := _find(ids, self.img_start_id, pos)) >= 0:
            end = _find(ids, self.img_end_id, start)
            if end < 0:
                raise ImageSpanError(f"Unclosed image token: {IMG_START} without {IMG_END} in {text[:200]!r}")
            out += ids[pos:start] + self._image_span(ids[start + 1:end])
            pos = end + 1
        return out + ids[pos:]

    def _image_span(self, inner: list[int]) -> list[int]:
        special = [self._id_to_special[i] for i in inner if i in self._id_to_special]
        if special:
            raise ImageSpanError(f"special token {special[0]} inside {IMG_START}..{IMG_END}")
        # Byte b becomes id b (the token at rank b), not the id of the token spelling b (docs/qwen-vl.md §2.4).
        path = self.encoding.decode_bytes(inner)
        if len(path) > IMG_TOKEN_SPAN:
            raise ImageSpanError(
                f"The content in {IMG_START}..{IMG_END} is too long: image path "
                f"{path.decode('utf-8', 'replace')!r} is {len(path)} UTF-8 bytes; "
                f"the limit is {MAX_IMAGE_PATH_BYTES} UTF-8 bytes of path"
            )
        return [self.img_start_id, *path, *[self.img_pad_id] * (IMG_TOKEN_SPAN - len(path)), self.img_end_id]

    def __call__(self, text: str | Sequence[str], padding: bool = False,
                 padding_side: Literal["left", "right"] | None = None,
                 return_tensors: Literal["pt"] | None = None,
                 allowed_special: Literal["all"] | Collection[str] = "all",
                 disallowed_special: Literal["all"] | Collection[str] = ()) -> BatchEncoding:
        """`tok(text).input_ids`; a list of texts gives a batch (pad with eod when `padding=True`)."""
        if isinstance(text, str):
            ids = self.encode(text, allowed_special, disallowed_special)
            return BatchEncoding({"input_ids": ids, "attention_mask": [1] * len(ids)},
                                 tensor_type=return_tensors, prepend_batch_axis=return_tensors is not None)
        rows = [self.encode(t, allowed_special, disallowed_special) for t in text]
        masks = [[1] * len(r) for r in rows]
        if padding:
            width = max(map(len, rows), default=0)
            left = (padding_side or self.padding_side) == "left"
            rows = [_pad(r, width, self.pad_token_id, left) for r in rows]
            masks = [_pad(m, width, 0, left) for m in masks]
        if return_tensors == "pt" and len({len(r) for r in rows}) > 1:
            raise ValueError("texts of different lengths: pass padding=True to get one tensor")
        return BatchEncoding({"input_ids": rows, "attention_mask": masks}, tensor_type=return_tensors)

    # ---- decode ---------------------------------------------------------------------------------

    def decode(self, ids: int | Iterable[int] | torch.Tensor, skip_special_tokens: bool = False,
               errors: str | None = None, keep_image_special: bool = False) -> str:
        """Ids -> text; image spans come back as `<img>path</img>` (docs/qwen-vl.md §2.4).

        Unlike the original, malformed spans and ids past the vocabulary never raise with
        errors="replace" (the workbench rule in docs/qwen-vl.md §2.4): generation can stop anywhere.
        """
        errors = errors or self.errors
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        pieces = self._decode_image_spans(ids, errors)
        if skip_special_tokens:
            pieces = [p for p in pieces if not isinstance(p, int) or p < self.eod_id
                      or (keep_image_special and p in self.image_special_tokens)]
        text, run = [], []
        for piece in pieces:
            if isinstance(piece, int) and 0 <= piece < len(self):
                run.append(piece)
                continue
            text.append(self.encoding.decode(run, errors=errors))
            run = []
            if isinstance(piece, str):
                text.append(piece)
            elif errors == "strict":
                raise ValueError(f"Invalid token for decoding: {piece} (vocabulary has {len(self)} tokens)")
            elif errors == "replace":
                text.append("\ufffd")
        return "".join(text) + self.encoding.decode(run, errors=errors)

    def _decode_image_spans(self, ids: list[int], errors: str) -> list[int | str]:
        """Replace each well-formed `<img> bytes <imgpad>... </img>` by [<img>, path text, </img>]."""
        out: list[int | str] = []
        pos = 0
        while (start := _find(ids, self.img_start_id, pos)) >= 0:
            end = _find(ids, self.img_end_id, start)
            if end < 0:
                break  # generation stopped inside a span: the rest decodes as ordinary tokens
            out += ids[pos:start]
            inner = ids[start + 1:end]
            if self.img_pad_id in inner:
                inner = inner[:inner.index(self.img_pad_id)]
            if all(0 <= i < 256 for i in inner):
                out += [self.img_start_id, bytes(inner).decode("utf-8", errors), self.img_end_id]
            else:  # not a byte span (a merge or a special id inside): leave it as ordinary tokens
                out += ids[start:end + 1]
            pos = end + 1
        return out + ids[pos:]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> bytes | str | list[bytes | str]:
        """Ordinary tokens as bytes, special tokens as str (as the original)."""
        if isinstance(ids, int):
            return self._id_to_special.get(ids) or self._id_to_bytes[ids]
        return [self.convert_ids_to_tokens(i) for i in ids]


def _find(ids: list[int], value: int, start: int) -> int:
    try:
        return ids.index(value, start)
    except ValueError:
        return -1


def _pad(row: list[int], width: int, value: int, left: bool) -> list[int]:
    fill = [value] * (width - len(row))
    return fill + row if left else row + fill

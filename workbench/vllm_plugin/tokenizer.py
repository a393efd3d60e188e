"""The release's tiktoken vocabulary as a `tokenizer.json` that vLLM loads without remote code.

transformers' TikTokenConverter turns `qwen.tiktoken` into a byte-level BPE with the release's
pre-tokenizer pattern; the release's special tokens follow at their own ids, and the NFC
normalisation the release applies before encoding comes first. The ids equal `QWenTokenizer`'s
(tests/vllm compare them). `<ref>`, `</ref>`, `<box>`, `</box>`, `<quad>`, `</quad>` are added as
*non-special* tokens, so answers keep them under vLLM's default `skip_special_tokens=True` and the
workbench's box parser reads vLLM's text unchanged; the ChatML and image tokens are special.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from workbench.atomic import write_json
from workbench.model.tokenizer import (
    ENDOFTEXT,
    IMAGE_ST,
    IMEND,
    IMSTART,
    PAT_STR,
    SPECIAL_TOKENS,
    load_tiktoken_bpe,
)
from workbench.prompt.template import ChatTemplate, load_template
from workbench.user_cache import user_cache

KEPT_IN_TEXT = IMAGE_ST[:6]  # ref/box/quad open and close: part of the answer, never skipped


def export_tokenizer(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write tokenizer.json + tokenizer_config.json for the model folder's qwen.tiktoken into out_dir."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = Path(model_dir) / "qwen.tiktoken"
    fast = TikTokenConverter(vocab_file=str(vocab), pattern=PAT_STR).converted()
    fast.normalizer = normalizers.NFC()
    first = fast.get_vocab_size()
    fast.add_tokens([AddedToken(t, normalized=False, special=t not in KEPT_IN_TEXT) for t in SPECIAL_TOKENS])
    assert fast.token_to_id(SPECIAL_TOKENS[0]) == first, "special tokens must follow the mergeable ranks"
    wrapped = PreTrainedTokenizerFast(tokenizer_object=fast, eos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[0],
                                      model_max_length=8192, clean_up_tokenization_spaces=False)
    wrapped.chat_template = chat_template_jinja(load_template("chatml"))
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))  # a reader never sees half a folder
    try:
        wrapped.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)  # an older export of the same vocabulary
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def chat_template_jinja(template: ChatTemplate) -> str:
    """The chat template (data_templates/chatml.yaml) as the Jinja text vLLM's chat endpoint renders.

    vLLM writes each image of a message as `Picture N: <img></img>` on its own line before the
    message's text, which is the release's list format; the default system turn comes first unless
    the client sends one.
    """
    def turn(role: str, content: str) -> str:
        return f"{json.dumps(template.start(role))} + {content} + {json.dumps(template.turn_end + template.turn_sep)}"

    return ("{%- if messages[0]['role'] != 'system' -%}{{ " + turn("system", json.dumps(template.default_system))
            + " }}{%- endif -%}{%- for m in messages -%}{{ " + json.dumps(template.turn_start.split("{role}")[0])
            + " + m['role'] + " + json.dumps(template.turn_start.split("{role}")[1]) + " + m['content'] + "
            + json.dumps(template.turn_end + template.turn_sep) + " }}{%- endfor -%}"
            + "{%- if add_generation_prompt -%}{{ " + json.dumps(template.start("assistant")) + " }}{%- endif -%}")


def serving_folder(model_dir: str | Path) -> Path:
    """The tokenizer and generation config vLLM serves a model folder with, made once per content.

    `generation_config.json` is the model's with `<|im_end|>` and `<|im_start|>` added to its
    `eos_token_id`: the release's chat stops at them (its stop words), and vLLM stops at every id
    listed there (`--generation-config` points here).
    """
    model_dir = Path(model_dir)
    vocab, generation = model_dir / "qwen.tiktoken", model_dir / "generation_config.json"
    config = json.loads(generation.read_text()) if generation.is_file() else {}
    digest = hashlib.sha256(vocab.read_bytes() + json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    out = user_cache("vllm-serving", digest)
    if not (out / "generation_config.json").is_file():  # written last
        export_tokenizer(model_dir, out)
        n = len(load_tiktoken_bpe(vocab))
        stops = [n + SPECIAL_TOKENS.index(t) for t in (ENDOFTEXT, IMEND, IMSTART)]
        eos = config.get("eos_token_id", stops[0])
        config["eos_token_id"] = list(dict.fromkeys([*(eos if isinstance(eos, list) else [eos]), *stops]))
        write_json(out / "generation_config.json", config)
    return out

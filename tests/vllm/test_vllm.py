"""vLLM with the workbench's plugin answers as the workbench does (greedy tokens and their logprobs),
offline and through its OpenAI server, on the base model, with an LLM-only LoRA adapter, and on the
demo's merged model, whose answers hold boxes."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.vllm.conftest import CPU_MEMORY, TINY_REF, WORKBENCH
from workbench.api import load_model, load_tokenizer
from workbench.eval.parse import parse_boxes
from workbench.model.image_processing import load_image, preprocess
from workbench.model.modeling import kv_cache
from workbench.prompt import make_context

IMAGES = TINY_REF / "images"
NEW_TOKENS = 12

# name -> (query in the list format, history): text, one image, two images, multi-turn chats.
PROMPTS = {
    "text": ([{"text": "What is the capital of France?"}], []),
    "text, long answer asked": ([{"text": "Tell me a story about a helpful assistant and a red triangle."}], []),
    "one image (RGB)": ([{"image": "a.png"}, {"text": "What is in the picture?"}], []),
    "one image (grey)": ([{"image": "d.png"}, {"text": "Describe it."}], []),
    "two images (RGBA, palette)": ([{"image": "b.png"}, {"image": "c.png"}, {"text": "Which one is brighter?"}], []),
    "grounding question": ([{"image": "a.png"}, {"text": "Where is the red square? Answer with its box."}], []),
    "multi-turn with an image": ([{"text": "And the other one?"}],
                                 [([{"image": "a.png"}, {"text": "What is this?"}], "A square.")]),
    "multi-turn with a box in the history": (
        [{"text": "Is it the largest?"}],
        [([{"image": "c.png"}, {"text": "Find the circle."}], "<ref>the circle</ref><box>(120,340),(560,910)</box>")]),
}


def _query(parts: list[dict]) -> list[dict]:
    return [{"image": str(IMAGES / p["image"])} if "image" in p else p for p in parts]


def _images(query: list[dict], history: list) -> list[Path]:
    parts = [p for q, _ in history for p in q] + query
    return [IMAGES / p["image"] for p in parts if "image" in p]


def _collapse_image_spans(ids: list[int], start: int, end: int) -> list[int]:
    """vLLM's prompt holds `<img></img>` per image; its processor puts the 256 image positions back."""
    out, inside = [], False
    for i in ids:
        if i == start:
            inside = True
            out.append(i)
        elif i == end:
            inside = False
            out.append(i)
        elif not inside:
            out.append(i)
    return out


@torch.no_grad()
def workbench_greedy(model, ids: list[int], images: list[Path], n: int = NEW_TOKENS) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities from the workbench's own model, step by step with its KV cache."""
    size = model.transformer.visual.image_size
    pixels = torch.stack([preprocess(load_image(p), size) for p in images]) if images else None
    out = model(input_ids=torch.tensor([ids]), pixel_values=pixels, use_cache=True)
    tokens, logprobs = [], []
    for _ in range(n):
        logp = out.logits[0, -1].float().log_softmax(-1)
        token = int(logp.argmax())
        tokens.append(token)
        logprobs.append(float(logp[token]))
        out = model(input_ids=torch.tensor([[token]]), past_key_values=kv_cache(out), use_cache=True)
    return tokens, logprobs


@pytest.fixture(scope="module")
def reference(tiny_model):
    return load_model(tiny_model, dtype=torch.float32).eval(), load_tokenizer(tiny_model)


def _vllm_greedy(llm, tok, query, history, lora=None) -> tuple[list[int], list[float], list[int]]:
    from vllm import SamplingParams

    _, ids = make_context(tok, _query(query), [(_query(q), a) for q, a in history])
    images = _images(query, history)
    prompt = {"prompt_token_ids": _collapse_image_spans(ids, tok.img_start_id, tok.img_end_id)}
    if images:
        prompt["multi_modal_data"] = {"image": [Image.open(p) for p in images]}
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0,
                            skip_special_tokens=False)
    [out] = llm.generate([prompt], params, lora_request=lora, use_tqdm=False)
    answer = out.outputs[0]
    return list(answer.token_ids), [lp[t].logprob for t, lp in zip(answer.token_ids, answer.logprobs)], ids


@pytest.mark.parametrize("name", PROMPTS)
def test_offline_greedy_tokens_and_logprobs_equal_the_workbench(llm, reference, name):
    model, tok = reference
    query, history = PROMPTS[name]
    tokens, logprobs, ids = _vllm_greedy(llm, tok, query, history)
    want_tokens, want_logprobs = workbench_greedy(model, ids, _images(query, history))
    assert tokens == want_tokens
    assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs)) < 1e-3


def test_llm_lora_adapter_answers_as_the_same_adapter_merged(llm, reference, llm_adapter):
    from vllm.lora.request import LoRARequest

    adapter, merged = llm_adapter
    merged_model = load_model(merged, dtype=torch.float32).eval()
    lora = LoRARequest("tuned", 1, str(adapter))
    changed = 0
    for name in ("text", "one image (RGB)", "two images (RGBA, palette)", "multi-turn with an image"):
        query, history = PROMPTS[name]
        tokens, logprobs, ids = _vllm_greedy(llm, reference[1], query, history, lora=lora)
        want_tokens, want_logprobs = workbench_greedy(merged_model, ids, _images(query, history))
        assert tokens == want_tokens, name
        assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs)) < 1e-3, name
        changed += tokens != workbench_greedy(reference[0], ids, _images(query, history))[0]
    assert changed, "the adapter changes the answers (so the test can tell it was applied)"


def test_the_release_tokenizer_and_the_exported_one_give_the_same_ids(tiny_model, reference):
    from transformers import PreTrainedTokenizerFast

    from workbench.vllm_plugin.tokenizer import serving_folder

    fast, slow = PreTrainedTokenizerFast.from_pretrained(serving_folder(tiny_model)), reference[1]
    golden = json.loads((TINY_REF / "golden.json").read_text())
    texts = [case["text"] for case in golden["case7"]["strings"] if "<img>" not in case["text"]]
    assert len(texts) >= 10
    for text in texts:
        assert fast.encode(text, add_special_tokens=False) == slow.encode(text), text
    answer = "<ref>the cat</ref><box>(12,34),(560,789)</box><|im_end|>"
    assert fast.decode(fast.encode(answer), skip_special_tokens=True) == answer.removesuffix("<|im_end|>")


# ---- the OpenAI server, started the way users start it -----------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_server(demo_run):
    """`workbench serve --engine vllm` on the demo's merged model (from .venv, vLLM from this environment)."""
    port = _free_port()
    env = {**os.environ, "WORKBENCH_VLLM_PYTHON": str(Path(os.sys.executable))}
    cmd = [str(WORKBENCH), "serve", "--engine", "vllm", "--model", str(demo_run / "merged"), "--name", "demo",
           "--port", str(port), "--dtype", "float32", "--vllm-arg=--enforce-eager",
           f"--vllm-arg=--gpu-memory-utilization={CPU_MEMORY}", "--vllm-arg=--max-num-seqs=8"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        try:
            client.models.list()
            break
        except Exception:
            time.sleep(2)
    else:
        pytest.fail("the vLLM server did not start in 300 s")
    yield client
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(60)


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_served_demo_model_answers_the_showcase_question_with_the_workbench_box(demo_server, demo_run):
    example = json.loads((demo_run / "metrics.json").read_text())["example"]
    image = Path(example["image"])
    reply = demo_server.chat.completions.create(
        model="demo", temperature=0, max_tokens=64,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                                               {"type": "text", "text": example["question"]}]}])
    answer = reply.choices[0].message.content
    assert parse_boxes(answer) and answer == example["answer"], (answer, example["answer"])
    assert reply.choices[0].finish_reason == "stop"  # at <|im_end|>, as the release's chat stops


def test_served_tokens_and_logprobs_equal_the_workbench(demo_server, demo_run):
    """Through /v1/chat/completions (token ids returned as `token_id:N`), on the demo model: the
    showcase question (an answer with a box), a text question and a two-turn chat."""
    model, tok = load_model(demo_run / "merged", dtype=torch.float32).eval(), load_tokenizer(demo_run / "merged")
    example = json.loads((demo_run / "metrics.json").read_text())["example"]
    image = Path(example["image"])
    chats = [([{"image": str(image)}, {"text": example["question"]}], []),
             ([{"text": "Hello, who are you?"}], []),
             ([{"text": "Where is it now?"}], [([{"image": str(image)}, {"text": example["question"]}], example["answer"])])]
    for query, history in chats:
        messages = []
        for q, a in [*history, (query, None)]:
            content = [{"type": "image_url", "image_url": {"url": _data_url(Path(p["image"]))}} if "image" in p
                       else {"type": "text", "text": p["text"]} for p in q]
            messages.append({"role": "user", "content": content})
            if a is not None:
                messages.append({"role": "assistant", "content": a})
        reply = demo_server.chat.completions.create(
            model="demo", messages=messages, temperature=0, max_tokens=NEW_TOKENS, logprobs=True,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True, "skip_special_tokens": False})
        served = reply.choices[0].logprobs.content
        tokens = [int(t.token.removeprefix("token_id:")) for t in served]
        _, ids = make_context(tok, query, history)
        want_tokens, want_logprobs = workbench_greedy(model, ids, [Path(p["image"]) for q in [*[h[0] for h in history], query]
                                                                   for p in q if "image" in p])
        assert tokens == want_tokens, messages
        assert max(abs(t.logprob - w) for t, w in zip(served, want_logprobs)) < 1e-3

"""Bad inputs, faults and hostile files through the CLI: each one exit code 2, one line on stderr that
names the file, record, key or argument, no traceback, and no payload of a hostile file runs.

Each case builds its input in a scratch folder next to a shared tiny model and adapter, then runs one
`workbench` command in-process. `{x}` in the arguments is the case's folder, `{m}` the tiny model,
`{a}` a LoRA adapter trained on it, `{d}` a valid grounding data file, `{i}` a valid image.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from workbench.cli.main import main

MARKER = "HOSTILE_PAYLOAD_RAN"


class Payload:
    """Unpickling this would create the marker file: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_pickle(path: Path, marker: Path) -> None:
    """A torch checkpoint whose unpickling runs a shell command (as a real attack would)."""
    torch.save({"weight": Payload(marker)}, path)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A tiny model, a LoRA adapter on it, an image and a valid grounding file."""
    from peft import LoraConfig, get_peft_model

    from workbench import load_model
    from workbench.demo.synthetic import make_shapes_dataset
    from workbench.demo.tiny import make_tiny_model_dir

    root = tmp_path_factory.mktemp("bad-inputs")
    model_dir = make_tiny_model_dir(root / "model")
    peft = get_peft_model(load_model(model_dir), LoraConfig(r=2, target_modules=["c_attn"]))
    peft.save_pretrained(root / "adapter")
    data = make_shapes_dataset(root / "data", 2, shapes_per_image=(1, 1), size_range=(56, 64), name="eval")
    image = next((root / "data" / "images").glob("*.png"))
    return {"m": model_dir, "a": root / "adapter", "d": data, "i": image}


# ---- builders: each writes the bad input into the case folder `x` -------------------------------

def jsonl(name: str, *rows: object) -> Callable[[Path, dict], None]:
    def build(x: Path, s: dict) -> None:
        Image.new("RGB", (40, 30), (9, 9, 9)).save(x / "ok.png")
        (x / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return build


def grounding(image: str, bbox=(1, 1, 10, 10), **extra) -> dict:
    return {"images": [image], "messages": [{"role": "user", "content": "<image>Where is <ref-object>?"},
                                            {"role": "assistant", "content": "<ref-object><bbox>"}],
            "objects": [{"ref": "the thing", "bbox": list(bbox)}], **extra}


def text(name: str, content: str | bytes) -> Callable[[Path, dict], None]:
    def build(x: Path, s: dict) -> None:
        path = x / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return build


def image_file(name: str, make: Callable[[Path], None]) -> Callable[[Path, dict], None]:
    def build(x: Path, s: dict) -> None:
        make(x / name)
        Image.new("RGB", (40, 30)).save(x / "ok.png")
        (x / "d.jsonl").write_text(json.dumps(grounding(name)) + "\n")
    return build


def truncated_jpeg(path: Path) -> None:
    Image.effect_noise((64, 64), 50).convert("RGB").save(path, "JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def bomb_png(path: Path) -> None:
    """A PNG header claiming 100000 x 100000 pixels (a few hundred bytes on disk)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def model_copy(change: Callable[[Path], None]) -> Callable[[Path, dict], None]:
    def build(x: Path, s: dict) -> None:
        shutil.copytree(s["m"], x / "model")
        change(x / "model")
    return build


def adapter_copy(change: Callable[[Path], None]) -> Callable[[Path, dict], None]:
    def build(x: Path, s: dict) -> None:
        shutil.copytree(s["a"], x / "adapter")
        change(x / "adapter")
    return build


def edit_json(name: str, update: Callable[[dict], object]) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        out = update(data)
        (folder / name).write_text(json.dumps(data if out is None else out))
    return change


def nan_weight(file: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        tensors = load_file(folder / file)
        key = next(k for k, v in tensors.items() if v.is_floating_point())
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float("nan")
        save_file(tensors, folder / file)
    return change


def pickled_bin(weights: str, remove: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        (folder / remove).unlink()
        hostile_pickle(folder / weights, folder.parent / MARKER)
    return change


def wider_lora(folder: Path) -> None:
    """The adapter as if trained on a wider base: every lora_A takes 8 more input features."""
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors = {k: torch.zeros(v.shape[0], v.shape[1] + 8) if "lora_A" in k else v for k, v in tensors.items()}
    save_file(tensors, folder / "adapter_model.safetensors")


def run_file(yaml_text: str) -> Callable[[Path, dict], None]:
    def build(x: Path, s: dict) -> None:
        Image.new("RGB", (40, 30)).save(x / "ok.png")
        (x / "t.jsonl").write_text(json.dumps(grounding("ok.png")) + "\n")
        (x / "run.yaml").write_text(yaml_text.format(m=s["m"], x=x))
    return build


RUN = "model: {m}\nadapter: official-lora\ndata: {{train: {x}/t.jsonl, num_workers: 0}}\ntrain: {{output_dir: {x}/run}}\n"
CHECK = ["data", "check"]
CHAT = ["chat", "--model", "{m}", "--device", "cpu", "--max-new-tokens", "2"]
EVAL = ["eval", "grounding", "--model", "{m}", "--device", "cpu", "--max-new-tokens", "2", "--out", "{x}/eval"]
MERGE = ["merge", "--base", "{m}", "--adapter", "{a}", "--out", "{x}/merged"]
NOTHING = None  # no builder needed

# (name, builder, argv, the message's substring; `{x}` etc. are filled in)
CASES = [
    # ---- data records (data check reads every record, decoding images) ---------------------
    ("data file missing", NOTHING, [*CHECK, "{x}/none.jsonl"], "none.jsonl: data file not found"),
    ("unknown data suffix", text("d.csv", "a,b"), [*CHECK, "{x}/d.csv"], "unknown data file type '.csv'"),
    ("unreadable JSON line", jsonl("d.jsonl", "{not json"), [*CHECK, "{x}/d.jsonl"], "record 0: unreadable JSON on line 1"),
    ("record not an object", jsonl("d.jsonl", [1, 2]), [*CHECK, "{x}/d.jsonl"], "a record must be a JSON object"),
    ("no messages", jsonl("d.jsonl", {"hello": 1}), [*CHECK, "{x}/d.jsonl"], "field 'conversations': no 'conversations'"),
    ("unknown role", jsonl("d.jsonl", {"messages": [{"role": "bot", "content": "x"}]}), [*CHECK, "{x}/d.jsonl"],
     "field 'messages[0].role': unknown role 'bot'"),
    ("no assistant turn", jsonl("d.jsonl", {"messages": [{"role": "user", "content": "x"}]}),
     [*CHECK, "{x}/d.jsonl"], "no assistant turn"),
    ("image missing", jsonl("d.jsonl", grounding("nope.png")), [*CHECK, "{x}/d.jsonl"], "image not found"),
    ("image outside the root", jsonl("d.jsonl", grounding("../ok.png")), [*CHECK, "{x}/d.jsonl"],
     "leads outside the image root"),
    ("absolute image path outside", jsonl("d.jsonl", grounding("/etc/hostname")), [*CHECK, "{x}/d.jsonl"],
     "leads outside the image root"),
    ("image URL", jsonl("d.jsonl", grounding("http://example.com/a.png")), [*CHECK, "{x}/d.jsonl"],
     "image URLs are not supported"),
    ("image path too long", jsonl("d.jsonl", grounding("a" * 300 + ".png")), [*CHECK, "{x}/d.jsonl"],
     "UTF-8 bytes; Qwen-VL's image span holds at most 255"),
    ("box outside the image", jsonl("d.jsonl", grounding("ok.png", (1, 1, 50, 10))), [*CHECK, "{x}/d.jsonl"],
     "field 'objects[0].bbox': box [1, 1, 50, 10] is outside the 40x30 image"),
    ("inverted box", jsonl("d.jsonl", grounding("ok.png", (20, 1, 10, 10))), [*CHECK, "{x}/d.jsonl"],
     "need x1 <= x2 and y1 <= y2"),
    ("box of three numbers", jsonl("d.jsonl", grounding("ok.png", (1, 2, 3))), [*CHECK, "{x}/d.jsonl"],
     "expected [x1, y1, x2, y2]"),
    ("bad bbox_format", jsonl("d.jsonl", grounding("ok.png", bbox_format="xywh")), [*CHECK, "{x}/d.jsonl"],
     "field 'bbox_format': expected 'pixel' or 'norm1000'"),
    ("more <image> than images", jsonl("d.jsonl", {**grounding("ok.png"), "images": []}), [*CHECK, "{x}/d.jsonl"],
     "more <image> placeholders than the 0 listed images"),
    ("typed <img> in structured text", jsonl("d.jsonl", {"messages": [
        {"role": "user", "content": "<img>/etc/passwd</img> what?"}, {"role": "assistant", "content": "x"}]}),
     [*CHECK, "{x}/d.jsonl"], "write <image> and list the file in 'images'"),
    ("system message not first", jsonl("d.jsonl", {"messages": [
        {"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}]}),
     [*CHECK, "{x}/d.jsonl"], "a system message must come first"),
    ("json file not a list", text("d.json", '{"a": 1}'), [*CHECK, "{x}/d.json"], "must hold a list of records"),
    ("truncated JPEG", image_file("t.jpg", truncated_jpeg), [*CHECK, "{x}/d.jsonl"], "cannot read image"),
    ("decompression bomb", image_file("bomb.png", bomb_png), [*CHECK, "{x}/d.jsonl"], "a decompression bomb?"),
    ("not an image", image_file("fake.png", lambda p: p.write_text("hello")), [*CHECK, "{x}/d.jsonl"],
     "cannot read image"),
    ("refcoco row without sent", jsonl("d.jsonl", {"image": "ok.png", "sent": 5, "bbox": [1, 1, 2, 2],
                                                    "height": 30, "width": 40}),
     [*CHECK, "{x}/d.jsonl"], "field 'sent': missing or not a str"),
    # ---- YAML and the command line --------------------------------------------------------------
    ("config file missing", NOTHING, ["train", "{x}/none.yaml"], "none.yaml: no such config file"),
    ("malformed YAML", run_file("model: [unclosed\n"), ["train", "{x}/run.yaml"], "run.yaml: not valid YAML"),
    ("duplicate key in run config", run_file(RUN + "dtype: float32\ndtype: bfloat16\n"), ["train", "{x}/run.yaml"],
     "key 'dtype' given twice"),
    ("config not a mapping", run_file("- a\n- b\n"), ["train", "{x}/run.yaml"], "expected a mapping of run settings"),
    ("NaN learning rate", run_file(RUN), ["train", "{x}/run.yaml", "--set", "train.lr=.nan"],
     "train.lr: must be a finite number, got nan"),
    ("inf learning rate", run_file(RUN), ["train", "{x}/run.yaml", "--set", "train.lr=.inf"],
     "train.lr: must be a finite number"),
    ("unknown train key", run_file(RUN), ["train", "{x}/run.yaml", "--set", "train.lr_rate=1"],
     "train.lr_rate: unknown key"),
    ("bad choice", run_file(RUN), ["train", "{x}/run.yaml", "--set", "train.schedule=cosin"],
     "train.schedule: 'cosin' is not one of"),
    ("wrong type", run_file(RUN), ["train", "{x}/run.yaml", "--set", "train.batch_size=two"],
     "train.batch_size: expected an integer"),
    ("out of range", run_file(RUN), ["train", "{x}/run.yaml", "--set", "data.max_length=0"],
     "data.max_length: must be an integer >= 1"),
    ("--set without =", run_file(RUN), ["train", "{x}/run.yaml", "--set", "train.lr"], "--set 'train.lr': expected key=value"),
    ("--set bad YAML", run_file(RUN), ["train", "{x}/run.yaml", "--set", "train.lr=[1"], "--set train.lr: the value"),
    ("unknown recipe", run_file(RUN), ["train", "{x}/run.yaml", "--set", "adapter=offical-lora"],
     "adapter: no recipe 'offical-lora'"),
    ("duplicate key in recipe", text("r.yaml", "llm:\n  modules: [c_attn]\n  r: 4\n  r: 8\n"),
     ["inspect", "{x}/r.yaml"], "key 'r' given twice"),
    # ---- model folders ---------------------------------------------------------------------------
    ("model folder missing", NOTHING, [*CHAT, "--model", "{x}/nope", "hi"], "no such model folder"),
    ("model is a file", text("m.bin", "x"), [*CHAT, "--model", "{x}/m.bin", "hi"], "is a file; a model folder"),
    ("no config.json", model_copy(lambda m: (m / "config.json").unlink()), [*CHAT, "--model", "{x}/model", "hi"],
     "no config.json in the model folder"),
    ("config.json not JSON", model_copy(lambda m: (m / "config.json").write_text("{")), [*CHAT, "--model", "{x}/model", "hi"],
     "config.json: not valid JSON"),
    ("not a Qwen config", model_copy(edit_json("config.json", lambda c: c.update(model_type="llama"))),
     [*CHAT, "--model", "{x}/model", "hi"], "model_type is 'llama', expected 'qwen'"),
    ("text-only Qwen config", model_copy(edit_json("config.json", lambda c: c.pop("visual") and None)),
     [*CHAT, "--model", "{x}/model", "hi"], "no 'visual' block"),
    ("corrupt weights", model_copy(lambda m: (m / "model.safetensors").write_bytes(b"\x10\x00garbage")),
     [*CHAT, "--model", "{x}/model", "hi"], "model.safetensors: unreadable safetensors file"),
    ("NaN in base weights", model_copy(nan_weight("model.safetensors")), [*CHAT, "--model", "{x}/model", "hi"],
     "holds NaN or inf values"),
    ("pickled base weights (hostile)", model_copy(pickled_bin("pytorch_model.bin", "model.safetensors")),
     [*CHAT, "--model", "{x}/model", "hi"], "pytorch_model.bin: holds pickled Python objects"),
    ("malformed generation_config.json", model_copy(lambda m: (m / "generation_config.json").write_text("{")),
     [*CHAT, "--model", "{x}/model", "hi"], "generation_config.json: cannot be read"),
    ("uncached hub id offline", NOTHING, [*CHAT, "--model", "Qwen/Qwen-VL-Chat-Int9", "hi"],
     "Qwen/Qwen-VL-Chat-Int9: not in the local hub cache"),
    # ---- adapters --------------------------------------------------------------------------------
    ("adapter folder missing", NOTHING, [*CHAT, "--adapter", "{x}/nope", "hi"], "not a PEFT adapter folder"),
    ("adapter without weights", adapter_copy(lambda a: (a / "adapter_model.safetensors").unlink()),
     [*CHAT, "--adapter", "{x}/adapter", "hi"], "no adapter_model.safetensors"),
    ("adapter config not JSON", adapter_copy(lambda a: (a / "adapter_config.json").write_text("{")),
     [*CHAT, "--adapter", "{x}/adapter", "hi"], "adapter_config.json"),
    ("adapter targets not in the model", adapter_copy(edit_json("adapter_config.json",
                                                                lambda c: c.update(target_modules=["q_proj"]))),
     [*CHAT, "--adapter", "{x}/adapter", "hi"], "adapter: cannot be applied to this model"),
    ("adapter for another base", adapter_copy(wider_lora), [*CHAT, "--adapter", "{x}/adapter", "hi"],
     "adapter: does not fit the base model"),
    ("pickled adapter (hostile)", adapter_copy(pickled_bin("adapter_model.bin", "adapter_model.safetensors")),
     [*MERGE[:4], "{x}/adapter", "--out", "{x}/merged"], "adapter_model.bin: holds pickled Python objects"),
    ("NaN in adapter (merge)", adapter_copy(nan_weight("adapter_model.safetensors")),
     [*MERGE[:4], "{x}/adapter", "--out", "{x}/merged"], "holds NaN or inf values"),
    ("pickled OpenCLIP file (hostile)", lambda x, s: hostile_pickle(x / "clip.bin", x / MARKER),
     ["vit", "import-openclip", "--weights", "{x}/clip.bin", "--base", "{m}", "--out", "{x}/vit"], "clip.bin"),
    # ---- output paths ------------------------------------------------------------------------------
    ("merge output exists", lambda x, s: (x / "merged").mkdir(), MERGE, "merged already exists; pass --overwrite"),
    ("merge output inside the base", NOTHING, [*MERGE[:6], "{m}/sub"], "overlaps BASE"),
    ("train output is a file", run_file(RUN), ["train", "{x}/run.yaml", "--set", "train.output_dir={x}/run.yaml"],
     "is a file, not a folder"),
    ("resume with nothing to resume", run_file(RUN), ["train", "{x}/run.yaml", "--resume"],
     "--resume: no complete checkpoint-N folder"),
    ("eval output holds a report", lambda x, s: (x / "eval").mkdir() or (x / "eval" / "report.json").write_text("{}"),
     [*EVAL, "--data", "{d}"], "already holds files"),
    # ---- images and paths at inference ---------------------------------------------------------
    ("chat image missing", NOTHING, [*CHAT, "--image", "{x}/none.png", "hi"], "image not found"),
    ("chat decompression bomb", lambda x, s: bomb_png(x / "bomb.png"), [*CHAT, "--image", "{x}/bomb.png", "hi"],
     "a decompression bomb?"),
    ("chat truncated image", lambda x, s: truncated_jpeg(x / "t.jpg"), [*CHAT, "--image", "{x}/t.jpg", "hi"],
     "cannot read image"),
    ("eval image outside the data folder", jsonl("d.jsonl", grounding("../../x.png")), [*EVAL, "--data", "{x}/d.jsonl"],
     "leads outside the image root"),
    ("eval absolute image path", jsonl("d.jsonl", grounding("/etc/hostname")), [*EVAL, "--data", "{x}/d.jsonl"],
     "leads outside the image root"),
    ("eval symlink out of the root", lambda x, s: (x / "link.png").symlink_to(s["i"]) or
     (x / "d.jsonl").write_text(json.dumps(grounding("link.png")) + "\n"), [*EVAL, "--data", "{x}/d.jsonl"],
     "leads outside the image root"),
    ("eval data without queries", jsonl("d.jsonl", {"messages": [{"role": "user", "content": "a"},
                                                                 {"role": "assistant", "content": "b"}]}),
     [*EVAL, "--data", "{x}/d.jsonl"], "no grounding queries"),
]


@pytest.mark.parametrize("name, build, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_one_line(shared, tmp_path, capsys, monkeypatch, name, build, argv, message):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    if build is not None:
        build(tmp_path, shared)
    values = {"x": tmp_path, **shared}
    args = [a.format(**values) for a in argv]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert message.format(**values) in err, err
    assert not (tmp_path / MARKER).exists() and not (tmp_path / "model" / MARKER).exists(), "a payload ran"


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_the_hostile_payload_is_real(tmp_path):
    """The marker appears when the pickle is loaded without weights-only: the cases above prove something."""
    hostile_pickle(tmp_path / "p.bin", tmp_path / MARKER)
    torch.load(tmp_path / "p.bin", weights_only=False)  # never do this with a file you did not make
    assert (tmp_path / MARKER).exists()

"""`workbench chat`: ask a model (+ adapter) about an image, one question or a conversation on stdin."""

from __future__ import annotations

import argparse
import sys

from workbench.cli.args import whole
from workbench.dtypes import DTYPE_NAMES


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat about an image; answers stream as they are generated",
                       description="With a question: one answer. Without: one question per stdin line, "
                                   "with the conversation kept as history (end with EOF / Ctrl-D).")
    p.add_argument("question", nargs="?", help="the question (omit to read questions from stdin)")
    p.add_argument("--model", required=True, help="model folder or hub repo id")
    p.add_argument("--adapter", help="PEFT adapter folder")
    p.add_argument("--image", help="image file the conversation is about")
    p.add_argument("--draw", metavar="OUT.png", help="draw the boxes of the (latest) answer on the image")
    p.add_argument("--max-new-tokens", type=whole(1), default=512)
    p.add_argument("--sample", action="store_true", help="sample with the model's generation config (default: greedy)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: the config's")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from workbench.errors import WorkbenchError
    from workbench.eval.chat import AnswerStreamer, ChatSession, draw_answer, load_for_inference

    if args.draw and not args.image:
        raise WorkbenchError("--draw needs --image")
    model, tokenizer = load_for_inference(args.model, args.adapter, args.dtype, args.device)
    session = ChatSession(model, tokenizer, args.image, args.max_new_tokens, args.sample)
    questions = [args.question] if args.question else _stdin_questions()
    for question in questions:
        answer = session.ask(question, AnswerStreamer(tokenizer))
        if args.draw:
            drawn = draw_answer(answer, session.image, args.draw)
            print(f"[boxes drawn to {drawn}]" if drawn else "[no boxes in the answer]", file=sys.stderr)
    return 0


def _stdin_questions():
    while True:
        if sys.stdin.isatty():
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()

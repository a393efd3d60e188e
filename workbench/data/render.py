"""Conversation -> rendered turns (the text of each turn), with the chat template's image and ref forms.

`<image>` becomes the template's image form, `<ref-object>` its ref form, and `<bbox>`
`<box>(x1,y1),(x2,y2)</box>` per box through workbench/data/boxes.py. Tokenising the turns is
`workbench.prompt.tokenize`.
"""

from __future__ import annotations

from workbench.data.boxes import format_box, normalize_box
from workbench.data.records import BoxSlot, Conversation, ImageSlot, RefSlot
from workbench.prompt import ChatTemplate, RenderedTurn


def render(conv: Conversation, template: ChatTemplate, system: str | None = None) -> list[RenderedTurn]:
    """The system turn, then one RenderedTurn per conversation turn.

    System text: the record's own, else `system` (data.system), else the template's default.
    """
    text = conv.system if conv.system is not None else system if system is not None else template.default_system
    out = [RenderedTurn("system", text, ())]
    for turn in conv.turns:
        pieces: list[str] = []
        images: list[int] = []
        for part in turn.parts:
            if isinstance(part, ImageSlot):
                path = conv.images[part.index].path
                span = f"<img>{path}</img>"
                pieces.append(template.image.format(n=part.index + 1, path=path) if part.numbered else span)
                images.append(part.index)
            elif isinstance(part, RefSlot):
                pieces.append(template.ref.format(ref=part.text))
            elif isinstance(part, BoxSlot):
                pieces += [format_box(normalize_box(b, *part.size) if part.size else b) for b in part.boxes]
            else:
                pieces.append(part)
        out.append(RenderedTurn(turn.role, "".join(pieces), tuple(images)))
    return out

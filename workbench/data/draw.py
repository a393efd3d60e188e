"""A training sample's boxes drawn on its images as the model sees them (`workbench data preview --draw`).

Wrong coordinates (pixels where the grid is expected, x and y swapped, boxes against the wrong image
size) are the most common cause of a grounding fine-tune that learns nothing, and they show at a
glance here: the image is resized to the model's square input as preprocessing does, and each box is
read back from the sample's tokens (after the conversion to the [0, 1000) grid) onto that image.
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from workbench.data.boxes import denormalize_box
from workbench.eval.draw import draw_boxes, save_png
from workbench.eval.parse import parse_boxes
from workbench.model.image_processing import load_image, to_rgb
from workbench.prompt.chatml import Sample

IMAGE_SPAN = re.compile(r"<img>.*?</img>", re.DOTALL)
MIN_SIDE = 448  # small model inputs (the tiny demo's 56 px) are enlarged, pixel for pixel, to be seen


def draw_sample(sample: Sample, tokenizer, image_size: int, out_dir: Path) -> list[Path]:
    """One PNG per image of `sample`: the S x S model input with the boxes the text puts on it.

    A box belongs to the latest image before it in the conversation (the first image when it comes
    before any image).
    """
    parts = IMAGE_SPAN.split(tokenizer.decode(sample.input_ids))  # parts[k + 1] follows image k
    boxes: list[list] = [[] for _ in sample.images]
    for k, part in enumerate(parts):
        if sample.images:
            boxes[max(k - 1, 0)] += parse_boxes(part)
    scale = max(1, -(-MIN_SIDE // image_size))
    side = image_size * scale
    written = []
    for k, path in enumerate(sample.images):
        seen = to_rgb(load_image(path)).resize((image_size, image_size), Image.Resampling.BICUBIC)
        shown = seen.resize((side, side), Image.Resampling.NEAREST)
        drawn = [(b.ref, denormalize_box(b.box, side, side)) for b in boxes[k]]
        caption = f"{Path(sample.file).name} record {sample.record}, image {k + 1}" + ("" if drawn else ": no box")
        name = f"{Path(sample.file).stem}-record{sample.record}-image{k + 1}.png"
        written.append(save_png(draw_boxes(shown, drawn, caption=caption), out_dir / name))
    return written

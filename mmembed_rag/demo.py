"""Offline demo: a tiny checkpoint in the released format, a few generated items, their similarities.

Runs on a laptop CPU with no network (``make demo``). The model is randomly initialised, so the
numbers show the pipeline end to end (text, image and composed items in one space), not retrieval
quality.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from .encoder import Encoder
from .items import MultimodalItem
from .testing import make_tiny_checkpoint

logger = logging.getLogger(__name__)


def _shape(colour: str, kind: str, size: int = 96) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    if kind == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.rectangle(box, fill=colour)
    return image


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: a tiny random one built now)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_tiny_checkpoint(Path(tmp) / "tiny-mmembed", seed=0)
        encoder = Encoder.from_pretrained(model, device="cpu")
        documents = [
            MultimodalItem(text="a red circle on a white background"),
            MultimodalItem(image=_shape("red", "circle")),
            MultimodalItem(image=_shape("blue", "square")),
            MultimodalItem(text="a blue square", image=_shape("blue", "square")),
        ]
        queries = [
            MultimodalItem(text="a red circle"),
            MultimodalItem(text="the same shape but in blue", image=_shape("red", "square")),
        ]
        d = encoder.encode_documents(documents)
        q = encoder.encode_queries(queries, instruction="mscoco_t2i")
    labels = ["text: red circle", "image: red circle", "image: blue square", "text+image: blue square"]
    print(f"encoder: {model if args.model else 'tiny random checkpoint'}  dim={encoder.dim}")
    print("query \\ document".ljust(34) + "".join(f"{lab[:22]:>24}" for lab in labels))
    for name, row in zip(["text: a red circle", "composed: square -> blue"], q @ d.T):
        print(name.ljust(34) + "".join(f"{v:24.3f}" for v in row))


if __name__ == "__main__":
    main()

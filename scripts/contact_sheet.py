"""A contact sheet of a model's overlays on chest X-rays that are not JSRT, to look at.

    python scripts/contact_sheet.py --weights FILE [--images ../shared/data/samples] --out docs/x.png

Segments every image (as ``chexmask segment`` does: decode, preprocess, model,
post-process) and tiles the 1024-frame overlays, each labelled with its file name.
"""

import argparse
import functools
from pathlib import Path

import cv2
import numpy as np

from chexmask.config import Settings
from chexmask.files import image_files
from chexmask.storage.sources import read_regular_file
from chexmask.worker.pipeline import Segmenter
from chexmask.worker.weights import load

TILE = 320
COLUMNS = 4


def tile(overlay_jpeg: bytes, label: str) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(overlay_jpeg, np.uint8), cv2.IMREAD_COLOR)
    image = cv2.resize(image, (TILE, TILE), interpolation=cv2.INTER_AREA)
    cv2.rectangle(image, (0, 0), (TILE, 18), (0, 0, 0), -1)
    cv2.putText(image, label[:52], (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return image


def label(name: str, framing: dict | None) -> str:
    return f"{name} (re-framed)" if framing and framing["reframed"] else name


def main(weights: str | None, images: Path, out: Path) -> None:
    model, info = load(weights, Settings.from_env(), "cpu")
    files = image_files((images,))
    sources = [(p.name, functools.partial(read_regular_file, p)) for p in files]
    tiles = [
        tile(o.segmentation.pictures()["overlay.jpg"], label(o.name, o.segmentation.framing()))
        for o in Segmenter(model, info).run(sources)
        if o.segmentation is not None
    ]
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % COLUMNS)
    rows = [np.hstack(tiles[i : i + COLUMNS]) for i in range(0, len(tiles), COLUMNS)]
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), np.vstack(rows))
    print(f"{len(files)} images, model {info.version} -> {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights")
    parser.add_argument("--images", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/samples")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    main(args.weights, args.images, args.out)

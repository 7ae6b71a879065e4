"""Build the QC reference bank bundled with the package, reproducibly.

    python scripts/build_bank.py [--jsrt ../shared/data/jsrt] [--name jsrt-bank-v1]

From the JSRT images and landmarks: the training ids (all but the default
model's ``validation_ids`` in chexmask/weights/manifest.json) are split into
the bank's references and a calibration set (every 4th training id, sorted);
the validation ids are in neither. The bank is built without latents (references
are picked by thumbnail, whatever the weights), at RCAConfig.size; the
calibration and flag caps are fitted on the calibration images' validation cases
(``qc_commands.image_cases``, seed 0) with the bundled default model. Writes
chexmask/weights/NAME.npz and pins its sha256 in chexmask/weights/qc_bank.json.
"""

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from chexmask.config import Settings
from chexmask.worker import rca
from chexmask.worker.bank import ReferenceBank
from chexmask.worker.model import file_sha256
from chexmask.worker.qc_commands import calibrate, image_cases
from chexmask.worker.train import list_ids, load_landmarks
from chexmask.worker.weights import load

WEIGHTS = Path(__file__).resolve().parents[1] / "chexmask" / "weights"
CALIBRATION_EVERY = 4


def split(jsrt: Path) -> dict[str, list[str]]:
    validation = set(json.loads((WEIGHTS / "manifest.json").read_text())["validation_ids"])
    train = sorted(set(list_ids(jsrt / "images", jsrt / "landmarks")) - validation)
    calibration = train[::CALIBRATION_EVERY]
    return {"bank": [i for i in train if i not in calibration], "calibration": calibration,
            "validation": sorted(validation)}


def main(jsrt: Path, name: str) -> None:
    torch.set_num_threads(1)  # the same numbers on any machine, and a quiet neighbour
    started = time.perf_counter()
    ids = split(jsrt)
    images, landmarks = jsrt / "images", jsrt / "landmarks"
    bank = ReferenceBank.build(images, landmarks, ids["bank"], size=rca.RCAConfig.size)
    model, info = load(None, Settings.from_env(), "cpu")
    cfg, rows = rca.RCAConfig(), []
    calibration = ids["calibration"]
    for n, i in enumerate(calibration):
        image = cv2.imread(str(images / f"{i}.png"), cv2.IMREAD_GRAYSCALE)
        other = load_landmarks(landmarks, calibration[(n + 1) % len(calibration)])
        rows += image_cases(i, image, load_landmarks(landmarks, i), other, model, bank, cfg,
                            np.random.default_rng([0, n]))
        print(f"calibration {n + 1}/{len(calibration)}", flush=True)
    calibrate(bank, rows)
    target = WEIGHTS / f"{name}.npz"
    bank.save(target)
    entry = {
        "name": name, "file": target.name, "sha256": file_sha256(target),
        "references": len(bank), "size": bank.size, "latents": False,
        "calibration_ids": calibration, "calibration_cases": len(rows), "calibration_model": info.version,
        "flag_caps": bank.flag_caps, "view_threshold": bank.view_threshold,
        "command": "python scripts/build_bank.py --jsrt ../shared/data/jsrt --name " + name,
    }
    (WEIGHTS / "qc_bank.json").write_text(json.dumps(entry, indent=1) + "\n")
    print(f"{target}: {len(bank)} references, {len(rows)} calibration cases, caps {bank.flag_caps}, "
          f"{target.stat().st_size / 1e6:.1f} MB ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jsrt", type=Path, default=Path("../shared/data/jsrt"))
    parser.add_argument("--name", default="jsrt-bank-v1")
    args = parser.parse_args()
    main(args.jsrt, args.name)

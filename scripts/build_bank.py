"""Build the QC reference bank bundled with the package, reproducibly.

    python scripts/build_bank.py [--jsrt ../shared/data/jsrt] [--name jsrt-bank-v1]

References: the JSRT training ids (all but the default model's ``validation_ids``
in chexmask/weights/manifest.json), without latents (references are picked by
thumbnail, whatever the weights), at RCAConfig.size.

Calibration and flag caps: fitted on the validation cases (``qc_commands.
validation_cases``, seed 0, the bundled default model) of the 20 validation ids,
the only JSRT images here that the model never trained on: on its training
images the model's masks are better than RCA can tell, and a calibration fitted
there lifted every estimate. The validation reports them cross-validated
(``chexmask qc validate --folds 4``: each image's estimates come from a
calibration fitted on the other 15 images), never in-sample. Writes
chexmask/weights/NAME.npz and pins its sha256 in chexmask/weights/qc_bank.json.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from chexmask.config import Settings
from chexmask.worker import rca
from chexmask.worker.bank import ReferenceBank
from chexmask.worker.qc_commands import fit_calibration, validation_cases
from chexmask.worker.train import list_ids
from chexmask.worker.weights import file_sha256, load

WEIGHTS = Path(__file__).resolve().parents[1] / "chexmask" / "weights"


def main(jsrt: Path, name: str) -> None:
    torch.set_num_threads(1)  # the same numbers on any machine, and a quiet neighbour
    started = time.perf_counter()
    images, landmarks = jsrt / "images", jsrt / "landmarks"
    validation = json.loads((WEIGHTS / "manifest.json").read_text())["validation_ids"]
    train = sorted(set(list_ids(images, landmarks)) - set(validation))
    bank = ReferenceBank.build(images, landmarks, train, size=rca.RCAConfig.size)
    model, info = load(None, Settings.from_env(), "cpu")
    rows, _, _ = validation_cases(bank, model, images, landmarks, validation)
    bank.calibration, bank.flag_caps = fit_calibration(rows)
    target = WEIGHTS / f"{name}.npz"
    bank.save(target)
    entry = {
        "name": name,
        "file": target.name,
        "sha256": file_sha256(target),
        "references": len(bank),
        "size": bank.size,
        "latents": False,
        "calibration_ids": validation,
        "calibration_cases": len(rows),
        "calibration_model": info.version,
        "flag_caps": bank.flag_caps,
        "view_threshold": bank.view_threshold,
        "command": f"python scripts/build_bank.py --jsrt ../shared/data/jsrt --name {name}",
    }
    (WEIGHTS / "qc_bank.json").write_text(json.dumps(entry, indent=1) + "\n")
    print(
        f"{target}: {len(bank)} references, {len(rows)} calibration cases, caps {bank.flag_caps}, "
        f"{target.stat().st_size / 1e6:.1f} MB ({time.perf_counter() - started:.0f} s)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jsrt", type=Path, default=Path("../shared/data/jsrt"))
    parser.add_argument("--name", default="jsrt-bank-v1")
    args = parser.parse_args()
    main(args.jsrt, args.name)

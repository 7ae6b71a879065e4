"""Make a training run's best weights the bundled default model.

Copies ``RUN/best.pt`` (compact: fp16, no encoder.fc_logvar) to
``chexmask/weights/NAME.pt`` and pins its sha256 in ``manifest.json``, which
``chexmask.worker.weights`` reads. Usage: python scripts/bundle_weights.py RUN NAME
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parents[1] / "chexmask" / "weights"


def main(run: Path, name: str) -> None:
    target = WEIGHTS / f"{name}.pt"
    WEIGHTS.mkdir(exist_ok=True)
    shutil.copyfile(run / "best.pt", target)
    history = json.loads((run / "history.json").read_text())
    best = max(history, key=lambda e: e.get("dice_lungs", 0) + e.get("dice_heart", 0))
    manifest = {
        "name": name,
        "file": target.name,
        "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        "format": "compact state_dict: fp16, without encoder.fc_logvar (expanded on load)",
        "validation": {k: v for k, v in best.items() if k != "loss"},
        # The held-out JSRT images (the split of `chexmask train --seed 1234`).
        "validation_ids": json.loads((run / "split.json").read_text())["val"],
    }
    (WEIGHTS / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])

"""Make a training run's best weights the bundled default model.

Copies ``RUN/best.pt`` (compact: fp16; runs since --ood-val keep encoder.fc_logvar,
which uncertainty needs) to ``chexmask/weights/NAME.pt`` and pins its sha256 in
``manifest.json``, which ``chexmask.worker.weights`` reads. The best epoch is the one
``train`` chose (``selection_score``: JSRT and, where validated, OOD Dice).
Usage: python scripts/bundle_weights.py RUN NAME
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path

from chexmask.worker.train import selection_score
from chexmask.worker.weights import read_checkpoint

WEIGHTS = Path(__file__).resolve().parents[1] / "chexmask" / "weights"


def main(run: Path, name: str) -> None:
    target = WEIGHTS / f"{name}.pt"
    WEIGHTS.mkdir(exist_ok=True)
    shutil.copyfile(run / "best.pt", target)
    history = json.loads((run / "history.json").read_text())
    best = max(history, key=selection_score)
    _, has_logvar = read_checkpoint(target)
    layout = "with" if has_logvar else "without"
    manifest = {
        "name": name,
        "file": target.name,
        "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        "format": f"compact state_dict: fp16, {layout} encoder.fc_logvar (expanded on load)",
        "validation": {k: v for k, v in best.items() if k != "loss"},
        # The held-out JSRT images (the split of `chexmask train --seed 1234`).
        "validation_ids": json.loads((run / "split.json").read_text())["val"],
    }
    (WEIGHTS / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])

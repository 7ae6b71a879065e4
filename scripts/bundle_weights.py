"""Make a training run's weights the bundled default model.

Copies ``RUN/best.pt`` (compact: fp16; runs since --ood-val keep encoder.fc_logvar,
which uncertainty needs), or with ``--averaged`` ``RUN/average.pt`` (the running mean
of the weights of a ``--average-from`` run), to ``chexmask/weights/NAME.pt`` and pins
its sha256 in ``manifest.json``, which ``chexmask.worker.weights`` reads. The best
epoch is the one ``train`` chose (``selection_score``: JSRT and, where validated, OOD
Dice); the average is that of the run's last epoch. ``--without-logvar`` leaves
encoder.fc_logvar out, for one fitted afterwards by scripts/fit_logvar.py.
Usage: python scripts/bundle_weights.py RUN NAME [--averaged] [--without-logvar]
"""

import argparse
import hashlib
import json
from pathlib import Path

import torch

from chexmask.worker.train import selection_score
from chexmask.worker.weights import read_checkpoint

WEIGHTS = Path(__file__).resolve().parents[1] / "chexmask" / "weights"
AVERAGE_PREFIX = "average_"


def validation_of(history: list[dict], averaged: bool) -> dict:
    """The validation scores of the weights bundled, with the epoch(s) they come from."""
    if not averaged:
        return {k: v for k, v in max(history, key=selection_score).items() if k != "loss"}
    last = history[-1]
    scores = {k.removeprefix(AVERAGE_PREFIX): v for k, v in last.items() if k.startswith(AVERAGE_PREFIX)}
    first = last["epoch"] - last["averaged_epochs"] + 1
    return {"epochs_averaged": f"{first}-{last['epoch']}", "seconds": last["seconds"], **scores}


def main(run: Path, name: str, averaged: bool, without_logvar: bool) -> None:
    target = WEIGHTS / f"{name}.pt"
    WEIGHTS.mkdir(exist_ok=True)
    weights = torch.load(run / ("average.pt" if averaged else "best.pt"), weights_only=True)
    if without_logvar:
        weights = {k: v for k, v in weights.items() if not k.startswith("encoder.fc_logvar")}
    torch.save(weights, target)
    history = json.loads((run / "history.json").read_text())
    _, has_logvar = read_checkpoint(target)
    layout = "with" if has_logvar else "without"
    manifest = {
        "name": name,
        "file": target.name,
        "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        "format": f"compact state_dict: fp16, {layout} encoder.fc_logvar (expanded on load)",
        "validation": validation_of(history, averaged),
        # The held-out JSRT images (the split of `chexmask train --seed 1234`).
        "validation_ids": json.loads((run / "split.json").read_text())["val"],
    }
    (WEIGHTS / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("name")
    parser.add_argument("--averaged", action="store_true", help="bundle RUN/average.pt, not RUN/best.pt")
    parser.add_argument("--without-logvar", action="store_true", help="leave encoder.fc_logvar out")
    args = parser.parse_args()
    main(args.run, args.name, args.averaged, args.without_logvar)

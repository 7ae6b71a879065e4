"""Fit ``encoder.fc_logvar`` for weights that ship without it, everything else frozen.

    python scripts/fit_logvar.py --weights chexmask/weights/NAME.pt \\
        --jsrt ../shared/data/jsrt --out chexmask/weights/NAME.logvar.pt \\
        --cache /tmp/jsrt-encoded.pt --pin

The compact default weights (chexmask-jsrt-v2, v3) leave fc_logvar out, so the model has no
latent distribution to sample for per-landmark uncertainty. Training's objective is the
error of landmarks decoded from sampled latents plus a small KL term; with the encoder's
mu and the decoder frozen, the same objective fits the log-variance alone: the posterior
the decoder tolerates around each image's mu. mu, and so every landmark the model puts
out, is unchanged. Training images only: the manifest's validation ids are left out and
used to report whether the spread follows the true error. With ``--pin`` the result is
pinned in chexmask/weights/manifest.json ("logvar", with the fit and that report);
load_model takes it from beside the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr, spearmanr

from chexmask.anatomy import FRAME
from chexmask.worker.model import HybridGNet, landmark_spread, to_input
from chexmask.worker.train import list_ids, load_landmarks, pool_to_coarse
from chexmask.worker.weights import load_model


def encode(model: HybridGNet, jsrt: Path, ids: list[str]) -> list[tuple[torch.Tensor, ...]]:
    """Per image: the flattened conv6 features, mu, conv5, conv6 and the target [120,2] in [0,1]."""
    cached = []
    with torch.no_grad():
        for n, image_id in enumerate(ids):
            image = cv2.imread(str(jsrt / "images" / f"{image_id}.png"), cv2.IMREAD_GRAYSCALE)
            mu, _, conv5, conv6 = model.encoder(to_input(image[None]))
            target = torch.from_numpy(load_landmarks(jsrt / "landmarks", image_id) / FRAME)
            cached.append((conv6.flatten(1), mu, conv5, conv6, target))
            if n % 20 == 0:
                print(f"encoded {n + 1}/{len(ids)}", flush=True)
    return cached


def objective(model: HybridGNet, item: tuple[torch.Tensor, ...], samples: int, kl_weight: float) -> torch.Tensor:
    flat, mu, conv5, conv6, target = item
    logvar = model.encoder.fc_logvar(flat)
    z = mu + torch.randn(samples, mu.shape[1]) * torch.exp(0.5 * logvar)
    landmarks, pos1, pos2 = model.decode(z, conv5, conv6)
    target = target[None].expand(samples, -1, -1).float()
    mse = F.mse_loss(landmarks, target) + F.mse_loss(pos2, target) + F.mse_loss(pos1, pool_to_coarse(target))
    kl = -0.5 * torch.mean(1 + logvar - mu**2 - logvar.exp())
    return mse + kl_weight * kl


def spread_and_error(model: HybridGNet, item: tuple[torch.Tensor, ...], samples: int) -> tuple[float, float]:
    flat, mu, conv5, conv6, target = item
    with torch.no_grad():
        logvar = model.encoder.fc_logvar(flat)
        eps = torch.randn(samples, mu.shape[1], generator=torch.Generator().manual_seed(0))
        sampled = model.decode(mu + eps * torch.exp(0.5 * logvar), conv5, conv6)[0].numpy() * FRAME
        predicted = model.decode(mu, conv5, conv6)[0][0].numpy() * FRAME
    error = float(np.linalg.norm(predicted - target.numpy() * FRAME, axis=1).mean())
    return float(landmark_spread(sampled).mean()), error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--jsrt", type=Path, required=True, help="folder with images/ and landmarks/")
    parser.add_argument("--manifest", type=Path, default=Path("chexmask/weights/manifest.json"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--kl-weight", type=float, default=1e-5)  # worker.train.TrainConfig's
    parser.add_argument("--lr", type=float, default=0.05, help="the bias's learning rate")
    parser.add_argument("--weight-lr", type=float, default=2e-5)
    parser.add_argument("--cache", type=Path, help="keep the encoded images here between runs")
    parser.add_argument("--init-logvar", type=float, default=-9.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pin", action="store_true", help="record the file, its fit and validation in --manifest")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = load_model(args.weights)
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.encoder.fc_logvar
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.constant_(head.bias, args.init_logvar)
    for p in head.parameters():
        p.requires_grad_(True)
    validation = set(json.loads(args.manifest.read_text())["validation_ids"])
    ids = list_ids(args.jsrt / "images", args.jsrt / "landmarks")
    train_ids, val_ids = [i for i in ids if i not in validation], sorted(validation & set(ids))
    started = time.time()
    if args.cache and args.cache.is_file():
        train, val = torch.load(args.cache)
    else:
        train, val = encode(model, args.jsrt, train_ids), encode(model, args.jsrt, val_ids)
        if args.cache:
            torch.save((train, val), args.cache)
    print(f"{len(train)} training and {len(val)} validation images encoded in {time.time() - started:.0f} s")
    # The bias sets the overall spread and must travel several units; the 8M weights only
    # shape it per image, and move far less per step.
    optimiser = torch.optim.Adam(
        [{"params": [head.bias], "lr": args.lr}, {"params": [head.weight], "lr": args.weight_lr}]
    )
    rng = np.random.default_rng(args.seed)
    for step in range(1, args.steps + 1):
        loss = objective(model, train[rng.integers(len(train))], args.samples, args.kl_weight)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 100 == 0:
            pairs = [spread_and_error(model, item, 20) for item in val]
            spread, error = np.array(pairs).T
            print(
                f"step {step}: loss {loss.item():.5f}, bias mean {head.bias.mean().item():.2f}; validation: "
                f"spread {spread.mean():.2f} px, error {error.mean():.2f} px, Spearman {spearmanr(spread, error)[0]:.2f}",
                flush=True,
            )
    torch.save({k: v.detach().half() for k, v in head.state_dict().items()}, args.out)
    print(f"wrote {args.out}")
    if args.pin:
        pin(args, [spread_and_error(model, item, 20) for item in val])


def pin(args: argparse.Namespace, pairs: list[tuple[float, float]]) -> None:
    """Record the fitted file in the manifest, with how it was fitted and how its spread
    (N = 20) follows the true error of the validation images."""
    spread, error = np.array(pairs).T
    manifest = json.loads(args.manifest.read_text())
    manifest["logvar"] = {
        "file": args.out.name,
        "sha256": hashlib.sha256(args.out.read_bytes()).hexdigest(),
        "format": "encoder.fc_logvar weight and bias, fp16, fitted with everything else frozen (scripts/fit_logvar.py)",
        "fit": {
            "images": "the training ids (validation_ids left out)",
            "steps": args.steps,
            "samples": args.samples,
            "kl_weight": args.kl_weight,
            "bias_lr": args.lr,
            "weight_lr": args.weight_lr,
            "seed": args.seed,
        },
        "validation": {
            "mean_landmark_std_px_n20": round(float(spread.mean()), 2),
            "mean_landmark_error_px": round(float(error.mean()), 2),
            "spearman_std_vs_error": round(float(spearmanr(spread, error)[0]), 2),
            "pearson_std_vs_error": round(float(pearsonr(spread, error)[0]), 2),
        },
    }
    args.manifest.write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest["logvar"], indent=1))


if __name__ == "__main__":
    main()

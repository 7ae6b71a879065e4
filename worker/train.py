"""Train HybridGNet on landmark-annotated chest X-rays (the Chest-xray-landmark-dataset
layout: ``<id>.png`` in the 1024 frame and ``landmarks/{RL,LL,H}/<id>.npy``).

The objective is the official one: mean squared error of the landmarks and of the
two skip-connection position heads (pos1 against the landmarks pooled to the coarse
graph), plus 1e-5 times the KL term of the variational encoder; Adam at 1e-4 with a
step decay. The encoder trains with batch statistics, as the official model did.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from chexmask.anatomy import FRAME, ORGAN_ROWS, ORGAN_SIZES
from chexmask.worker.augment import CONDITIONS, POLICIES, ood_sample
from chexmask.worker.memory import keep_freed_memory
from chexmask.worker.metrics import landmark_scores
from chexmask.worker.model import HybridGNet, to_input
from chexmask.worker.weights import compact_state_dict

log = logging.getLogger(__name__)

ORGANS = tuple(ORGAN_ROWS)  # RL, LL, H: the annotation folders, in landmark order


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-5
    lr_step: int = 50  # epochs between decays
    lr_gamma: float = 0.5
    kl_weight: float = 1e-5
    val_fraction: float = 0.1
    val_every: int = 1
    seed: int = 1234
    augment: str = "basic"  # a policy of worker.augment.POLICIES: none, basic, world
    # Also validate on the re-framed, re-processed validation images (worker.augment
    # CONDITIONS) and choose the best epoch on JSRT and OOD Dice together.
    ood_val: bool = False
    # fc_logvar for weights that come without it (compact files): zero weights and this
    # log-variance, a narrow posterior that leaves the starting model's landmarks as they are.
    init_logvar: float = -9.0
    # bf16 autocast on CPU: ~2x faster where oneDNN has AMX kernels for it, but 10x slower
    # with some torch builds (2.13 CPU here); off unless asked for.
    bf16_on_cpu: bool = False
    limit: int | None = None  # use only the first N images (smoke runs)
    # From this epoch on, also keep the running mean of the weights (stochastic weight
    # averaging): at a small constant lr the epochs scatter around a better point than
    # any one of them; written as average.pt and validated beside the model each epoch.
    average_from: int | None = None


# ---------------------------------------------------------------------------
# Data


def list_ids(images: Path, landmarks: Path) -> list[str]:
    ids = sorted(p.stem for p in images.glob("*.png"))
    return [i for i in ids if all((landmarks / o / f"{i}.npy").exists() for o in ORGANS)]


def load_landmarks(landmarks: Path, image_id: str) -> np.ndarray:
    """[120,2] (x, y) pixels in the 1024 frame, organs in model order."""
    return np.concatenate([np.load(landmarks / o / f"{image_id}.npy") for o in ORGANS]).astype(np.float32)


def split_ids(ids: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    shuffled = sorted(ids)
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, round(len(ids) * val_fraction))
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


class LandmarkDataset(torch.utils.data.Dataset):
    def __init__(self, images: Path, landmarks: Path, ids: list[str], policy: str, seed: int):
        self.images, self.landmarks, self.ids = images, landmarks, ids
        self.transform = POLICIES[policy]
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        image = cv2.imread(str(self.images / f"{self.ids[i]}.png"), cv2.IMREAD_GRAYSCALE)
        points = load_landmarks(self.landmarks, self.ids[i])
        if self.transform is not None:
            image, points = self.transform(image, points, self.rng)
        return to_input(image[None])[0], torch.from_numpy(points / FRAME)


def ood_cases(images: Path, landmarks: Path, ids: list[str], seed: int = 0):
    """(condition, image id, image, landmarks) of the OOD validation set: each image of
    ``ids`` under each condition of ``worker.augment.CONDITIONS``, the same on every run."""
    for image_id in ids:
        image = cv2.imread(str(images / f"{image_id}.png"), cv2.IMREAD_GRAYSCALE)
        points = load_landmarks(landmarks, image_id)
        for condition in CONDITIONS:
            yield (condition, image_id, *ood_sample(image, points, condition, image_id, seed))


class OODDataset(torch.utils.data.Dataset):
    def __init__(self, images: Path, landmarks: Path, ids: list[str], seed: int = 0):
        self.cases = [(c, i) for i in ids for c in CONDITIONS]
        self.images, self.landmarks, self.seed = images, landmarks, seed

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int):
        condition, image_id = self.cases[i]
        image = cv2.imread(str(self.images / f"{image_id}.png"), cv2.IMREAD_GRAYSCALE)
        image, points = ood_sample(image, load_landmarks(self.landmarks, image_id), condition, image_id, self.seed)
        return to_input(image[None])[0], torch.from_numpy(points / FRAME)


# ---------------------------------------------------------------------------
# Objective


def pool_to_coarse(points: torch.Tensor) -> torch.Tensor:
    """Average consecutive pairs of landmarks per organ (the official D matrix);
    odd-sized organs keep their last point."""
    parts, start = [], 0
    for n in ORGAN_SIZES.values():
        organ = points[:, start : start + n]
        if n % 2:
            organ = torch.cat([organ, organ[:, -1:]], dim=1)
        parts.append(organ.reshape(organ.shape[0], -1, 2, 2).mean(2))
        start += n
    return torch.cat(parts, dim=1)


def hybrid_loss(out, target: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, dict]:
    # In training the model returns logvar too; every output is a tensor.
    landmarks, pos1, pos2, mu, logvar = (t.float() for t in out)
    mse = F.mse_loss(landmarks, target)
    mse_pos = F.mse_loss(pos2, target) + F.mse_loss(pos1, pool_to_coarse(target))
    kl = -0.5 * torch.mean(torch.mean(1 + logvar - mu**2 - logvar.exp(), dim=1))
    total = mse + mse_pos + kl_weight * kl
    return total, {"mse": mse.item(), "pos": mse_pos.item(), "kl": kl.item()}


def init_official(model: HybridGNet) -> None:
    """ChebConv weights and biases ~ N(0, 0.1), as the official model initialises them."""
    for name, p in model.named_parameters():
        if name.startswith(("graphConv", "SC_")):
            torch.nn.init.normal_(p, 0.0, 0.1)


# ---------------------------------------------------------------------------
# Loop


def _autocast(device: str, cfg: TrainConfig):
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_on_cpu)


@torch.no_grad()
def validate(model: HybridGNet, loader, device: str) -> dict:
    model.eval()
    scores = []
    for x, target in loader:
        landmarks = model(x.to(device))[0].float().cpu().numpy() * FRAME
        for pred, true in zip(landmarks, target.numpy() * FRAME, strict=True):
            scores.append(landmark_scores(pred, true))
    model.train()
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


def load_init_weights(model: HybridGNet, path: Path, init_logvar: float) -> None:
    """Start from ``path``. A file without fc_logvar (compact) gets zero weights and the
    bias ``init_logvar``: every image the same narrow posterior around its mu, so the
    model starts with the file's landmarks and the KL term trains the variance from there."""
    from chexmask.worker.weights import read_checkpoint

    weights, stored_logvar = read_checkpoint(path)
    model.load_state_dict(weights)
    if not stored_logvar:
        torch.nn.init.zeros_(model.encoder.fc_logvar.weight)
        torch.nn.init.constant_(model.encoder.fc_logvar.bias, init_logvar)


def selection_score(entry: dict) -> float:
    """What chooses the best epoch: Dice of lungs and heart on the validation images,
    plus on their OOD versions when those were validated too."""
    return sum(entry.get(f"{prefix}dice_{organ}", 0.0) for prefix in ("", "ood_") for organ in ("lungs", "heart"))


def train(
    images: Path,
    landmarks: Path,
    out: Path,
    cfg: TrainConfig,
    device: str = "cpu",
    resume: Path | None = None,
    init_weights: Path | None = None,
) -> dict:
    """Train, writing ``last.ckpt`` (resumable) every epoch and ``best.pt`` (compact
    inference weights) whenever validation improves. Returns the best validation scores."""
    out.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()
    torch.manual_seed(cfg.seed)
    ids = list_ids(images, landmarks)[: cfg.limit]
    train_ids, val_ids = split_ids(ids, cfg.val_fraction, cfg.seed)
    (out / "split.json").write_text(json.dumps({"train": train_ids, "val": val_ids}, indent=1))
    train_set = LandmarkDataset(images, landmarks, train_ids, cfg.augment, cfg.seed)
    val_set = LandmarkDataset(images, landmarks, val_ids, "none", cfg.seed)
    train_loader = torch.utils.data.DataLoader(train_set, cfg.batch_size, shuffle=True, drop_last=True)
    val_loader = torch.utils.data.DataLoader(val_set, cfg.batch_size)
    ood_loader = torch.utils.data.DataLoader(OODDataset(images, landmarks, val_ids), cfg.batch_size)

    # channels_last makes the CPU convolutions about 2x faster; results are unaffected.
    model = HybridGNet().to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing in torch's stubs
    init_official(model)
    if init_weights is not None:
        load_init_weights(model, init_weights, cfg.init_logvar)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_step, cfg.lr_gamma)
    # BatchNorm uses batch statistics in eval as well, so the average needs no BN update.
    average = torch.optim.swa_utils.AveragedModel(model) if cfg.average_from else None
    state: dict[str, Any] = {"epoch": 0, "best": None, "history": [], "seconds": 0.0}
    if resume is not None and resume.exists():
        ckpt = torch.load(resume, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        if average is not None and "average" in ckpt:
            average.load_state_dict(ckpt["average"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        torch.set_rng_state(ckpt["rng"])
        log.info("resumed from %s at epoch %d", resume, state["epoch"])

    model.train()
    for epoch in range(state["epoch"], cfg.epochs):
        started = time.monotonic()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
        running = None
        for x, target in bar:
            x, target = x.to(device, memory_format=torch.channels_last), target.to(device)
            with _autocast(device, cfg):
                outputs = model(x)
            loss, _ = hybrid_loss(outputs, target, cfg.kl_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            bar.set_postfix(loss=f"{running:.5f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
        scheduler.step()
        state["seconds"] += time.monotonic() - started
        state["epoch"] = epoch + 1
        entry = {"epoch": epoch + 1, "loss": running, "seconds": round(state["seconds"])}
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            entry.update(validate(model, val_loader, device))
            if cfg.ood_val:
                entry.update({f"ood_{k}": v for k, v in validate(model, ood_loader, device).items()})
            if state["best"] is None or selection_score(entry) > selection_score(state["best"]):
                state["best"] = entry
                torch.save(compact_state_dict(model, keep_logvar=True), out / "best.pt")
        if average is not None and epoch + 1 >= (cfg.average_from or 0):
            average.update_parameters(model)
            averaged: HybridGNet = average.module  # type: ignore[assignment]
            entry.update({f"average_{k}": v for k, v in validate(averaged, val_loader, device).items()})
            entry["averaged_epochs"] = int(average.n_averaged)
            torch.save(compact_state_dict(averaged, keep_logvar=True), out / "average.pt")
        state["history"].append(entry)
        tqdm.write(json.dumps(entry))
        ckpt = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": state,
            "rng": torch.get_rng_state(),
            "config": asdict(cfg),
        }
        if average is not None:
            ckpt["average"] = average.state_dict()
        torch.save(ckpt, out / "last.ckpt.part")
        (out / "last.ckpt.part").replace(out / "last.ckpt")
        (out / "history.json").write_text(json.dumps(state["history"], indent=1))
    return state["best"] or {}

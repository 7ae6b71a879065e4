"""``chexmask qc``: build the QC reference bank, and validate RCA against true Dice.

Validation widens the range of true quality on purpose. Per annotated image not
in the bank it scores: the ground truth ('truth'), the model's prediction
('model'), a base landmark set (the ground truth, or with --perturb model the
prediction) with landmark noise, a shift, a scaling, a rotation or mirrored sides
('swap'), the base of another image ('other'), a partially trained model's
prediction ('partial', with --partial-weights) and the prediction on the
intensity-inverted image, assessed on that image ('inverted'). It reports Pearson r and MAE of
Dice RCA (Max) and (Mean) against the true Dice, and QC cost per image against
the segmentation forward pass timed in the same run.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import click
import cv2
import numpy as np

from chexmask.config import Settings
from chexmask.worker import plausibility, rca
from chexmask.worker.bank import ReferenceBank
from chexmask.worker.train import list_ids, load_landmarks

PERTURBATIONS = ("noise", "shift", "scale", "rotate", "swap")
DEGRADATIONS = ("truth", "model", *PERTURBATIONS, "other", "partial", "inverted")
USABLE = 0.5  # the summary also reports the cases with at least this true Dice


@click.group("qc")
def qc_command() -> None:
    """Quality control: reference bank and RCA validation."""


def _ids(images: Path, landmarks: Path, ids_file: Path | None, split: str) -> list[str]:
    if ids_file is None:
        return list_ids(images, landmarks)
    listed = json.loads(ids_file.read_text())
    if split not in listed:
        raise click.BadParameter(f"{ids_file} has no split {split!r} (has {sorted(listed)})", param_hint="--split")
    return list(listed[split])


def _model(weights: str | None):
    from chexmask.worker.weights import load

    model, info = load(weights, Settings.from_env(), "cpu")
    return model, info.weights_sha256


def _threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


_dirs = dict(type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)


@qc_command.command("build-bank")
@click.option("--images", **_dirs, help="Folder of <id>.png, 1024x1024 grey.")
@click.option("--landmarks", **_dirs, help="Folder with {RL,LL,H}/<id>.npy.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Bank file (.npz).")
@click.option("--weights", default=None, help="HybridGNet weights for the latents (default: CHEXMASK_WEIGHTS "
              "or the bundled model); --no-latents to skip them.")
@click.option("--no-latents", is_flag=True, help="Store no latents: references are then picked by image.")
@click.option("--ids-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSON {split: [ids]} (e.g. a training run's split.json).")
@click.option("--split", default="train", show_default=True)
@click.option("--size", default=rca.RCAConfig.size, show_default=True, help="Registration size of the images.")
@click.option("--threads", type=int, default=None, help="torch threads.")
def build_bank_command(images, landmarks, out, weights, no_latents, ids_file, split, size, threads) -> None:
    """Build the QC reference bank from annotated images."""
    _threads(threads)
    model, sha = (None, "") if no_latents else _model(weights)
    started = time.perf_counter()
    bank = ReferenceBank.build(images, landmarks, _ids(images, landmarks, ids_file, split), model, sha, size)
    bank.save(out)
    click.echo(f"bank {out}: {len(bank)} references at {size}x{size}, latents "
               f"{'yes' if bank.latents is not None else 'no'}, {len(bank.shape_model.variances)} shape modes, "
               f"shape-outlier threshold {bank.shape_model.threshold:.2f} ({time.perf_counter() - started:.0f} s)")


# ---------------------------------------------------------------------------
# Validation


def degrade(points: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A perturbed copy of landmarks [120,2] (1024-frame pixels)."""
    p = np.asarray(points, dtype=np.float64).copy()
    centre = p.mean(0)
    if kind == "noise":
        return p + rng.normal(0, rng.uniform(4, 30), p.shape)
    if kind == "shift":
        return p + rng.uniform(-80, 80, 2)
    if kind == "scale":
        return centre + (p - centre) * rng.uniform(0.7, 1.3, 2)
    if kind == "rotate":
        a = np.deg2rad(rng.uniform(-20, 20))
        return centre + (p - centre) @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    if kind == "swap":  # mirror about the vertical centre line: each organ lands on the other side
        p[:, 0] = 2 * centre[0] - p[:, 0]
        return p
    raise ValueError(f"unknown degradation {kind}")


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def _stats(rows: list[dict], estimate: str, truth: str = "true") -> dict[str, float | None]:
    if len(rows) < 2:
        return {"pearson": None, "mae": None, "bias": None}
    t, e = np.array([r[truth] for r in rows]), np.array([r[estimate] for r in rows])
    return {"pearson": _pearson(t, e), "mae": float(np.abs(t - e).mean()), "bias": float((e - t).mean())}


@qc_command.command("validate")
@click.option("--bank", "bank_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--images", **_dirs)
@click.option("--landmarks", **_dirs)
@click.option("--ids-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--split", default="val", show_default=True)
@click.option("--weights", default=None, help="Model weights (default: CHEXMASK_WEIGHTS or the bundled model).")
@click.option("--partial-weights", default=None, help="Weights of a partially trained model ('partial' cases).")
@click.option("--perturb", type=click.Choice(["truth", "model"]), default="truth", show_default=True,
              help="Perturb the ground truth (a known range of quality) or the model's predictions.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--limit", type=int, default=None, help="Validate on the first N images only.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None,
              help="torch threads of the forward passes (registration always uses RCAConfig.threads).")
def validate_command(bank_path, images, landmarks, ids_file, split, weights, partial_weights, perturb, out,
                     limit, seed, threads) -> None:
    """Compare Dice RCA with the true Dice of predicted and degraded masks."""
    from chexmask.worker.model import segment_batch
    from chexmask.worker.postprocess import landmarks_to_pixels
    from chexmask.worker.qc import assess

    _threads(threads)
    model, sha = _model(weights)
    partial = _model(partial_weights)[0] if partial_weights else None
    bank = ReferenceBank.load(bank_path, sha)
    cfg = rca.RCAConfig()
    ids = _ids(images, landmarks, ids_file, split)[:limit]
    overlap = sorted(set(ids) & set(bank.ids))
    if overlap:
        raise click.UsageError(f"{len(overlap)} validation images are in the bank (e.g. {overlap[0]})")

    pictures = {i: cv2.imread(str(images / f"{i}.png"), cv2.IMREAD_GRAYSCALE) for i in ids}
    segment = lambda m, image: segment_batch(m, image[None])  # noqa: E731
    segment(model, pictures[ids[0]])  # warm-up: the first call pays for allocations
    predictions, latents, seg_seconds = {}, {}, []
    for i in ids:
        started = time.perf_counter()
        landmarks01, latent = segment(model, pictures[i])
        seg_seconds.append(time.perf_counter() - started)
        predictions[i], latents[i] = landmarks_to_pixels(landmarks01[0]), latent[0]

    truths = {i: load_landmarks(landmarks, i) for i in ids}
    bases = truths if perturb == "truth" else predictions
    rows, qc_seconds = [], []
    with click.progressbar(ids, label="validating") as bar:
        for n, i in enumerate(bar):
            truth = truths[i]
            # The production path, timed: the model's prediction through assess().
            result = assess(pictures[i], predictions[i], latents[i], bank, cfg)
            qc_seconds.append(result.seconds)
            rng = np.random.default_rng([seed, n])
            cases = {"truth": truth, "model": predictions[i]}
            cases |= {kind: degrade(bases[i], kind, rng) for kind in PERTURBATIONS}
            cases["other"] = bases[ids[(n + 1) % len(ids)]]
            if partial is not None:
                cases["partial"] = landmarks_to_pixels(segment(partial, pictures[i])[0][0])
            # The same image, hence the same references and registration, for all cases.
            small = rca.working_image(pictures[i], bank.size)[None]
            carried = rca.carry_references(small, bank.nearest(small, latents[i][None], cfg.k), bank, cfg)[0]
            for kind, points in cases.items():
                rows.append(_case(i, kind, points, truth, carried, bank, cfg))
            inverted = 255 - pictures[i]
            landmarks01, latent = segment(model, inverted)
            points = landmarks_to_pixels(landmarks01[0])
            small = rca.working_image(inverted, bank.size)[None]
            carried = rca.carry_references(small, bank.nearest(small, latent, cfg.k), bank, cfg)[0]
            rows.append(_case(i, "inverted", points, truth, carried, bank, cfg))

    usable = [r for r in rows if r["true"] >= USABLE]
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(rows, out / "cases.csv")
    summary = {
        "images": len(ids), "cases": len(rows), "bank": str(bank_path), "bank_references": len(bank),
        "latents": bank.latents is not None, "k": cfg.k, "perturbed": perturb,
        "dice_rca_max": _stats(rows, "rca_max"), "dice_rca_mean": _stats(rows, "rca_mean"),
        # Without the easy, far-off failures: how well RCA ranks and scores usable masks.
        f"true_ge_{USABLE}": {
            "cases": len(usable), "dice_rca_max": _stats(usable, "rca_max"), "dice_rca_mean": _stats(usable, "rca_mean"),
        },
        "organs_max": {o: _stats(rows, f"rca_max_{o}", f"true_{o}") for o in rca.ORGAN_KEYS},
        "by_kind": {
            kind: {"n": len(sel), "true": float(np.mean([r["true"] for r in sel])),
                   "rca_max": float(np.mean([r["rca_max"] for r in sel])),
                   "mae_max": float(np.mean([abs(r["rca_max"] - r["true"]) for r in sel]))}
            for kind in DEGRADATIONS if (sel := [r for r in rows if r["kind"] == kind])
        },
        "seconds_per_image": {"segmentation": float(np.mean(seg_seconds)), "qc": float(np.mean(qc_seconds))},
    }
    summary["cost_ratio"] = summary["seconds_per_image"]["qc"] / summary["seconds_per_image"]["segmentation"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _scatter(rows, out / "scatter.png")
    for label, part, n in (("", summary, len(rows)), (f" (true >= {USABLE})", summary[f"true_ge_{USABLE}"], len(usable))):
        for key in ("dice_rca_max", "dice_rca_mean"):
            if (s := part[key])["pearson"] is not None:
                click.echo(f"{key}{label}: pearson {s['pearson']:.3f}  MAE {s['mae']:.3f}  bias {s['bias']:+.3f}  "
                           f"({n} cases)")
    seconds = summary["seconds_per_image"]
    click.echo(f"cost per image: QC {seconds['qc']:.2f} s, segmentation {seconds['segmentation']:.2f} s, "
               f"ratio {summary['cost_ratio']:.2f}")
    click.echo(f"wrote {out / 'cases.csv'}, {out / 'summary.json'}, {out / 'scatter.png'}")


def _case(image_id: str, kind: str, points: np.ndarray, truth: np.ndarray, carried: np.ndarray,
          bank: ReferenceBank, cfg: rca.RCAConfig) -> dict:
    true = {k: float(v[0]) for k, v in rca.dice_table(points, truth[None], 1024).items()}
    estimate = rca.summarise(rca.dice_table(points, carried, cfg.dice_size))
    checks = plausibility.check(points, bank.shape_model)
    row = {"id": image_id, "kind": kind, "true": true["overall"], "rca_max": estimate["max"],
           "rca_mean": estimate["mean"]}
    for organ in rca.ORGAN_KEYS:
        row |= {f"true_{organ}": true[organ], f"rca_max_{organ}": estimate[f"max_{organ}"],
                f"rca_mean_{organ}": estimate[f"mean_{organ}"]}
    return row | {"shape_outlier": checks.scores["shape_outlier"], "flags": " ".join(checks.flags)}


def _write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _scatter(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), sharey=True)
    for ax, key, title in ((axes[0], "rca_max", "Dice RCA (Max)"), (axes[1], "rca_mean", "Dice RCA (Mean)")):
        for kind in DEGRADATIONS:
            sel = [r for r in rows if r["kind"] == kind]
            if sel:
                ax.scatter([r["true"] for r in sel], [r[key] for r in sel], s=14, alpha=0.8, label=kind)
        s = _stats(rows, key)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="true Dice ((lungs + heart) / 2)",
               title=f"{title}: r = {s['pearson']:.3f}, MAE = {s['mae']:.3f}")
    axes[0].set_ylabel("RCA estimate")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

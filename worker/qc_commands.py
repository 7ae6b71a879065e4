"""``chexmask qc``: build the QC reference bank, validate RCA against true Dice, and
compare it with the landmark uncertainty (``uncertainty``, in ``worker.qc_uncertainty``).

Validation widens the range of true quality on purpose. Per annotated image not
in the bank it scores: the ground truth ('truth'), the model's prediction
('model'), a base landmark set (the ground truth, or with --perturb model the
prediction) with landmark noise, a shift, a scaling, a rotation or mirrored sides
('swap'), the base of another image ('other'), a partially trained model's
prediction ('partial', with --partial-weights) and the model's prediction on
degraded copies of the image, each assessed on its own image: Gaussian noise,
blur, low contrast, heavy JPEG, inverted grey levels, a black box over one lung
('image_noise', 'blur', 'low_contrast', 'jpeg', 'inverted', 'occluded'). It
reports Pearson r and MAE of the (calibrated, capped) Dice RCA (Max) and (Mean)
against the true Dice, how many inverted images were flagged, and QC CPU time
per image against the segmentation forward pass timed in the same run.

``fit_calibration`` fits a bank's calibration and flag caps on such cases.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import click
import cv2
import numpy as np

from chexmask.anatomy import ORGAN_ROWS
from chexmask.config import Settings
from chexmask.worker import plausibility, rca
from chexmask.worker.bank import ReferenceBank
from chexmask.worker.train import list_ids, load_landmarks

PERTURBATIONS = ("noise", "shift", "scale", "rotate", "swap")
IMAGE_DEGRADATIONS = ("image_noise", "blur", "low_contrast", "jpeg", "inverted", "occluded")
DEGRADATIONS = ("truth", "model", *PERTURBATIONS, "other", "partial", *IMAGE_DEGRADATIONS)
IMAGE_FLAGS = ("inverted", "occluded", "not_frontal")
USABLE = 0.5  # the summary also reports the cases with at least this true Dice


@click.group("qc")
def qc_command() -> None:
    """Quality control: reference bank, RCA validation, RCA against the landmark uncertainty."""


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


_dirs: dict[str, Any] = dict(type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
_bank_option = click.option(
    "--bank",
    "bank_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Bank file (default: the bundled bank).",
)


@qc_command.command("build-bank")
@click.option("--images", **_dirs, help="Folder of <id>.png, 1024x1024 grey.")
@click.option("--landmarks", **_dirs, help="Folder with {RL,LL,H}/<id>.npy.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Bank file (.npz).")
@click.option(
    "--weights",
    default=None,
    help="HybridGNet weights for the latents (default: CHEXMASK_WEIGHTS "
    "or the bundled model); --no-latents to skip them.",
)
@click.option("--no-latents", is_flag=True, help="Store no latents: references are then picked by image.")
@click.option(
    "--ids-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="JSON {split: [ids]} (e.g. a training run's split.json).",
)
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
    click.echo(
        f"bank {out}: {len(bank)} references at {size}x{size}, latents "
        f"{'yes' if bank.latents is not None else 'no'}, {len(bank.shape_model.variances)} shape modes, "
        f"shape-outlier threshold {bank.shape_model.threshold:.2f} ({time.perf_counter() - started:.0f} s)"
    )


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


def degrade_image(image: np.ndarray, kind: str, truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A degraded copy of a 1024 uint8 image; ``truth`` [120,2] places the occlusion."""
    image = np.asarray(image)
    if kind == "image_noise":
        return np.clip(image + rng.normal(0, rng.uniform(10, 35), image.shape), 0, 255).astype(np.uint8)
    if kind == "blur":
        return cv2.GaussianBlur(image, (0, 0), rng.uniform(3, 10))
    if kind == "low_contrast":
        factor = rng.uniform(0.2, 0.5)
        return (image * factor + rng.uniform(0, 255 * (1 - factor))).astype(np.uint8)
    if kind == "jpeg":
        encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(3, 16))])[1]
        return cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
    if kind == "inverted":
        return 255 - image
    if kind == "occluded":  # a black box over most of one lung
        lung = truth[ORGAN_ROWS["RL"] if rng.random() < 0.5 else ORGAN_ROWS["LL"]]
        (x0, y0), (x1, y1) = lung.min(0), lung.max(0)
        top = y0 + (y1 - y0) * rng.uniform(0, 0.3)
        out = image.copy()
        out[int(top) : int(y1), int(x0) : int(x1)] = 0
        return out
    raise ValueError(f"unknown image degradation {kind}")


def image_cases(
    image_id: str,
    image: np.ndarray,
    truth: np.ndarray,
    other: np.ndarray,
    model,
    bank: ReferenceBank,
    cfg: rca.RCAConfig,
    rng: np.random.Generator,
    perturb: str = "truth",
    partial=None,
) -> list[dict]:
    """The validation cases of one annotated image (see the module docstring): the
    landmark cases share the clean image's registration, each image degradation
    is segmented and registered anew. ``other``: another image's landmarks."""
    prediction = _predict(model, image)
    carried, correlations = _carry(image, bank, cfg)
    cases = {"truth": truth, "model": prediction}
    base = truth if perturb == "truth" else prediction
    cases |= {kind: degrade(base, kind, rng) for kind in PERTURBATIONS}
    cases["other"] = other
    if partial is not None:
        cases["partial"] = _predict(partial, image)
    rows = [
        _case(image_id, kind, points, truth, image, carried, correlations, bank, cfg) for kind, points in cases.items()
    ]
    for kind in IMAGE_DEGRADATIONS:
        degraded = degrade_image(image, kind, truth, rng)
        carried, correlations = _carry(degraded, bank, cfg)
        rows.append(_case(image_id, kind, _predict(model, degraded), truth, degraded, carried, correlations, bank, cfg))
    return rows


def _predict(model, image: np.ndarray) -> np.ndarray:
    from chexmask.worker.model import segment_batch
    from chexmask.worker.postprocess import landmarks_to_pixels

    return landmarks_to_pixels(segment_batch(model, np.asarray(image)[None])[0][0])


def _carry(image: np.ndarray, bank: ReferenceBank, cfg: rca.RCAConfig) -> tuple[np.ndarray, np.ndarray]:
    """The references' landmarks carried into the image, and its thumbnail correlations."""
    small = rca.working_image(image, bank.size)[None]
    return rca.carry_references(small, bank.nearest(small, None, cfg.k), bank, cfg)[0], bank.correlations(small)[0]


def _case(
    image_id: str,
    kind: str,
    points: np.ndarray,
    truth: np.ndarray,
    image: np.ndarray,
    carried: np.ndarray,
    correlations: np.ndarray,
    bank: ReferenceBank,
    cfg: rca.RCAConfig,
) -> dict:
    """One case: true and raw RCA Dice (overall and per organ), flags. ``estimate``
    adds the calibrated, capped values."""
    true = {k: float(v[0]) for k, v in rca.dice_table(points, truth[None], 1024).items()}
    raw = rca.summarise(rca.dice_table(points, carried, cfg.dice_size))
    checks = plausibility.check(points, bank.shape_model)
    flags = checks.flags + plausibility.check_image(image, points, correlations, bank.view_threshold).flags
    row = {"id": image_id, "kind": kind, "true": true["overall"]}
    row |= {f"true_{organ}": true[organ] for organ in rca.ORGAN_KEYS}
    row |= {f"raw_{key}": value for key, value in raw.items()}
    return row | {"shape_outlier": checks.scores["shape_outlier"], "flags": " ".join(flags)}


def estimate(rows: list[dict], calibration: rca.Calibration | None, flag_caps: dict[str, float]) -> None:
    """Set each case's rca_* estimates from its raw values, as ``assess`` does."""
    from chexmask.worker.qc import honest_estimates

    for row in rows:
        raw = {key[len("raw_") :]: value for key, value in row.items() if key.startswith("raw_")}
        values, _ = honest_estimates(row["flags"].split(), raw, calibration, flag_caps)
        row |= {f"rca_{key}": value for key, value in values.items()}


def fit_calibration(rows: list[dict]) -> tuple[rca.Calibration, dict[str, float]]:
    """The calibration (raw -> true Dice, isotonic per estimate) and the flag caps fitted
    on cases (``image_cases`` rows). A flag's cap is the median true Dice of the cases
    of its own degradation that raised it; ``not_frontal``, which no case here makes,
    is capped at USABLE. The unperturbed ground truth is left out: no model makes a
    Dice of exactly 1, and at the top of the raw range it lifted every good mask's
    estimate (cross-validated on the held-out JSRT images: bias +0.011 on the model's
    clean masks with it, +0.001 without)."""
    rows = [r for r in rows if r["kind"] != "truth"]
    truth_key = lambda key: "true" if key in ("max", "mean") else f"true_{key.split('_', 1)[1]}"  # noqa: E731
    keys = [key[len("raw_") :] for key in rows[0] if key.startswith("raw_")]
    calibration = rca.Calibration.fit(
        {k: np.array([r[f"raw_{k}"] for r in rows]) for k in keys},
        {k: np.array([r[truth_key(k)] for r in rows]) for k in keys},
    )
    caps = {"not_frontal": USABLE}
    for flag in ("inverted", "occluded"):
        flagged = [r["true"] for r in rows if r["kind"] == flag and flag in r["flags"].split()]
        if flagged:
            caps[flag] = float(np.median(flagged))
    return calibration, caps


def cross_validate(rows: list[dict], ids: list[str], folds: int) -> None:
    """Estimates of each fold's images from a calibration fitted on the other folds only."""
    for fold in range(folds):
        held_out = set(ids[fold::folds])
        calibration, caps = fit_calibration([r for r in rows if r["id"] not in held_out])
        estimate([r for r in rows if r["id"] in held_out], calibration, caps)


@qc_command.command("validate")
@_bank_option
@click.option("--images", **_dirs)
@click.option("--landmarks", **_dirs)
@click.option("--ids-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--split", default="val", show_default=True)
@click.option("--weights", default=None, help="Model weights (default: CHEXMASK_WEIGHTS or the bundled model).")
@click.option("--partial-weights", default=None, help="Weights of a partially trained model ('partial' cases).")
@click.option(
    "--perturb",
    type=click.Choice(["truth", "model"]),
    default="truth",
    show_default=True,
    help="Perturb the ground truth (a known range of quality) or the model's predictions.",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--limit", type=int, default=None, help="Validate on the first N images only.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--threads",
    type=int,
    default=None,
    help="torch threads of the forward passes (registration always uses RCAConfig.threads).",
)
@click.option(
    "--folds",
    type=int,
    default=0,
    show_default=True,
    help="Calibrate by cross-validation over the images in this many folds instead of using the "
    "bank's calibration (which must then not have been fitted on these images).",
)
def validate_command(
    bank_path, images, landmarks, ids_file, split, weights, partial_weights, perturb, out, limit, seed, threads, folds
) -> None:
    """Compare Dice RCA with the true Dice of predicted and degraded masks."""
    _threads(threads)
    model, sha = _model(weights)
    partial = _model(partial_weights)[0] if partial_weights else None
    bank = ReferenceBank.load(bank_path, sha) if bank_path else _bundled(sha)
    ids = _ids(images, landmarks, ids_file, split)[:limit]
    summary = validate(bank, model, images, landmarks, ids, out, partial, perturb, seed, folds)
    for label, part in (
        ("", summary),
        (f" (true >= {USABLE})", summary[f"true_ge_{USABLE}"]),
        (" (image degradations)", summary["image_degradations"]),
    ):
        for key in ("dice_rca_max", "dice_rca_mean"):
            if (s := part[key])["pearson"] is not None:
                click.echo(
                    f"{key}{label}: pearson {s['pearson']:.3f}  MAE {s['mae']:.3f}  bias {s['bias']:+.3f}  "
                    f"({part['cases']} cases)"
                )
    inverted = summary["inverted"]
    click.echo(
        f"inverted images: {inverted['flagged']}/{inverted['n']} flagged, {inverted['within_0.05']}/"
        f"{inverted['n']} estimated within 0.05"
    )
    seconds = summary["seconds_per_image"]
    click.echo(
        f"cost per image: QC {seconds['qc']:.2f} s, segmentation {seconds['segmentation']:.2f} s, "
        f"ratio {summary['cost_ratio']:.2f}"
    )
    click.echo(f"wrote {out / 'cases.csv'}, {out / 'summary.json'}, {out / 'scatter.png'}")


@qc_command.command("uncertainty")
@_bank_option
@click.option("--images", **_dirs)
@click.option("--landmarks", **_dirs)
@click.option(
    "--ids-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="JSON {split: [ids]}; the bundled manifest.json with --split validation_ids gives the default model's.",
)
@click.option("--split", default="val", show_default=True)
@click.option("--weights", default=None, help="Model weights with encoder.fc_logvar (default: the bundled model).")
@click.option("--samples", type=click.IntRange(min=2), default=20, show_default=True, help="Latent samples per mask.")
@click.option(
    "--threshold",
    "thresholds",
    type=click.FloatRange(0, 1),
    multiple=True,
    default=None,
    help="A mask is bad below this true Dice (repeatable; the first is drawn in the plot). [default: 0.9, 0.85]",
)
@click.option(
    "--kinds",
    default=None,
    help="Comma-separated case kinds (default: clean, every OOD condition and image degradation).",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--limit", type=int, default=None, help="The first N images only.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads of the forward passes.")
def uncertainty_command(
    bank_path, images, landmarks, ids_file, split, weights, samples, thresholds, kinds, out, limit, seed, threads
) -> None:
    """Does the landmark uncertainty add to Dice RCA in predicting true error? Scores the
    model's masks of held-out clean, OOD and degraded images (cached in OUT/cases.json)."""
    from chexmask.worker import qc_uncertainty as study

    chosen = tuple(kinds.split(",")) if kinds else study.KINDS
    if unknown := set(chosen) - set(study.KINDS):
        raise click.BadParameter(f"unknown {sorted(unknown)}; kinds: {', '.join(study.KINDS)}", param_hint="--kinds")
    thresholds = tuple(thresholds) or study.THRESHOLDS
    _threads(threads)
    model, sha = _model(weights)
    bank = ReferenceBank.load(bank_path, sha) if bank_path else _bundled(sha)
    ids = _ids(images, landmarks, ids_file, split)[:limit]
    if overlap := sorted(set(ids) & set(bank.ids)):
        raise click.UsageError(f"{len(overlap)} images are in the bank (e.g. {overlap[0]})")
    key = study.CacheKey(sha or "", _bank_sha256(bank_path), samples, seed)
    with click.progressbar(ids, label="scoring") as bar:
        rows, cached = study.collect_cases(model, bank, images, landmarks, ids, key, out / "cases.json", chosen, bar)
    summary = study.summarise(rows, thresholds) | {"samples": samples, "kinds": list(chosen)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    study.scatter(rows, thresholds[0], out / "scatter.png")
    click.echo(f"{len(rows)} masks of {len(ids)} images ({cached} from the cache), {samples} latent samples")
    for name, part in summary.items():
        if name in ("all", "clean_and_ood"):
            click.echo(study.describe(name, part))
    click.echo(f"wrote {out / 'summary.json'}, {out / 'cases.json'}, {out / 'scatter.png'}")


def _bank_sha256(bank_path: Path | None) -> str:
    """The sha256 of the bank in use: the --bank file's, else the bundled one's (pinned, and
    checked when it was loaded)."""
    from chexmask.worker.bank import bundled_bank
    from chexmask.worker.weights import file_sha256

    if bank_path is not None:
        return file_sha256(bank_path)
    found = bundled_bank()
    return found[1]["sha256"] if found else ""


def _bundled(weights_sha256: str | None) -> ReferenceBank:
    from chexmask.worker.bank import resolve

    bank, _ = resolve(None, weights_sha256)
    if bank is None:
        raise click.UsageError("this install has no bundled QC bank: pass --bank")
    return bank


def validation_cases(
    bank: ReferenceBank,
    model,
    images: Path,
    landmarks: Path,
    ids: list[str],
    partial=None,
    perturb: str = "truth",
    seed: int = 0,
) -> tuple[list[dict], list[float], list[float]]:
    """The cases of ``ids`` (raw estimates) and the CPU seconds per image of the
    segmentation forward pass and of ``assess``, measured on the same images."""
    from chexmask.worker.qc import assess

    overlap = sorted(set(ids) & set(bank.ids))
    if overlap:
        raise click.UsageError(f"{len(overlap)} validation images are in the bank (e.g. {overlap[0]})")
    cfg = rca.RCAConfig()
    pictures = {i: cv2.imread(str(images / f"{i}.png"), cv2.IMREAD_GRAYSCALE) for i in ids}
    truths = {i: load_landmarks(landmarks, i) for i in ids}
    _predict(model, pictures[ids[0]])  # warm-up: the first call pays for allocations
    rows, seg_seconds, qc_seconds = [], [], []
    with click.progressbar(ids, label="validating") as bar:
        for n, i in enumerate(bar):
            # The production path, timed: the model's prediction through assess().
            started = time.process_time()
            prediction = _predict(model, pictures[i])
            seg_seconds.append(time.process_time() - started)
            started = time.process_time()
            assess(pictures[i], prediction, None, bank, cfg)
            qc_seconds.append(time.process_time() - started)
            other = truths[ids[(n + 1) % len(ids)]]
            rows += image_cases(
                i, pictures[i], truths[i], other, model, bank, cfg, np.random.default_rng([seed, n]), perturb, partial
            )
    return rows, seg_seconds, qc_seconds


def validate(
    bank: ReferenceBank,
    model,
    images: Path,
    landmarks: Path,
    ids: list[str],
    out: Path,
    partial=None,
    perturb: str = "truth",
    seed: int = 0,
    folds: int = 0,
) -> dict:
    """Run the validation cases of ``ids``, write cases.csv, summary.json and
    scatter.png to ``out`` and return the summary. Estimates use the bank's
    calibration, or with ``folds`` > 1 one cross-validated on these cases."""
    rows, seg_seconds, qc_seconds = validation_cases(bank, model, images, landmarks, ids, partial, perturb, seed)
    if folds > 1:
        cross_validate(rows, ids, folds)
    else:
        estimate(rows, bank.calibration, bank.flag_caps)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(rows, out / "cases.csv")
    summary = summarise_cases(rows) | {
        "images": len(ids),
        "bank_references": len(bank),
        "latents": bank.latents is not None,
        "k": rca.RCAConfig.k,
        "perturbed": perturb,
        "calibration": f"cross-validated, {folds} folds"
        if folds > 1
        else ("the bank's" if bank.calibration is not None else "none"),
        # CPU seconds, one torch thread for registration; the forward pass as --threads.
        "seconds_per_image": {"segmentation": float(np.mean(seg_seconds)), "qc": float(np.mean(qc_seconds))},
    }
    summary["cost_ratio"] = summary["seconds_per_image"]["qc"] / summary["seconds_per_image"]["segmentation"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _scatter(rows, out / "scatter.png")
    return summary


def summarise_cases(rows: list[dict]) -> dict:
    """Pearson r, MAE and bias of the estimates against true Dice: all cases, usable
    ones, the image degradations alone, per organ and per kind; the inverted images' count."""
    usable = [r for r in rows if r["true"] >= USABLE]
    degraded = [r for r in rows if r["kind"] in ("model", *IMAGE_DEGRADATIONS)]
    inverted = [r for r in rows if r["kind"] == "inverted"]
    part = lambda sel: {
        "cases": len(sel),
        "dice_rca_max": _stats(sel, "rca_max"),  # noqa: E731
        "dice_rca_mean": _stats(sel, "rca_mean"),
        "raw_dice_rca_max": _stats(sel, "raw_max"),
    }
    return part(rows) | {
        # Without the easy, far-off failures: how well RCA ranks and scores usable masks.
        f"true_ge_{USABLE}": part(usable),
        # The model's masks of clean and degraded images: what serving sees.
        "image_degradations": part(degraded),
        "organs_max": {o: _stats(rows, f"rca_max_{o}", f"true_{o}") for o in rca.ORGAN_KEYS},
        "by_kind": {
            kind: {
                "n": len(sel),
                "true": float(np.mean([r["true"] for r in sel])),
                "rca_max": float(np.mean([r["rca_max"] for r in sel])),
                "raw_max": float(np.mean([r["raw_max"] for r in sel])),
                "mae_max": float(np.mean([abs(r["rca_max"] - r["true"]) for r in sel])),
                "flagged": {flag: sum(flag in r["flags"].split() for r in sel) for flag in IMAGE_FLAGS},
            }
            for kind in DEGRADATIONS
            if (sel := [r for r in rows if r["kind"] == kind])
        },
        "inverted": {
            "n": len(inverted),
            "flagged": sum("inverted" in r["flags"].split() for r in inverted),
            "within_0.05": sum(abs(r["rca_max"] - r["true"]) <= 0.05 for r in inverted),
        },
    }


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
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel="true Dice ((lungs + heart) / 2)",
            title=f"{title}: r = {s['pearson']:.3f}, MAE = {s['mae']:.3f}",
        )
    axes[0].set_ylabel("RCA estimate")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

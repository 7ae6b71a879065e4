"""``chexmask segment``, ``train`` and ``evaluate``: the model's commands."""

from __future__ import annotations

import csv
import functools
import json
import os
import sys
from collections import Counter
from pathlib import Path

import click
from tqdm import tqdm

from chexmask.config import Settings, resolve_device
from chexmask.files import image_files

# --uncertainty on every command that segments (segment here, serve in pipeline_cli).
uncertainty_option = click.option(
    "--uncertainty",
    type=click.IntRange(min=0),
    default=None,
    help="Latent samples per image for a per-landmark standard deviation, kept with each "
    "segmentation (default: CHEXMASK_UNCERTAINTY_SAMPLES or 0 = none); needs weights with "
    "encoder.fc_logvar (the bundled default has one).",
)

# --reframe/--no-reframe where a command loads the bundled model to segment.
reframe_option = click.option(
    "--reframe/--no-reframe",
    default=None,
    help="Segment again, re-framed, images the bundled model did not understand (its latent far "
    "from its training images'; results named <model>-reframed). Default: CHEXMASK_REFRAME or on. "
    "Other weights (--weights) are never re-framed.",
)


def _settings(reframe: bool | None) -> Settings:
    settings = Settings.from_env()
    return settings if reframe is None else settings.model_copy(update={"reframe": reframe})


@click.command("segment")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--weights", help="Checkpoint path or URL (default: CHEXMASK_WEIGHTS, then the bundled model).")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("chexmask-out"),
    show_default=True,
    help="Folder for the JSON records, mask PNGs, overlays and segmentations.csv.",
)
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Images in the model at once, shared by its threads (default: CHEXMASK_BATCH_SIZE or 2). "
    "Results never depend on it.",
)
@click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None, help="Default: CHEXMASK_DEVICE or auto."
)
@click.option("--dataset", default="", help="Dataset name; picks the CheXmask id column of the CSV (default image_id).")
@uncertainty_option
@reframe_option
def segment_command(
    paths: tuple[Path, ...],
    weights: str | None,
    out: Path,
    batch_size: int | None,
    device: str | None,
    dataset: str,
    uncertainty: int | None,
    reframe: bool | None,
) -> int:
    """Segment chest X-rays (files or folders of DICOM, PNG or JPEG).

    Writes <name>.json (landmarks at 1024 and original resolution, latent,
    preprocessing, source, model), <name>_{right_lung,left_lung,heart}.png,
    <name>_overlay.jpg and one segmentations.csv in the CheXmask layout at
    original resolution, one row per segmented image. <name> is the file's
    stem; inputs sharing a stem keep their extension (rand.png, rand.jpg), and
    inputs sharing a file name are named by their path below the inputs' common
    folder with / as __ (a__x.png, b__x.png). An input that is refused gets
    <name>.error.json with its code; one that fails for any other reason (a
    decoder crash, an unreadable file) gets one with code internal_error, and
    the run goes on. The exit status is 1 when any input was refused or failed.
    """
    from chexmask.datasets import DEFAULT_ID_COLUMN, id_column
    from chexmask.storage.sources import read_regular_file
    from chexmask.worker.pipeline import Segmenter, write_outputs
    from chexmask.worker.weights import load

    settings = _settings(reframe)
    model, info = load(weights, settings, resolve_device(device or settings.device))
    files = list(dict.fromkeys(p.absolute() for p in image_files(paths)))
    if not files:
        raise click.UsageError("no image files found in the given paths")
    out.mkdir(parents=True, exist_ok=True)
    segmenter = Segmenter(
        model,
        info,
        batch_size or settings.batch_size,
        settings.model_threads,
        settings.max_pixels,
        uncertainty=settings.uncertainty_samples if uncertainty is None else uncertainty,
    )
    # Regular files only: a FIFO would block the run, a device never end.
    sources = [(str(p.name), functools.partial(read_regular_file, p)) for p in files]
    refused = failed = 0
    with open(out / "segmentations.csv", "w", newline="") as fh:
        writer = None
        outcomes = segmenter.run(sources, finish=lambda o: write_outputs(o, out), keys=output_names(files))
        for outcome in tqdm(outcomes, total=len(files), desc="segment", unit="image"):
            if outcome.refusal is not None:
                refused += 1
                tqdm.write(
                    f"refused {outcome.name}: {outcome.refusal.code}: {outcome.refusal.message}", file=sys.stderr
                )
                continue
            if not outcome.ok:
                failed += 1
                tqdm.write(f"failed {outcome.name}: {type(outcome.error).__name__}: {outcome.error}", file=sys.stderr)
                continue
            id_name = id_column(dataset) if dataset else DEFAULT_ID_COLUMN
            row = {id_name: outcome.key, **outcome.segmentation.csv_row()}
            if writer is None:
                writer = csv.DictWriter(fh, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
            fh.flush()  # rows already written survive whatever stops the run
    click.echo(
        f"{len(files) - refused - failed} segmented, {refused} refused, {failed} failed; "
        f"results in {out} (model {info.version})"
    )
    return 1 if refused or failed else 0


def output_names(files: list[Path]) -> list[str]:
    """A unique output name per file: its stem; its file name where stems clash
    (rand.png, rand.jpg); its path below the files' common folder with / as __ where
    file names clash (a/x.png, b/x.png -> a__x.png, b__x.png); ~N appended if even those do."""
    common = Path(os.path.commonpath([f.parent for f in files]))
    stems = Counter(f.stem for f in files)
    names = Counter(f.name for f in files)
    wanted = [
        f.stem if stems[f.stem] == 1 else f.name if names[f.name] == 1 else "__".join(f.relative_to(common).parts)
        for f in files
    ]
    seen: Counter[str] = Counter()
    unique = []
    for name in wanted:
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name}~{seen[name]}")
    return unique


@click.command("train")
@click.option(
    "--images",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder of <id>.png images in the 1024 frame.",
)
@click.option(
    "--landmarks",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Folder with RL/, LL/ and H/ subfolders of <id>.npy landmarks.",
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/train"), show_default=True)
@click.option("--epochs", type=int, default=100, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--lr-step", type=int, default=50, show_default=True, help="Epochs between learning-rate halvings.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True)
@click.option("--seed", type=int, default=1234, show_default=True)
@click.option("--resume", type=click.Path(path_type=Path), help="A last.ckpt to continue from.")
@click.option(
    "--init-weights", type=click.Path(exists=True, path_type=Path), help="Start from these weights (fine-tuning)."
)
@click.option("--limit", type=int, help="Use only the first N images (a smoke run).")
@click.option(
    "--augment",
    type=click.Choice(["none", "basic", "world"]),
    default="basic",
    show_default=True,
    help="basic: small affine, gamma, contrast; world: other framing, collimation, text, processing, "
    "noise, blur, JPEG (worker/augment.py).",
)
@click.option(
    "--ood-val/--no-ood-val",
    default=False,
    show_default=True,
    help="Also validate on re-framed, re-processed validation images and choose the best epoch on both.",
)
@click.option(
    "--average-from",
    type=int,
    help="From this epoch on also keep the running mean of the weights (stochastic weight "
    "averaging), written as out/average.pt and validated each epoch.",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def train_command(
    images,
    landmarks,
    out,
    epochs,
    batch_size,
    lr,
    lr_step,
    val_fraction,
    seed,
    resume,
    init_weights,
    limit,
    augment,
    ood_val,
    average_from,
    device,
) -> int:
    """Train HybridGNet on landmark-annotated chest X-rays (resumable).

    Writes out/last.ckpt every epoch (pass it to --resume), out/best.pt (compact
    inference weights for --weights) and out/history.json."""
    from chexmask.worker.train import TrainConfig, train

    cfg = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lr_step=lr_step,
        val_fraction=val_fraction,
        seed=seed,
        limit=limit,
        augment=augment,
        ood_val=ood_val,
        average_from=average_from,
    )
    best = train(images, landmarks, out, cfg, resolve_device(device), resume, init_weights)
    click.echo(json.dumps({"best": best, "weights": str(out / "best.pt")}, indent=1))
    return 0


@click.command("evaluate")
@click.option("--weights", help="Checkpoint to evaluate (default: CHEXMASK_WEIGHTS, then the bundled model).")
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--landmarks", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--ids-file",
    type=click.Path(exists=True, path_type=Path),
    help="A split.json from training; evaluates its --split part only.",
)
@click.option("--split", default="val", show_default=True)
@click.option(
    "--ood",
    is_flag=True,
    help="Score re-framed and re-processed versions of the images instead (zoomed out, shifted, "
    "cropped aspect, collimated, text and markers, rotated, gamma/contrast, processed, "
    "noise/blur/JPEG; seeded), Dice per condition.",
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/evaluate"), show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@reframe_option
def evaluate_command(weights, images, landmarks, ids_file, split, ood, out, device, reframe) -> int:
    """Dice (lungs, heart), Hausdorff distance and landmark error against annotations;
    writes out/summary.json and out/per_image.csv (with --ood also out/conditions.md)."""
    from chexmask.worker.evaluate import condition_table, evaluate, write_report
    from chexmask.worker.weights import load

    model, info = load(weights, _settings(reframe), resolve_device(device))
    ids = json.loads(ids_file.read_text())[split] if ids_file else None
    rows, summary = evaluate(model, images, landmarks, ids, ood=ood, framing=info.framing)
    summary["model"] = info.version
    write_report(rows, summary, out)
    click.echo(json.dumps(summary, indent=1))
    if ood:
        (out / "conditions.md").write_text(condition_table(summary) + "\n")
        click.echo(condition_table(summary))
    return 0

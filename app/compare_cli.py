"""``chexmask compare``: two models' masks of the same images side by side."""

from __future__ import annotations

import json

import click

from chexmask.app.index_cli import _open_index, _table


@click.command("compare")
@click.option("--dataset", required=True, help="Dataset name or alias.")
@click.option("--models", nargs=2, required=True, metavar="A B", help="The two model versions.")
@click.option("--limit", type=click.IntRange(min=1), help="Compare at most this many images.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, writable=True),
    help="Also draw the Dice histograms and the Dice RCA scatter to this PNG.",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def compare_command(dataset: str, models: tuple[str, str], limit: int | None, plot: str | None, fmt: str) -> None:
    """Per-organ Dice and Hausdorff distance between two models' masks of the images
    both have segmented (paired by dataset image id), and the agreement of their
    Dice RCA (Mean): Pearson, Spearman, mean absolute difference. Each image's result
    is stored (replacing an earlier one) for query --compare-to."""
    from chexmask.worker.compare import compare, plot_comparison

    result = compare(_open_index(), dataset, models[0], models[1], limit)
    organs, rca = result.organ_summary(), result.rca_agreement()
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "models": models,
                    "images": len(result.pairs),
                    "organs": organs,
                    "dice_rca_mean": rca,
                    "skipped": result.skipped,
                },
                indent=2,
            )
        )
    else:
        click.echo(f"{len(result.pairs)} image(s) segmented by both {models[0]} and {models[1]}")
        columns = ["organ", "dice mean", "dice median", "hausdorff mean px", "hausdorff median px"]
        rows = [
            [organ, *(f"{v:.4f}" if k.startswith("dice") else f"{v:.1f}" for k, v in s.items())]
            for organ, s in organs.items()
        ]
        click.echo(_table(columns, rows))
        click.echo(
            "Dice RCA (Mean) agreement: "
            + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rca.items())
        )
        for image_id, reason in result.skipped:
            click.echo(f"not compared: {image_id}: {reason}", err=True)
    click.echo(
        f"stored {len(result.pairs)} per-image result(s): `chexmask query --compare-to {models[1]} "
        "--max-agreement-dice X` lists the masks that disagree",
        err=True,
    )
    if plot:
        plot_comparison(result, plot)
        click.echo(f"plot written to {plot}", err=True)

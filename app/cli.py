"""The ``chexmask`` command: a thin layer over the library.

The commands live beside this file, grouped by what they work on (the model,
the pipeline, the index); this file only wires them into one group. Command modules are imported when their command runs, so that
``chexmask --help`` or ``chexmask query`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys

import click

from chexmask import __version__
from chexmask.errors import ChexmaskError

# command name -> (module defining ``<name>_command``, one-line help for the listing)
COMMANDS = {
    "segment": ("chexmask.app.model_cli", "Segment chest X-rays (files or folders of DICOM, PNG or JPEG)."),
    "serve": ("chexmask.app.pipeline_cli", "All in one, no servers: watch an inbox, segment, store and index."),
    "worker": ("chexmask.app.pipeline_cli", "Run a Celery worker (ingest, segment and QC queues)."),
    "watch": ("chexmask.app.pipeline_cli", "Watch a folder and queue the images that arrive."),
    "listen": (
        "chexmask.app.pipeline_cli",
        "Queue images announced by S3 (SQS) or MinIO (Redis list, webhook) events.",
    ),
    "scan": (
        "chexmask.app.pipeline_cli",
        "Queue the new or changed images of a folder or S3 prefix (a dataset release).",
    ),
    "reprocess": ("chexmask.app.pipeline_cli", "Queue the images that lack a segmentation from a model."),
    "retry": ("chexmask.app.pipeline_cli", "Queue again stuck images and QCs, and with --failed every failed image."),
    "push": ("chexmask.app.pipeline_cli", "Send the DICOM SEG and SR of DICOM inputs to the configured destinations."),
    "query": (
        "chexmask.app.index_cli",
        "List segmentations matching the filters (--status refused|failed: those images).",
    ),
    "export": ("chexmask.app.index_cli", "Write a dataset's masks in the CheXmask CSV layout (or Parquet)."),
    "stats": ("chexmask.app.index_cli", "Counts by status and Dice RCA summaries per dataset and release."),
    "import-chexmask": ("chexmask.app.index_cli", "Import a published CheXmask CSV as a model's segmentations."),
    "compare": ("chexmask.app.compare_cli", "Per-organ Dice, Hausdorff and Dice RCA agreement between two models."),
    "api": ("chexmask.app.index_cli", "Serve the HTTP API (docs at /docs) and the web app to browse and grade masks."),
    "reviews": ("chexmask.app.index_cli", "Expert grades of the masks: export them to CSV."),
    "db": ("chexmask.app.index_cli", "Manage the index database schema."),
    "qc": (
        "chexmask.worker.qc_commands",
        "Quality control: build an RCA reference bank, validate RCA, compare it with the uncertainty.",
    ),
    "train": ("chexmask.app.model_cli", "Train HybridGNet on landmark-annotated chest X-rays (resumable)."),
    "evaluate": ("chexmask.app.model_cli", "Dice, Hausdorff distance and landmark error against annotations."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(COMMANDS[name][0])
        return getattr(module, f"{name.replace('-', '_')}_command")

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, help_) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="chexmask")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Segment chest X-rays with HybridGNet in the CheXmask conventions,
    store the masks and query them."""
    from chexmask import logs
    from chexmask.config import Settings

    logs.configure(verbose, Settings.from_env().log_format)


def main() -> None:
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ChexmaskError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

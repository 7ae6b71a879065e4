"""The ``chexmask`` command: a thin layer over the library.

Each subsystem defines its commands next to its code; this file only wires them
into one group.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from chexmask import __version__
from chexmask.errors import ChexmaskError

# module path -> names of click commands/groups it defines
_COMMAND_MODULES = {
    "chexmask.worker.commands": ["segment", "train", "evaluate"],
    "chexmask.worker.worker_commands": ["worker"],
    "chexmask.worker.qc_commands": ["qc"],
    "chexmask.storage.commands": ["query", "export", "stats", "api", "db"],
    "chexmask.ingest.commands": ["serve", "watch", "listen", "scan", "reprocess"],
}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="chexmask")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """Segment chest X-rays with HybridGNet in the CheXmask conventions,
    store the masks and query them."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _register() -> None:
    for module_name, names in _COMMAND_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # subsystem not built yet
                continue
            raise
        for name in names:
            command = getattr(module, f"{name}_command", None)
            if command is not None:
                cli.add_command(command, name)


_register()


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

"""Copy the example chest X-rays that ship with installed packages into a folder.

pydicom-data carries a real CR chest radiograph (RG1), uncompressed and as
JPEG 2000; `make run` drops them into the inbox so the first run has work to do.
"""

import shutil
import sys
from pathlib import Path

from pydicom.data import get_testdata_file

EXAMPLES = ["RG1_UNCR.dcm", "RG1_J2KR.dcm"]


def main(folder: str) -> None:
    inbox = Path(folder)
    inbox.mkdir(parents=True, exist_ok=True)
    for name in EXAMPLES:
        source = get_testdata_file(name, download=False)
        if source is None:
            print(f"example {name} not found (is pydicom-data installed?)", file=sys.stderr)
            continue
        target = inbox / name
        if not target.exists():
            # copy under a hidden name, then rename: a watcher never sees half a file
            partial = inbox / f".{name}.part"
            shutil.copyfile(source, partial)
            partial.rename(target)
            print(f"example image {target}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "inbox")

"""Shared fixtures: the read-only golden data beside the repository, decoded samples,
JSRT ids and reference banks, and model weights for tests.

Everything that needs ../shared (or pydicom-data) skips cleanly when it is absent.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest

from chexmask.worker.decode import DecodedImage, decode_path

# The service fixtures (PostgreSQL, Redis, moto, index, store), one instance per session.
pytest_plugins = ["services"]

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"

# Where each image of the reference goldens comes from: a file in
# data/samples, a pydicom-data file ("pydicom:") or a reference input ("reference:").
GOLDEN_SOURCES = {
    "00000001_000": "00000001_000.png",
    "00027426_000": "00027426_000.png",
    "16747_3_1": "16747_3_1.jpg",
    "covid-19-pneumonia-58-prior": "covid-19-pneumonia-58-prior.jpg",
    "utils_example1": "utils_example1.jpg",
    "synthetic_padded": "reference:synthetic_padded_INPUT.png",
    "RG1_UNCR": "pydicom:RG1_UNCR.dcm",
    "RG1_J2KR": "pydicom:RG1_J2KR.dcm",
    "Fake_MONOHR1": "Fake_MONOHR1.dcm",
    # The SIIM sample is named by its SOP Instance UID in the goldens.
    "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819": "siim_cr_jpeg_baseline_mono2.dcm",
}
DICOM_GOLDENS = ("RG1_UNCR", "RG1_J2KR", "Fake_MONOHR1", "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests asking for ``golden_name`` or ``dicom_golden_name`` run once per golden image."""
    if "golden_name" in metafunc.fixturenames:
        metafunc.parametrize("golden_name", list(GOLDEN_SOURCES))
    if "dicom_golden_name" in metafunc.fixturenames:
        metafunc.parametrize("dicom_golden_name", DICOM_GOLDENS)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.skip(f"golden data not found at {SHARED_DIR}")
    return SHARED_DIR


@pytest.fixture(scope="session")
def jsrt(shared_dir: Path) -> Path:
    """JSRT radiographs with landmarks (images/, landmarks/{RL,LL,H}/, masks/)."""
    root = shared_dir / "data" / "jsrt"
    if not (root / "images").is_dir():
        pytest.skip(f"JSRT data not found under {root}")
    return root


@pytest.fixture(scope="session")
def jsrt_ids(jsrt: Path) -> list[str]:
    """The JSRT images that have landmarks, in ``list_ids`` order."""
    from chexmask.worker.train import list_ids

    return list_ids(jsrt / "images", jsrt / "landmarks")


@pytest.fixture(scope="session")
def jsrt_bank(jsrt: Path, jsrt_ids: list[str]):
    """``jsrt_bank(n)``: a ReferenceBank (no latents) of the first ``n`` JSRT images,
    built once per session. Callers must leave it as they found it."""
    from chexmask.worker.bank import ReferenceBank

    @cache
    def build(n: int) -> ReferenceBank:
        return ReferenceBank.build(jsrt / "images", jsrt / "landmarks", jsrt_ids[:n])

    return build


@pytest.fixture(scope="session")
def samples_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "samples"


@pytest.fixture(scope="session")
def preprocessing_dir(shared_dir: Path) -> Path:
    return shared_dir / "reference" / "preprocessing"


@pytest.fixture(scope="session")
def postprocessing_dir(shared_dir: Path) -> Path:
    return shared_dir / "reference" / "postprocessing"


@pytest.fixture(scope="session")
def postprocessing_goldens(postprocessing_dir: Path) -> dict:
    return json.loads((postprocessing_dir / "postprocessing_goldens.json").read_text())


@pytest.fixture(scope="session")
def pydicom_file() -> Callable[[str], Path]:
    """Path of a file shipped with pydicom or pydicom-data; skips when missing."""
    from pydicom.data import get_testdata_file

    def find(name: str) -> Path:
        path = get_testdata_file(name, download=False)  # never reach for the network
        if path is None:
            pytest.skip(f"pydicom test file {name} is not installed (pip install pydicom-data)")
        return Path(path)

    return find


@pytest.fixture(scope="session")
def golden_source(samples_dir: Path, preprocessing_dir: Path, pydicom_file) -> Callable[[str], Path]:
    """Input file of a golden image, by its name in the reference folder."""

    def find(name: str) -> Path:
        source = GOLDEN_SOURCES[name]
        if source.startswith("pydicom:"):
            return pydicom_file(source.removeprefix("pydicom:"))
        if source.startswith("reference:"):
            return preprocessing_dir / source.removeprefix("reference:")
        return samples_dir / source

    return find


@pytest.fixture(scope="session")
def decoded() -> Callable[[Path], DecodedImage]:
    """decode_path with a session cache: several test files read the same large samples.

    Callers must not modify the returned image.
    """
    return cache(decode_path)


@pytest.fixture(scope="session")
def golden_csv() -> Callable[[Path], list[dict[str, str]]]:
    """Reads a golden CSV into rows; header names are stripped (SPEC 9.1: trailing space)."""

    def read(path: Path) -> list[dict[str, str]]:
        with path.open(newline="") as handle:
            return [{key.strip(): value for key, value in row.items()} for row in csv.DictReader(handle)]

    return read


@pytest.fixture(scope="session")
def golden_weights(shared_dir: Path) -> dict:
    """The deterministic weights of SPEC 6, with which the official goldens were made."""
    import numpy as np
    import torch

    keys = json.loads((shared_dir / "reference" / "hybridgnet_state_dict.json").read_text())["keys"]
    return {
        k["key"]: torch.from_numpy(
            np.random.RandomState(1000 + k["index"])
            .normal(k["rule"]["mean"], k["rule"]["std"], k["shape"])
            .astype(np.float32)
        )
        for k in keys
    }


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory) -> Path:
    """Seeded random HybridGNet weights in a checkpoint file: deterministic results,
    where mask quality does not matter."""
    import torch

    from chexmask.worker.model import HybridGNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "seed0.pt"
    torch.save(HybridGNet().state_dict(), path)
    return path

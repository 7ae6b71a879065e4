"""QC on by default: the bundled bank, switching QC off, a bad bank at start, the
calibration, and the image checks (inverted, occluded, not frontal) on real JSRT images."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from chexmask.config import Settings
from chexmask.errors import ConfigError
from chexmask.status import QCStatus
from chexmask.storage.index import MaskIndex
from chexmask.worker import plausibility, rca
from chexmask.worker.bank import bundled_bank, resolve
from chexmask.worker.qc_commands import degrade_image
from chexmask.worker.service import Service
from chexmask.worker.train import load_landmarks
from chexmask.worker.weights import default_weights, file_sha256

pytest_plugins = ["services"]

VALIDATION_IDS = default_weights()[1]["validation_ids"]


@pytest.fixture(scope="module")
def bank():
    bank, _ = resolve(None)
    return bank


def read(jsrt: Path, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    image = cv2.imread(str(jsrt / "images" / f"{image_id}.png"), cv2.IMREAD_GRAYSCALE)
    return image, load_landmarks(jsrt / "landmarks", image_id)


def settings(tmp_path: Path, qc_bank: str | None) -> Settings:
    return Settings(
        home=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'index.db'}",
        store_url=(tmp_path / "store").as_uri(),
        qc_bank=qc_bank,
    )


# ---------------------------------------------------------------------------
# The bundled bank


def test_bundled_bank_loads_with_its_pinned_checksum(bank):
    path, entry = bundled_bank()
    assert file_sha256(path) == entry["sha256"]
    assert len(bank) == entry["references"] and bank.size == rca.RCAConfig.size
    assert path.stat().st_size < 5e6
    # The model's validation images (the calibration's) are no references.
    assert not set(bank.ids) & (set(VALIDATION_IDS) | set(entry["calibration_ids"]))
    assert bank.latents is None  # picked by thumbnail: the same with any weights
    assert bank.calibration is not None and set(bank.flag_caps) >= {"inverted", "occluded", "not_frontal"}


def test_a_bank_that_fails_its_checksum_is_a_config_error(monkeypatch, tmp_path):
    path, entry = bundled_bank()
    copy = tmp_path / "bank.npz"
    copy.write_bytes(path.read_bytes() + b"tampered")
    monkeypatch.setattr("chexmask.worker.bank.bundled_bank", lambda: (copy, entry))
    with pytest.raises(ConfigError, match="sha256"):
        resolve(None)


def test_calibration_is_monotone(bank):
    raw = np.linspace(0, 1, 501)
    for key, knots in bank.calibration.knots.items():
        mapped = np.interp(raw, *knots)
        assert np.all(np.diff(mapped) >= 0), key
        assert mapped.min() >= 0 and mapped.max() <= 1


def test_isotonic_fit_is_monotone_and_fits_better_than_identity():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.3, 1, 400)
    y = np.clip(x - 0.1 * (1 - x) + rng.normal(0, 0.03, 400), 0, 1)  # biased upward like raw RCA
    knots = rca.fit_isotonic(x, y)
    fitted = np.interp(x, *knots)
    assert np.all(np.diff(knots[1]) >= 0)
    assert np.abs(fitted - y).mean() < np.abs(x - y).mean()


# ---------------------------------------------------------------------------
# Service: QC on by default, off on request, a bad bank at start


def test_unreadable_bank_is_a_config_error_at_service_start(tmp_path):
    broken = tmp_path / "bank.npz"
    broken.write_bytes(b"not a bank")
    with pytest.raises(ConfigError, match="not readable"):
        Service(settings(tmp_path, str(broken)))


def test_bank_none_skips_qc_and_stores_the_reason(tmp_path, jsrt):
    service = Service(settings(tmp_path, "none"))
    try:
        assert service.bank is None and "switched off" in service.qc_state
        service.index.upgrade()
        image, truth = read(jsrt, VALIDATION_IDS[0])
        segmentation = _segmentation(service.index, truth)
        assert service.qc(segmentation, image) is QCStatus.SKIPPED
        row = service.index.get_segmentation(segmentation)
        assert row.qc_status is QCStatus.SKIPPED and row.dice_rca_max is None
        assert row.qc_reason == service.qc_state
    finally:
        service.close()


def test_default_bank_scores_real_masks(tmp_path, jsrt):
    service = Service(settings(tmp_path, None))
    try:
        assert service.bank is not None and "bundled" in service.qc_state
        service.index.upgrade()
        image, truth = read(jsrt, VALIDATION_IDS[1])
        good = _segmentation(service.index, truth, "good")
        shifted = _segmentation(service.index, truth + [90.0, 0.0], "shifted")
        assert service.qc(good, image) is QCStatus.DONE
        assert service.qc(shifted, image) is QCStatus.DONE
        good_row, shifted_row = service.index.get_segmentation(good), service.index.get_segmentation(shifted)
        assert good_row.dice_rca_max > 0.85 and good_row.qc_reason is None
        assert shifted_row.dice_rca_max < good_row.dice_rca_max - 0.1
        assert good_row.qc_flags == []
    finally:
        service.close()


def _segmentation(index: MaskIndex, landmarks: np.ndarray, name: str = "a.png") -> int:
    from services import add_sample

    points = np.round(landmarks).astype(int).tolist()
    return add_sample(index, name, landmarks_1024=points, height=1024, width=1024)[1].id


def test_qc_reason_migration_keeps_existing_rows(tmp_path):
    from alembic import command
    from services import add_sample

    from chexmask.storage.engine import alembic_config

    index = MaskIndex(f"sqlite:///{tmp_path / 'index.db'}")
    try:
        index.upgrade()
        _, segmentation = add_sample(index, "a.png", dice_mean=0.8)
        config = alembic_config()
        with index.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0001")
        index.upgrade()
        row = index.get_segmentation(segmentation.id)
        assert index.current_revision() == MaskIndex.head_revision()
        assert row.dice_rca_mean == 0.8 and row.qc_reason is None
    finally:
        index.close()


# ---------------------------------------------------------------------------
# The image checks on real JSRT images (the model's held-out ones: not in the bank)


def image_flags(bank, image: np.ndarray, landmarks: np.ndarray) -> list[str]:
    small = rca.working_image(image, bank.size)[None]
    return plausibility.check_image(image, landmarks, bank.correlations(small)[0], bank.view_threshold).flags


def test_clean_images_raise_no_image_flag(bank, jsrt):
    for image_id in VALIDATION_IDS:
        image, truth = read(jsrt, image_id)
        assert image_flags(bank, image, truth) == [], image_id


@pytest.mark.parametrize("kind, flag", [("inverted", "inverted"), ("occluded", "occluded")])
def test_degraded_images_are_flagged(bank, jsrt, kind, flag):
    for n, image_id in enumerate(VALIDATION_IDS):
        image, truth = read(jsrt, image_id)
        degraded = degrade_image(image, kind, truth, np.random.default_rng(n))
        assert flag in image_flags(bank, degraded, truth), image_id


@pytest.mark.parametrize("kind", ["image_noise", "blur", "low_contrast", "jpeg"])
def test_other_degradations_are_not_taken_for_inversion_or_occlusion(bank, jsrt, kind):
    for n, image_id in enumerate(VALIDATION_IDS):
        image, truth = read(jsrt, image_id)
        degraded = degrade_image(image, kind, truth, np.random.default_rng(n))
        assert image_flags(bank, degraded, truth) == [], image_id


def test_a_picture_that_is_no_chest_x_ray_is_not_frontal(bank, jsrt):
    """No lateral views are at hand to test with; a picture with no chest-like structure
    stands in. The check is weak (docs/qc.md): a CT slice sits at its threshold."""
    _, truth = read(jsrt, VALIDATION_IDS[0])
    noise = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (1024, 1024), dtype=np.uint8), (0, 0), 20)
    assert "not_frontal" in image_flags(bank, noise, truth)


def test_inverted_real_samples_are_flagged(bank, samples_dir):
    """Files whose pixels display inverted (raw MONOCHROME1 values saved as PNG) are
    flagged; correctly decoded ones of the same sources are not."""
    from chexmask.worker.pipeline import prepare

    def flags(name: str) -> list[str]:
        prepared = prepare((samples_dir / name).read_bytes(), name)
        points = np.array(_frame_points(), dtype=np.float64)
        small = rca.working_image(prepared.image, bank.size)[None]
        return plausibility.check_image(prepared.image, points, bank.correlations(small)[0], bank.view_threshold).flags

    assert "inverted" in flags("rg1_raw_MONO1_15bit.png")
    for name in ("sitk_cxr_MONO2_16bit_scaled.png", "00000001_000.png", "siim_cr_jpeg_baseline_mono2.dcm"):
        assert "inverted" not in flags(name) and "not_frontal" not in flags(name), name


def _frame_points() -> list[list[float]]:
    """A lung box over the middle of the frame (the check only uses the lungs' extent)."""
    return [[256 + 512 * (i % 2), 200 + 5 * i] for i in range(120)]


# ---------------------------------------------------------------------------
# serve says once at start what QC does, and stops on a bad bank


def serve_once(tmp_path: Path, monkeypatch, qc_bank: str):
    from click.testing import CliRunner

    from chexmask.app.cli import cli

    monkeypatch.setenv("CHEXMASK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CHEXMASK_QC_BANK", qc_bank)
    for name in ("CHEXMASK_DATABASE_URL", "CHEXMASK_STORE_URL", "CHEXMASK_WEIGHTS"):
        monkeypatch.delenv(name, raising=False)
    return CliRunner().invoke(cli, ["serve", "--inbox", str(tmp_path / "inbox"), "--once"])


def test_serve_says_once_that_qc_is_off(tmp_path, monkeypatch):
    result = serve_once(tmp_path, monkeypatch, "none")
    assert result.exit_code == 0, result.output
    assert result.output.count("QC switched off (CHEXMASK_QC_BANK=none)") == 1


def test_serve_stops_at_start_on_an_unreadable_bank(tmp_path, monkeypatch):
    broken = tmp_path / "bank.npz"
    broken.write_bytes(b"not a bank")
    (tmp_path / "inbox").mkdir()
    cv2.imwrite(str(tmp_path / "inbox" / "chest.png"), np.full((64, 64), 128, np.uint8))
    result = serve_once(tmp_path, monkeypatch, str(broken))
    # `chexmask` turns a ConfigError into "error: ..." and exit status 2 (cli.main).
    assert isinstance(result.exception, ConfigError) and "is not readable" in str(result.exception)
    assert not (tmp_path / "home" / "store").exists()  # stopped before any image was taken

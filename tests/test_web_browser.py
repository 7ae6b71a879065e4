"""The web app in a real browser: headless Debian chromium driven by selenium,
against ``chexmask api`` (uvicorn) on a loopback port, over an index filled by
``chexmask serve --once`` segmenting real chest X-rays with the bundled weights.

The server runs with a token, given once as ``?token=``: every image that loads
afterwards proves the cookie works for pages, thumbnails and stored objects.
Screenshots of each page go to ``$CHEXMASK_WEB_SCREENSHOTS`` (default: a tmp folder).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

pytest_plugins = ["services"]

SAMPLES = ("00000001_000.png", "00027426_000.png", "utils_example1.jpg")
TOKEN = "browser-s3cret"
# No RCA reference bank ships with the repository, so QC is skipped when serving;
# the test writes Dice values itself (as `chexmask qc` would) to have an order to browse.
DICE = {1: 0.52, 2: 0.93, 3: 0.81}
CHEXMASK = str(Path(sys.executable).with_name("chexmask"))


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip(
            "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver; "
            "scripts/ensure-services.sh does it)"
        )
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    return browser, driver


@pytest.fixture(scope="module")
def home(tmp_path_factory, samples_dir) -> Path:
    """A CHEXMASK_HOME whose index holds three real segmentations and one refusal."""
    root = tmp_path_factory.mktemp("web")
    inbox = root / "inbox"
    inbox.mkdir()
    for name in SAMPLES:
        shutil.copy(samples_dir / name, inbox / name)
    (inbox / "notes.png").write_text("not an image")
    env = {**os.environ, "CHEXMASK_HOME": str(root / "home")}
    env.pop("CHEXMASK_API_TOKEN", None)
    subprocess.run(
        [CHEXMASK, "serve", "--once", "--inbox", str(inbox)], env=env, check=True, capture_output=True, timeout=600
    )
    from chexmask.storage.index import MaskIndex

    index = MaskIndex(f"sqlite:///{root / 'home' / 'index.db'}")
    for seg_id, dice in DICE.items():
        index.set_qc(
            seg_id,
            dice_rca_mean=dice,
            dice_rca_max=dice + 0.02,
            dice_rca_mean_rl=dice,
            dice_rca_mean_ll=dice,
            dice_rca_mean_h=dice - 0.05,
            flags=["shape_outlier"] if dice < 0.6 else [],
        )
    index.close()
    return root / "home"


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[str]:
    with api_server(home) as base:
        yield base


@contextmanager
def api_server(home: Path) -> Iterator[str]:
    """``chexmask api`` over ``home`` with the token, on a free loopback port."""
    from services import free_port

    port = free_port()
    env = {**os.environ, "CHEXMASK_HOME": str(home), "CHEXMASK_API_TOKEN": TOKEN}
    process = subprocess.Popen(
        [CHEXMASK, "api", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("chexmask api did not come up")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture(scope="module")
def browser(server: str):
    binary, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1100",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("CHEXMASK_WEB_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def broken_images(driver) -> list[str]:
    """Sources of the images on the page that did not load (after waiting for them)."""
    deadline = time.time() + 20
    script = "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
    while time.time() < deadline:
        missing = driver.execute_script(script)
        if not missing:
            return []
        time.sleep(0.2)
    return missing


def wait_for(driver, condition, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def press(driver, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    chain = ActionChains(driver)
    for key in keys:
        chain.send_keys(key)
    chain.perform()


def test_browse_filter_and_grade_by_keyboard(server, browser, shots, home):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(f"{server}/")
    assert "token is needed" in browser.page_source
    browser.get(f"{server}/?token={TOKEN}")  # once: it becomes a cookie
    assert "token=" not in browser.current_url
    cards = browser.find_elements(By.CSS_SELECTOR, "#gallery a[data-id]")
    assert [c.get_attribute("data-id") for c in cards] == ["1", "3", "2"]  # worst Dice RCA first
    assert broken_images(browser) == []
    browser.save_screenshot(str(shots / "gallery.png"))

    # filters: the form's fields, submitted like a user would
    browser.find_element(By.NAME, "min_dice_mean").send_keys("0.8")
    browser.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]").click()
    wait_for(browser, lambda d: "min_dice_mean=0.8" in d.current_url)
    assert [c.get_attribute("data-id") for c in browser.find_elements(By.CSS_SELECTOR, "#gallery a[data-id]")] == [
        "3",
        "2",
    ]
    browser.save_screenshot(str(shots / "gallery-filtered.png"))

    # keyboard: j moves to the first card, Enter opens it, j goes on to the next image of the filter
    press(browser, "j", Keys.ENTER)
    wait_for(browser, lambda d: "/image/3" in d.current_url)
    assert broken_images(browser) == []
    press(browser, "j")
    wait_for(browser, lambda d: "/image/2" in d.current_url)
    assert "min_dice_mean=0.8" in browser.current_url
    heart = "return getComputedStyle(document.querySelector('#layers [data-layer=H]')).display"
    assert browser.execute_script(heart) != "none"
    # The plain picture under filled organ layers, so switching an organ off shows the bare X-ray.
    picture = browser.find_element(By.ID, "overlay").get_attribute("src")
    assert picture.endswith("/picture.jpg"), picture
    fill = "return document.querySelector('#layers [data-layer=H] polygon').getAttribute('fill')"
    assert browser.execute_script(fill) not in (None, "none")
    press(browser, "h", "m")  # heart off, landmarks on
    assert browser.execute_script(heart) == "none"
    points = "return document.querySelectorAll('#layers [data-layer=points] circle').length"
    assert browser.execute_script(points) == 120
    browser.save_screenshot(str(shots / "image.png"))

    # the review queue, lowest Dice RCA first, graded by keyboard only
    browser.get(f"{server}/queue?order=worst")
    browser.find_element(By.CSS_SELECTOR, "#reviewer-form input[name=reviewer]").send_keys("dr-ann", Keys.ENTER)
    for seg_id, keys in ((1, "2453"), (3, "5")):
        wait_for(browser, lambda d, s=seg_id: f'action="/review/{s}"' in d.page_source)
        assert broken_images(browser) == []
        browser.execute_script("document.activeElement && document.activeElement.blur()")  # keys to the page
        press(browser, *keys)
        if seg_id == 1:
            browser.save_screenshot(str(shots / "queue-grading.png"))
        press(browser, Keys.ENTER)
    wait_for(browser, lambda d: 'action="/review/2"' in d.page_source)

    from chexmask.storage.index import MaskIndex
    from chexmask.storage.reviews import reviews_of

    index = MaskIndex(f"sqlite:///{home / 'index.db'}")
    graded = [(r.reviewer, r.overall, r.right_lung, r.left_lung, r.heart) for s in (1, 3) for r in reviews_of(index, s)]
    index.close()
    assert graded == [("dr-ann", 2, 4, 5, 3), ("dr-ann", 5, None, None, None)]

    for path, name in (
        ("/problems?status=refused", "refused"),
        ("/datasets/chestx-ray8", "dataset"),
        ("/agreement", "agreement"),
    ):
        browser.get(server + path)
        assert broken_images(browser) == [], path
        browser.save_screenshot(str(shots / f"{name}.png"))
    browser.get(f"{server}/problems?status=refused")
    assert "not_an_image" in browser.page_source


OTHER_MODEL = "hybridgnet-official"
# How far the other model's outlines lie from ours, per segmentation (pixels of the 1024 frame).
OTHER_SHIFT = {1: 0, 2: 24, 3: 60}


@pytest.fixture(scope="module")
def compared_home(home: Path, tmp_path_factory) -> Path:
    """A copy of ``home`` where a second model segmented the same three images (our
    outlines shifted by OTHER_SHIFT) and ``chexmask compare`` stored the agreement."""
    import numpy as np

    from chexmask.anatomy import ORGAN_NAMES
    from chexmask.storage.index import MaskIndex
    from chexmask.worker.postprocess import organ_masks, rle_encode

    copy = tmp_path_factory.mktemp("compared") / "home"
    shutil.copytree(home, copy)
    index = MaskIndex(f"sqlite:///{copy / 'index.db'}")
    for seg_id, shift in OTHER_SHIFT.items():
        ours = index.get_segmentation(seg_id)
        scale = max(ours.height, ours.width) / 1024
        points_1024 = np.asarray(ours.landmarks_1024) + shift
        points = np.round(np.asarray(ours.landmarks_original) + shift * scale).astype(int)
        index.add_segmentation(
            image_id=ours.image_id,
            image_sha256=ours.image_sha256,
            model_version=OTHER_MODEL,
            weights_sha256="b7" * 32,
            landmarks_1024=points_1024.tolist(),
            landmarks_original=points.tolist(),
            height=ours.height,
            width=ours.width,
            rle={ORGAN_NAMES[o]: rle_encode(m) for o, m in organ_masks(points, ours.height, ours.width).items()},
            rle_1024={ORGAN_NAMES[o]: rle_encode(m) for o, m in organ_masks(points_1024, 1024, 1024).items()},
        )
    model = ours.model_version
    datasets = sorted({index.get_image(index.get_segmentation(i).image_id).dataset for i in OTHER_SHIFT})
    index.close()
    env = {**os.environ, "CHEXMASK_HOME": str(copy)}
    env.pop("CHEXMASK_API_TOKEN", None)
    for dataset in datasets:
        subprocess.run(
            [CHEXMASK, "compare", "--dataset", dataset, "--models", model, OTHER_MODEL],
            env=env,
            check=True,
            capture_output=True,
            timeout=300,
        )
    return copy


def test_compare_filter_and_agreement_on_the_image_page(compared_home, browser, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    from chexmask.storage.index import MaskIndex
    from chexmask.storage.queries import QueryFilters

    index = MaskIndex(f"sqlite:///{compared_home / 'index.db'}")
    ours = index.get_segmentation(1).model_version
    disagreeing = index.query(QueryFilters(model=ours, compare_to=OTHER_MODEL, max_agreement_dice=0.95), sort="id")
    index.close()
    assert [r.id for r in disagreeing] == [2, 3]  # the shifted outlines; the unshifted one agrees fully
    worst = min(disagreeing, key=lambda r: r.dice_rca_mean)

    with api_server(compared_home) as base:
        browser.get(f"{base}/?token={TOKEN}")
        browser.get(f"{base}/?model={ours}")
        picker = Select(browser.find_element(By.NAME, "compare_to"))
        assert [o.text for o in picker.options] == ["none", OTHER_MODEL]  # the models compared with ours
        picker.select_by_visible_text(OTHER_MODEL)
        browser.find_element(By.NAME, "max_agreement_dice").send_keys("0.95")
        browser.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]").click()
        wait_for(browser, lambda d: "max_agreement_dice=0.95" in d.current_url)
        cards = browser.find_elements(By.CSS_SELECTOR, "#gallery a[data-id]")
        assert [c.get_attribute("data-id") for c in cards] == [
            str(worst.id),
            *(str(r.id) for r in disagreeing if r is not worst),
        ]
        said = [c.find_element(By.CSS_SELECTOR, ".agreement").text for c in cards]
        assert said[0] == f"agreement with {OTHER_MODEL}: Dice {worst.agreement_dice:.3f}"
        assert broken_images(browser) == []
        browser.save_screenshot(str(shots / "gallery-compare.png"))

        press(browser, "j", Keys.ENTER)
        wait_for(browser, lambda d: f"/image/{worst.id}" in d.current_url)
        assert "compare_to=" in browser.current_url
        section = browser.find_element(By.ID, "agreement").text
        for value in (worst.agreement_dice_rl, worst.agreement_dice_ll, worst.agreement_dice_h):
            assert f"{value:.3f}" in section
        assert f"{worst.agreement_hausdorff_h:.1f}" in section
        outlines = "return document.querySelectorAll('#layers [data-layer=other] polygon').length"
        assert browser.execute_script(outlines) == 3
        assert broken_images(browser) == []
        browser.save_screenshot(str(shots / "image-compare.png"))
        browser.execute_script("document.getElementById('agreement').scrollIntoView()")
        browser.save_screenshot(str(shots / "image-compare-values.png"))
        press(browser, "c")  # the other model's outline off
        shown = "return getComputedStyle(document.querySelector('#layers [data-layer=other]')).display"
        assert browser.execute_script(shown) == "none"

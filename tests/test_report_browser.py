"""The benchmark's report.html in a real browser: headless Chromium driven by Selenium through Debian's chromedriver.

Checks what a person relies on: every image loads, the table sorts on a click, zooming changes
what the panels show (all panels together), and the page is not blank. The screenshot stays in
pytest's tmp dir as an artefact (its path is printed; run with -s to see it).
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.recon import ReconConfig, run_recon
from benchmarks.recon.report import HTML_NAME

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1400,1000")

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): "
           "apt-get install chromium chromium-driver (.ci/run does)")


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install 'cascade-codec[dev]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")  # fresh: nothing from earlier runs
    # An explicit driver path: Selenium then never tries to download one (there is no network here).
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def photo(seed: int, size: int = 160) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([128 + 100 * np.sin(6 * x + seed), 90 + 140 * y, 200 - 120 * x * y], -1)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def test_report_in_headless_chromium(tmp_path, browser):
    from selenium.webdriver.common.by import By

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(photo(i)).save(folder / f"p{i}.png")
    out = tmp_path / "report"
    run_recon(ReconConfig(str(folder), str(out), ["jpeg:quality=20,60", "webp-budget", "bicubic"], size=160,
                          progress=False, grid_images=2, lpips=False, fid=False), log=lambda m: None)
    browser.get((out / HTML_NAME).as_uri())

    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);")
    assert len(images) == 1 + 2 * 5  # the plot; per grid image the original and 4 codecs
    assert all(complete and width > 0 for _, complete, width in images), images

    def column(i: int) -> list[str]:
        return [r.find_elements(By.TAG_NAME, "td")[i].get_attribute("data-v")
                for r in browser.find_elements(By.CSS_SELECTOR, "#summary tbody tr")]

    heads = browser.find_elements(By.CSS_SELECTOR, "#summary th")
    psnr = [h.text for h in heads].index("PSNR dB")
    heads[psnr].click()
    ascending = [float(v) for v in column(psnr)]
    assert ascending == sorted(ascending) and len(ascending) == 4
    heads[psnr].click()
    assert [float(v) for v in column(psnr)] == sorted(ascending, reverse=True)
    assert heads[psnr].get_attribute("aria-sort") == "descending"
    heads[0].click()
    assert column(0) == sorted(column(0))

    figure = browser.find_elements(By.CSS_SELECTOR, "figure.viewer")[0]
    frame_imgs = figure.find_elements(By.CSS_SELECTOR, ".frame img")
    before = browser.execute_script("return arguments[0].getBoundingClientRect().width;", frame_imgs[0])
    figure.find_element(By.CSS_SELECTOR, "button[data-act=in]").click()
    figure.find_element(By.CSS_SELECTOR, "button[data-act=in]").click()
    widths = [browser.execute_script("return arguments[0].getBoundingClientRect().width;", i) for i in frame_imgs]
    assert widths[0] == pytest.approx(4 * before, rel=0.01)  # two clicks: ×4
    transforms = {i.value_of_css_property("transform") for i in frame_imgs}
    assert len(transforms) == 1 and transforms != {"none"}  # every panel shows the same zoomed region
    assert figure.find_element(By.CSS_SELECTOR, ".zoom").text == "400 %"

    shot = tmp_path / "report.png"
    browser.execute_script("window.scrollTo(0, 0);")
    assert browser.save_screenshot(str(shot))
    print(f"\nscreenshot of report.html in headless Chromium: {shot}")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50  # text, a table and a plot, not an empty page

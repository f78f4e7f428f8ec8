"""The build report (OUT/report.html) in a real headless Chromium, and a truthful dataset card.

Chromium and chromedriver come from the OS packages (`apt-get install chromium
chromium-driver`, done by .ci/run); selenium drives the system binaries (nothing is
downloaded)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from conftest import write_synthetic


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """12 good images (3 with sidecar captions) and 3 bad ones, three shards."""
    from pipeline.build import run_build
    from pipeline.config import BuildConfig

    root = tmp_path_factory.mktemp("report")
    folder = root / "in"
    write_synthetic(folder, 12)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notimage.jpg").write_bytes(b"this is not a picture" * 4)
    Image.new("RGB", (20, 20)).save(folder / "tiny.jpg")
    for i in range(3):
        (folder / f"synth_{i:04d}.txt").write_text(f"a caption <b>with markup</b> number {i}")
    out = root / "out"
    run_build(BuildConfig(input=[str(folder)], output=str(out), resolution=64, min_size=64, caption_model="none",
                          keep_captions=True, executor="local", samples_per_shard=5, preview=0), log=lambda *_: None)
    return out


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert binary and driver, "needs the OS packages chromium and chromium-driver (bash .ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,1600",
                 "--allow-file-access-from-files"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_every_build_writes_a_report_that_renders_in_chromium(build, tmp_path):
    from selenium.webdriver.common.by import By

    from pipeline.report import write_report

    manifest = json.loads((build / "manifest.json").read_text())
    reasons = {json.loads(line)["error"] for line in (build / "errors.jsonl").read_text().splitlines()}
    assert reasons == {"empty_file", "not_an_image", "too_small"}
    assert (build / "report.html").exists(), "the build wrote its report"
    write_report(build, samples=1000, per_page=5)  # the command again, with small pages to page through
    browser = _browser()
    try:
        browser.get((build / "report.html").as_uri())
        text = lambda css: browser.find_element(By.CSS_SELECTOR, css).text  # noqa: E731
        assert int(text("#samples")) == manifest["samples"] == 12
        assert int(text("#shards")) == len(manifest["shards"]) and int(text("#rejected")) == 3
        shown = {row.get_attribute("data-reason") for row in browser.find_elements(By.CSS_SELECTOR, "tr[data-reason]")}
        assert shown == reasons
        assert "notimage.jpg" in browser.find_element(By.CSS_SELECTOR, 'tr[data-reason="not_an_image"]').text
        cards = browser.find_elements(By.CSS_SELECTOR, "#grid .card")
        assert len(cards) == 5 and text("#page") == "page 1 of 3"
        loaded = browser.execute_script(
            "return Array.from(document.querySelectorAll('#grid img')).map(i => i.complete && i.naturalWidth)")
        assert all(w and w > 0 for w in loaded), f"thumbnails did not load: {loaded}"
        assert "<b>with markup</b>" in browser.find_element(By.ID, "grid").text, "captions shown as text, not HTML"
        browser.find_element(By.ID, "next").click()
        browser.find_element(By.ID, "next").click()
        assert text("#page") == "page 3 of 3" and len(browser.find_elements(By.CSS_SELECTOR, "#grid .card")) == 2
        assert len(browser.find_elements(By.CSS_SELECTOR, "svg.hist")) == 2, "canny coverage and caption length"
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
        shot = Path(os.environ.get("CONTROLFORGE_ARTIFACTS", tmp_path)) / "report.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        browser.quit()


def test_report_figures_come_from_every_sample(build):
    from pipeline.report import collect

    data = collect(__import__("stages.shards.output", fromlist=["Output"]).Output(str(build)))
    canny = data["coverage"]["canny"]  # samples per twentieth of [0, 1]
    assert sum(canny) == 12 and sum(canny[10:]) == 0, "every map has edges on less than half its pixels"
    assert data["caption_words"][0] == 9 and sum(data["caption_words"].values()) == 12, "nine images had no caption"
    assert data["caption_sources"] == {"input: sidecar .txt files": 3, "none": 9}
    assert data["reasons"] == {"empty_file": 1, "not_an_image": 1, "too_small": 1}


def test_report_spreads_the_grid_over_shards():
    from pipeline.report import pick

    shards = [{"name": f"s{i}", "samples": 1000} for i in range(100)]
    taken = pick(shards, 1000)
    assert sum(taken.values()) == 1000 and set(taken.values()) == {10}
    assert pick([{"name": "a", "samples": 3}], 1000) == {"a": 3}


def test_report_refuses_a_folder_that_is_not_a_build(tmp_path):
    from pipeline.cli import main

    assert main(["report", str(tmp_path)]) == 2


def test_dataset_card_is_truthful(build, tmp_path):
    from pipeline.publish import publish

    target = publish(str(build), to=str(tmp_path / "pub"), val_fraction=0.0, log=lambda *_: None)
    card = (target / "README.md").read_text()
    manifest = json.loads((build / "manifest.json").read_text())
    assert "- input: sidecar .txt files: 3 samples" in card and "- none: 9 samples" in card
    assert f"samples: {manifest['samples']}; rejected: 3" in card and "| train | 12 |" in card
    assert "- `canny`: Canny v" in card and "default settings" in card
    for header in re.finditer(r"^\| .* \|\n\| --- \| --- \|\n(?!\|)", card, re.M):
        raise AssertionError(f"empty table in the card: {header.group(0)!r}")


def test_card_says_so_when_nothing_was_rejected(tmp_path):
    from pipeline.build import run_build
    from pipeline.config import BuildConfig
    from pipeline.publish import publish

    write_synthetic(tmp_path / "in", 2)
    run_build(BuildConfig(input=[str(tmp_path / "in")], output=str(tmp_path / "b"), resolution=64, min_size=64,
                          caption_model="none", executor="local", preview=0, report_samples=0), log=lambda *_: None)
    assert not (tmp_path / "b" / "report.html").exists(), "--report-samples 0 writes no report"
    card = (publish(str(tmp_path / "b"), to=str(tmp_path / "p"), val_fraction=0.0, log=lambda *_: None)
            / "README.md").read_text()
    assert "No input was rejected." in card and "rejected because" not in card

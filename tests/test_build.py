"""End to end: inputs -> shards that follow ../shared/SCHEMA.md, on Ray and without it.

The captioner here is a tiny BLIP with random weights (tests/tiny_models.py),
loaded through the same from_pretrained path as a real one: it checks batching,
plumbing and formats, not caption quality.
"""

from __future__ import annotations

import hashlib
import io
import json
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import synthetic_image, write_real_photos, write_synthetic
from pipeline.build import BuildError, main, run_build
from pipeline.config import BuildConfig
from stages.models.captioner import CaptionModelError

REPO = Path(__file__).resolve().parent.parent
MEMBER_ORDER = ["jpg", "txt", "json", "canny.png"]


def config(inputs, out, **kw) -> BuildConfig:
    base = dict(input=[str(i) for i in inputs], output=str(out), caption_model="none", samples_per_shard=3,
                min_size=64, preview=0)
    base.update(kw)
    return BuildConfig(**base)


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def samples_of(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {member ext: bytes}, over every shard in the manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    found: dict[str, dict[str, bytes]] = {}
    for entry in manifest["shards"]:
        for name, data in read_tar(out / entry["name"]):
            key, ext = name.split(".", 1)
            found.setdefault(key, {})[ext] = data
    return found


def check_schema(out: Path, conditions=("canny",)) -> dict:
    """Everything SCHEMA.md promises about an output folder."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["complete"]
    total = 0
    all_keys = []
    for i, entry in enumerate(manifest["shards"]):
        assert entry["name"] == f"shards/{i:05d}.tar"
        data = (out / entry["name"]).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
        members = read_tar(out / entry["name"])
        keys = list(dict.fromkeys(n.split(".", 1)[0] for n, _ in members))
        assert keys == sorted(keys), "samples in key order"
        expected_order = [f"{k}.{ext}" for k in keys for ext in ["jpg", "txt", "json", *[f"{c}.png" for c in conditions]]]
        assert [n for n, _ in members] == expected_order, "members together, in SCHEMA order"
        assert entry["samples"] == len(keys)
        stats = json.loads((out / "shards" / f"{i:05d}_stats.json").read_text())
        assert stats["samples"] == len(keys) and stats["inputs"] == len(keys) + len(stats["errors"])
        for key in keys:
            assert len(key) == 16 and all(c in "0123456789abcdef" for c in key)
            blobs = {n.split(".", 1)[1]: d for n, d in members if n.startswith(key + ".")}
            meta = json.loads(blobs["json"])
            assert meta["key"] == key and meta["sha256"].startswith(key)
            image = Image.open(io.BytesIO(blobs["jpg"]))
            assert image.mode == "RGB" and image.size == (meta["width"], meta["height"])
            assert "\n" not in blobs["txt"].decode("utf-8")
            for cond in conditions:
                cimg = Image.open(io.BytesIO(blobs[f"{cond}.png"]))
                assert cimg.size == image.size and cimg.mode == "L"
                assert meta["conditions"][cond]["params"]["seed"] > 0
        total += len(keys)
        all_keys += keys
    assert len(all_keys) == len(set(all_keys)), "keys unique across shards"
    assert manifest["samples"] == total
    index = json.loads((out / "wids-index.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1"
    assert [(s["url"], s["nsamples"]) for s in index["shardlist"]] == [(e["name"], e["samples"]) for e in manifest["shards"]]
    return manifest


def summary_rows(table: str) -> dict[str, str]:
    """The end-of-build table's rows, name -> value (names keep their indent)."""
    return {line[:line.rindex("  ")].rstrip(): line[line.rindex("  "):].strip() for line in table.splitlines()
            if "  " in line.strip(" ")}


def errors_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


def test_end_to_end_on_ray_with_tiny_blip_and_three_loaders(tmp_path, ray_session, tiny_blip):
    photos = write_real_photos(tmp_path / "in" / "real")
    synth = write_synthetic(tmp_path / "in" / "synth", 4)
    out = tmp_path / "out"
    cfg = config([tmp_path / "in"], out, caption_model=str(tiny_blip), caption_max_tokens=6, caption_beams=1,
                 caption_batch_size=3, preview=4)
    summary = run_build(cfg, log=lambda *_: None)
    manifest = check_schema(out)
    assert summary["samples"] == manifest["samples"] == len(photos) + len(synth) == 8
    assert (out / "preview.png").exists()
    samples = samples_of(out)
    sources = {json.loads(s["json"])["source"]: k for k, s in samples.items()}
    for path in photos + synth:
        key = sources[str(path)]
        assert key == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        meta = json.loads(samples[key]["json"])
        assert meta["caption_model"] == str(tiny_blip)
        assert samples[key]["txt"].decode().strip(), "the (random) BLIP produced some caption text"

    urls = [str(out / e["name"]) for e in manifest["shards"]]
    import webdataset as wds

    decoded = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(decoded) == 8 and decoded[0]["jpg"].size == (512, 512) and decoded[0]["canny.png"].size == (512, 512)

    import datasets

    hf = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train")
    assert len(hf) == 8 and {"jpg", "txt", "json", "canny.png"} <= set(hf.column_names)
    assert hf[0]["jpg"].size == hf[0]["canny.png"].size

    rows = ray_session.data.read_webdataset(urls).take_all()
    assert len(rows) == 8 and {r["__key__"] for r in rows} == set(samples)


def test_keep_captions_runs_blip_only_for_the_rest(tmp_path, tiny_blip):
    write_real_photos(tmp_path / "in", ["chelsea", "coffee"], captions=True)
    write_synthetic(tmp_path / "in", 2)
    out = tmp_path / "out"
    run_build(config([tmp_path / "in"], out, caption_model=str(tiny_blip), keep_captions=True,
                     caption_max_tokens=5, caption_beams=1, executor="local"), log=lambda *_: None)
    metas = {Path(json.loads(s["json"])["source"]).name: (json.loads(s["json"]), s["txt"].decode())
             for s in samples_of(out).values()}
    assert metas["chelsea.jpg"] == (metas["chelsea.jpg"][0], "a photo called chelsea")
    assert metas["chelsea.jpg"][0]["caption_model"] == "input"
    assert metas["synth_0000.jpg"][0]["caption_model"] == str(tiny_blip)


def test_missing_caption_model_is_a_clear_error(tmp_path, capsys):
    write_synthetic(tmp_path / "in", 2)
    with pytest.raises(CaptionModelError, match="--caption-model"):
        run_build(config([tmp_path / "in"], tmp_path / "out", caption_model=str(tmp_path / "no-blip-here"),
                         executor="local"), log=lambda *_: None)
    code = main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out2"), "--executor", "local",
                 "--caption-model", "Salesforce/blip-image-captioning-base"])
    err = capsys.readouterr().err
    assert code == 2 and "blip-image-captioning-base" in err and "--caption-model ./blip" in err


def make_bad_inputs(folder: Path) -> dict[str, str | None]:
    """file name -> expected rejection reason (None: becomes a sample)."""
    folder.mkdir(parents=True)
    good = synthetic_image(1)
    expect: dict[str, str | None] = {}

    def save(name, img=None, reason=None, raw=None, **kw):
        path = folder / name
        if raw is not None:
            path.write_bytes(raw)
        else:
            img.save(path, **kw)
        expect[name] = reason

    save("good.jpg", good, quality=90)
    save("zero.jpg", raw=b"", reason="empty_file")
    buf = io.BytesIO()
    synthetic_image(2).save(buf, "JPEG", quality=90)
    save("truncated.jpg", raw=buf.getvalue()[: len(buf.getvalue()) // 3], reason="decode_error")
    save("not-an-image.png", raw=b"<html>404 not found</html>", reason="not_an_image")
    save("bomb.png", Image.new("1", (6000, 5000)), reason="decompression_bomb")
    save("cmyk.jpg", synthetic_image(3).convert("CMYK"))
    save("sixteen.png", Image.fromarray((np.asarray(synthetic_image(4).convert("L"), np.uint16) * 257)))
    rgba = synthetic_image(5).convert("RGBA")
    rgba.putalpha(128)
    save("alpha.png", rgba)
    frames = [synthetic_image(6), synthetic_image(7)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:])
    save("panorama.jpg", synthetic_image(8, (1600, 300)), reason="bad_aspect")
    exif = Image.Exif()
    exif[0x0112] = 6
    save("rotated.jpg", synthetic_image(9, (400, 300)), exif=exif)
    save("wéird name (1) #2.jpg", synthetic_image(10))
    save("dots.in.name.jpeg", synthetic_image(11))
    save("tiny.png", synthetic_image(12, (40, 30)), reason="too_small")
    shutil.copy(folder / "good.jpg", folder / "z-copy-of-good.jpg")  # sorts after good.jpg: the copy is the duplicate
    expect["z-copy-of-good.jpg"] = "duplicate"
    return expect


def test_bad_input_set_every_input_is_one_sample_or_one_error(tmp_path, ray_session):
    expect = make_bad_inputs(tmp_path / "in")
    out = tmp_path / "out"
    logs = []
    summary = run_build(config([tmp_path / "in"], out, samples_per_shard=4, max_pixels=20_000_000),
                        log=logs.append)
    check_schema(out)
    by_source = {Path(json.loads(s["json"])["source"]).name: json.loads(s["json"]) for s in samples_of(out).values()}
    errors = {Path(e["source"]).name: e for e in errors_of(out)}
    assert set(by_source).isdisjoint(errors)
    assert set(by_source) | set(errors) == set(expect)
    for name, reason in expect.items():
        if reason is None:
            assert name in by_source, f"{name} should be a sample, got {errors.get(name)}"
        else:
            assert errors[name]["error"] == reason, errors[name]
            assert errors[name]["message"] and errors[name]["stage"]
    assert (by_source["rotated.jpg"]["orig_width"], by_source["rotated.jpg"]["orig_height"]) == (300, 400)
    assert summary["samples"] == sum(r is None for r in expect.values())
    rows = summary_rows("\n".join(map(str, logs)))
    reasons = Counter(r for r in expect.values() if r is not None)
    # fails if the table's rejected total or a reason's row is wrong or missing (it always has a "rejected" row)
    assert rows["rejected"] == str(sum(reasons.values())) and sum(reasons.values()) > 0
    assert {reason: rows.get(f"  {reason}") for reason in reasons} == {r: str(n) for r, n in reasons.items()}


def test_cli_exit_code_and_summary_for_bad_inputs(tmp_path):
    make_bad_inputs(tmp_path / "in")
    proc = subprocess.run([sys.executable, str(REPO / "pipeline" / "build.py"), "--input", str(tmp_path / "in"),
                           "--output", str(tmp_path / "out"), "--executor", "local", "--caption-model", "none",
                           "--min-size", "64", "--max-pixels", "20000000", "--preview", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "rejected" in proc.stdout and "not_an_image" in proc.stdout


def test_two_builds_are_identical_ray_and_local(tmp_path, ray_session):
    write_real_photos(tmp_path / "in", ["astronaut", "rocket"])
    write_synthetic(tmp_path / "in", 5)
    run_build(config([tmp_path / "in"], tmp_path / "a"), log=lambda *_: None)
    run_build(config([tmp_path / "in"], tmp_path / "b", executor="local"), log=lambda *_: None)
    a, b = samples_of(tmp_path / "a"), samples_of(tmp_path / "b")
    assert list(a) == list(b) and len(a) == 7
    for key in a:
        assert a[key]["canny.png"] == b[key]["canny.png"]
    for shard in sorted((tmp_path / "a" / "shards").glob("*.tar")):
        assert shard.read_bytes() == (tmp_path / "b" / "shards" / shard.name).read_bytes()
    other_seed = tmp_path / "c"
    run_build(config([tmp_path / "in"], other_seed, executor="local", seed=7), log=lambda *_: None)
    c = samples_of(other_seed)
    assert any(c[k]["canny.png"] != a[k]["canny.png"] for k in a), "the seed drives the random thresholds"


def test_resume_after_sigkill_gives_the_uninterrupted_result(tmp_path):
    write_synthetic(tmp_path / "in", 40, size=(700, 600))
    args = ["--input", str(tmp_path / "in"), "--executor", "local", "--caption-model", "none", "--min-size", "64",
            "--samples-per-shard", "2", "--preview", "0"]
    reference = tmp_path / "reference"
    assert main([*args, "--output", str(reference)]) == 0

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(REPO / "pipeline" / "build.py"), *args, "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if len(list(out.glob("shards/*_stats.json"))) >= 3:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = json.loads((out / "manifest.json").read_text())
    markers = sorted(out.glob("shards/*_stats.json"))
    assert 3 <= len(markers) < 20 and not partial["complete"], "killed mid-build"
    assert partial["shards"] == [], "shards are listed by their own completion markers until the end"

    logs = []
    run_build(BuildConfig(**{**json.loads((reference / "manifest.json").read_text())["config"],
                             "output": str(out)}), log=logs.append)
    assert logs[0].startswith("warning: taking over the lock") and "is gone" in logs[0], "the killed build's lock"
    assert "already done" in logs[1]
    check_schema(out)
    assert not list(out.rglob("*.tmp-*")), "no temporaries left"
    ref_files = sorted(p.name for p in (reference / "shards").glob("*.tar"))
    assert sorted(p.name for p in (out / "shards").glob("*.tar")) == ref_files
    for name in ref_files:
        assert (out / "shards" / name).read_bytes() == (reference / "shards" / name).read_bytes()
    ref_manifest = json.loads((reference / "manifest.json").read_text())
    assert json.loads((out / "manifest.json").read_text())["shards"] == ref_manifest["shards"]


def test_duplicates_across_shards_become_one_sample(tmp_path):
    paths = write_synthetic(tmp_path / "in", 5)
    shutil.copy(paths[0], tmp_path / "in" / "zz_copy_of_first.jpg")  # sorts last: lands in another shard
    out = tmp_path / "out"
    run_build(config([tmp_path / "in"], out, samples_per_shard=2, executor="local"), log=lambda *_: None)
    check_schema(out)
    assert len(samples_of(out)) == 5
    [error] = errors_of(out)
    assert error["error"] == "duplicate" and error["source"].endswith("zz_copy_of_first.jpg")
    before = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}
    run_build(config([tmp_path / "in"], out, samples_per_shard=2, executor="local"), log=lambda *_: None)
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")} == before, "rerun changes nothing"
    assert len(errors_of(out)) == 1


def test_a_later_build_adds_a_condition_to_existing_shards(tmp_path):
    from stages.annotators import REGISTRY, Annotator, register

    @register
    class Inverted(Annotator):  # a stand-in for the next issue's annotators: one class is all it takes
        name = "inverted"

        def __call__(self, image, rng):
            return 255 - image[..., 0], {}

    try:
        write_real_photos(tmp_path / "in", ["astronaut", "coffee"], captions=True)
        first = tmp_path / "first"
        run_build(config([tmp_path / "in"], first, keep_captions=True, executor="local"), log=lambda *_: None)
        second = tmp_path / "second"
        run_build(config([first / "shards" / "00000.tar"], second, keep_captions=True, executor="local",
                         conditions=["canny", "inverted"]), log=lambda *_: None)
        check_schema(second, conditions=("canny", "inverted"))
        old, new = samples_of(first), samples_of(second)
        assert list(old) == list(new), "keys kept"
        for key in old:
            assert new[key]["jpg"] == old[key]["jpg"], "image bytes passed through, not re-encoded"
            assert new[key]["canny.png"] == old[key]["canny.png"] and new[key]["txt"] == old[key]["txt"]
            assert "inverted.png" in new[key]
    finally:
        REGISTRY.pop("inverted", None)


def test_changed_config_or_inputs_refuse_to_resume(tmp_path):
    write_synthetic(tmp_path / "in", 3)
    out = tmp_path / "out"
    run_build(config([tmp_path / "in"], out, executor="local"), log=lambda *_: None)
    with pytest.raises(BuildError, match="resolution"):
        run_build(config([tmp_path / "in"], out, executor="local", resolution=256), log=lambda *_: None)
    write_synthetic(tmp_path / "in", 1, start=100)
    with pytest.raises(BuildError, match="inputs changed"):
        run_build(config([tmp_path / "in"], out, executor="local"), log=lambda *_: None)
    (out / "keep-me.txt").write_text("user file")
    run_build(config([tmp_path / "in"], out, executor="local", overwrite=True), log=lambda *_: None)
    assert json.loads((out / "manifest.json").read_text())["samples"] == 4
    assert (out / "keep-me.txt").read_text() == "user file"


def test_readme_example_command(tmp_path):
    """The quick start's build, as a subprocess, on the bundled photos."""
    out = tmp_path / "example"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "build", "--config", "datasets/example.yaml",
                           "--output", str(out), "--executor", "local"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "samples written" in proc.stdout and (out / "preview.png").exists()
    assert check_schema(out)["samples"] == 7
    help_text = subprocess.run([sys.executable, "-m", "pipeline.cli", "build", "--help"], cwd=REPO,
                               capture_output=True, text=True).stdout
    assert "--conditions" in help_text and "--keep-captions" in help_text


def test_the_manifest_is_written_a_constant_number_of_times_however_many_shards(tmp_path, monkeypatch):
    """Each shard records its own completion; the manifest is consolidated once at the end."""
    from stages.shards import manifest as index

    saves = []
    original = index.save_manifest
    monkeypatch.setattr(index, "save_manifest", lambda out, m: (saves.append(len(m["shards"])), original(out, m)))
    write_synthetic(tmp_path / "in", 12)
    assert main(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--executor", "local",
                 "--caption-model", "none", "--min-size", "64", "--resolution", "64", "--samples-per-shard", "1",
                 "--preview", "0", "--report-samples", "0"]) == 0
    assert saves == [0, 12], "once at the start (config), once at the end (12 shards)"


def test_auto_executor_runs_small_builds_locally_and_uses_a_cluster_when_there_is_one(monkeypatch):
    from pipeline.build import choose_executor

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not started in this process
    small = BuildConfig(input=["x"])
    assert choose_executor(small, 7) == "local" and choose_executor(small, 65) == "ray"
    assert choose_executor(BuildConfig(input=["x"], auto_local_max_inputs=1000), 500) == "local"
    assert choose_executor(BuildConfig(input=["x"], ray_address="10.0.0.1:6379"), 7) == "ray"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # e.g. under `ray job submit`
    assert choose_executor(small, 7) == "ray"


def _cmdline(process) -> str:
    """A child's command line, or "" for one that is gone or a zombie by now."""
    import psutil

    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_sigterm_leaves_no_process_and_no_lock_behind(tmp_path, executor):
    """A build stopped with SIGTERM (kill, a scheduler, `ray job stop`): the driver exits,
    the lock is released, and no Ray process outlives it (on Ray, its own driver handler
    and fate-sharing do most of it; locally, controlforge's handler unwinds the build)."""
    import shutil
    import tempfile

    import psutil

    write_synthetic(tmp_path / "in", 80, size=(300, 200))
    ray_tmp = tempfile.mkdtemp(prefix="cfr-")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "build", "--input", str(tmp_path / "in"), "--output",
                             str(tmp_path / "out"), "--executor", executor, "--caption-model", "none", "--min-size", "64",
                             "--samples-per-shard", "2", "--preview", "0", "--report-samples", "0"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    family: list = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            family = psutil.Process(proc.pid).children(recursive=True)
            ray_up = executor == "local" or any("raylet" in _cmdline(p) for p in family)
            if ray_up and list((tmp_path / "out" / "shards").glob("*_stats.json")):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the build ended before it could be stopped"
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) != 0
        _, alive = psutil.wait_procs(family, timeout=60)
        assert not alive, f"outlived the driver: {[(p.pid, _cmdline(p)[:80]) for p in alive]}"
        assert not (tmp_path / "out" / ".controlforge.lock").exists(), "the lock was released"
    finally:
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)

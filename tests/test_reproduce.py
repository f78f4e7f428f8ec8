"""bench/reproduce.py end to end in its smoke mode: a tiny random-weight SD base, a few
steps, 8 held-out conditions. Plumbing only (layout, resume, refusal), nothing learns
here; tests/test_learns.py checks that training does."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def reproduce(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "reproduce.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from tiny_models import make_tiny_sd

    root = tmp_path_factory.mktemp("repro")
    sd = make_tiny_sd(root / "sd")
    proc = reproduce("--smoke", "--base", str(sd), "--output", str(root / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, sd, proc


def test_smoke_run_writes_results_report_and_comparable_samples(smoke):
    root, _, _ = smoke
    out = root / "out"
    results = json.loads((out / "results.json").read_text())
    for key in ("base", "base_no_prompt", "vae_reconstruction", "summary", "seconds", "machine"):
        assert key in results
    seed = results["seeds"]["0"]
    assert sorted(seed["curve"], key=int) == ["2", "4"] and set(seed["guidance"]) >= {
        "paper (CFG resolution weighting)", "both branches", "unconditional branch only", "no CFG (scale 1)"}
    assert set(seed["ablations"]) == {"zero_init", "random_init", "dropout_50_no_prompt", "dropout_0_no_prompt"}
    report = (out / "report.md").read_text()
    assert "## Ablations" in report and "![curve](curve.png)" in report
    assert "At the final checkpoint" not in report, "no --dropout-final, no final-step dropout ablation"
    assert "## Stop signal against the evaluation curve" in report
    for name in ("curve.png", "guidance.png", "contact_sheet.png"):
        assert (out / name).stat().st_size > 1000
    records = {}
    for kind in ("controlnet", "base"):
        folder = out / "samples" / kind
        records[kind] = [json.loads(p.read_text()) for p in sorted(folder.glob("[0-9][0-9][0-9][0-9].json"))]
        assert len(records[kind]) == 8
        assert all((folder / f"{r['index']:04d}.png").exists() and (folder / f"{r['index']:04d}_condition.png").exists()
                   for r in records[kind])
    same = lambda r: (r["source"], r["prompt"], r["seed"])  # noqa: E731
    assert [same(r) for r in records["controlnet"]] == [same(r) for r in records["base"]], \
        "the same held-out conditions, prompts and seeds for both"
    assert records["base"][0]["controlnets"] == [] and records["controlnet"][0]["controlnets"]


def test_a_finished_run_resumes_without_redoing_anything(smoke):
    root, sd, _ = smoke
    before = json.loads((root / "out" / "state.json").read_text())["done"]
    proc = reproduce("--smoke", "--base", str(sd), "--output", str(root / "out"))
    assert proc.returncode == 0 and "resuming the run" in proc.stdout
    assert json.loads((root / "out" / "state.json").read_text())["done"] == before


def test_a_folder_from_another_run_or_with_other_files_is_refused(smoke, tmp_path):
    root, sd, _ = smoke
    other = reproduce("--smoke", "--base", str(sd), "--steps", "6", "--output", str(root / "out"))
    assert other.returncode == 2 and "other settings (steps differ)" in other.stderr
    (tmp_path / "mine.txt").write_text("not a reproduction")
    foreign = reproduce("--smoke", "--base", str(sd), "--output", str(tmp_path))
    assert foreign.returncode == 2 and "holds no reproduce run" in foreign.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"], "nothing written into it"


FINAL_ABLATIONS = {"final_step", "dropout_50_no_prompt_final", "dropout_0_no_prompt_final", "dropout_50_final",
                   "dropout_0_final"}


def test_dropout_final_extends_a_finished_run_to_what_a_run_with_it_from_the_start_gives(smoke, tmp_path):
    """--dropout-final on a finished run keeps every phase done and trains the no-dropout
    ControlNet on from its ablation checkpoint: the same weights and scores as a run that
    had the flag from the start (the full mode's path, as smoke runs it)."""
    import shutil

    from safetensors.torch import load_file

    root, sd, _ = smoke
    extended, fresh = tmp_path / "extended", tmp_path / "fresh"
    shutil.copytree(root / "out", extended)
    before = json.loads((extended / "state.json").read_text())["done"]
    proc = reproduce("--smoke", "--dropout-final", "--base", str(sd), "--output", str(extended))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "extending the run" in proc.stdout and "dropout_final" in proc.stdout
    after = json.loads((extended / "state.json").read_text())["done"]
    assert {k: after[k] for k in before} == before, "nothing done before was redone"
    assert set(after) - set(before) == {"train seed 0 no prompt dropout to 4", "eval seed 0 dropout 50 no prompt final",
                                        "eval seed 0 dropout 0 no prompt final", "eval seed 0 dropout 0 final"}
    assert reproduce("--smoke", "--dropout-final", "--base", str(sd), "--output", str(fresh)).returncode == 0
    results = {name: json.loads((folder / "results.json").read_text())["seeds"]["0"]["ablations"]
               for name, folder in (("extended", extended), ("fresh", fresh))}
    assert set(results["extended"]) >= FINAL_ABLATIONS and results["extended"]["final_step"] == 4
    assert results["extended"] == results["fresh"]
    weights = [load_file(folder / "work" / "runs" / "dropout0-s0" / "checkpoint-4" / "controlnet"
                         / "diffusion_pytorch_model.safetensors") for folder in (extended, fresh)]
    assert weights[0].keys() == weights[1].keys() and all(weights[0][k].equal(weights[1][k]) for k in weights[0])
    report = (extended / "report.md").read_text()
    assert "At the final checkpoint (step 4)" in report and "0 %, with the caption" in report
    assert "extended with dropout_final" in report
    assert [e["added"] for e in json.loads((extended / "results.json").read_text())["extended"]] == [["dropout_final"]]
    dropped = reproduce("--smoke", "--base", str(sd), "--output", str(extended))
    assert dropped.returncode == 2 and "dropout_final differ" in dropped.stderr, "an extension is not undone"
    assert reproduce("--smoke", "--part", "generalisation", "--dropout-final", "--base", str(sd), "--output",
                     str(tmp_path / "part")).returncode == 2


def test_sigterm_stops_the_worker_processes_too(smoke, tmp_path):
    """A stopped reproduction leaves no worker training on into its folder."""
    import signal
    import time

    import psutil

    def command(process) -> str:  # a child may end (a zombie, then gone) between listing and reading
        try:
            return " ".join(process.cmdline())
        except psutil.Error:
            return ""

    _, sd, _ = smoke
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "reproduce.py"), "--smoke", "--base", str(sd),
                             "--output", str(tmp_path / "out")], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        workers: list = []
        while time.time() < deadline and len(workers) < 2:  # the job pool: spawned workers besides the tracker
            workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                       if "spawn_main" in command(c)]
            time.sleep(0.5)
        assert len(workers) >= 2, "the run never started its worker processes"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"workers outlived the run: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_smoke_run_scores_the_three_held_out_sets_beside_set_a(smoke):
    root, _, _ = smoke
    out = root / "out"
    results = json.loads((out / "results.json").read_text())
    assert list(results["heldout_sets"]) == ["new", "excluded", "two"]
    for entry in results["heldout_sets"].values():
        assert {"controlnet_f1", "controlnet_f1_shuffled", "base_f1", "vae_ceiling_f1", "ratio_over_base",
                "ratio_over_shuffled"} <= set(entry)
    assert results["heldout_distances"]["a_min_distance_px"] >= 2.0
    assert results["heldout_distances"]["b_min_radius_difference_px"] >= 2.0
    for kind in ("excluded", "two"):
        for who in ("controlnet", "base"):
            assert len(list((out / "samples" / kind / who).glob("[0-9][0-9][0-9][0-9].json"))) == 8
    assert "## Held-out sets" in (out / "report.md").read_text()


# ---- held-out sets and the leak check (bench/circles.py) ----------------------------------

def _circles():
    sys.path.insert(0, str(ROOT / "bench"))
    import circles

    return circles


def test_training_distribution_leaves_out_the_band_and_a_neighbourhood_of_every_set_a_condition():
    C = _circles()
    train, new = C.circle_sets(6000, 64, seed=0)
    assert (train, new) == C.circle_sets(6000, 64, seed=0), "deterministic from the seed"
    assert C.circle_sets(100, 8, seed=0)[0] == train[:100], "the training set does not depend on --heldout"
    assert not any(C.EXCLUDED_RADII_PX[0] < c.r * 64 < C.EXCLUDED_RADII_PX[1] for c in train)
    for h in new:  # brute force, the definition itself: |d centre| >= 2 px or |d r| >= 2 px for every training circle
        assert all(math.hypot(h.cx - t.cx, h.cy - t.cy) * 64 >= 2 or abs(h.r - t.r) * 64 >= 2 for t in train)
    radii = [c.r for c in train]
    assert all(min(radii) <= h.r <= max(radii) for h in new), "set (a) is in range"
    found = C.check_heldout(train, new, C.excluded_set(64), C.two_circle_set(64))
    assert found["a_min_distance_px"] >= 2 and found["b_min_radius_difference_px"] >= 2 and found["c_min_gap_px"] >= 3
    assert all(len(p.circles) == 2 and p.caption.startswith(f"a {p.fg} circle on a ") for p in C.two_circle_set(8))


def test_colours_are_judged_by_the_two_most_common_palette_colours():
    C = _circles()
    circle = C.Circle("red", "light blue", 0.5, 0.5, 0.3)
    assert C.parse_caption(circle.caption) == ("red", "light blue")
    assert C.colours_right(circle.draw(), "red", "light blue")
    assert not C.colours_right(circle.draw(), "light blue", "red"), "circle and background swapped"
    assert not C.colours_right(circle.draw(), "green", "light blue"), "a wrong circle colour"
    big = C.Circle("red", "light blue", 0.5, 0.5, 0.6).draw()  # the circle covers most of the picture
    assert C.colours_right(big, "light blue", "red") and not C.colours_right(big, "red", "light blue")


def test_the_leak_check_fails_on_leaking_sets():
    C = _circles()
    train, new = C.circle_sets(2000, 16, seed=0)
    t = train[5]
    close_centre = C.Circle(t.fg, t.bg, t.cx + 1.5 / 64, t.cy, t.r + 1.0 / 64)  # 1.5 px and 1 px: a leak
    with pytest.raises(C.LeakError, match=r"set \(a\): 1 of 17"):
        C.check_heldout(train, [*new, close_centre])
    far_centre = C.Circle(t.fg, t.bg, t.cx + 2.5 / 64, t.cy, t.r)  # same radius, centre 2.5 px away: allowed
    if all(C.condition_distance(far_centre, o) >= 2 for o in train):
        C.check_heldout(train, [*new, far_centre])
    with pytest.raises(C.LeakError, match=r"set \(b\)"):
        C.check_heldout(train, excluded=[C.Circle("red", "white", 0.5, 0.5, train[0].r + 1.9 / 64)])
    overlapping = C.TwoCircles("red", "white", ((0.4, 0.5, 0.15), (0.6, 0.5, 0.15)))
    with pytest.raises(C.LeakError, match=r"set \(c\)"):
        C.check_heldout(train, two=[overlapping])


def test_a_leak_fails_the_bench_run(tmp_path):
    """The bench checks the circles as written: a held-out circle edited to sit next to a
    training one stops the run."""
    C = _circles()
    import reproduce

    s = dict(reproduce.MODES["smoke"])
    run = reproduce.Run(tmp_path / "out", {"mode": "smoke", **s})
    reproduce.make_data(run, s)
    assert reproduce.check_distances(run, s)["a_min_distance_px"] >= 2
    listing = run.work / "data" / "heldout" / "circles.jsonl"
    train = C.read_circles(run.work / "data" / "train")
    lines = listing.read_text().splitlines()
    leaked = json.loads(lines[0]) | {"cx": train[0].cx, "cy": train[0].cy, "r": train[0].r}
    listing.write_text("\n".join([json.dumps(leaked), *lines[1:]]) + "\n")
    with pytest.raises(C.LeakError):
        reproduce.check_distances(run, s)


# ---- the stop signal (train/metrics.py) -----------------------------------------------------

def _validation_scores(rng, own_mean: float, shuffled_mean: float = 0.13, n: int = 16):
    """Per-image F1 of one validation: against the own and against shuffled conditions,
    with a shared per-image factor (an image without edges scores low on both)."""
    import numpy as np

    q = rng.normal(0, 0.04, n)
    rise = min(1.0, max(0.0, own_mean - shuffled_mean) / 0.3)
    shuffled = np.clip(shuffled_mean + q + rng.normal(0, 0.05, n), 0, 1)
    own = np.clip(own_mean + q + rng.normal(0, 0.05 + 0.15 * rise, n), 0, 1)
    return own, shuffled


def _curve(rise_at: int, width: int, step: int, low: float = 0.13, high: float = 0.75) -> float:
    if width == 0:
        return high if step >= rise_at else low
    return low + (high - low) * min(1.0, max(0.0, (step - rise_at) / width))


@pytest.mark.parametrize("scipy_missing", [False, True], ids=["wilcoxon", "sign-test"])
@pytest.mark.parametrize("spacing", [100, 250])
@pytest.mark.parametrize("width", [0, 300], ids=["jump", "ramp"])
def test_the_stop_signal_fires_within_one_validation_of_a_planted_rise(spacing, width, scipy_missing, monkeypatch):
    """A rise planted at step 1000 (a jump, or a ramp over 300 steps whose midpoint is
    1150): at validation spacings of 100 and 250 steps the signal fires no earlier than
    the rise and no later than the first validation past its midpoint."""
    import builtins

    import numpy as np

    from train.metrics import ConvergenceTracker

    if scipy_missing:
        real_import = builtins.__import__
        monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                            if name.startswith("scipy") else real_import(name, *a, **k))
    rise_at, midpoint = 1000, 1000 + width // 2
    first_past = min(s for s in range(spacing, 10**5, spacing) if s >= midpoint)
    for seed in range(10):
        rng = np.random.default_rng(seed)
        tracker = ConvergenceTracker()
        for step in range(spacing, 3001, spacing):
            tracker.add_scores(step, *_validation_scores(rng, _curve(rise_at, width, step)))
            if step <= rise_at:
                assert tracker.converged_at is None, f"fired at {step}, before the rise"
        assert tracker.converged_at is not None and rise_at <= tracker.converged_at <= first_past, \
            (seed, tracker.converged_at, tracker.p_values)
        assert tracker.to_json()["rule"].startswith("own - shuffled")


def test_a_run_validating_every_50_steps_answers_for_spacings_100_and_250():
    """ConvergenceTracker.replay: the per-image scores a run records (controllability.json)
    fed again at a coarser spacing give exactly the tracker a run at that spacing has."""
    import numpy as np

    from train.metrics import ConvergenceTracker

    rng = np.random.default_rng(3)
    scores = {step: _validation_scores(rng, _curve(1000, 300, step)) for step in range(50, 2001, 50)}
    fine = ConvergenceTracker()
    for step, (own, shuffled) in scores.items():
        fine.add_scores(step, own, shuffled)
    record = json.loads(json.dumps(fine.to_json()))  # as the trainer writes it
    for spacing in (50, 100, 250):
        direct = ConvergenceTracker()
        for step in range(spacing, 2001, spacing):
            direct.add_scores(step, *scores[step])
        replayed = ConvergenceTracker.replay(record, spacing)
        assert replayed.steps == direct.steps and replayed.p_values == pytest.approx(direct.p_values, rel=1e-12)
        assert replayed.converged_at == direct.converged_at is not None, spacing
    assert ConvergenceTracker.replay(record, 250).converged_at != ConvergenceTracker.replay(record, 50).converged_at
    with pytest.raises(ValueError, match="every 50 steps"):
        ConvergenceTracker.replay(record, 75)
    with pytest.raises(ValueError, match="no per-image scores"):
        ConvergenceTracker.replay({k: v for k, v in record.items() if k != "own_scores"}, 100)


def test_the_report_puts_the_stop_signal_against_the_evaluation_curve():
    """reproduce.stop_signal: the evaluation curve's rise (the first evaluated step past
    the midpoint between the base and the best), and at each spacing whether the signal
    fired within one validation of it; a signal that fires late is reported as such."""
    import numpy as np

    from train.metrics import ConvergenceTracker

    _circles()  # bench/ on the path
    import reproduce as bench_reproduce

    curve = {str(k): {"f1": f} for k, f in ((200, 0.12), (400, 0.55), (600, 0.85), (800, 0.86))}

    def record(jump: int) -> dict:
        rng, tracker = np.random.default_rng(0), ConvergenceTracker()
        for step in range(50, 801, 50):
            tracker.add_scores(step, *_validation_scores(rng, 0.75 if step >= jump else 0.13))
        return json.loads(json.dumps(tracker.to_json()))

    result = bench_reproduce.stop_signal(record(400), curve, 0.12)
    assert result["eval_rise"]["step"] == 400 and result["eval_rise"]["after"] == 200
    assert {k: v["fired"] for k, v in result["spacings"].items()} == {50: 400, 100: 400, 250: 500}
    assert all(v["within_one_validation"] for v in result["spacings"].values())
    late = bench_reproduce.stop_signal(record(700), curve, 0.12)["spacings"]
    assert late[50]["fired"] == 700 and not late[50]["within_one_validation"] and not late[100]["within_one_validation"]


def test_the_stop_signal_does_not_fire_on_noise_or_on_sharper_pictures_alone():
    import numpy as np

    from train.metrics import ConvergenceTracker

    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        noise, sharper, small = ConvergenceTracker(), ConvergenceTracker(), ConvergenceTracker()
        for step in range(100, 5001, 100):
            noise.add_scores(step, *_validation_scores(rng, 0.13))
            level = 0.13 + 0.2 * min(1.0, step / 2000)  # both rise together: better circles, not placed
            sharper.add_scores(step, *_validation_scores(rng, level, level))
            small.add_scores(step, *_validation_scores(rng, 0.16))  # own 0.03 over shuffled: under the margin
        assert noise.converged_at is None and sharper.converged_at is None and small.converged_at is None, seed


def test_the_stop_signal_asks_for_two_significant_validations_and_drives_stop_after_convergence():
    import numpy as np

    from train.metrics import ConvergenceTracker

    rng = np.random.default_rng(0)
    tracker = ConvergenceTracker()
    levels = {100: 0.13, 200: 0.13, 300: 0.7, 400: 0.13, 500: 0.13, 600: 0.7, 700: 0.72, 800: 0.75}
    for step, level in levels.items():
        tracker.add_scores(step, *_validation_scores(rng, level))
        if step < 700:
            assert tracker.converged_at is None, "a one-off significant validation (a spike) is not convergence"
    assert tracker.converged_at == 600
    assert not tracker.should_stop(700, 200) and tracker.should_stop(800, 200) and not tracker.should_stop(800, None)
    record = tracker.to_json()
    assert record["p_values"][5] < 0.01 and record["p_values"][1] > 0.01 and len(record["shuffled_values"]) == 8


def test_the_trainer_feeds_the_stop_signal_per_image_scores(tmp_path):
    """validation.track_controllability: per-image own and shuffled F1 of the validation
    images; samples that draw their own condition make it fire at the first of two such
    validations, and --stop-after-convergence K stops K steps later."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from train import validation

    C = _circles()
    _, circles = C.circle_sets(0, 16, seed=0)
    cfg = SimpleNamespace(condition="canny", validation_annotator=None, seed=0, output_dir=str(tmp_path),
                          stop_after_convergence=100)
    tracker = validation.controllability_tracker(cfg)
    canny = tracker.annotator
    pictures = [np.asarray(c.draw()) for c in circles]
    conditions = [canny(p, np.random.default_rng(0))[0] for p in pictures]
    batch = {"conditioning_pixel_values": torch.from_numpy(np.stack([np.stack([c] * 3) for c in conditions])) / 255.0}
    accelerator = SimpleNamespace(log=lambda *a, **k: None)
    logged: list[str] = []
    blank = [np.full_like(pictures[0], 128) for _ in pictures]
    stops = [validation.track_controllability(tracker, batch, images, cfg, step, accelerator, logged.append)
             for step, images in ((100, blank), (200, pictures), (300, pictures), (400, pictures))]
    assert tracker.converged_at == 200 and stops == [False, False, True, True]
    assert any("sudden convergence detected at step 200" in line for line in logged)
    record = json.loads((tmp_path / "controllability.json").read_text())
    assert record["values"][1] > 0.9 and record["shuffled_values"][1] < 0.5 and record["p_values"][1] < 0.01


def smoke_part(tmp_path, part: str) -> tuple[Path, dict]:
    """`--smoke --part PART` on a tiny SD base: the output folder and the part's results."""
    from tiny_models import make_tiny_sd

    sd = make_tiny_sd(tmp_path / "sd")
    out = tmp_path / "out"
    proc = reproduce("--smoke", "--part", part, "--base", str(sd), "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())[part]


def test_consistency_part_smoke_forks_two_arms_and_scores_both(tmp_path):
    """--part consistency: one training per seed to the fork step, then two arms from that
    ControlNet (the loss off and on) scored on every held-out set; the arms start equal and
    end different (the loss changed the training), and the report has the table."""
    import torch
    from diffusers import ControlNetModel

    out, result = smoke_part(tmp_path, "consistency")
    assert set(result["sets"]) == {"new", "excluded", "two"}
    for entry in result["sets"].values():
        assert entry["off"]["f1"]["n"] == 1 and len(entry["f1_gain_per_seed"]) == 1
    assert result["cost_ratio"] > 0 and "| (a) new in-range conditions |" in (out / "report.md").read_text()
    runs = out / "work" / "runs"
    off, on = (ControlNetModel.from_pretrained(runs / f"consistency-{arm}-s0" / "checkpoint-2" / "controlnet")
               .state_dict() for arm in ("off", "on"))
    assert any(not torch.equal(off[k], on[k]) for k in off)


def test_composition_part_smoke_trains_both_conditions_and_scores_every_arm_twice(tmp_path):
    """--part composition: a canny and a colour-grid ControlNet per seed (the latter validated
    on its own metric, so it trained on color_grid), three arms and the base, each scored for
    edges and for colours; the composed sample records both ControlNets."""
    out, result = smoke_part(tmp_path, "composition")
    assert set(result["arms"]) == {"canny only", "colour only", "composed", "composed, colour at 0.5"}
    for entry in [*result["arms"].values()]:
        assert 0 <= entry["f1"]["mean"] <= 1 and 0 <= entry["colour_following"]["mean"] <= 1
    assert set(result["ratios"]) == {"composed", "composed, colour at 0.5"}
    assert result["scales"]["composed, colour at 0.5"] == [1.0, 0.5]
    assert "| composed |" in (out / "report.md").read_text()
    half = json.loads((out / "work" / "samples" / "composed-colour-at-0.5-s0" / "0000.json").read_text())
    assert half["scales"] == [1.0, 0.5]
    runs = out / "work" / "runs"
    assert json.loads((runs / "colour-s0" / "controllability.json").read_text())["metric"] == "colour_error"
    assert json.loads((runs / "canny-s0" / "controllability.json").read_text())["metric"] == "f1_2px"
    record = json.loads((out / "work" / "samples" / "composed-s0" / "0000.json").read_text())
    assert record["conditions"] == ["canny", "color_grid"] and len(record["controlnets"]) == 2


# ---- the stored base's script (bench/circles.py base) -----------------------------------------

def test_the_base_script_makes_the_same_weights_bit_for_bit_and_records_its_command(tmp_path):
    """Step-limited, seeded, on fixed threads: two runs of one command give byte-identical
    weights (a few steps on a few images here: plumbing, not a base that draws circles);
    the json holds the command, the schedule and the colour-following probe. Saving the base
    as it was before the prompt phase as well changes neither base: it is what
    `--prompt-steps 0` makes, and the final base is the one made without it."""
    import subprocess

    outs = [tmp_path / "a", tmp_path / "b"]
    command = ["bench/circles.py", "base", "--vae-steps", "2", "--unet-steps", "3", "--prompt-steps", "2", "--images",
               "16", "--threads", "1", "--schedule", "linear-v"]

    def run(out: Path, *extra: str) -> None:
        proc = subprocess.run([sys.executable, *command[:2], str(out), *command[2:], *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]

    run(outs[0])
    run(outs[1], "--before-prompt-phase", str(tmp_path / "b-before"))
    run(tmp_path / "no-prompt-phase", "--prompt-steps", "0")
    weights = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.safetensors"))
    assert len(weights) == 3  # vae, unet, text encoder
    for path in weights:
        assert (outs[0] / path).read_bytes() == (outs[1] / path).read_bytes(), path
        assert (tmp_path / "b-before" / path).read_bytes() == (tmp_path / "no-prompt-phase" / path).read_bytes(), path
    assert (outs[0] / "unet/diffusion_pytorch_model.safetensors").read_bytes() != \
        (tmp_path / "b-before/unet/diffusion_pytorch_model.safetensors").read_bytes(), "the prompt phase trains the UNet"
    before = json.loads((tmp_path / "b-before" / "circles_base.json").read_text())
    assert before["prompt_phase"] is None and before["saved"].startswith("before the prompt phase")
    assert before["command"][-2:] == ["--before-prompt-phase", str(tmp_path / "b-before")]
    refused = subprocess.run([sys.executable, *command[:2], str(tmp_path / "c"), "--prompt-steps", "0",
                              "--before-prompt-phase", str(tmp_path / "c-before")], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "needs a prompt phase" in refused.stderr and not (tmp_path / "c").exists()
    info = json.loads((outs[0] / "circles_base.json").read_text())
    assert info["command"] == ["python", "bench/circles.py", "base", str(outs[0]), *command[2:]]
    assert info["unet"]["steps"] == 3 and info["vae"]["steps"] == 2 and info["torch_threads"] == 1
    assert info["prompt_phase"]["steps"] == 2 and info["prompt_phase"]["offset_noise"] == 0.3
    assert info["noise_schedule"]["beta_schedule"] == "linear" and 0.0 <= info["colour_following_56_pairs"] <= 1.0
    scheduler = json.loads((outs[0] / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["beta_schedule"] == "linear" and scheduler["beta_end"] == 0.02
    assert scheduler["prediction_type"] == "v_prediction"


def test_the_base_probe_trains_on_stored_latents_and_records_each_probe(tmp_path):
    """bench/base_probe.py (plumbing: two steps on 64 pictures, not a recipe's quality): one
    probe per guidance scale every --every steps, each share a fraction of the 56 colour
    pairs, with its contact sheet; --stored --steps 0 judges the stored base as it is, and
    reproduces the stored base's colour following as circles.colour_following judges it."""
    sys.path.insert(0, str(ROOT / "bench"))
    from base_probe import main as probe

    out = tmp_path / "probe"
    assert probe([str(out), "--steps", "2", "--every", "1", "--images", "64", "--batch", "8", "--heads", "1",
                  "--guidance", "2", "--threads", "2", "--offset-noise", "0.2", "--save"]) == 0
    record = json.loads((out / "probe.json").read_text())
    assert [(p["step"], p["guidance_scale"]) for p in record["probes"]] == [(1, 2.0), (2, 2.0)]
    for p in record["probes"]:
        assert all(0 <= p[k] <= 1 and round(p[k] * 56, 6) == int(round(p[k] * 56)) for k in ("both", "background", "circle"))
        assert p["both"] <= min(p["background"], p["circle"])
        assert (out / f"step-{p['step']}-gs{p['guidance_scale']:g}.png").exists()
    assert record["scheduler"]["prediction_type"] == "v_prediction" and record["scheduler"]["rescale_betas_zero_snr"]
    assert record["unet"]["steps"] == 2 and record["command"][:2] == ["python", "bench/base_probe.py"]
    assert record["settings"]["offset_noise"] == 0.2
    assert json.loads((out / "model" / "model_index.json").read_text())["unet"][1] == "UNet2DConditionModel"

    import torch

    threads = torch.get_num_threads()
    stored = tmp_path / "stored"
    assert probe([str(stored), "--stored", "--steps", "0", "--images", "16", "--guidance", "5", "--threads", "1"]) == 0
    assert torch.get_num_threads() == threads, "the probe leaves the caller's thread count as it was"
    judged_record = json.loads((stored / "probe.json").read_text())
    assert "schedule" not in judged_record["settings"] and "heads" not in judged_record["settings"], \
        "options the stored base does not use are not recorded as its settings"
    judged = judged_record["probes"]
    from circles import STORED_BASE, colour_following

    from train.families.sd import SD

    assert judged[0]["both"] == colour_following(SD().load(str(STORED_BASE), torch.float32), guidance_scale=5.0)

    on = tmp_path / "stored-on"  # --stored --steps N trains the stored base on (it loads frozen)
    assert probe([str(on), "--stored", "--steps", "1", "--images", "16", "--batch", "4", "--offset-noise", "0.3",
                  "--guidance", "2", "--threads", "1"]) == 0
    trained_on = json.loads((on / "probe.json").read_text())
    assert trained_on["unet"]["steps"] == 1 and trained_on["settings"]["offset_noise"] == 0.3


def test_the_base_scheduler_is_configured_as_the_saved_base_so_a_base_is_judged_as_the_tools_load_it():
    """circles.base_scheduler is what make_base and base_probe sample with in memory; diffusers'
    DDPMScheduler defaults clip the predicted clean latent to [-1, 1], which made a base that
    follows its prompts (0.59) score 0.04. It must agree with the scheduler the base saves."""
    sys.path.insert(0, str(ROOT / "bench"))
    from circles import STORED_BASE, base_scheduler

    saved = json.loads((STORED_BASE / "scheduler" / "scheduler_config.json").read_text())
    config = base_scheduler().config
    for key in ("clip_sample", "steps_offset", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                "num_train_timesteps"):
        assert config[key] == saved[key], key
    assert config.clip_sample is False


def test_judge_records_a_saved_bases_colour_following_and_its_command(tmp_path):
    """`circles.py judge BASE`: the colour following of the base as loaded, written into its
    circles_base.json with the command; the build's other fields are kept."""
    import shutil

    sys.path.insert(0, str(ROOT / "bench"))
    from circles import STORED_BASE, judge_base

    base = tmp_path / "base"
    shutil.copytree(STORED_BASE, base)
    before = json.loads((base / "circles_base.json").read_text())
    result = judge_base(base, ["python", "bench/circles.py", "judge", str(base)])
    after = json.loads((base / "circles_base.json").read_text())
    share = after["colour_following_56_pairs"]
    assert share == result["colour_following_56_pairs"] and 0 <= share <= 1 and round(share * 56, 6) == round(share * 56)
    assert after["colour_following_judged_by"] == ["python", "bench/circles.py", "judge", str(base)]
    assert {k: v for k, v in after.items() if k not in ("colour_following_56_pairs", "colour_following_judged_by")} == \
        {k: v for k, v in before.items() if k != "colour_following_56_pairs"}

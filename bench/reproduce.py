"""Does the trainer learn? A fill50k-style reproduction, end to end with controlforge's
own commands (build, train, sample, eval), on a tiny base model that runs on a CPU.

    python bench/reproduce.py --quick --output out/repro       # <= 30 min on 2 CPU cores
    python bench/reproduce.py --output out/repro-full          # 3 seeds, longer runs, all ablations
    python bench/reproduce.py --output out/gen --part generalisation  # 3 seeds, sets (a)-(c) only
    python bench/reproduce.py --output out/cons --part consistency    # with / without the consistency loss
    python bench/reproduce.py --output out/comp --part composition    # canny + colour-grid ControlNets composed

Steps: write circles (bench/circles.py) -> `controlforge build --conditions canny
--keep-captions` for the training and the held-out set -> `controlforge train` on the
stored tiny base (bench/circles_base, or --make-base to train one) -> `controlforge
sample` every checkpoint on the held-out conditions, and the base model with the same
prompts and seeds -> `controlforge eval --shuffled` (edge F1, 2 px tolerance, against the
own and against shuffled conditions) -> ablations (zero vs random init of the output
layers, prompt dropout 50 % vs 0 % in the no-prompt mode (at the ablation step; at the last
step too in the full mode, or with --dropout-final, which also extends a finished run), the
sampler's guidance modes)
-> DIR/results.json, DIR/report.md (+ PNG plots), DIR/samples/{controlnet,base}/.

Held-out sets (bench/circles.py defines them; the training distribution leaves their
parts of condition space out, and a check fails the run if any leaks):
  (a) new in-range conditions: each >= 2 px from every training circle in centre or in
      radius -> DIR/samples/{controlnet,base}/ (scored in every mode);
  (b) the excluded radius band (15.5-16.5 px; no training radius within 2 px)
      -> DIR/samples/excluded/{controlnet,base}/;
  (c) two circles in one picture -> DIR/samples/two/{controlnet,base}/.
The quick mode scores (a) only; the full mode all three; `--part generalisation` runs
the full mode's main trainings and sets (a)-(c) without the ablations (one part of the
full mode that fits 90 minutes on 2 cores).

An output folder holding an earlier run with the same settings is resumed (finished
phases are skipped, training resumes from its last checkpoint); one with other settings,
or with files that are not a run's, is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

MODES = {
    "quick": dict(train_images=6000, heldout=64, steps=1200, eval_every=200, seeds=[0], ablation_steps=400,
                  batch=32, learning_rate=1e-3, timestep_sampling="cubic", validation_steps=50, curve_samples=64,
                  sets=["new"]),
    "full": dict(train_images=20000, heldout=64, steps=2000, eval_every=250, seeds=[0, 1, 2], ablation_steps=500,
                 batch=32, learning_rate=1e-3, timestep_sampling="cubic", validation_steps=50, curve_samples=64,
                 sets=["new", "excluded", "two"]),
}
#: held-out set -> (its data and shard folder under work/, its samples folder under OUT/samples/, title)
SETS = {"new": ("heldout", "", "(a) new in-range conditions"),
        "excluded": ("excluded", "excluded", "(b) excluded radius band"),
        "two": ("two", "two", "(c) two circles in one picture")}
PARTS = ("generalisation", "consistency", "composition")
#: --part consistency: one training per seed to `fork_step`, then two arms from its ControlNet
#: for `extra_steps` more, with and without ControlNet++'s consistency loss (`weight`), the
#: same seeds and batches; both scored on every held-out set. Kept apart from MODES so that
#: the other parts' recorded settings do not change.
CONSISTENCY = {"full": dict(fork_step=1000, extra_steps=250, weight=0.5),
               "smoke": dict(fork_step=2, extra_steps=2, weight=0.5)}
#: --part composition: per seed a canny ControlNet and a colour-grid ControlNet (T2I-Adapter's
#: colour condition: colour without shape), `steps` each; set (a) sampled with each alone and
#: with both composed, every sample scored for edges and for colours.
COMPOSITION = {"full": dict(steps=1000), "smoke": dict(steps=2)}
#: the whole run (no --part): the no-prompt-dropout ablation trained to the last step and scored
#: there too (with and without prompts), besides at ablation_steps; the quick mode keeps to its 30
#: minutes. Kept apart from MODES so that the parts' recorded settings do not change.
DROPOUT_FINAL = {"full": True, "smoke": False, "quick": False}
#: settings a finished run may gain on resume: each only adds jobs and changes none done (with
#: `dropout_final` the no-dropout ControlNet trains on from its ablation checkpoint, which is
#: the straight run bit for bit), so the phases done are kept
EXTENSIONS = ("dropout_final",)
#: arm -> (condition, ControlNet scale) per ControlNet; "composed, colour at 0.5" was added after
#: the full-scale composition over-drove the edges (chosen on set (a) itself: see the README)
COMPOSED = {"canny only": (("canny", 1.0),), "colour only": (("color_grid", 1.0),),
            "composed": (("canny", 1.0), ("color_grid", 1.0)),
            "composed, colour at 0.5": (("canny", 1.0), ("color_grid", 0.5))}
SAMPLING = dict(steps=20, guidance_scale=5.0, mode="paper")
GUIDANCE_MODES = {  # name -> sampler flags, on the same checkpoint
    "paper (CFG resolution weighting)": ["--mode", "paper"],
    "both branches": ["--mode", "both"],
    "unconditional branch only": ["--mode", "uncond"],
    "no CFG (scale 1)": ["--mode", "both", "--guidance-scale", "1"],
    "lllyasviel soft weights": ["--mode", "lllyasviel"],
    "diffusers guess-mode weights": ["--mode", "diffusers"],
}
MODES["smoke"] = dict(train_images=48, heldout=8, steps=4, eval_every=2, seeds=[0], ablation_steps=2, batch=4,
                      learning_rate=1e-3, timestep_sampling="cubic", validation_steps=2, curve_samples=8,
                      sets=["new", "excluded", "two"])  # plumbing only, ~1 min
TARGETS = {"smoke": dict(f1=0.0, over_base=0.0, over_shuffled=0.0), "quick": dict(f1=0.35, over_base=2.0, over_shuffled=2.0), "full": dict(f1=0.5, over_base=3.0, over_shuffled=3.0)}


class RefusedOutput(RuntimeError):
    pass


class Run:
    """The output folder: its settings, the phases done (state.json), and logging."""

    def __init__(self, out: Path, settings: dict):
        self.out, self.settings = out, settings
        self.work = out / "work"
        state_path = out / "state.json"
        if state_path.exists():
            state = json.loads(state_path.read_text())
            if state["settings"] != settings:
                changed = sorted(k for k in settings.keys() | state["settings"].keys()
                                 if settings.get(k) != state["settings"].get(k))
                if not all(k in EXTENSIONS and settings.get(k) and not state["settings"].get(k) for k in changed):
                    raise RefusedOutput(f"{out} holds a run with other settings ({', '.join(changed)} differ): "
                                        f"resume it with the same flags, or pass another --output")
            self.done = state["done"]
            self.first_started = state.get("started", time.time())
            self.extended = state.get("extended", [])
            if state["settings"] != settings:
                self.extended.append({"added": changed, "at": time.time()})
                self.log(f"extending the run in {out} with {', '.join(changed)}: the phases done are kept")
            self.log(f"resuming the run in {out}: done so far: {', '.join(self.done) or 'nothing'}")
        elif out.exists() and any(out.iterdir()):
            raise RefusedOutput(f"{out} is not empty and holds no reproduce run (no state.json): pass an empty or "
                                f"new --output so nothing gets mixed")
        else:
            out.mkdir(parents=True, exist_ok=True)
            self.done = {}
            self.first_started = time.time()
            self.extended = []  # settings added to a finished run (EXTENSIONS), and when
        self._save()

    def _save(self) -> None:
        tmp = self.out / "state.json.tmp"
        tmp.write_text(json.dumps({"settings": self.settings, "started": self.first_started, "done": self.done,
                                   **({"extended": self.extended} if self.extended else {})}, indent=1))
        os.replace(tmp, self.out / "state.json")

    def phase(self, name: str, fn):
        """Run `fn` once; its (JSON) result is kept, so a resumed run skips it."""
        if name not in self.done:
            began = time.perf_counter()
            self.log(f"== {name}")
            result = fn()
            self.done[name] = {"result": result, "seconds": round(time.perf_counter() - began, 1)}
            self._save()
        return self.done[name]["result"]

    def log(self, message: str) -> None:
        elapsed = time.time() - getattr(self, "first_started", time.time())
        line = f"[{elapsed / 60:5.1f} min] {message}"
        print(line, flush=True)
        with open(self.out / "log.txt", "a") as f:
            f.write(line + "\n")


def controlforge(*argv: str) -> None:
    """The project's own command line, in this process (no interpreter start per call)."""
    from pipeline.cli import main

    code = main([str(a) for a in argv])
    if code:
        raise RuntimeError(f"controlforge {' '.join(map(str, argv))} exited with {code}")


# ---- phases ----------------------------------------------------------------------------

def make_data(run: Run, s: dict) -> dict:
    from circles import circle_sets, excluded_set, two_circle_set, write_circles

    train, heldout = circle_sets(s["train_images"], s["heldout"], seed=0)
    write_circles(run.work / "data" / "train", train)
    write_circles(run.work / "data" / "heldout", heldout)
    made = {"train": len(train), "heldout": len(heldout)}
    if "excluded" in s["sets"]:
        made["excluded"] = len(write_circles(run.work / "data" / "excluded", excluded_set(s["heldout"], seed=0)))
    if "two" in s["sets"]:
        made["two"] = len(write_circles(run.work / "data" / "two", two_circle_set(s["heldout"], seed=0)))
    return made


def check_distances(run: Run, s: dict) -> dict:
    """The leak check, on the circles as written (circles.jsonl): raises LeakError (the
    run fails) if a held-out condition is closer to a training one than the sets allow."""
    from circles import check_heldout, read_circles

    data = run.work / "data"
    found = check_heldout(read_circles(data / "train"), new=read_circles(data / "heldout"),
                          excluded=read_circles(data / "excluded") if "excluded" in s["sets"] else (),
                          two=read_circles(data / "two") if "two" in s["sets"] else ())
    run.log(f"   held-out distances: {json.dumps(found)}")
    return found


def build(run: Run, split: str, per_shard: int, conditions: str = "canny") -> dict:
    out = run.work / "shards" / split
    controlforge("build", "--input", run.work / "data" / split, "--output", out, "--conditions", conditions,
                 "--keep-captions", "--caption-model", "none", "--resolution", 64, "--min-size", 64,
                 "--samples-per-shard", per_shard, "--executor", "local", "--preview", 0, "--overwrite")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"samples": sum(s["samples"] for s in manifest["shards"]), "shards": len(manifest["shards"])}


def base_model(run: Run, make: bool) -> str:
    from circles import BASE_DEFAULTS, STORED_BASE, make_base

    if not make:
        return str(STORED_BASE)
    folder = run.work / "base"
    d = BASE_DEFAULTS  # the stored base's recipe, whole
    make_base(folder, d["vae_steps"], d["unet_steps"], d["images"], d["seed"], schedule=d["schedule"],
              threads=d["threads"], prompt_steps=d["prompt_steps"], prompt_offset_noise=d["prompt_offset_noise"],
              prompt_lr=d["prompt_lr"], log=run.log)
    return str(folder)


def train(run: Run, s: dict, base: str, name: str, seed: int, steps: int, init: str = "zero",
          dropout: float = 0.5, controlnet: str | None = None, extra: tuple = ()) -> str:
    """`controlforge train` with the reproduction's recipe; checkpoints every `eval_every`
    steps (each holds a ControlNet folder to sample), validation on the held-out shards
    (every `validation_steps` in the main runs, whose stop signal is reported; every
    `eval_every` in the others).
    `controlnet`: start from that ControlNet; `extra`: further flags."""
    out = run.work / "runs" / f"{name}-s{seed}"
    extra = (*(("--controlnet", controlnet) if controlnet else ()), *extra)
    controlforge("train", "--shards", run.work / "shards" / "train", "--pretrained-model", base,
                 "--output-dir", out, "--resolution", 64, "--train-batch-size", s["batch"],
                 "--max-train-steps", steps, "--learning-rate", s["learning_rate"],
                 "--lr-scheduler", "constant_with_warmup", "--lr-warmup-steps", 50,
                 "--timestep-sampling", s["timestep_sampling"], "--controlnet-init", init, "--prompt-dropout", dropout,
                 "--checkpointing-steps", s["eval_every"], "--checkpoints-total-limit", 1000,
                 "--validation-shards", run.work / "shards" / "heldout",
                 "--validation-steps", s["validation_steps"] if name == "main" else s["eval_every"],
                 "--num-validation-images", 16, "--validation-inference-steps", SAMPLING["steps"],
                 "--validation-guidance-scale", SAMPLING["guidance_scale"], "--dataloader-num-workers", 0,
                 "--shuffle-buffer", 1000, "--report-to", "none", "--seed", seed, "--resume", "latest", *extra)
    return str(out)


def sample_and_eval(run: Run, folder: Path, base: str, controlnet: str | None, n: int, seed: int = 0,
                    extra: list[str] = (), prompt_mode: str = "auto", split: str = "heldout") -> dict:
    """`controlforge sample` on the held-out conditions (`split`: heldout = set (a),
    excluded, two), then `controlforge eval --shuffled`."""
    shard = sorted((run.work / "shards" / split / "shards").glob("*.tar"))[0]
    if folder.exists():
        shutil.rmtree(folder)  # a half-written folder from an interrupted run is redone whole
    flags = {"--mode": SAMPLING["mode"], "--guidance-scale": SAMPLING["guidance_scale"], **dict(zip(extra[::2], extra[1::2]))}
    controlforge("sample", "--pretrained-model", base, *(["--controlnet", controlnet] if controlnet else []),
                 "--shard", shard, "--condition", "canny", "--num", n, "--prompt-mode", prompt_mode,
                 "--steps", SAMPLING["steps"], "--resolution", 64, "--seed", seed, "--output", folder,
                 *[x for kv in flags.items() for x in kv])
    controlforge("eval", folder, "--condition", "canny", "--shuffled")
    report = json.loads((folder / "report.json").read_text())
    result = {"f1": report["mean"], "f1_shuffled": report["shuffled_mean"],
              "colour_accuracy": colour_accuracy(run, folder, split)}
    run.log(f"   {folder.relative_to(run.out)}: F1 {result['f1']:.3f} (shuffled {result['f1_shuffled']:.3f}), "
            f"colours right {result['colour_accuracy']:.2f}")
    return result


def heldout_captions(run: Run, split: str = "heldout") -> dict[str, str]:
    """Sample key -> the caption of its held-out circle (what the prompt asked for)."""
    import webdataset as wds

    shard = sorted((run.work / "shards" / split / "shards").glob("*.tar"))
    return {s["__key__"]: s["txt"].decode().strip() for s in wds.WebDataset([str(p) for p in shard],
                                                                            shardshuffle=False, empty_check=False)}


def colour_accuracy(run: Run, folder: Path, split: str = "heldout") -> float:
    """Prompt-following, independent of position: the share of samples whose most common
    colour (nearest of the task's colours) is the caption's background and second most
    common is the circle's colour. Judged against the held-out caption even when the
    sample was drawn without a prompt."""
    import numpy as np
    from PIL import Image

    from circles import colours_right, parse_caption

    captions = heldout_captions(run, split)
    right = []
    for record_path in sorted(folder.glob("[0-9][0-9][0-9][0-9].json")):
        record = json.loads(record_path.read_text())
        fg, bg = parse_caption(captions[record["source"]])
        right.append(colours_right(Image.open(folder / f"{record['index']:04d}.png"), fg, bg))
    return float(np.mean(right))


def vae_ceiling(run: Run, base: str, split: str = "heldout", samples: str = "base") -> dict:
    """Edge F1 of the base's VAE reconstructions of the held-out images: no sample can
    beat what the decoder can draw (a diagnostic, measured with the same metric)."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from stages.annotators import create
    from train.metrics import controllability

    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=torch.float32).eval()
    folder = run.work / "samples" / samples
    conditions, images = [], []
    for path in sorted(folder.glob("[0-9][0-9][0-9][0-9]_condition.png")):
        conditions.append(np.asarray(Image.open(path).convert("L")))
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("[0-9][0-9][0-9][0-9].json"))]
    originals = heldout_images(run, split)
    with torch.no_grad():
        for record in records:
            x = torch.from_numpy(originals[record["source"]]).permute(2, 0, 1)[None].float() / 127.5 - 1
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
            images.append(((y[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    canny = create(["canny"], {})["canny"]
    return {"f1": controllability("canny", canny, conditions, images)}


def heldout_images(run: Run, split: str = "heldout") -> dict:
    import webdataset as wds

    shard = sorted((run.work / "shards" / split / "shards").glob("*.tar"))
    import numpy as np

    return {s["__key__"]: np.asarray(s["jpg"].convert("RGB")) for s in wds.WebDataset(
        [str(p) for p in shard], shardshuffle=False, empty_check=False).decode("pil")}


def trainer_convergence(run_dir: str) -> dict:
    path = Path(run_dir) / "controllability.json"
    if not path.exists():
        return {"sudden_convergence_step": None, "steps": [], "values": []}
    data = json.loads(path.read_text())
    keys = ("steps", "values", "sudden_convergence_step", "metric", "shuffled_values", "p_values", "rule",
            "higher_is_better", "own_scores", "shuffled_scores")
    return {k: data[k] for k in keys if k in data}


#: the validation spacings the stop signal is shown at, replayed from one run that validates
#: at a divisor of them all (ConvergenceTracker.replay: validation leaves the training unchanged)
STOP_SPACINGS = (100, 250)


def stop_signal(record: dict, curve: dict, base_f1: float) -> dict:
    """When the stop signal fires at the run's own validation spacing and at STOP_SPACINGS,
    against the evaluation curve's rise: the first evaluated step past the midpoint between
    the base's F1 and the curve's best (the rise happened after the evaluation before it).
    Within one validation: fired no earlier than one spacing before that earlier evaluation,
    and no later than one spacing after the rise."""
    from train.metrics import ConvergenceTracker, validation_spacing

    f1 = {int(k): v["f1"] for k, v in curve.items()}
    steps = sorted(f1)
    midpoint = (base_f1 + max(f1.values())) / 2
    rise = next(k for k in steps if f1[k] >= midpoint)
    after = max([0] + [k for k in steps if k < rise])
    result = {"eval_rise": {"step": rise, "after": after, "midpoint_f1": midpoint}, "spacings": {}}
    if not record.get("steps"):
        return result
    own = validation_spacing(record["steps"])
    for spacing in sorted({own, *STOP_SPACINGS}):
        if spacing % own or spacing > record["steps"][-1] or (spacing != own and "own_scores" not in record):
            continue  # not a multiple of the run's spacing, longer than the run, or no per-image scores
        fired = (record["sudden_convergence_step"] if spacing == own
                 else ConvergenceTracker.replay(record, spacing).converged_at)
        result["spacings"][spacing] = {"fired": fired, "within_one_validation":
                                       fired is not None and after - spacing < fired <= rise + spacing}
    return result


def stop_signal_markdown(results: dict) -> list[str]:
    lines = ["## Stop signal against the evaluation curve (set (a))", "",
             "| seed | evaluation curve rose | validation spacing | signal fired | within one validation |",
             "| --- | --- | --- | --- | --- |"]
    for seed, sd in results["seeds"].items():
        signal = sd.get("stop_signal") or {}
        rise = signal.get("eval_rise")
        for spacing, entry in (signal.get("spacings") or {}).items():
            lines.append(f"| {seed} | {rise['after']}-{rise['step']} | {spacing} | "
                         f"{entry['fired'] if entry['fired'] is not None else 'no'} | "
                         f"{'yes' if entry['within_one_validation'] else 'NO'} |")
    return lines + ["", "Spacings other than the run's own are replayed from its per-image validation scores "
                        "(train/metrics.py ConvergenceTracker.replay).", ""]


# ---- the whole reproduction ---------------------------------------------------------------

class Job(NamedTuple):
    name: str
    fn: Callable[[], Any]
    deps: tuple[str, ...] = ()
    files: tuple[Path, ...] = ()  # files that must exist first (a checkpoint another job is writing)


def _worker_start(threads: int, parent: int) -> None:
    """Torch threads per worker, and a watchdog: a worker whose parent is gone (killed,
    even with SIGKILL) exits instead of training on into a folder nobody owns."""
    import threading

    import torch

    torch.set_num_threads(threads)

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def run_jobs(run: Run, jobs: list[Job], workers: int, threads: int) -> None:
    """Run jobs in `workers` processes, in list order as their inputs become ready.
    On 2 cores, two 1-thread processes do about 1.5x the work of one 2-thread process
    (small tensors parallelise poorly inside one op), so training runs and sample
    evaluations overlap. Results are recorded by this process as each job ends."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pending = [job for job in jobs if job.name not in run.done]
    running: dict = {}
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_start, initargs=(threads, os.getpid()))
    try:
        while pending or running:
            for job in list(pending):
                if len(running) >= workers:
                    break
                if all(d in run.done for d in job.deps) and all(Path(f).exists() for f in job.files):
                    pending.remove(job)
                    run.log(f"== {job.name}")
                    running[pool.submit(job.fn)] = (job, time.perf_counter())
            if not running:
                raise RuntimeError(f"jobs wait for inputs nothing is making: {[j.name for j in pending]}")
            finished, _ = wait(running, timeout=5, return_when=FIRST_COMPLETED)
            for future in finished:
                job, began = running.pop(future)
                run.done[job.name] = {"result": future.result(), "seconds": round(time.perf_counter() - began, 1)}
                run._save()
    except BaseException:  # a failed job, Ctrl-C, SIGTERM: stop at once; finished jobs stay recorded
        pool.shutdown(wait=False, cancel_futures=True)
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        raise
    pool.shutdown()


def plan(run: Run, s: dict, base: str, part: str | None = None) -> list[Job]:
    """Every training and evaluation of the reproduction, most urgent first; with
    part="generalisation" the main trainings, their curves and sets (a)-(c) only."""
    a, last = s["ablation_steps"], s["steps"]
    checkpoint_steps = sorted({*range(s["eval_every"], last + 1, s["eval_every"]), last, a})
    samples = run.work / "samples"
    n = s["curve_samples"]

    def runs(name: str, seed: int) -> Path:
        return run.work / "runs" / f"{name}-s{seed}"

    def ready(name: str, seed: int, step: int) -> tuple[Path, ...]:
        return (runs(name, seed) / f"checkpoint-{step}" / "controlforge_state.json",)

    def net(name: str, seed: int, step: int) -> str:
        return str(runs(name, seed) / f"checkpoint-{step}" / "controlnet")

    if part == "consistency":
        return consistency_plan(run, s, base, ready, net)
    if part == "composition":
        return composition_plan(run, s, base, ready, net)
    jobs = [Job(f"train seed {seed}", partial(train, run, s, base, "main", seed, last)) for seed in s["seeds"]]
    jobs += [Job("sample base", partial(sample_and_eval, run, samples / "base", base, None, n)),
             Job("vae ceiling", partial(vae_ceiling, run, base), deps=("sample base",))]
    for name in s["sets"]:
        if name == "new":
            continue
        split = SETS[name][0]
        jobs += [Job(f"sample base {name}", partial(sample_and_eval, run, samples / f"base-{name}", base, None, n,
                                                    split=split)),
                 Job(f"vae ceiling {name}", partial(vae_ceiling, run, base, split, f"base-{name}"),
                     deps=(f"sample base {name}",))]
    for seed in s["seeds"]:
        jobs += [Job(f"eval seed {seed} {name}", partial(sample_and_eval, run, samples / f"main-s{seed}-{last}-{name}",
                                                         base, net("main", seed, last), n, split=SETS[name][0]),
                     files=ready("main", seed, last)) for name in s["sets"] if name != "new"]
    if part == "generalisation":
        curve_steps = sorted({*range(s["eval_every"], last + 1, s["eval_every"]), last})
        return jobs + [Job(f"eval seed {seed} step {k}", partial(sample_and_eval, run, samples / f"main-s{seed}-{k}",
                                                                 base, net("main", seed, k), n),
                           files=ready("main", seed, k)) for seed in s["seeds"] for k in curve_steps]
    jobs += [Job("sample base, no prompt", partial(sample_and_eval, run, samples / "base-none", base, None, n,
                                                   prompt_mode="none"))]
    for seed in s["seeds"]:
        jobs += [Job(f"train seed {seed} random init", partial(train, run, s, base, "random-init", seed, a, init="random")),
                 Job(f"train seed {seed} no prompt dropout", partial(train, run, s, base, "dropout0", seed, a,
                                                                     dropout=0.0))]
        if s.get("dropout_final"):  # on from step a in the same folder: the straight run bit for bit (resume)
            jobs.append(Job(f"train seed {seed} no prompt dropout to {last}",
                            partial(train, run, s, base, "dropout0", seed, last, dropout=0.0),
                            deps=(f"train seed {seed} no prompt dropout",)))
    for seed in s["seeds"]:
        jobs += [Job(f"eval seed {seed} step {k}", partial(sample_and_eval, run, samples / f"main-s{seed}-{k}", base,
                                                           net("main", seed, k), n), files=ready("main", seed, k))
                 for k in checkpoint_steps]
        jobs += [Job(f"eval seed {seed} random init", partial(sample_and_eval, run, samples / f"random-init-s{seed}", base,
                                                              net("random-init", seed, a), n),
                     files=ready("random-init", seed, a)),
                 Job(f"eval seed {seed} dropout 50 no prompt", partial(
                     sample_and_eval, run, samples / f"dropout50-none-s{seed}", base, net("main", seed, a), n,
                     prompt_mode="none"), files=ready("main", seed, a)),
                 Job(f"eval seed {seed} dropout 0 no prompt", partial(
                     sample_and_eval, run, samples / f"dropout0-none-s{seed}", base, net("dropout0", seed, a), n,
                     prompt_mode="none"), files=ready("dropout0", seed, a))]
        if s.get("dropout_final"):  # the prompt-dropout ablation at the final checkpoint too, with and without prompts
            jobs += [Job(f"eval seed {seed} dropout 50 no prompt final", partial(
                         sample_and_eval, run, samples / f"dropout50-none-s{seed}-{last}", base, net("main", seed, last),
                         n, prompt_mode="none"), files=ready("main", seed, last)),
                     Job(f"eval seed {seed} dropout 0 no prompt final", partial(
                         sample_and_eval, run, samples / f"dropout0-none-s{seed}-{last}", base,
                         net("dropout0", seed, last), n, prompt_mode="none"), files=ready("dropout0", seed, last)),
                     Job(f"eval seed {seed} dropout 0 final", partial(
                         sample_and_eval, run, samples / f"dropout0-s{seed}-{last}", base, net("dropout0", seed, last),
                         n), files=ready("dropout0", seed, last))]
        jobs += [Job(f"guidance seed {seed} {name}", partial(sample_and_eval, run, samples / f"guidance-s{seed}-{i}", base,
                                                             net("main", seed, last), n, extra=flags),
                     files=ready("main", seed, last)) for i, (name, flags) in enumerate(GUIDANCE_MODES.items())]
    return jobs


ARMS = {"off": (), "on": None}  # the consistency arms: without the loss, and with it (flags made from settings)


def consistency_plan(run: Run, s: dict, base: str, ready, net) -> list[Job]:
    """Per seed: train to fork_step; from that ControlNet, extra_steps more without and with
    the consistency loss; score both arms on every held-out set. The base is scored too."""
    c = s["consistency"]
    samples, n = run.work / "samples", s["curve_samples"]
    jobs = [Job(f"sample base {name}", partial(sample_and_eval, run, samples / f"base-{name}", base, None, n,
                                               split=SETS[name][0])) for name in s["sets"]]
    for seed in s["seeds"]:
        jobs.append(Job(f"train seed {seed} to fork", partial(train, run, s, base, "fork", seed, c["fork_step"])))
    for seed in s["seeds"]:
        start = net("fork", seed, c["fork_step"])
        for arm in ARMS:
            flags = () if arm == "off" else ("--consistency-weight", c["weight"])
            jobs.append(Job(f"train seed {seed} consistency {arm}",
                            partial(train, run, s, base, f"consistency-{arm}", seed, c["extra_steps"],
                                    controlnet=start, extra=flags), files=ready("fork", seed, c["fork_step"])))
    for seed in s["seeds"]:
        for arm in ARMS:
            jobs += [Job(f"eval seed {seed} consistency {arm} {name}", partial(
                sample_and_eval, run, samples / f"consistency-{arm}-s{seed}-{name}", base,
                net(f"consistency-{arm}", seed, c["extra_steps"]), n, split=SETS[name][0]),
                files=ready(f"consistency-{arm}", seed, c["extra_steps"])) for name in s["sets"]]
    return jobs


def consistency_results(run: Run, s: dict) -> dict:
    """Per held-out set: F1 and colour following of both arms (mean and spread over seeds),
    the difference on = off per seed, and the seconds per training step of each arm."""
    c, seeds = s["consistency"], s["seeds"]

    def done(name: str):
        return run.done[name]["result"]

    sets = {}
    for name in s["sets"]:
        arms = {arm: [done(f"eval seed {seed} consistency {arm} {name}") for seed in seeds] for arm in ARMS}
        sets[name] = {"title": SETS[name][2], "base": done(f"sample base {name}"),
                      **{arm: {"f1": mean_spread([r["f1"] for r in rs]),
                               "f1_shuffled": mean_spread([r["f1_shuffled"] for r in rs]),
                               "colour_accuracy": mean_spread([r["colour_accuracy"] for r in rs])}
                         for arm, rs in arms.items()},
                      "f1_gain_per_seed": [on["f1"] - off["f1"] for on, off in zip(arms["on"], arms["off"])],
                      "colour_gain_per_seed": [on["colour_accuracy"] - off["colour_accuracy"]
                                               for on, off in zip(arms["on"], arms["off"])]}
    seconds = {arm: [run.done[f"train seed {seed} consistency {arm}"]["seconds"] / c["extra_steps"] for seed in seeds]
               for arm in ARMS}
    return {"settings": c, "sets": sets,
            "seconds_per_step": {arm: mean_spread(v) for arm, v in seconds.items()},
            "cost_ratio": float(sum(seconds["on"]) / max(sum(seconds["off"]), 1e-9)),
            "goal": "at least +0.03 F1 on set (a), colour following no worse"}


def consistency_markdown(result: dict) -> list[str]:
    c = result["settings"]
    lines = ["## Consistency fine-tuning (ControlNet++)", "",
             f"From each seed's ControlNet at step {c['fork_step']}, {c['extra_steps']} more steps without and with "
             f"the consistency loss (weight {c['weight']}), the same seeds; sets scored with 2 px edge F1 and colour "
             f"following. Cost: {result['seconds_per_step']['on']['mean']:.2f} s/step with it, "
             f"{result['seconds_per_step']['off']['mean']:.2f} without ({result['cost_ratio']:.2f}x, job wall time "
             f"incl. model loading).", "",
             "| set | F1 off | F1 on | gain per seed | colours off | colours on | base F1 |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for entry in result["sets"].values():
        lines.append(f"| {entry['title']} | {entry['off']['f1']['mean']:.3f} | {entry['on']['f1']['mean']:.3f} | "
                     + ", ".join(f"{g:+.3f}" for g in entry["f1_gain_per_seed"])
                     + f" | {entry['off']['colour_accuracy']['mean']:.2f} | {entry['on']['colour_accuracy']['mean']:.2f}"
                     f" | {entry['base']['f1']:.3f} |")
    return lines + [""]


def composed_sample_and_score(run: Run, folder: Path, base: str, nets: list[tuple[str, str, float]], n: int,
                              split: str = "heldout") -> dict:
    """`controlforge sample` with the (ControlNet, condition) pairs in `nets` composed (none:
    the base alone), conditions from the held-out shard; each sample scored twice against
    the shard's own maps: edge F1 against canny, colour error against color_grid (so every
    arm is scored against both, whichever it was given), plus the caption colours."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    from stages.annotators import create
    from train.metrics import controllability

    shard = sorted((run.work / "shards" / split / "shards").glob("*.tar"))[0]
    if folder.exists():
        shutil.rmtree(folder)
    pairs = [x for path, condition, scale in nets
             for x in ("--controlnet", path, "--condition", condition, "--scale", scale)]
    controlforge("sample", "--pretrained-model", base, *(pairs or ["--condition", "canny"]), "--shard", shard,
                 "--num", n, "--prompt-mode", "auto", "--steps", SAMPLING["steps"], "--resolution", 64, "--seed", 0,
                 "--output", folder, "--mode", SAMPLING["mode"], "--guidance-scale", SAMPLING["guidance_scale"])
    maps = {s["__key__"]: {c: np.asarray(s[f"{c}.png"].convert("L" if c == "canny" else "RGB"))
                           for c in ("canny", "color_grid")}
            for s in wds.WebDataset(str(shard), shardshuffle=False, empty_check=False).decode("pil")}
    annotators = create(["canny", "color_grid"])
    f1, colour = [], []
    for record_path in sorted(folder.glob("[0-9][0-9][0-9][0-9].json")):
        record = json.loads(record_path.read_text())
        image = np.asarray(Image.open(folder / f"{record['index']:04d}.png").convert("RGB"))
        own = maps[record["source"]]
        f1.append(controllability("canny", annotators["canny"], [own["canny"]], [image]))
        colour.append(controllability("color_grid", annotators["color_grid"], [own["color_grid"]], [image]))
    result = {"f1": float(np.mean(f1)), "colour_error": float(np.mean(colour)),
              "colour_following": 1.0 - float(np.mean(colour)), "colour_accuracy": colour_accuracy(run, folder, split)}
    run.log(f"   {folder.relative_to(run.out)}: F1 {result['f1']:.3f}, colour error {result['colour_error']:.3f}, "
            f"caption colours right {result['colour_accuracy']:.2f}")
    return result


def composition_plan(run: Run, s: dict, base: str, ready, net) -> list[Job]:
    c, n, samples = s["composition"], s["curve_samples"], run.work / "samples"
    jobs = [Job("sample base", partial(composed_sample_and_score, run, samples / "base", base, [], n))]
    for seed in s["seeds"]:
        jobs += [Job(f"train seed {seed} canny", partial(train, run, s, base, "canny", seed, c["steps"])),
                 Job(f"train seed {seed} colour", partial(train, run, s, base, "colour", seed, c["steps"],
                                                          extra=("--condition", "color_grid")))]
    for seed in s["seeds"]:
        paths = {"canny": net("canny", seed, c["steps"]), "color_grid": net("colour", seed, c["steps"])}
        for arm, controls in COMPOSED.items():
            needs = tuple(f for cond, _ in controls for f in ready("canny" if cond == "canny" else "colour", seed,
                                                                    c["steps"]))
            folder = samples / f"{re.sub(r'[^a-z0-9.]+', '-', arm)}-s{seed}"
            jobs.append(Job(f"eval seed {seed} {arm}", partial(
                composed_sample_and_score, run, folder, base, [(paths[cond], cond, scale) for cond, scale in controls],
                n), files=needs))
    return jobs


def composition_results(run: Run, s: dict) -> dict:
    """Per arm: F1 against canny and colour following (1 - colour error) against the colour
    grid, mean and spread over seeds; the goal ratios of the composed arm."""
    def done(name: str):
        return run.done[name]["result"]

    arms = {arm: [done(f"eval seed {seed} {arm}") for seed in s["seeds"]] for arm in COMPOSED}
    table = {arm: {key: mean_spread([r[key] for r in rs]) for key in ("f1", "colour_following", "colour_accuracy")}
             for arm, rs in arms.items()}
    ratios = {arm: {"f1_vs_canny_only": table[arm]["f1"]["mean"] / max(table["canny only"]["f1"]["mean"], 1e-9),
                    "colour_vs_colour_only": table[arm]["colour_following"]["mean"]
                    / max(table["colour only"]["colour_following"]["mean"], 1e-9)}
              for arm, controls in COMPOSED.items() if len(controls) > 1}
    return {"settings": s["composition"], "base": done("sample base"), "arms": table, "ratios": ratios,
            "scales": {arm: [scale for _, scale in controls] for arm, controls in COMPOSED.items()},
            "goal": "composed >= 0.9x canny-only F1 and >= 0.9x colour-only colour following"}


def composition_markdown(result: dict) -> list[str]:
    lines = ["## Composition: a canny ControlNet and a colour-grid ControlNet", "",
             f"Each trained {result['settings']['steps']} steps per seed; set (a), every sample scored for edges "
             "(F1 against its canny map) and colours (1 - mean absolute difference of colour grids; and the share "
             "whose two main colours are the caption's).", "",
             "| arm | edge F1 | colour following | caption colours |", "| --- | ---: | ---: | ---: |"]
    rows = {**result["arms"], "base alone": {k: {"mean": result["base"][k]} for k in
                                             ("f1", "colour_following", "colour_accuracy")}}
    for arm, entry in rows.items():
        lines.append(f"| {arm} | {entry['f1']['mean']:.3f} | {entry['colour_following']['mean']:.3f} | "
                     f"{entry['colour_accuracy']['mean']:.2f} |")
    ratios = result["ratios"]
    return lines + [""] + [f"{arm.capitalize()} / canny only, F1: {r['f1_vs_canny_only']:.2f}x; / colour only, colour "
                           f"following: {r['colour_vs_colour_only']:.2f}x (goal: 0.9x each)." for arm, r in ratios.items()
                           ] + [""]


def reproduce(args) -> dict:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    s = dict(MODES[mode])
    if args.steps:
        s["steps"] = args.steps
    if args.seeds:
        s["seeds"] = list(range(args.seeds))
    part = getattr(args, "part", None)
    if part and mode == "quick":
        raise RefusedOutput("--part splits the full mode; the quick mode runs whole")
    dropout_final = getattr(args, "dropout_final", False)
    if part is None and (DROPOUT_FINAL[mode] or dropout_final):
        s["dropout_final"] = True
    elif dropout_final:
        raise RefusedOutput("--dropout-final is an ablation; --part runs none")
    settings = {"mode": mode, **s, "make_base": args.make_base, "base": args.base, "sampling": SAMPLING}
    extra = {"consistency": CONSISTENCY, "composition": COMPOSITION}.get(part)
    if extra:
        s[part] = extra[mode]
    if part:
        settings = {**settings, **({part: s[part]} if extra else {}), "part": part}
    run = Run(Path(args.output), settings)
    workers = args.workers or default_workers(mode)
    threads = max(1, (os.cpu_count() or 1) // workers)
    run.log(f"mode {mode}: {s}; {workers} worker processes x {threads} torch thread(s)")
    run.phase("data", lambda: make_data(run, s))
    distances = run.phase("check held-out distances", lambda: check_distances(run, s))
    conditions = "canny,color_grid" if part == "composition" else "canny"
    run.phase("build train", lambda: build(run, "train", 1000, conditions))
    run.phase("build heldout", lambda: build(run, "heldout", s["heldout"], conditions))
    for name in s["sets"]:
        if name != "new":
            run.phase(f"build {SETS[name][0]}", lambda split=SETS[name][0]: build(run, split, s["heldout"]))
    base = run.phase("base model", lambda: args.base or base_model(run, args.make_base))
    run_jobs(run, plan(run, s, base, part), workers, threads)

    def done(name: str):
        return run.done[name]["result"]

    if part in ("consistency", "composition"):
        made, markdown, title = ((consistency_results, consistency_markdown, "Consistency fine-tuning")
                                 if part == "consistency" else
                                 (composition_results, composition_markdown, "Composed ControlNets"))
        results = {"mode": mode, "settings": settings, "base_model": base, "heldout_distances": distances,
                   part: made(run, s), "machine": machine(),
                   "seconds": {k: v["seconds"] for k, v in run.done.items()},
                   "minutes_wall": round((time.time() - run.first_started) / 60, 1)}
        (run.out / "results.json").write_text(json.dumps(results, indent=1))
        (run.out / "report.md").write_text("\n".join([f"# {title} ({mode} mode, part {part})", "",
                                                      *markdown(results[part]),
                                                      f"{results['minutes_wall']} minutes of wall time; machine "
                                                      f"{json.dumps(results['machine'])}."]) + "\n")
        run.log(f"done: {run.out / 'report.md'}")
        return results
    a, last = s["ablation_steps"], s["steps"]
    checkpoint_steps = sorted({*range(s["eval_every"], last + 1, s["eval_every"]), last})
    results: dict = {"mode": mode, "settings": settings, "base_model": base, "seeds": {},
                     "base": done("sample base"), "vae_reconstruction": done("vae ceiling"),
                     "heldout_distances": distances}
    if part is None:
        results["base_no_prompt"] = done("sample base, no prompt")
    for seed in s["seeds"]:
        seed_results = results["seeds"][seed] = {
            "curve": {k: done(f"eval seed {seed} step {k}") for k in checkpoint_steps},
            "convergence": trainer_convergence(done(f"train seed {seed}"))}
        seed_results["stop_signal"] = stop_signal(seed_results["convergence"], seed_results["curve"],
                                                  results["base"]["f1"])
        if part == "generalisation":
            continue
        seed_results.update({
            "ablation_step": a,
            "ablations": {"zero_init": done(f"eval seed {seed} step {a}"),
                          "random_init": done(f"eval seed {seed} random init"),
                          "dropout_50_no_prompt": done(f"eval seed {seed} dropout 50 no prompt"),
                          "dropout_0_no_prompt": done(f"eval seed {seed} dropout 0 no prompt"),
                          **({"final_step": last,
                              "dropout_50_no_prompt_final": done(f"eval seed {seed} dropout 50 no prompt final"),
                              "dropout_0_no_prompt_final": done(f"eval seed {seed} dropout 0 no prompt final"),
                              "dropout_50_final": done(f"eval seed {seed} step {last}"),
                              "dropout_0_final": done(f"eval seed {seed} dropout 0 final")}
                             if s.get("dropout_final") else {})},
            "guidance": {name: done(f"guidance seed {seed} {name}") for name in GUIDANCE_MODES}})
    first = s["seeds"][0]
    shutil.copytree(run.work / "samples" / f"main-s{first}-{last}", run.out / "samples" / "controlnet",
                    dirs_exist_ok=True)
    shutil.copytree(run.work / "samples" / "base", run.out / "samples" / "base", dirs_exist_ok=True)
    for name in s["sets"]:
        if name != "new":
            shutil.copytree(run.work / "samples" / f"main-s{first}-{last}-{name}",
                            run.out / "samples" / SETS[name][1] / "controlnet", dirs_exist_ok=True)
            shutil.copytree(run.work / "samples" / f"base-{name}", run.out / "samples" / SETS[name][1] / "base",
                            dirs_exist_ok=True)
    results["summary"] = summarise(results, s, TARGETS[mode])
    results["heldout_sets"] = heldout_sets(results, s, done)
    results["seconds"] = {k: v["seconds"] for k, v in run.done.items()}
    results["minutes_wall"] = round((time.time() - run.first_started) / 60, 1)
    if run.extended:  # the wall time since the first start spans the pause before; this is the extension's own
        results["extended"] = [{**e, "minutes_wall_since": round((time.time() - e["at"]) / 60, 1)} for e in run.extended]
    results["machine"] = machine()
    (run.out / "results.json").write_text(json.dumps(results, indent=1))
    write_reports(run.out, results, part)
    run.log(f"done: {run.out / 'report.md'}; {json.dumps(results['summary'])}")
    return results


def heldout_sets(results: dict, s: dict, done: Callable[[str], dict]) -> dict:
    """Per held-out set: the ControlNet at the final step (mean over seeds), the base with
    the same prompts and seeds, shuffled conditions, the VAE ceiling, and the ratios."""
    out = {}
    last = s["steps"]
    for name in s["sets"]:
        if name == "new":
            finals = [r["curve"][last] for r in results["seeds"].values()]
            base, ceiling = results["base"], results["vae_reconstruction"]
        else:
            finals = [done(f"eval seed {seed} {name}") for seed in s["seeds"]]
            base, ceiling = done(f"sample base {name}"), done(f"vae ceiling {name}")
        f1 = mean_spread([r["f1"] for r in finals])
        shuffled = mean_spread([r["f1_shuffled"] for r in finals])
        out[name] = {"title": SETS[name][2], "samples": f"samples/{SETS[name][1] + '/' if SETS[name][1] else ''}",
                     "controlnet_f1": f1, "controlnet_f1_shuffled": shuffled,
                     "controlnet_colour_accuracy": mean_spread([r["colour_accuracy"] for r in finals]),
                     "base_f1": base["f1"], "base_f1_shuffled": base["f1_shuffled"],
                     "base_colour_accuracy": base["colour_accuracy"], "vae_ceiling_f1": ceiling["f1"],
                     "ratio_over_base": f1["mean"] / max(base["f1"], 1e-9),
                     "ratio_over_shuffled": f1["mean"] / max(shuffled["mean"], 1e-9)}
    return out


def heldout_sets_markdown(results: dict) -> list[str]:
    def fmt(entry: dict) -> str:
        return f"{entry['mean']:.3f} ± {entry['spread']:.3f}" if entry["n"] > 1 else f"{entry['mean']:.3f}"

    d = results["heldout_distances"]
    s = results["settings"]
    lines = ["## Held-out sets: conditions the training never saw", "",
             f"{s['heldout']} conditions per set, final checkpoint (step {s['steps']}), {len(results['seeds'])} seed(s). "
             "The training distribution leaves out radii in 13.5-18.5 px and a 2 px neighbourhood (in centre and in "
             "radius) of each set (a) condition; the run checked the sets as written: set (a) nearest training "
             f"condition {d.get('a_min_distance_px')} px (max of centre distance and radius difference, "
             f"must be >= {d['min_px']})"
             + (f", set (b) nearest training radius {d['b_min_radius_difference_px']} px" if "b_min_radius_difference_px" in d else "")
             + (f", set (c) smallest gap between its two circles {d['c_min_gap_px']} px" if "c_min_gap_px" in d else "")
             + ".", "",
             "| held-out set | ControlNet F1 | against shuffled | base F1 | VAE ceiling | ControlNet / base | "
             "ControlNet / shuffled | colours right (ControlNet, base) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for entry in results["heldout_sets"].values():
        lines.append(f"| {entry['title']} (`{entry['samples']}`) | {fmt(entry['controlnet_f1'])} | "
                     f"{fmt(entry['controlnet_f1_shuffled'])} | {entry['base_f1']:.3f} | {entry['vae_ceiling_f1']:.3f} | "
                     f"{entry['ratio_over_base']:.2f} | {entry['ratio_over_shuffled']:.2f} | "
                     f"{entry['controlnet_colour_accuracy']['mean']:.2f}, {entry['base_colour_accuracy']:.2f} |")
    return lines + [""]


def write_reports(out: Path, results: dict, part: str | None) -> None:
    """report.md: the whole run's (bench/reproduce_report.py) with the held-out sets
    added; a part writes its own, shorter one."""
    from reproduce_report import contact_sheet, curve_plot, write_report

    if part is None:
        write_report(out, results)
        report = (out / "report.md").read_text()
        marker = "## Controllability over training"
        extra = "\n".join(heldout_sets_markdown(results) + stop_signal_markdown(results)) + "\n"
        report = report.replace(marker, extra + marker, 1) if marker in report else report + "\n" + extra
        (out / "report.md").write_text(report)
        return
    results = json.loads(json.dumps(results))
    curve_plot(out / "curve.png", results)
    contact_sheet(out / "contact_sheet.png", out / "samples" / "controlnet", out / "samples" / "base")
    summary = results["summary"]
    fired = {k: sd["convergence"]["sudden_convergence_step"] for k, sd in results["seeds"].items()}
    lines = [f"# Does it generalise? (full mode, part {part})", "",
             f"{results['settings']['train_images']} training images, {len(results['seeds'])} seed(s), "
             f"{results['settings']['steps']} steps; machine {json.dumps(results['machine'])}; "
             f"{results['minutes_wall']} minutes of wall time.", "", "![condition | base | ControlNet](contact_sheet.png)",
             "", *heldout_sets_markdown(results),
             f"Targets on set (a): {json.dumps(summary['targets'])}: "
             f"{'met' if all(summary['targets_met'].values()) else 'NOT met: ' + json.dumps(summary['targets_met'])}.", "",
             "## Controllability over training (set (a))", "", "![curve](curve.png)", "",
             "Stop signal (the trainer's detector on its own validation): "
             + ", ".join(f"seed {k}: {'step ' + str(v) if v is not None else 'did not fire'}" for k, v in fired.items()),
             "", *stop_signal_markdown(results), "## Time per phase (s)", "", "| phase | seconds |", "| --- | --- |",
             *[f"| {k} | {v} |" for k, v in results["seconds"].items()]]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def default_workers(mode: str) -> int:
    """Processes side by side. Tiny models leave a GPU mostly idle (kernel launches bound
    them), so on a GPU eight processes share it; on CPUs, 2 (3 in full mode), at most the cores."""
    import torch

    cores = os.cpu_count() or 1
    if torch.cuda.is_available():
        return max(1, min(8, cores // 2))
    return min(cores, 2 if mode != "full" else 3)


def mean_spread(values: list[float]) -> dict:
    import numpy as np

    return {"mean": float(np.mean(values)), "spread": float(np.std(values)), "n": len(values)}


def summarise(results: dict, s: dict, targets: dict) -> dict:
    final = [r["curve"][s["steps"]] for r in results["seeds"].values()]
    f1 = mean_spread([r["f1"] for r in final])
    shuffled = mean_spread([r["f1_shuffled"] for r in final])
    base_f1 = results["base"]["f1"]
    summary = {"controlnet_f1": f1, "controlnet_f1_shuffled": shuffled, "base_f1": base_f1,
               "base_f1_shuffled": results["base"]["f1_shuffled"],
               "ratio_over_base": f1["mean"] / max(base_f1, 1e-9),
               "ratio_over_shuffled": f1["mean"] / max(shuffled["mean"], 1e-9), "targets": targets}
    summary["targets_met"] = {"f1": f1["mean"] >= targets["f1"],
                              "over_base": summary["ratio_over_base"] >= targets["over_base"],
                              "over_shuffled": summary["ratio_over_shuffled"] >= targets["over_shuffled"]}
    return summary


def machine() -> dict:
    import platform

    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one seed, short ablations (<= 30 min on 2 CPU cores)")
    parser.add_argument("--output", required=True, help="results folder (resumed if it holds this run)")
    parser.add_argument("--make-base", action="store_true",
                        help="train the tiny base here (about 31 min, bit for bit the stored one) instead of using bench/circles_base")
    parser.add_argument("--base", help="a base model folder to use instead of the stored one")
    parser.add_argument("--smoke", action="store_true", help="a plumbing check in about a minute: tiny settings, "
                        "nothing is expected to learn")
    parser.add_argument("--steps", type=int, help="ControlNet steps of the main runs (default: by mode)")
    parser.add_argument("--seeds", type=int, help="how many seeds (default: 1 quick, 3 full)")
    parser.add_argument("--part", choices=PARTS, help="run one part of the full mode: generalisation = the main "
                        "trainings and held-out sets (a)-(c), without the ablations (<= 90 min on 2 cores); "
                        "consistency = a training per seed to step 1000, then 250 steps with and without "
                        "ControlNet++'s consistency loss, scored on sets (a)-(c); composition = a canny and a "
                        "colour-grid ControlNet per seed, sampled alone and composed on set (a)")
    parser.add_argument("--dropout-final", action="store_true",
                        help="also train the no-prompt-dropout ControlNet to the last step and score it there, "
                        "with and without captions (the full mode always does; the quick mode scores the ablation "
                        "step only, to keep its 30 minutes). A finished run without it is extended: what it did "
                        "is kept, and that ControlNet trains on from its last checkpoint")
    parser.add_argument("--workers", type=int, help="processes that train and sample side by side (default: 2, "
                        "3 in full mode, at most the cores; 8 on a GPU); each gets cores / workers torch threads")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds like Ctrl-C: workers are stopped too
    try:
        reproduce(args)
    except RefusedOutput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

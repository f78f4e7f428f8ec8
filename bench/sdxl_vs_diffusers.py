"""controlforge's SDXL training against diffusers' `examples/controlnet/train_controlnet_sdxl.py`
on the same tiny SDXL base (random weights, tests/tiny_models.py) and the same images, in
one run: steps/s of the training loop and peak RSS of each process.

    python bench/sdxl_vs_diffusers.py --diffusers-script PATH/TO/diffusers/examples/controlnet/train_controlnet_sdxl.py

diffusers' script is not shipped here: pass a checkout's copy. Both run on this machine's
CPU at 64 px with batch 4; what differs is the loop (diffusers precomputes the prompt
embeddings once; controlforge streams shards and encodes prompts every step, which prompt
dropout needs), not the model.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def run(command: list[str], cwd: Path) -> tuple[float, float, str]:
    """(steps/s from the last tqdm rate printed, peak RSS GiB, output)."""
    import psutil

    began = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps, peak, chunks = psutil.Process(proc.pid), 0, []
    import threading

    def read():
        for line in proc.stdout:
            chunks.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True)))
        except Exception:
            pass
        time.sleep(0.05)
    reader.join()
    out = "".join(chunks)
    if proc.returncode:
        raise RuntimeError(f"{command[:3]} failed after {time.perf_counter() - began:.0f} s:\n{out[-3000:]}")
    rates = re.findall(r"(\d+\.\d+)it/s", out.replace("\r", "\n")) or ["nan"]
    slow = re.findall(r"(\d+\.\d+)s/it", out.replace("\r", "\n"))
    rate = float(rates[-1]) if rates[-1] != "nan" else (1 / float(slow[-1]) if slow else float("nan"))
    return rate, peak / 2**30, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers-script", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    from conftest import write_synthetic
    from tiny_models import make_tiny_sdxl

    from pipeline.build import run_build
    from pipeline.config import BuildConfig
    from pipeline.publish import publish

    work = Path(tempfile.mkdtemp(prefix="cf-sdxl-cmp-"))
    base = make_tiny_sdxl(work / "sdxl")
    write_synthetic(work / "in", 64)
    for i in range(64):
        (work / "in" / f"synth_{i:04d}.txt").write_text(f"a synthetic picture number {i}")
    run_build(BuildConfig(input=[str(work / "in")], output=str(work / "build"), resolution=64, min_size=64,
                          caption_model="none", keep_captions=True, executor="local", preview=0, report_samples=0),
              log=lambda *_: None)
    published = publish(str(work / "build"), to=str(work / "hf"), val_fraction=0.0, log=lambda *_: None)

    common = dict(steps=args.steps, batch=args.batch)
    theirs = run([sys.executable, args.diffusers_script, "--pretrained_model_name_or_path", str(base),
                  "--dataset_name", str(published), "--dataset_config_name", "canny", "--resolution", "64",
                  "--train_batch_size", str(args.batch), "--max_train_steps", str(args.steps), "--learning_rate", "1e-5",
                  "--output_dir", str(work / "diffusers-out"), "--checkpointing_steps", "100000", "--seed", "0",
                  "--report_to", "tensorboard"], work)
    ours = {workers: run([sys.executable, "-m", "pipeline.cli", "train", "--shards", str(work / "build"),
                          "--pretrained-model", str(base), "--resolution", "64", "--train-batch-size", str(args.batch),
                          "--max-train-steps", str(args.steps), "--learning-rate", "1e-5",
                          "--output-dir", str(work / f"ours-out-{workers}"), "--checkpointing-steps", "100000",
                          "--num-validation-images", "0", "--report-to", "none", "--prompt-dropout", "0",
                          "--dataloader-num-workers", str(workers)], ROOT)
            for workers in (0, 2)}
    print(f"tiny SDXL, 64 px, batch {common['batch']}, {common['steps']} steps, CPU (peak RSS: the process and its "
          f"loader workers):")
    print(f"  diffusers train_controlnet_sdxl.py (0 loader workers): {theirs[0]:.2f} steps/s, peak RSS {theirs[1]:.2f} GiB")
    for workers, (rate, rss, _) in ours.items():
        print(f"  controlforge train, {workers} loader workers:          {rate:.2f} steps/s, peak RSS {rss:.2f} GiB"
              f"  ({rate / theirs[0]:.2f}x steps/s, {rss / theirs[1]:.2f}x memory)")


if __name__ == "__main__":
    main()

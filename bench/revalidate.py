"""Replay the trainer's validation on a finished run's checkpoints, in any guidance mode.

    python bench/revalidate.py RUN_DIR --pretrained-model BASE --validation-shards SHARDS \\
        --output OUT [--validation-mode paper] [--every 250] [--num-validation-images 16] ...

For each `RUN_DIR/checkpoint-K/controlnet` (K a multiple of --every), the ControlNet is
sampled on the validation conditions exactly as `controlforge train` validates
(train/validation.py: the same batch, seed, sampler and metric), re-annotated and scored
against its own and against shuffled conditions; the stop signal and the curve are written
to OUT/controllability.json (and .png, with each step's condition | sample rows under
OUT/validation), as the trainer would have written them had it validated this way.

Why: validation draws from its own generator and leaves the training unchanged, so a run's
saved checkpoints answer for any validation mode and for any spacing that is a multiple of
the checkpoint spacing, without training again. bench/reproduce.py used it to put the full
run, which validated through the diffusers pipeline (control in both CFG branches), on the
paper-mode curve the evaluation uses.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]


def checkpoints(run_dir: Path, every: int, log=print) -> list[tuple[int, Path]]:
    """(step, ControlNet folder) of the run's whole checkpoints at multiples of `every`, by
    step; incomplete ones (a save that did not finish) are skipped with a line saying why."""
    from train.checkpoints import checkpoints as all_checkpoints, incomplete_reason, step_of

    found = []
    for folder in all_checkpoints(run_dir):
        if step_of(folder) % every:
            continue
        fault = incomplete_reason(folder)
        if fault:
            log(f"skipping {folder}: {fault}")
        else:
            found.append((step_of(folder), folder / "controlnet"))
    if not found:
        raise SystemExit(f"error: {run_dir}: no whole checkpoint-K with K a multiple of {every}")
    return found


def revalidate(run_dir: Path, cfg, every: int, log=print) -> dict:
    """The trainer's validation at each checkpoint of `run_dir`; `cfg` a TrainConfig whose
    output_dir is where the record goes. Returns the controllability record."""
    import torch
    from accelerate import Accelerator

    from train import families
    from train.data import expand_shards
    from train.trainer import load_base, load_text_encoders
    from train.validation import controllability_tracker, run_validation, track_controllability, validation_batch

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    # prompts as the trainer had them: its shards' stored embeddings when they fit the base
    frozen, cached, _ = load_base(cfg, families.detect(cfg.pretrained_model), expand_shards(cfg.shards), torch.float32)
    batch = validation_batch(expand_shards(cfg.validation_shards), cfg, text=cached is not None)
    if cached is not None and "text_embeds" in batch:
        log(f"prompts: {cached.describe()}, as the trainer used them")
    elif not frozen.text_encoders:
        load_text_encoders(frozen, cfg, torch.float32)
    for module in (*frozen.text_encoders, frozen.vae, frozen.denoiser):
        module.to(accelerator.device)
    tracker = controllability_tracker(cfg)
    if tracker is None:
        raise SystemExit(f"error: no controllability metric for condition {cfg.condition!r}")
    for step, path in checkpoints(run_dir, every):
        controlnet = frozen.family.load_controlnet(str(path)).to(accelerator.device)
        images = run_validation(batch, cfg, accelerator, frozen, frozen.denoiser, controlnet, step, torch.float32)
        track_controllability(tracker, batch, images, cfg, step, accelerator, log)
        log(f"step {step}: own {tracker.values[-1]:.3f}, shuffled {tracker.shuffled_values[-1]:.3f}, "
            f"p {tracker.p_values[-1]:.2g}")
    return json.loads((Path(cfg.output_dir) / "controllability.json").read_text())


def main(argv: list[str] | None = None) -> int:
    from train.config import GuidanceMode, TrainConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a `controlforge train` output folder with checkpoint-K folders")
    parser.add_argument("--output", required=True, help="where controllability.json and the validation rows go")
    parser.add_argument("--every", type=int, default=1, help="only checkpoints at multiples of this step")
    parser.add_argument("--pretrained-model", required=True)
    parser.add_argument("--validation-shards", required=True, nargs="+")
    parser.add_argument("--shards", nargs="+", help="the run's training shards (default: the validation shards): "
                        "when they hold this base's prompt embeddings the trainer validated with those, and so does this")
    parser.add_argument("--condition", default="canny")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--num-validation-images", type=int, default=16)
    parser.add_argument("--validation-inference-steps", type=int, default=20)
    parser.add_argument("--validation-guidance-scale", type=float, default=7.5)
    parser.add_argument("--validation-mode", choices=typing.get_args(GuidanceMode))
    parser.add_argument("--seed", type=int, default=0, help="the run's --seed (validation's generator)")
    args = parser.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k not in ("run_dir", "output", "every")}
    settings["shards"] = settings["shards"] or settings["validation_shards"]
    cfg = TrainConfig(**settings, output_dir=args.output, report_to="none")
    record = revalidate(args.run_dir, cfg, args.every)
    print(f"sudden convergence: step {record['sudden_convergence_step']}; {Path(args.output) / 'controllability.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

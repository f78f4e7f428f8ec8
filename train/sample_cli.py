"""`controlforge sample`: the paper's auto-prompt sampler, and `controlforge eval`.

sample: one or more ControlNets, each with its condition image (or conditions drawn
from a shard), or none (the base model alone, same prompts and seeds, for comparison), prompt modes none / default / auto / user, DDIM, CFG and a guidance
weighting mode. Writes NNNN.png, NNNN.json (prompt, modes, seed, weights),
NNNN_condition.png (the first condition; with several, also NNNN_condition_NAME.png each,
which eval --condition NAME compares with) and contact_sheet.png.

Every setting is a flag and a key of the --config YAML (train/config.py: SampleConfig,
EvalConfig).

eval: re-annotates each generated image with the condition's annotator, compares it
with the condition it was given, and writes report.json; --shuffled also scores every
image against another sample's condition (the chance level).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from common.config import ConfigError, load_config
from common.flags import add_model_flags, overrides_from

from .config import EvalConfig, PromptMode, SampleConfig
from .sampler import DEFAULT_PROMPT, Control, SampleResult, resolve_mode, sample

PROMPT_MODES = typing.get_args(PromptMode)


def resolve_prompt(mode: str, user_prompt: str | None, source_caption: str | None,
                   first_pass: Callable[[str], Image.Image], captioner: Callable[[list], list[str]] | None) -> dict[str, Any]:
    """The prompt a mode gives, and how it was found (recorded in the json).

    auto: the source image's caption when there is one; else the paper's two passes:
    generate with the default prompt, caption that result with BLIP, use the caption."""
    if mode == "none":
        return {"prompt": "", "prompt_source": "none"}
    if mode == "default":
        return {"prompt": DEFAULT_PROMPT, "prompt_source": "default"}
    if mode == "user":
        if not user_prompt:
            raise ValueError("--prompt-mode user needs --prompt")
        return {"prompt": user_prompt, "prompt_source": "user"}
    if mode != "auto":
        raise ValueError(f"prompt mode must be one of {PROMPT_MODES}")
    if source_caption:
        return {"prompt": source_caption, "prompt_source": "source caption"}
    if captioner is None:
        raise ValueError("--prompt-mode auto without source captions needs --caption-model")
    draft = first_pass(DEFAULT_PROMPT)
    caption = captioner([np.asarray(draft)])[0]
    return {"prompt": caption, "prompt_source": "two-pass: BLIP caption of a default-prompt sample"}


def conditions_from_shard(shard: str, conditions: list[str], n: int
                          ) -> list[tuple[list[Image.Image], str | None, str, dict]]:
    """(the condition images in `conditions` order, source caption, key, the first
    condition's recorded parameters) per sample that has them all."""
    import webdataset as wds

    found = []
    for sample_ in wds.WebDataset(shard, shardshuffle=False, empty_check=False, nodesplitter=None):
        if all(f"{c}.png" in sample_ for c in conditions):
            caption = sample_.get("txt", b"").decode("utf-8").strip() or None
            params = json.loads(sample_["json"]).get("conditions", {}).get(conditions[0], {}).get("params", {})
            found.append(([Image.open(io.BytesIO(sample_[f"{c}.png"])).convert("RGB") for c in conditions], caption,
                          sample_["__key__"], params))
        if len(found) >= n:
            break
    if not found:
        raise ValueError(f"{shard}: no sample with {' and '.join(c + '.png' for c in conditions)}")
    return found


def _tensor(image: Image.Image, size: int) -> torch.Tensor:
    image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].float() / 255.0


def contact_sheet(rows: list[tuple[Image.Image, Image.Image, str]], cell: int = 256) -> Image.Image:
    sheet = Image.new("RGB", (cell * 3, cell * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (cond, image, prompt) in enumerate(rows):
        sheet.paste(cond.convert("RGB").resize((cell, cell)), (0, i * cell))
        sheet.paste(image.resize((cell, cell)), (cell, i * cell))
        draw.multiline_text((2 * cell + 6, i * cell + 6), "\n".join(textwrap.wrap(prompt or "(empty prompt)", 34)[:12]),
                            fill="black")
    return sheet


@dataclass
class Job:
    """One sample to draw: a condition image per ControlNet, and what the source says."""

    conditions: list[Image.Image]
    caption: str | None
    name: str
    condition_params: dict


Draw = Callable[[list[list[Image.Image]], list[str], list[int]], SampleResult]


def run_sample(cfg: SampleConfig, log=print) -> list[dict[str, Any]]:
    check_inputs(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    frozen = load_base(cfg, device, dtype)
    mode = resolve_mode(cfg.mode, frozen.family)
    nets = load_controlnets(cfg, frozen, device, dtype)
    draw = make_draw(cfg, frozen, nets, mode, device, dtype)
    jobs = sampling_jobs(cfg)
    planned = plan_prompts(cfg, jobs, draw, make_captioner(cfg))
    return draw_and_write(cfg, planned, draw, mode, log)


def check_inputs(cfg: SampleConfig) -> None:
    """What the flags must agree on, before any model loads."""
    n = len(cfg.controlnet)
    if cfg.scale and len(cfg.scale) != n:
        raise ValueError("give one --scale per --controlnet")
    if not n and not cfg.shard and len(cfg.image) != 1:
        raise ValueError("without --controlnet (the base model alone) give --shard or one --image: the conditions "
                         "are recorded beside the samples for eval")
    if cfg.shard and len(cfg.condition) != max(n, 1):
        raise ValueError(f"--shard with {n} --controlnet: give one --condition per --controlnet, in the same order "
                         f"(got {len(cfg.condition)})")
    if not cfg.shard and n and len(cfg.image) != n:
        raise ValueError("give one --image per --controlnet (or --shard)")


def load_base(cfg: SampleConfig, device: str, dtype: torch.dtype):
    """The base model's parts, on `device`, checked against the resolution."""
    from . import families

    frozen = families.load(cfg.pretrained_model, dtype)
    frozen.family.check_resolution(frozen, cfg.resolution)
    frozen.denoiser.to(device, dtype)
    frozen.vae.to(device)
    for encoder in frozen.text_encoders:
        encoder.to(device)
    return frozen


def load_controlnets(cfg: SampleConfig, frozen, device: str, dtype: torch.dtype) -> list:
    """Each --controlnet, of the base's family and checked against the base."""
    family = frozen.family
    nets = [family.load_controlnet(path).to(device, dtype).eval() for path in cfg.controlnet]
    for path, net in zip(cfg.controlnet, nets):
        family.check_controlnet(frozen, net, path)
    if family.SAMPLES_THROUGH_PIPELINE and len(nets) > 1:
        raise ValueError(f"{family.NAME}: one --controlnet at a time")
    return nets


def make_draw(cfg: SampleConfig, frozen, nets: list, mode: str, device: str, dtype: torch.dtype) -> Draw:
    """A function drawing one batch: each ControlNet gets its conditions stacked, each
    sample its own seed; through the family's diffusers pipeline, or through ours."""
    family = frozen.family
    scales = cfg.scale or [1.0] * len(nets)
    size = cfg.resolution
    if family.SAMPLES_THROUGH_PIPELINE:
        pipe = _family_pipeline(frozen, nets[0] if nets else None, device, dtype)

        def draw(conditions, prompts, seeds):
            control = ({family.CONTROL_IMAGE_ARG: [c[0].convert("RGB") for c in conditions],
                        "controlnet_conditioning_scale": scales[0]} if nets else {})
            negative = {"negative_prompt": [cfg.negative_prompt] * len(prompts)} if cfg.negative_prompt else {}
            images = pipe(prompt=prompts, **negative, **control, num_inference_steps=cfg.steps,
                          guidance_scale=cfg.guidance_scale, height=size, width=size,
                          generator=[torch.Generator().manual_seed(s) for s in seeds],
                          **family.EXTRA_PIPELINE_ARGS).images
            return SampleResult(images, [])
        return draw

    scheduler = family.sampling_scheduler(frozen)

    def draw(conditions, prompts, seeds):
        controls = [Control(net, torch.cat([_tensor(c[k], size) for c in conditions]).to(device, dtype), s)
                    for k, (net, s) in enumerate(zip(nets, scales))]
        return sample(frozen, scheduler, controls, prompts, cfg.negative_prompt, mode, cfg.steps, cfg.guidance_scale,
                      size, size, [torch.Generator().manual_seed(seed) for seed in seeds])
    return draw


def _family_pipeline(frozen, controlnet, device, dtype):
    """The family's diffusers pipeline (with the ControlNet, or the base's own without)."""
    family = frozen.family
    if controlnet is not None:
        pipe = family.pipeline(frozen, frozen.denoiser, controlnet, family.sampling_scheduler(frozen))
    else:
        pipe = family.base_pipeline(frozen)
        pipe.scheduler = family.sampling_scheduler(frozen)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def sampling_jobs(cfg: SampleConfig) -> list[Job]:
    """The conditions to sample: the first --num of --shard, or the --image files."""
    if cfg.shard:
        return [Job(conds, caption, key, params)
                for conds, caption, key, params in conditions_from_shard(cfg.shard, cfg.condition, cfg.num)]
    return [Job([Image.open(p) for p in cfg.image], None, Path(cfg.image[0]).stem, {})]


def make_captioner(cfg: SampleConfig):
    """BLIP for --prompt-mode auto (when a condition has no source caption), else None."""
    if cfg.prompt_mode == "auto" and cfg.caption_model:
        from stages.models.captioner import BlipCaptioner

        return BlipCaptioner(cfg.caption_model, max_new_tokens=30)
    return None


def plan_prompts(cfg: SampleConfig, jobs: list[Job], draw: Draw, captioner) -> list[tuple[int, Job, int, dict]]:
    """(index, job, seed, prompt) per sample: prompts first, since auto mode may draw a
    first pass per sample; then the batches."""
    planned = []
    for index, job in enumerate(jobs):
        seed = cfg.seed + index
        prompt = resolve_prompt(cfg.prompt_mode, cfg.prompt, job.caption,
                                lambda p, job=job, seed=seed: draw([job.conditions], [p], [seed]).images[0], captioner)
        planned.append((index, job, seed, prompt))
    return planned


def draw_and_write(cfg: SampleConfig, planned: list[tuple[int, Job, int, dict]], draw: Draw, mode: str,
                   log=print) -> list[dict[str, Any]]:
    """Draw the planned samples in batches; write NNNN.png, NNNN_condition.png, NNNN.json
    and contact_sheet.png."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    scales = cfg.scale or [1.0] * len(cfg.controlnet)
    records, rows = [], []
    for start in range(0, len(planned), cfg.batch_size):
        chunk = planned[start:start + cfg.batch_size]
        result = draw([job.conditions for _, job, _, _ in chunk], [p["prompt"] for *_, p in chunk],
                      [seed for _, _, seed, _ in chunk])
        for (index, job, seed, prompt), image in zip(chunk, result.images):
            record = {"index": index, "source": job.name, **prompt, "prompt_mode": cfg.prompt_mode,
                      "negative_prompt": cfg.negative_prompt, "guidance_mode": mode, "weights": result.weights,
                      "seed": seed, "steps": cfg.steps, "guidance_scale": cfg.guidance_scale,
                      "controlnets": list(cfg.controlnet), "scales": scales, "condition": cfg.condition[0],
                      "conditions": list(cfg.condition), "condition_keypoints": job.condition_params.get("keypoints")}
            image.save(out / f"{index:04d}.png")
            for i, condition in enumerate(job.conditions):  # the first as NNNN_condition.png, each by its name
                resized = condition.convert("RGB").resize((cfg.resolution, cfg.resolution))
                if i == 0:
                    resized.save(out / f"{index:04d}_condition.png")
                if len(job.conditions) > 1 and i < len(cfg.condition):
                    resized.save(out / f"{index:04d}_condition_{cfg.condition[i]}.png")
            (out / f"{index:04d}.json").write_text(json.dumps(record, indent=1))
            records.append(record)
            rows.append((job.conditions[0], image, prompt["prompt"]))
            log(f"  {index:04d}: {prompt['prompt_source']}: {prompt['prompt']!r}")
    contact_sheet(rows).save(out / "contact_sheet.png")
    log(f"wrote {len(records)} samples and contact_sheet.png to {out}")
    return records


def run_eval(cfg: EvalConfig, log=print) -> dict[str, Any]:
    from stages.annotators import create

    from .metrics import METRICS, clip_score, controllability, keypoint_distance

    folder, condition, clip_model = cfg.folder, cfg.condition, cfg.clip_model
    root = Path(folder)
    annotator = create([condition], {condition: {"weights": cfg.weights}} if cfg.weights else {})[condition]
    annotator.setup()
    records = [json.loads(p.read_text()) for p in sorted(root.glob("[0-9][0-9][0-9][0-9].json"))]
    if not records:
        raise ValueError(f"{folder}: no samples (NNNN.json + NNNN.png + NNNN_condition.png) to evaluate")
    images = {r["index"]: Image.open(root / f"{r['index']:04d}.png").convert("RGB") for r in records}
    per_image = []
    if condition == "openpose":  # compare keypoints recorded at build time with those found again
        name, higher = "keypoint_distance", False
        for r in records:
            _, used = annotator(np.asarray(images[r["index"]]), np.random.default_rng(0))
            per_image.append({"sample": f"{r['index']:04d}",
                              name: keypoint_distance(r.get("condition_keypoints") or [], used["keypoints"])})
    else:
        if condition not in METRICS:
            raise ValueError(f"no controllability metric for {condition!r}")
        metric = METRICS[condition]
        name, higher = metric.name, metric.higher_is_better
        for r in records:
            cond = np.asarray(Image.open(condition_path(root, r["index"], condition)).convert(
                "RGB" if annotator.mode == "RGB" else "L"))
            per_image.append({"sample": f"{r['index']:04d}",
                              name: controllability(condition, annotator, [cond], [np.asarray(images[r["index"]])])})
    values = [p[name] for p in per_image if p[name] is not None]
    report = {"condition": condition, "metric": name, "higher_is_better": higher,
              "mean": float(np.mean(values)) if values else None, "evaluated": len(values), "samples": per_image}
    if cfg.shuffled:
        if condition == "openpose" or len(records) < 2:
            raise ValueError("--shuffled needs a map condition (not openpose) and at least two samples")
        report["shuffled_mean"] = _shuffled_score(root, records, images, condition, annotator)
        report["shuffled"] = "each image against another sample's condition (seeded derangement): the chance level"
    if clip_model:
        report["clip_score"] = clip_score([images[r["index"]] for r in records], [r["prompt"] for r in records],
                                          clip_model)
    report["not_computed"] = "FID: needs Inception weights locally" + ("" if clip_model else "; CLIP score: pass --clip-model")
    (root / "report.json").write_text(json.dumps(report, indent=1))
    log(f"{condition} {name}: {report['mean']} over {len(values)} of {len(per_image)} samples -> {root / 'report.json'}")
    return report


def condition_path(root: Path, index: int, condition: str) -> Path:
    """The condition a sample was given for `condition`: NNNN_condition_NAME.png where the
    sample composed several ControlNets, else NNNN_condition.png."""
    named = root / f"{index:04d}_condition_{condition}.png"
    return named if named.exists() else root / f"{index:04d}_condition.png"


def _shuffled_score(root: Path, records: list[dict], images: dict, condition: str, annotator) -> float:
    from .metrics import controllability

    order = np.random.default_rng(0).permutation(len(records))
    scores = []
    for i, j in zip(order, np.roll(order, 1)):  # every image meets a condition that is not its own
        cond = np.asarray(Image.open(condition_path(root, records[j]["index"], condition)).convert(
            "RGB" if annotator.mode == "RGB" else "L"))
        scores.append(controllability(condition, annotator, [cond], [np.asarray(images[records[i]["index"]])]))
    return float(np.mean(scores))


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with any of the settings below; flags override it")
    add_model_flags(parser, SampleConfig)  # list flags repeat: --controlnet a --image x --controlnet b --image y


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", nargs="?", default=argparse.SUPPRESS, metavar="FOLDER",
                        help="a `controlforge sample` output folder (or --folder, or folder: in --config)")
    parser.add_argument("--config", help="YAML file with any of the settings below; flags override it")
    add_model_flags(parser, EvalConfig)


def _run(args: argparse.Namespace, model, run) -> int:
    try:
        run(load_config(args.config, overrides_from(args), model=model))
    except (ConfigError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def run_sample_from_args(args: argparse.Namespace) -> int:
    return _run(args, SampleConfig, run_sample)


def run_eval_from_args(args: argparse.Namespace) -> int:
    return _run(args, EvalConfig, run_eval)

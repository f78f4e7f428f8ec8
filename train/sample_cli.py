"""`controlforge sample`: the paper's auto-prompt sampler, and `controlforge eval`.

sample: one or more ControlNets, each with its condition image (or conditions drawn
from a shard), or none (the base model alone, same prompts and seeds, for comparison), prompt modes none / default / auto / user, DDIM, CFG and a guidance
weighting mode. Writes NNNN.png, NNNN.json (prompt, modes, seed, weights),
NNNN_condition.png and contact_sheet.png (condition | generated | prompt).

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
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from .sampler import DEFAULT_PROMPT, MODES, Control, SampleResult, sample

PROMPT_MODES = ("none", "default", "auto", "user")


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


def conditions_from_shard(shard: str, condition: str, n: int) -> list[tuple[Image.Image, str | None, str, dict]]:
    """(condition image, source caption, key, the condition's recorded parameters) per sample."""
    import webdataset as wds

    found = []
    for sample_ in wds.WebDataset(shard, shardshuffle=False, empty_check=False, nodesplitter=None):
        if f"{condition}.png" in sample_:
            caption = sample_.get("txt", b"").decode("utf-8").strip() or None
            params = json.loads(sample_["json"]).get("conditions", {}).get(condition, {}).get("params", {})
            found.append((Image.open(io.BytesIO(sample_[f"{condition}.png"])).convert("RGB"), caption,
                          sample_["__key__"], params))
        if len(found) >= n:
            break
    if not found:
        raise ValueError(f"{shard}: no sample with a {condition}.png")
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


def run_sample(args: argparse.Namespace, log=print) -> list[dict[str, Any]]:
    from diffusers import ControlNetModel, DDIMScheduler

    from . import families

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    frozen = families.load(args.pretrained_model, dtype)
    families.check_resolution(frozen, args.resolution)
    unet, vae = frozen.unet.to(device, dtype), frozen.vae.to(device)
    for encoder in frozen.text_encoders:
        encoder.to(device)
    through_pipeline = hasattr(frozen.family, "loss")  # flow-matching families: the diffusers pipeline samples
    if args.mode is None:
        args.mode = "both" if through_pipeline else "paper"
    if through_pipeline and args.mode != "both":
        raise ValueError(f"--mode {args.mode}: {frozen.family.NAME} samples through diffusers' "
                         f"{frozen.family.PIPELINE}, which puts the control in both CFG branches: use --mode both")
    scheduler = DDIMScheduler.from_pretrained(args.pretrained_model, subfolder="scheduler")
    net_class = ControlNetModel
    if frozen.family.NAME == "sd3":
        from diffusers import SD3ControlNetModel as net_class
    elif frozen.family.NAME == "flux":
        from diffusers import FluxControlNetModel as net_class
    nets = []
    for path in args.controlnet or []:
        try:
            nets.append(net_class.from_pretrained(path).to(device, dtype).eval())
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a ControlNet for this {frozen.family.NAME} base "
                             f"(made for another kind of base model?): {str(exc)[:200]}") from None
    for path, net in zip(args.controlnet or [], nets):
        families.check_controlnet(frozen, net, path)

    def encode(prompts: list[str]):
        return frozen.family.conditioning(frozen, prompts, device, None, (args.resolution, args.resolution))

    pipe = None
    if through_pipeline:
        if len(nets) > 1:
            raise ValueError(f"{frozen.family.NAME}: one --controlnet at a time")
        pipe = _family_pipeline(frozen, nets[0] if nets else None, device, dtype)
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    scales = args.scale or [1.0] * len(nets)
    if len(scales) != len(nets):
        raise ValueError("give one --scale per --controlnet")
    if not nets and not args.shard and len(args.image or []) != 1:
        raise ValueError("without --controlnet (the base model alone) give --shard or one --image: the conditions "
                         "are recorded beside the samples for eval")
    if args.shard:
        if len(nets) > 1:
            raise ValueError("--shard draws conditions for one ControlNet; use --image per ControlNet for several")
        jobs = [([cond], caption, key, params)
                for cond, caption, key, params in conditions_from_shard(args.shard, args.condition, args.num)]
    else:
        if nets and len(args.image or []) != len(nets):
            raise ValueError("give one --image per --controlnet (or --shard)")
        jobs = [([Image.open(p) for p in args.image], None, Path(args.image[0]).stem, {})]
    captioner = None
    if args.prompt_mode == "auto" and args.caption_model:
        from stages.models.captioner import BlipCaptioner

        captioner = BlipCaptioner(args.caption_model, max_new_tokens=30)
    def generate(conditions: list[list[Image.Image]], prompts: list[str], seeds: list[int]):
        """One batch: each ControlNet gets its conditions stacked; each sample its own seed."""
        if pipe is not None:
            control = ({frozen.family.CONTROL_IMAGE_ARG: [c[0].convert("RGB") for c in conditions],
                        "controlnet_conditioning_scale": scales[0]} if nets else {})
            negative = {"negative_prompt": [args.negative_prompt] * len(prompts)} if args.negative_prompt else {}
            images = pipe(prompt=prompts, **negative, **control,
                          num_inference_steps=args.steps, guidance_scale=args.guidance_scale, height=args.resolution,
                          width=args.resolution, generator=[torch.Generator().manual_seed(s) for s in seeds],
                          **getattr(frozen.family, "EXTRA_PIPELINE_ARGS", {})).images
            return SampleResult(images, [])
        controls = [Control(net, torch.cat([_tensor(c[k], args.resolution) for c in conditions]).to(device, dtype), s)
                    for k, (net, s) in enumerate(zip(nets, scales))]
        return sample(unet, vae, None, None, scheduler, controls, prompts, args.negative_prompt,
                      args.mode, args.steps, args.guidance_scale, args.resolution, args.resolution,
                      [torch.Generator().manual_seed(seed) for seed in seeds], encode=encode)

    planned = []  # prompts first (auto mode may draw a first pass per sample), then batches
    for index, (images, caption, name, condition_params) in enumerate(jobs):
        seed = args.seed + index
        prompt = resolve_prompt(args.prompt_mode, args.prompt, caption,
                                lambda p: generate([images], [p], [seed]).images[0], captioner)
        planned.append((index, images, name, condition_params, seed, prompt))
    records, rows = [], []
    for start in range(0, len(planned), args.batch_size):
        chunk = planned[start:start + args.batch_size]
        result = generate([c[1] for c in chunk], [c[5]["prompt"] for c in chunk], [c[4] for c in chunk])
        for (index, images, name, condition_params, seed, prompt), image in zip(chunk, result.images):
            record = {"index": index, "source": name, **prompt, "prompt_mode": args.prompt_mode,
                      "negative_prompt": args.negative_prompt, "guidance_mode": args.mode, "weights": result.weights,
                      "seed": seed, "steps": args.steps, "guidance_scale": args.guidance_scale,
                      "controlnets": list(args.controlnet or []), "scales": scales, "condition": args.condition,
                      "condition_keypoints": condition_params.get("keypoints")}
            image.save(out / f"{index:04d}.png")
            images[0].convert("RGB").resize((args.resolution, args.resolution)).save(out / f"{index:04d}_condition.png")
            (out / f"{index:04d}.json").write_text(json.dumps(record, indent=1))
            records.append(record)
            rows.append((images[0], image, prompt["prompt"]))
            log(f"  {index:04d}: {prompt['prompt_source']}: {prompt['prompt']!r}")
    contact_sheet(rows).save(out / "contact_sheet.png")
    log(f"wrote {len(records)} samples and contact_sheet.png to {out}")
    return records


def _family_pipeline(frozen, controlnet, device, dtype):
    """The family's diffusers pipeline (with the ControlNet, or the base's own without)."""
    if controlnet is not None:
        pipe = frozen.family.pipeline(frozen, frozen.unet, controlnet, frozen.family.sampling_scheduler(frozen))
    else:
        pipe = frozen.family._prompt_pipeline(frozen)
        pipe.scheduler = frozen.family.sampling_scheduler(frozen)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def run_eval(folder: str, condition: str, annotator_params: dict | None = None, clip_model: str | None = None,
             shuffled: bool = False, log=print) -> dict[str, Any]:
    from stages.annotators import create

    from .metrics import METRICS, clip_score, controllability, keypoint_distance

    root = Path(folder)
    annotator = create([condition], {condition: annotator_params} if annotator_params else {})[condition]
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
            cond = np.asarray(Image.open(root / f"{r['index']:04d}_condition.png").convert(
                "RGB" if annotator.mode == "RGB" else "L"))
            per_image.append({"sample": f"{r['index']:04d}",
                              name: controllability(condition, annotator, [cond], [np.asarray(images[r["index"]])])})
    values = [p[name] for p in per_image if p[name] is not None]
    report = {"condition": condition, "metric": name, "higher_is_better": higher,
              "mean": float(np.mean(values)) if values else None, "evaluated": len(values), "samples": per_image}
    if shuffled:
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


def _shuffled_score(root: Path, records: list[dict], images: dict, condition: str, annotator) -> float:
    from .metrics import controllability

    order = np.random.default_rng(0).permutation(len(records))
    scores = []
    for i, j in zip(order, np.roll(order, 1)):  # every image meets a condition that is not its own
        cond = np.asarray(Image.open(root / f"{records[j]['index']:04d}_condition.png").convert(
            "RGB" if annotator.mode == "RGB" else "L"))
        scores.append(controllability(condition, annotator, [cond], [np.asarray(images[records[i]["index"]])]))
    return float(np.mean(scores))


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--pretrained-model", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="base model: hub id or folder")
    add("--controlnet", action="append", help="repeatable: a trained ControlNet (folder or hub id); none = the base "
        "model alone, with the same prompts and seeds (give --shard or --image for the conditions eval compares with)")
    add("--image", action="append", help="repeatable: the condition image for each --controlnet")
    add("--scale", action="append", type=float, help="repeatable: each ControlNet's scale (default 1)")
    add("--shard", help="draw conditions (and source captions) from this shard instead of --image")
    add("--condition", default="canny", help="the condition member to read from --shard (default canny)")
    add("--num", type=int, default=4, help="samples to draw from --shard (default 4)")
    add("--prompt-mode", choices=PROMPT_MODES, default="auto", help="none, default, auto (BLIP), user (default auto)")
    add("--prompt", help="the prompt for --prompt-mode user")
    add("--negative-prompt", default="")
    add("--caption-model", default="Salesforce/blip-image-captioning-base", help="BLIP for --prompt-mode auto")
    add("--mode", choices=MODES, default=None, help="guidance weighting (default paper; both for SD3): paper = control in the "
        "conditional branch weighted by resolution; lllyasviel, diffusers = other weightings; both = both branches; "
        "uncond = unconditional branch only; --guidance-scale 1 = no CFG")
    add("--steps", type=int, default=20, help="DDIM steps (default 20)")
    add("--guidance-scale", type=float, default=9.0, help="CFG scale (default 9.0)")
    add("--resolution", type=int, default=512)
    add("--seed", type=int, default=0, help="sample i uses seed + i, whatever the batch size")
    add("--batch-size", type=int, default=16, help="samples drawn together (default 16); a sample is the same "
        "in any batch size, up to float rounding")
    add("--output", default="out/samples")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a `controlforge sample` output folder")
    parser.add_argument("--condition", required=True, help="which annotator re-annotates the images")
    parser.add_argument("--weights", help="the annotator's weights (hub id or folder)")
    parser.add_argument("--clip-model", help="a CLIP model (folder or hub id) for the CLIP score of image vs prompt")
    parser.add_argument("--shuffled", action="store_true",
                        help="also score each image against another sample's condition (the chance level)")


def run_sample_from_args(args: argparse.Namespace) -> int:
    try:
        run_sample(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def run_eval_from_args(args: argparse.Namespace) -> int:
    try:
        run_eval(args.folder, args.condition, {"weights": args.weights} if args.weights else None, args.clip_model,
                 args.shuffled)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

"""`controlforge build`: images -> captions -> conditions -> WebDataset shards.

Runs on an embedded Ray cluster by default, on an existing one with
RAY_ADDRESS / --ray-address, or under `ray job submit --working-dir . -- python pipeline/build.py ...`.
Resumable: a rerun into the same --output skips the shards its manifest lists.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python pipeline/build.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import BuildConfig, ConfigError, load_config  # noqa: E402
from pipeline.executors import init_ray, run_local, run_ray_windows  # noqa: E402
from pipeline.summary import format_summary  # noqa: E402
from stages.annotators import AnnotatorError, MissingWeightsError, create as create_annotators  # noqa: E402
from stages.captioner import CaptionModelError  # noqa: E402
from stages.listing import open_listing  # noqa: E402
from stages.readers import InputError, InputRef  # noqa: E402
from stages.steps import make_steps  # noqa: E402
from stages import consolidate, writer  # noqa: E402
from stages.lock import BuildLock, LockedError  # noqa: E402
from stages.output import Output  # noqa: E402

VERSIONED = ("controlforge", "torch", "transformers", "diffusers", "controlnet-aux", "opencv-python-headless",
             "pillow", "numpy", "webdataset", "ray", "datasets")


class BuildError(RuntimeError):
    """A build that cannot start or go on; the message says why and what to do."""


def package_versions() -> dict[str, str]:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def _check_resumable(manifest: dict[str, Any], cfg: BuildConfig, listing) -> None:
    old = manifest.get("config", {})
    differ = [k for k, v in cfg.content_signature().items() if old.get(k) != v]
    if differ:
        raise BuildError(f"{cfg.output} was built with a different config ({', '.join(differ)} changed); "
                         "use a new --output, or --overwrite to replace it")
    if manifest.get("listing_sha256") != listing.digest:
        raise BuildError(f"the inputs changed since {cfg.output} was started: shards would not line up; "
                         "use a new --output, or --overwrite")


def _clear_output(out: Output) -> None:
    """--overwrite removes only what a build writes, never other files in the folder."""
    for name in (writer.SHARDS_DIR, "manifest.json", "errors.jsonl", "wids-index.json", "preview.png", "report.html",
                 "report"):
        out.remove(name)


def choose_executor(cfg: BuildConfig, inputs: int) -> str:
    """Ray when there is a cluster to use or enough work to pay for starting one (about
    5 s here); a small build runs in this process."""
    if cfg.ray_address or os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        return "ray"
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        return "ray"
    return "ray" if inputs > cfg.auto_local_max_inputs else "local"


def _captioner_plan(cfg: BuildConfig, refs: list[InputRef]) -> tuple[bool, float, int]:
    """Whether a captioner stage is needed, its GPUs per actor and its actor count."""
    if not cfg.captioning:
        return False, 0.0, 1
    known = all(r.kind == "file" and r.caption is not None for r in refs)
    if cfg.keep_captions and known:
        return False, 0.0, 1
    gpus = 0.0
    if cfg.executor == "ray":
        import ray

        gpus = float(ray.cluster_resources().get("GPU", 0))
    per_actor = cfg.caption_num_gpus if cfg.caption_num_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    actors = cfg.caption_concurrency or (max(1, int(gpus // per_actor)) if per_actor > 0 else 1)
    return True, per_actor, actors


def _annotator_gpus(cfg: BuildConfig, annotators: dict) -> float:
    """GPU share of the one actor holding the network annotators (0: they run in the CPU tasks)."""
    if cfg.executor != "ray" or not any(a.uses_model for a in annotators.values()):
        return 0.0
    import ray

    return cfg.annotator_num_gpus if cfg.annotator_num_gpus is not None else (
        0.5 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0)


def preflight_caption_model(name: str) -> None:
    """Fail before any work when the caption model is nowhere to be found."""
    from transformers.utils import cached_file

    try:
        cached_file(name, "config.json")
    except (OSError, ValueError) as exc:
        from stages.captioner import _load_error

        raise _load_error(name, exc) from None


def run_build(cfg: BuildConfig, log=print) -> dict[str, Any]:
    started = time.perf_counter()
    annotators = create_annotators(cfg.conditions, cfg.annotator_params)  # unknown names fail here, not in a worker
    out = Output(cfg.output)
    with BuildLock(out, cfg.lock_stale_seconds, log):  # one build per folder; --overwrite waits its turn too
        return _build_locked(cfg, out, annotators, started, log)


def _build_locked(cfg: BuildConfig, out: Output, annotators: dict, started: float, log) -> dict[str, Any]:
    if cfg.overwrite:
        _clear_output(out)
    writer.remove_stale_temporaries(out)

    t0 = time.perf_counter()
    listing = open_listing(cfg.input, cfg.url_column, cfg.caption_column, cfg.samples_per_shard,
                           peek=cfg.auto_local_max_inputs + 1)
    list_seconds = time.perf_counter() - t0
    if cfg.executor == "auto":
        inputs_seen = listing.known_count if listing.known_count is not None else len(listing.first)
        cfg = cfg.model_copy(update={"executor": choose_executor(cfg, inputs_seen)})
        log(f"executor: {cfg.executor} (auto; --executor ray or local to choose)")
    manifest = writer.load_manifest(out)
    if manifest is not None:
        _check_resumable(manifest, cfg, listing)
    else:
        manifest = {"schema_version": writer.SCHEMA_VERSION, "config": cfg.model_dump(mode="json"),
                    "versions": package_versions(), "inputs": listing.known_count, "listing_sha256": listing.digest,
                    "complete": False, "shards": []}
        writer.save_manifest(out, manifest)  # the config, for resume checks; shards are listed at the end
    # finished shards: their completion markers (every controlforge build has written them)
    done = {f"{writer.SHARDS_DIR}/{name}.tar" for name in writer.completed_shards(out)}
    pending = (w for w in listing.works if f"{writer.SHARDS_DIR}/{w.name}.tar" not in done)
    first = next(pending, None)  # is there anything to do? (a streamed list is not read further here)
    todo = itertools.chain([first], pending) if first is not None else iter(())
    where = Path(out.url).resolve() if out.local else out.url
    if listing.streamed:
        log(f"controlforge build: streaming {cfg.input[0]} in shards of {cfg.samples_per_shard} rows "
            f"({len(done)} shards already done) into {where}")
    else:
        log(f"controlforge build: {listing.count} inputs -> {len(listing.planned)} shards of up to "
            f"{cfg.samples_per_shard} ({len(done)} already done) into {where}")

    todo_any = first is not None
    if cfg.executor == "ray" and todo_any:
        init_ray(cfg.ray_address)
    captioning, caption_gpus, caption_actors = _captioner_plan(cfg, listing.first)
    if captioning and todo_any:
        preflight_caption_model(cfg.caption_model)
    if cfg.min_clip_score is not None and todo_any:
        from stages.clip_score import ClipScorer

        try:
            ClipScorer(cfg.clip_model, "cpu").setup()
        except ValueError as exc:
            raise BuildError(f"--min-clip-score: {exc}") from None
    if cfg.latents and todo_any:  # a wrong model fails here, named, before any shard
        from stages.latents import LatentEncoder

        try:
            LatentEncoder(cfg.latents, "cpu").setup()
        except ValueError as exc:
            raise BuildError(str(exc)) from None
    if todo_any:
        for annotator in annotators.values():
            annotator.check_weights()  # a missing file fails here, named, before any work
    steps = make_steps(cfg, captioning, caption_gpus, _annotator_gpus(cfg, annotators))
    results = (run_local(steps, todo) if cfg.executor == "local"
               else run_ray_windows(steps, todo, cfg.num_cpus, caption_actors))

    built = {"shards": 0, "samples": 0, "seconds": Counter()}  # the driver keeps totals, not the shards' stats
    for stats in results:  # each shard has written its own completion marker: O(1) here
        built["shards"] += 1
        built["samples"] += stats["samples"]
        built["seconds"].update(stats["seconds"])
        rejected = sum(stats["rejected"].values())
        total = "" if listing.streamed and listing.known_count is None else f"/{len(listing.planned)}"
        log(f"  shard {stats['shard']}: {stats['samples']} samples, {rejected} rejected "
            f"[{len(done) + built['shards']}{total}]")
    for _ in listing.works:  # a streamed list whose remaining shards were all done: count its rows
        pass

    ended = consolidate.finish(out, listing.planned, cfg.near_duplicates, log)
    manifest["inputs"] = listing.count
    manifest["shards"] = ended["entries"]
    manifest["samples"] = ended["samples"]
    manifest["rejected"] = sum(ended["rejected"].values())
    manifest["complete"] = True
    writer.write_wids_index(out, manifest)
    writer.save_manifest(out, manifest)

    wall = time.perf_counter() - started
    summary = {"inputs": listing.count, "samples": manifest["samples"], "shards": len(listing.planned),
               "shards_built": built["shards"], "samples_built": built["samples"], "stage_seconds": built["seconds"],
               "rejected": ended["rejected"], "wall_seconds": wall, "list_seconds": list_seconds}
    log(format_summary(summary))
    if cfg.preview and manifest["samples"]:
        from pipeline.preview import contact_sheet, png_bytes

        out.write_atomic("preview.png", png_bytes(contact_sheet(out, cfg.preview)))
        log(f"preview: {out.url_of('preview.png')}")
    if cfg.report_samples:
        from pipeline.report import write_report

        log(f"report: {write_report(out, cfg.report_samples)}")
    return summary


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="controlforge build", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--config", help="YAML file with any of the settings below; flags override it")
    add("--input", action="append", metavar="SPEC",
        help="repeatable: a folder (recursive), a glob ('photos/**/*.jpg'), a .txt/.csv/.jsonl/.parquet list of "
             "paths or URLs, WebDataset .tar shards ('data/{00000..00009}.tar'), a saved HF dataset folder, or hf:NAME")
    add("--output", help="output folder (default out/build); a rerun resumes it")
    add("--conditions", help="comma-separated condition names (default canny)")
    add("--resolution", type=int, help="output side in pixels (default 512)")
    add("--resize-mode", choices=["center_crop", "keep_ratio", "pad"], help="default center_crop")
    add("--min-size", type=int, help="reject images whose shorter side is below this (default 256)")
    add("--max-aspect", type=float, help="reject images with long/short side above this (default 3.0)")
    add("--max-pixels", type=int, help="decompression-bomb limit in pixels (default 100M)")
    add("--samples-per-shard", type=int, help="inputs per shard (default 1000)")
    add("--fetch-timeout", type=float, help="seconds to connect to a URL and without a byte while reading (default 10)")
    add("--fetch-retries", type=int, help="further tries after timeouts, resets, HTTP 408/429/5xx (default 2)")
    add("--user-agent", help="User-Agent of URL fetches (default names controlforge)")
    add("--respect-opt-out", action="store_true", default=None,
        help="skip images served with X-Robots-Tag noai/noimageai (counted as opted_out)")
    add("--caption-model", help="BLIP hub id or local folder (default Salesforce/blip-image-captioning-base); 'none' skips")
    add("--keep-captions", action="store_true", default=None, help="use captions that come with the input; BLIP only for the rest")
    add("--caption-prompt", help="text BLIP continues, e.g. 'a photography of'")
    add("--caption-max-tokens", type=int, help="default 40")
    add("--caption-beams", type=int, help="beam search width (default 3)")
    add("--caption-batch-size", type=int, help="images per BLIP forward pass (default 16)")
    add("--latents", metavar="MODEL", help="encode every stored image with MODEL's VAE into KEY.latents.npy "
        "(float16, mean x scaling factor); the trainer uses them when they match its base")
    add("--min-condition-coverage", type=float, metavar="F", help="reject a sample when a condition map has less "
        "than F of its pixels non-zero (reason empty_condition; off by default)")
    add("--min-clip-score", type=float, metavar="S", help="reject samples whose CLIP image-caption score "
        "(100 x cosine) is below S (reason low_clip_score; off by default); model: --clip-model")
    add("--clip-model", help="CLIPModel folder or hub id for --min-clip-score (default openai/clip-vit-base-patch32)")
    add("--min-depth-std", type=float, metavar="S", help="reject depth maps whose std (0-255) is below S (reason "
        "flat_depth; off by default). For openpose maps with nobody: annotator_params openpose keep_empty: false")
    add("--near-duplicates", type=int, metavar="N", help="reject images within pHash Hamming distance N of an earlier "
        "one across the whole build (reason near_duplicate; the first in shard/key order stays; off by default)")
    add("--seed", type=int, help="seed for per-image random annotator parameters (default 0)")
    add("--num-cpus", type=float, help="CPUs per shard task (default 1)")
    add("--num-gpus", type=float, dest="caption_num_gpus", help="GPUs per captioner actor (default: 1 if the cluster has GPUs)")
    add("--annotator-num-gpus", type=float, help="GPU share of the actor holding the network annotators (default 0.5 if the cluster has GPUs)")
    add("--executor", choices=["auto", "ray", "local"], help="auto (default): Ray for a cluster or a build of more "
        "than --auto-local-max-inputs inputs, else local; ray; local: one process, no Ray")
    add("--auto-local-max-inputs", type=int, help="auto runs builds up to this many inputs locally (default 64)")
    add("--ray-address", help="Ray cluster to join: host:port, ray://..., or auto for the one `ray start` made on this "
        "machine (default RAY_ADDRESS, else a new embedded local cluster)")
    add("--preview", type=int, help="samples drawn into OUT/preview.png (default 16, 0 = none)")
    add("--report-samples", type=int, help="samples in the grid of OUT/report.html (default 1000, 0 = no report)")
    add("--lock-stale-seconds", type=float, help="a lock held from another host with no heartbeat for this long "
        "is taken over (default 3600)")
    add("--overwrite", action="store_true", default=None, help="replace a previous build in --output")
    return parser


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "func", "command")}
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:  # `python pipeline/build.py ...`, e.g. under `ray job submit`
        from pipeline.cli import exit_on_sigterm

        exit_on_sigterm()
    return run_from_args(args)


def run_from_args(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        if not cfg.input:
            raise ConfigError("no input: pass --input or set `input:` in --config")
        run_build(cfg)
    except (ConfigError, BuildError, InputError, AnnotatorError, CaptionModelError, MissingWeightsError,
            LockedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        cause = _user_error_in(exc)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 2
    return 0


def _user_error_in(exc: BaseException) -> BaseException | None:
    """Ray wraps a worker's exception; find a known user-facing one inside it."""
    seen = exc
    while seen is not None:
        if isinstance(seen, (CaptionModelError, InputError, AnnotatorError, MissingWeightsError)):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return None


if __name__ == "__main__":
    sys.exit(main())

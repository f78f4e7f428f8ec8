"""`controlforge build`: images -> captions -> conditions -> WebDataset shards.

Runs on an embedded Ray cluster by default, on an existing one with
RAY_ADDRESS / --ray-address, or under `ray job submit --working-dir . -- python pipeline/build.py ...`.
Resumable: a rerun into the same --output skips the shards its manifest lists.
A full disk stops it with one line and exit status 3; the finished shards are kept.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python pipeline/build.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.disk_full import (DISK_FULL_EXIT, DiskFullError, disk_full_message, find_disk_full,  # noqa: E402
                              full_path)
from common.flags import add_model_flags, overrides_from  # noqa: E402
from pipeline.config import BuildConfig, ConfigError, load_config  # noqa: E402
from pipeline import licences  # noqa: E402
from pipeline.executors import init_ray, run_local, run_ray_windows  # noqa: E402
from pipeline.plan import make_steps, place  # noqa: E402
from pipeline.summary import format_summary  # noqa: E402
from stages.annotators import AnnotatorError, MissingWeightsError, create as create_annotators  # noqa: E402
from stages.annotators.licences import LicencePolicyError  # noqa: E402
from stages.models.captioner import CaptionModelError  # noqa: E402
from stages.read.listing import open_listing  # noqa: E402
from stages.read.readers import InputError  # noqa: E402
from stages.shards import consolidate, manifest as index  # noqa: E402
from stages.shards.layout import (EMPTY_TEXT, EMPTY_TEXT_POOLED, SCHEMA_VERSION, SHARDS_DIR,  # noqa: E402
                                  tar_path)
from stages.shards.lock import BuildLock, LockedError  # noqa: E402
from stages.shards.output import Output  # noqa: E402

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
    differ = [k for k, v in cfg.content_signature().items() if old.get(k, BuildConfig.content_default(k)) != v]
    if differ:
        raise BuildError(f"{cfg.output} was built with a different config ({', '.join(differ)} changed); "
                         "use a new --output, or --overwrite to replace it")
    if manifest.get("listing_sha256") != listing.digest:
        raise BuildError(f"the inputs changed since {cfg.output} was started: shards would not line up; "
                         "use a new --output, or --overwrite")


def _clear_output(out: Output) -> None:
    """--overwrite removes only what a build writes, never other files in the folder."""
    for name in (SHARDS_DIR, "manifest.json", "errors.jsonl", "wids-index.json", "preview.png", "report.html",
                 "report", EMPTY_TEXT, EMPTY_TEXT_POOLED):
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


def preflight_caption_model(name: str) -> None:
    """Fail before any work when the caption model is nowhere to be found."""
    from transformers.utils import cached_file

    try:
        cached_file(name, "config.json")
    except (OSError, ValueError) as exc:
        from stages.models.captioner import load_error

        raise load_error(name, exc) from None


def run_build(cfg: BuildConfig, log=print) -> dict[str, Any]:
    started = time.perf_counter()
    annotators = create_annotators(cfg.conditions, cfg.annotator_params)  # unknown names fail here, not in a worker
    try:
        licences.enforce(cfg.licence_policy, annotators)  # before any work: no listing, no fetch
    except LicencePolicyError as exc:
        raise BuildError(str(exc)) from None
    out = Output(cfg.output)
    progress: dict[str, Any] = {"planned": None}  # shards planned, once the listing knows
    try:
        with BuildLock(out, cfg.lock_stale_seconds, log):  # one build per folder; --overwrite waits its turn too
            return _build_locked(cfg, out, annotators, started, log, progress)
    except DiskFullError:
        raise
    except Exception as exc:  # on Ray too: the worker's OSError comes back wrapped
        error = find_disk_full(exc)
        if error is None:
            raise
        raise disk_full_error(out, error, progress["planned"]) from exc


def disk_full_error(out: Output, error: OSError, planned: int | None) -> DiskFullError:
    """The one line for a build stopped by a full disk: where (the file the error names,
    else the output folder or the temporary folder the spool uses, whichever has less
    room), the free space there, and the shards finished (their completion markers)."""
    try:
        done = len(index.completed_shards(out))
    except Exception:
        done = None
    if done is None:
        progress = "the finished shards are kept"
    elif planned is not None:
        progress = f"{done} of {planned} shards done"
    else:
        progress = f"{done} shards done"
    candidates = ([str(Path(out.root).resolve())] if out.local else []) + [tempfile.gettempdir()]
    path = full_path(error, candidates)
    return DiskFullError(disk_full_message(path, progress, error), error, path)


def _build_locked(cfg: BuildConfig, out: Output, annotators: dict, started: float, log,
                  progress: dict[str, Any] | None = None) -> dict[str, Any]:
    if cfg.overwrite:
        _clear_output(out)
    index.remove_stale_temporaries(out)

    t0 = time.perf_counter()
    listing = open_listing(cfg.input, cfg.url_column, cfg.caption_column, cfg.samples_per_shard,
                           peek=cfg.auto_local_max_inputs + 1)
    list_seconds = time.perf_counter() - t0
    if progress is not None and not listing.streamed:
        progress["planned"] = len(listing.planned)
    if cfg.executor == "auto":
        inputs_seen = listing.known_count if listing.known_count is not None else len(listing.first)
        cfg = cfg.model_copy(update={"executor": choose_executor(cfg, inputs_seen)})
        log(f"executor: {cfg.executor} (auto; --executor ray or local to choose)")
    manifest = index.load_manifest(out)
    recorded = json.dumps(manifest, sort_keys=True) if manifest is not None else None  # saved again if it changes
    if manifest is not None:
        _check_resumable(manifest, cfg, listing)
    else:  # saved before any shard (below): the config, for resume checks; shards are listed at the end
        manifest = {"schema_version": SCHEMA_VERSION, "config": cfg.model_dump(mode="json"),
                    "versions": package_versions(), "inputs": listing.known_count, "listing_sha256": listing.digest,
                    "complete": False, "shards": []}
    # finished shards: their completion markers (every controlforge build has written them)
    done = {tar_path(name) for name in index.completed_shards(out)}
    pending = (w for w in listing.works if tar_path(w.name) not in done)
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
    cluster_gpus, local_gpus = None, 0
    if cfg.executor == "ray":
        import ray

        cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    elif any(a.uses_model for a in annotators.values()):
        import torch

        local_gpus = torch.cuda.device_count()
    placement = place(cfg, listing.first, annotators, cluster_gpus, local_gpus)
    if placement.captioning and todo_any:
        preflight_caption_model(cfg.caption_model)
    if cfg.min_clip_score is not None and todo_any:
        from stages.models.clip_score import ClipScorer

        try:
            ClipScorer(cfg.clip_model, "cpu").setup()
        except ValueError as exc:
            raise BuildError(f"--min-clip-score: {exc}") from None
    if cfg.latents and todo_any:  # a wrong model fails here, named, before any shard
        from stages.models.latents import LatentEncoder

        try:
            LatentEncoder(cfg.latents, "cpu").setup()
        except ValueError as exc:
            raise BuildError(str(exc)) from None
    if cfg.text_embeddings and todo_any:  # a wrong model fails here, named
        _check_text_embeddings(cfg, manifest)
    if todo_any:
        for annotator in annotators.values():
            annotator.check_weights()  # a missing file fails here, named, before any work
        try:  # the weights' sha256, once per build; each sample's json gets a reference
            resolved = licences.resolve(annotators, manifest.get("licences"), cfg.output)
        except LicencePolicyError as exc:
            raise BuildError(str(exc)) from None
        manifest["licences"] = resolved
    if json.dumps(manifest, sort_keys=True) != recorded:  # once, before any shard is written
        index.save_manifest(out, manifest)
    steps = make_steps(cfg, placement, annotators)
    results = (run_local(steps, todo) if cfg.executor == "local"
               else run_ray_windows(steps, todo, cfg.num_cpus))

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
    index.write_wids_index(out, manifest)
    index.save_manifest(out, manifest)

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


def _check_text_embeddings(cfg: BuildConfig, manifest: dict[str, Any]) -> None:
    """`--text-embeddings`: the base's family, tokenizers and text encoder configs are found
    here, before any shard, so a wrong model fails at once; no encoder weights load on the
    driver. The step writes the empty prompt's embedding beside manifest.json."""
    from stages.steps import TextEmbeddingSettings
    from train.families import FamilyError
    from train.text_embeddings import PromptEncoder

    try:
        family = PromptEncoder(TextEmbeddingSettings(cfg.text_embeddings), "cpu").check()
    except (FamilyError, OSError, ValueError) as exc:
        raise BuildError(f"--text-embeddings {cfg.text_embeddings}: {exc}") from None
    manifest["text_embeddings"] = {"model": cfg.text_embeddings, "family": family.NAME}  # saved before any shard


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """`--config YAML`, then one flag per BuildConfig field (its help and default come from
    the field), plus `--num-gpus`, the short name of --caption-num-gpus."""
    parser = parser or argparse.ArgumentParser(prog="controlforge build", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with any of the settings below; flags override it")
    add_model_flags(parser, BuildConfig)
    parser.add_argument("--num-gpus", type=float, dest="caption_num_gpus", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the full traceback of a stop (a full disk is otherwise one line)")
    return parser


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    overrides = overrides_from(args)
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:  # `python pipeline/build.py ...`, e.g. under `ray job submit`
        from pipeline.cli import exit_on_sigterm

        exit_on_sigterm()
    return run_from_args(args)


def run_from_args(args: argparse.Namespace) -> int:
    debug = bool(getattr(args, "debug", False))
    try:
        cfg = config_from_args(args)
        if not cfg.input:
            raise ConfigError("no input: pass --input or set `input:` in --config")
        run_build(cfg)
    except DiskFullError as exc:
        return _stop_on_full_disk(exc, debug)
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


def _stop_on_full_disk(exc: DiskFullError, debug: bool) -> int:
    """One line on stderr and exit status 3; the tracebacks too with --debug."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"error: {exc}", file=sys.stderr)
    sys.stderr.flush()
    return DISK_FULL_EXIT


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

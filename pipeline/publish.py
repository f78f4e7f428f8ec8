"""`controlforge publish OUT`: export a build as a Hugging Face dataset.

One config per condition (`load_dataset(repo, "canny")`), each with diffusers'
ControlNet columns `image`, `conditioning_image`, `text`, one image column per
other condition and the metadata fields, as parquet files written shard by shard
(memory stays bounded by one shard). A dataset card (README.md) records how the
set was built. `--to DIR` writes it locally; `--repo-id NAME` pushes it with
huggingface_hub, in retried commits that resume where an
interrupted upload stopped (token from the usual places:
HF_TOKEN or `huggingface-cli login`; never printed, never written).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from stages.shards.manifest import load_manifest, load_stats
from stages.shards.reader import iter_samples
from stages.shards.output import Output

META_COLUMNS = {"key": "string", "source": "string", "sha256": "string", "width": "int64", "height": "int64",
                "orig_width": "int64", "orig_height": "int64", "caption_model": "string", "metadata": "string"}


class PublishError(RuntimeError):
    """A build that cannot be published as asked; the message says why."""


def is_validation(key: str, fraction: float, seed: int) -> bool:
    """Seeded, per-key: the same sample stays in the same split across re-exports."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _features(conditions: list[str], main: str):
    import datasets

    features = {"image": datasets.Image(), "conditioning_image": datasets.Image(), "text": datasets.Value("string")}
    features.update({c: datasets.Image() for c in conditions if c != main})
    features.update({name: datasets.Value(kind) for name, kind in META_COLUMNS.items()})
    return datasets.Features(features)


def _row(key: str, members: dict[str, bytes], main: str, conditions: list[str]) -> dict[str, Any]:
    meta = json.loads(members["json"])
    row = {"image": {"bytes": members["jpg"], "path": None},
           "conditioning_image": {"bytes": members[f"{main}.png"], "path": None},
           "text": members["txt"].decode("utf-8")}
    row.update({c: {"bytes": members[f"{c}.png"], "path": None} for c in conditions if c != main})
    row.update({name: meta.get(name) for name in META_COLUMNS if name != "metadata"})
    row["key"] = key
    row["metadata"] = json.dumps(meta, sort_keys=True)
    return row


def export_shard(build: str, entry: dict[str, Any], target: str, conditions: list[str], val_fraction: float,
                 seed: int) -> dict[str, Any]:
    """One shard -> parquet files for every condition and split it has samples for."""
    import datasets

    out = Output(build)
    shard = Path(entry["name"]).stem
    by_split: dict[str, list[tuple[str, dict[str, bytes]]]] = {"train": [], "validation": []}
    annotators: dict[str, Any] = {}
    with out.fs.open(out.path(entry["name"]), "rb") as handle:
        for key, members in iter_samples(handle):
            by_split["validation" if is_validation(key, val_fraction, seed) else "train"].append((key, members))
            if not annotators:
                annotators = json.loads(members["json"]).get("conditions", {})
    counts, splits = {}, []
    for split, samples in by_split.items():
        if not samples:
            continue
        counts[split] = len(samples)
        splits.append(split)
        for main in conditions:
            rows = [_row(k, m, main, conditions) for k, m in samples]
            folder = Path(target) / main
            folder.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict({name: [r[name] for r in rows] for name in rows[0]},
                                       features=_features(conditions, main)).to_parquet(
                str(folder / f"{split}-{shard}.parquet"))
    return {"shard": entry["name"], "counts": counts, "splits": splits, "annotators": annotators}


def export(out: Output, target: Path, val_fraction: float, seed: int, use_ray: bool = False, log=print) -> dict[str, Any]:
    """Parquet files per condition and split, shard by shard (memory bounded by one shard),
    as Ray tasks when `use_ray` (then `target` must be a folder every node sees)."""
    manifest = load_manifest(out)
    if manifest is None:
        raise PublishError(f"{out.url}: no manifest.json: not a controlforge build")
    if not manifest.get("complete"):
        raise PublishError(f"{out.url}: the build is not complete; finish it (rerun `controlforge build`) first")
    conditions = manifest["config"]["conditions"]
    args = (str(target), conditions, val_fraction, seed)
    if use_ray:
        import ray

        from pipeline.executors import init_ray

        init_ray()
        task = ray.remote(export_shard)
        results = ray.get([task.remote(out.url, entry, *args) for entry in manifest["shards"]])
    else:
        results = (export_shard(out.url, entry, *args) for entry in manifest["shards"])
    counts: Counter[str] = Counter()
    files: dict[str, set[str]] = {c: set() for c in conditions}
    annotators: dict[str, Any] = {}
    for result in results:
        counts.update(result["counts"])
        for cond in conditions:
            files[cond].update(result["splits"])
        annotators = annotators or result["annotators"]
        log(f"  exported {result['shard']}: {sum(result['counts'].values())} samples")
    return {"manifest": manifest, "conditions": conditions, "counts": dict(counts), "splits": files,
            "annotators": annotators}


def rejected_by_reason(out: Output) -> Counter[str]:
    reasons: Counter[str] = Counter()
    if out.exists("errors.jsonl"):
        for line in out.read_text("errors.jsonl").splitlines():
            if line.strip():
                reasons[json.loads(line)["error"]] += 1
    return reasons


def caption_sources(out: Output, manifest: dict[str, Any]) -> Counter[str]:
    """Where the captions came from, counted over the samples (from the per-shard stats)."""
    found: Counter[str] = Counter()
    for entry in manifest["shards"]:
        found.update(load_stats(out, Path(entry["name"]).stem).get("caption_sources", []))
    return found


def _table(header: tuple[str, str], rows: list[tuple[Any, Any]], empty: str) -> list[str]:
    """A markdown table, or a sentence where it would have no rows."""
    if not rows:
        return [empty, ""]
    return [f"| {header[0]} | {header[1]} |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows), ""]


def dataset_card(info: dict[str, Any], main: str, license: str, rejected: Counter[str], has_preview: bool,
                 captions: Counter[str] | None = None) -> str:
    """The README.md of the export: every figure comes from the manifest, the shards' stats
    and the export itself, and agrees with them."""
    manifest, conditions = info["manifest"], info["conditions"]
    configs = []
    for cond in conditions:
        config: dict[str, Any] = {"config_name": cond, "data_files": [
            {"split": split, "path": f"{cond}/{split}-*.parquet"} for split in ("train", "validation")
            if split in info["splits"][cond]]}
        if cond == main:
            config["default"] = True
        configs.append(config)
    total = sum(info["counts"].values())
    meta = {"license": license, "task_categories": ["text-to-image"], "tags": ["controlnet", "controlforge", *conditions],
            "size_categories": [_size_category(total)], "configs": configs}
    cfg = manifest["config"]
    captions = captions or Counter()
    if captions:
        caption_lines = [f"- {source}: {n} samples" for source, n in captions.most_common()]
    else:
        caption_lines = [f"- not recorded per sample by this build; its config: caption model `{cfg['caption_model']}`"
                         + (", captions that came with the input kept" if cfg.get("keep_captions") else "")]
    condition_lines = []
    for name in conditions:
        a = info["annotators"].get(name)
        settings = cfg.get("annotator_params", {}).get(name, {})
        condition_lines.append(
            f"- `{name}`: " + (f"{a.get('annotator')} v{a.get('version')}, parameters recorded with the first sample "
                               f"`{json.dumps(a.get('params', {}), sort_keys=True)}`" if a else "annotator not recorded")
            + (f"; settings given to the build `{json.dumps(settings, sort_keys=True)}`" if settings else
               "; default settings"))
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        "# ControlNet training set", "",
        f"Built with controlforge: {total} samples, conditions {', '.join(conditions)}. Each config "
        "(`load_dataset(REPO, NAME)`) has the columns diffusers' ControlNet training script expects, `image`, "
        "`conditioning_image` (that config's condition) and `text`, plus one image column per other condition and "
        "the metadata fields.", "",
        *(["![preview](preview.png)", ""] if has_preview else []),
        "## Counts", "",
        *_table(("split", "samples"), sorted(info["counts"].items()), "No samples were exported."),
        f"Inputs: {manifest.get('inputs')}; samples: {manifest.get('samples', total)}; rejected: {sum(rejected.values())}.",
        "",
        *_table(("rejected because", "inputs"), sorted(rejected.items()), "No input was rejected."),
        "## Captions", "", *caption_lines, "",
        "## Conditions", "", *condition_lines, "",
        "## Licences of the annotators", "", *licence_lines(manifest.get("licences")),
        "## How it was built", "",
        f"- resolution {cfg['resolution']}, resize mode {cfg['resize_mode']}, seed {cfg['seed']}",
        f"- package versions: {', '.join(f'{k} {v}' for k, v in manifest.get('versions', {}).items())}", "",
        "Build config:", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", "",
    ]
    return "\n".join(lines)


def licence_lines(licences: dict[str, Any] | None) -> list[str]:
    """One row per condition: the annotator, the weights it loaded (and their sha256
    fingerprint), their licence and source, and whether all of it allows commercial use."""
    if not licences:
        return ["Not recorded: this build predates controlforge's licence record; rebuild to add it.", ""]
    rows = ["| condition | annotator (code licence) | weights | weights licence | source | commercial use |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, rec in licences.items():
        weights = (f"`{rec['weights']}` (sha256 {rec['digest']})" if rec.get("digest") else
                   f"`{rec['weights']}`" if rec.get("weights") else "none")
        rows.append(f"| `{name}` | {rec['annotator']} ({rec['code_licence']}) | {weights} | "
                    f"{rec.get('weights_licence') or 'n/a'} | {rec.get('weights_source') or 'n/a'} | "
                    f"{'yes' if rec.get('commercial') else 'no'} |")
    return [*rows, "", "The full sha256 of every weight file is in the build's manifest.json (`licences`).", ""]


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def publish(build: str, to: str | None = None, repo_id: str | None = None, condition: str | None = None,
            val_fraction: float = 0.01, seed: int = 0, license: str = "other", private: bool = False,
            use_ray: bool = False, log=print) -> Path:
    if not to and not repo_id:
        raise PublishError("say where: --to DIR (a local folder) and/or --repo-id NAME (the Hub)")
    out = Output(build)
    target = Path(to) if to else Path(tempfile.mkdtemp(prefix="controlforge-publish-"))
    if target.exists() and any(target.glob("*/*.parquet")):
        raise PublishError(f"{target} already holds an export; choose an empty folder")
    target.mkdir(parents=True, exist_ok=True)
    log(f"controlforge publish: {out.url} -> {target}")
    info = export(out, target.resolve(), val_fraction, seed, use_ray, log)
    main = condition or info["conditions"][0]
    if main not in info["conditions"]:
        raise PublishError(f"--condition {main!r} is not in this build (it has {info['conditions']})")
    has_preview = out.exists("preview.png")
    if has_preview:
        (target / "preview.png").write_bytes(out.read_bytes("preview.png"))
    total = sum(info["counts"].values())
    if "samples" in info["manifest"] and info["manifest"]["samples"] != total:
        raise PublishError(f"{out.url}: the shards hold {total} samples but manifest.json says "
                           f"{info['manifest']['samples']}: run `controlforge verify {build}`")
    card = dataset_card(info, main, license, rejected_by_reason(out), has_preview,
                        caption_sources(out, info["manifest"]))
    (target / "README.md").write_text(card)
    log(f"wrote {sum(info['counts'].values())} samples x {len(info['conditions'])} configs and README.md")
    if repo_id:
        push(target, repo_id, private, log)
    return target


def push(folder: Path, repo_id: str, private: bool = False, log=print, files_per_commit: int = 100,
         retries: int = 4) -> None:
    """Upload in commits of `files_per_commit`, each retried with backoff; files already
    in the repo are skipped, so rerunning after an interruption resumes."""
    import time

    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    present = set(api.list_repo_files(repo_id, repo_type="dataset"))
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    todo = [f for f in files if f not in present or f == "README.md"]
    batches = [todo[i:i + files_per_commit] for i in range(0, len(todo), files_per_commit)]
    for number, batch in enumerate(batches, 1):
        for attempt in range(retries):
            try:
                api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="dataset", allow_patterns=batch,
                                  commit_message=f"controlforge publish ({number}/{len(batches)})")
                break
            except Exception as exc:  # network and server errors: retry, then give up with the cause
                if attempt == retries - 1:
                    raise PublishError(f"upload of commit {number}/{len(batches)} failed {retries} times "
                                       f"({type(exc).__name__}: {exc}); rerun the same command to resume") from None
                log(f"  upload {number}/{len(batches)} failed ({type(exc).__name__}), retrying")
                time.sleep(2 ** attempt)
        log(f"  uploaded {number}/{len(batches)} ({len(batch)} files)")
    log(f"pushed to https://huggingface.co/datasets/{repo_id} ({len(files) - len(todo)} files were already there)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="a build's output folder or fsspec URL")
    parser.add_argument("--to", help="write the dataset (parquet + README.md) into this folder")
    parser.add_argument("--repo-id", help="push to this Hub dataset repo (e.g. user/my-controlnet-set)")
    parser.add_argument("--condition", help="the default config's condition (default: the build's first)")
    parser.add_argument("--val-fraction", type=float, default=0.01, help="seeded share for the validation split (default 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--license", default="other", help="license field of the card (default other)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--ray", action="store_true", help="export shards in parallel as Ray tasks (RAY_ADDRESS or local)")


def run_from_args(args: argparse.Namespace) -> int:
    try:
        publish(args.output, args.to, args.repo_id, args.condition, args.val_fraction, args.seed, args.license,
                args.private, args.ray)
    except PublishError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

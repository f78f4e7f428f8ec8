"""Training batches streamed from build shards with webdataset, never downloaded whole.

Shards are resampled (an endless, seeded stream per node and worker), shuffled in a
buffer, image and condition are cropped and flipped together, and batches are
formed inside the workers. Deterministic given the seed, so a resumed run can
fast-forward the stream to where it stopped (`skip_batches`) and continue exactly.
"""

from __future__ import annotations

import glob
import os
import random
from typing import Any, Iterator

import numpy as np
import torch


#: object stores webdataset cannot open itself; opened through fsspec (s3fs, gcsfs, adlfs)
FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "abfs", "az")


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192):
    import fsspec

    return fsspec.open(url, mode).open()


def register_object_stores() -> None:
    """Let webdataset stream s3:// (and other object-store) shards through fsspec, so
    endpoints and credentials come from the usual places (FSSPEC_S3_ENDPOINT_URL, AWS_*)."""
    import importlib

    gopen_module = importlib.import_module("webdataset.gopen")  # the module (the package re-exports a function by that name)

    for scheme in FSSPEC_SCHEMES:
        gopen_module.gopen_schemes.setdefault(scheme, _gopen_fsspec)  # webdataset's own handlers (gs: gsutil) stay


def _remote_build_folder(spec: str) -> list[str] | None:
    """The shards of a build folder on an object store (s3://bucket/build), or None."""
    import fsspec

    if "://" not in spec or spec.endswith(".tar") or "{" in spec or spec.startswith(("http://", "https://", "pipe:")):
        return None
    fs, path = fsspec.core.url_to_fs(spec)
    fs.invalidate_cache()
    found = sorted(fs.glob(f"{path.rstrip('/')}/shards/*.tar")) or sorted(fs.glob(f"{path.rstrip('/')}/*.tar"))
    if not found:
        raise FileNotFoundError(f"{spec}: no .tar shards in it or in its shards/ folder")
    return [fs.unstrip_protocol(p) for p in found]


def expand_shards(specs: list[str]) -> list[str]:
    """Build folders (local or on an object store), .tar files, brace patterns and URLs ->
    a list of shard URLs."""
    import braceexpand

    register_object_stores()
    urls: list[str] = []
    for spec in specs:
        remote = _remote_build_folder(spec)
        if remote is not None:
            urls += remote
        elif os.path.isdir(spec):
            found = sorted(glob.glob(os.path.join(spec, "shards", "*.tar"))) or sorted(glob.glob(os.path.join(spec, "*.tar")))
            if not found:
                raise FileNotFoundError(f"{spec}: no .tar shards in it or in its shards/ folder")
            urls += found
        else:
            expanded = list(braceexpand.braceexpand(spec))
            local = [u for u in expanded if "://" not in u and not u.startswith("pipe:")]
            missing = [u for u in local if not os.path.exists(u)]
            if missing:
                raise FileNotFoundError(f"shard(s) not found: {', '.join(missing[:3])}"
                                        + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
            urls += expanded
    if not urls:
        raise FileNotFoundError("no shards given: pass --shards (a build folder, .tar files or URLs)")
    return urls


def _rgb(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def joint_crop_flip(image: np.ndarray, condition: np.ndarray, resolution: int, rng: random.Random,
                    flip: bool, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Resize both so that they cover `size` (width, height; default a `resolution` square),
    then one random crop and flip for both."""
    import cv2

    out_w, out_h = size or (resolution, resolution)
    height, width = image.shape[:2]
    scale = max(out_w / width, out_h / height)
    if abs(scale - 1) > 1e-9:
        new = (max(out_w, round(width * scale)), max(out_h, round(height * scale)))
        image = cv2.resize(image, new, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        condition = cv2.resize(condition, new, interpolation=cv2.INTER_NEAREST)
        height, width = image.shape[:2]
    top, left = rng.randint(0, height - out_h), rng.randint(0, width - out_w)
    image = image[top:top + out_h, left:left + out_w]
    condition = condition[top:top + out_h, left:left + out_w]
    if flip and rng.random() < 0.5:
        image, condition = image[:, ::-1], condition[:, ::-1]
    return image, condition


def to_tensors(image: np.ndarray, condition: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Image in [-1, 1] (the VAE's range), condition in [0, 1] (ControlNet's), both CHW float."""
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1.0
    cond = torch.from_numpy(np.ascontiguousarray(condition)).permute(2, 0, 1).float() / 255.0
    return pixels, cond


class Augment:
    """One seeded RNG per (rank, worker): the stream is a function of the seed alone."""

    def __init__(self, condition: str, resolution: int, flip: bool, seed: int, latents: bool = False,
                 buckets: bool = False, bad=None, text: bool | str = False):
        self.condition, self.resolution, self.flip, self.seed = condition, resolution, flip, seed
        self.bad = bad  # a BadSamples: samples missing a member (a shard cut short) are counted; None: an error
        self.latents = latents  # pass KEY.latents.npy through (the image is then not cropped or flipped)
        self.buckets = buckets  # crop to the sample's recorded aspect bucket instead of a square
        self.text = text  # pass KEY.text.npy (and KEY.text_pooled.npy: "pooled") through: cached prompt embeddings

    def __call__(self, source: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        rank = int(os.environ.get("RANK", 0))
        rng = random.Random(self.seed * 1_000_003 + rank * 1009 + (worker.id if worker else 0))
        member = f"{self.condition}.png"
        for sample in source:
            missing = [m for m in ("jpg", member, *(("latents.npy",) if self.latents else ()),
                                   *(("text.npy",) if self.text else ()),
                                   *(("text_pooled.npy",) if self.text == "pooled" else ())) if m not in sample]
            if missing and self.bad is not None:
                self.bad.add(sample.get("__url__"), f"sample {sample.get('__key__')} has no {', '.join(missing)}")
                continue
            if member not in sample:
                raise KeyError(f"{sample.get('__url__')}: sample {sample.get('__key__')} has no {member}; "
                               f"set --condition to one the shards have")
            image = _rgb(sample["jpg"])
            size = recorded_size(sample.get("json"), image.shape[:2])
            bucket = _bucket(sample.get("json"), self.resolution) if self.buckets else None
            image, cond = joint_crop_flip(image, _rgb(sample[member]), self.resolution, rng, self.flip, bucket)
            if bucket is not None:
                size["bucket"] = bucket
            pixels, cond = to_tensors(image, cond)
            item = {"pixel_values": pixels, "conditioning_pixel_values": cond, "text": sample.get("txt", ""), **size}
            if self.latents:
                if "latents.npy" not in sample:
                    raise KeyError(f"{sample.get('__url__')}: sample {sample.get('__key__')} has no latents.npy, "
                                   f"though the run uses cached latents (pass --no-cached-latents)")
                item["latents"] = torch.from_numpy(np.asarray(sample["latents.npy"], dtype=np.float32))
            if self.text:
                if "text.npy" not in sample:
                    raise KeyError(f"{sample.get('__url__')}: sample {sample.get('__key__')} has no text.npy, "
                                   f"though the run uses cached prompt embeddings (pass --no-cached-text-embeddings)")
                item["text_embeds"] = torch.from_numpy(np.asarray(sample["text.npy"], dtype=np.float32))
                if "text_pooled.npy" in sample:
                    item["text_pooled"] = torch.from_numpy(np.asarray(sample["text_pooled.npy"], dtype=np.float32))
            yield item


def _bucket(meta: Any, resolution: int) -> tuple[int, int]:
    """The sample's recorded (width, height) bucket (keep_ratio builds), else a square."""
    import json

    if isinstance(meta, (bytes, str)):
        meta = json.loads(meta)
    bucket = meta.get("bucket") if isinstance(meta, dict) else None
    return (int(bucket[0]), int(bucket[1])) if bucket else (resolution, resolution)


class BucketBatches:
    """Batches of one size: a streaming buffer per bucket; a buffer that reaches the batch
    size is emitted. When a finite stream ends, the part-filled buffers are emitted as
    smaller batches (`partial`) or dropped, and either way it is said."""

    def __init__(self, batch_size: int, partial: bool = True, log=print):
        self.batch_size, self.partial, self.log = batch_size, partial, log

    def __call__(self, source: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        buffers: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for sample in source:
            key = sample.get("bucket") or tuple(sample["pixel_values"].shape[-1:-3:-1])
            buffer = buffers.setdefault(key, [])
            buffer.append(sample)
            if len(buffer) == self.batch_size:
                yield collate(buffer)
                buffers[key] = []
        left = {k: len(v) for k, v in buffers.items() if v}
        if left:
            what = ", ".join(f"{n} of {w}x{h}" for (w, h), n in sorted(left.items()))
            self.log(f"end of the data: {'smaller last batches' if self.partial else 'dropped'}: {what}")
            if self.partial:
                for buffer in buffers.values():
                    if buffer:
                        yield collate(buffer)


def recorded_size(meta: Any, shape: tuple[int, int]) -> dict[str, Any]:
    """The source's original size and crop offset (SDXL conditions on them) from the
    sample's json when the build recorded them, else the stored image's size and no crop;
    `size_recorded` says which (the trainer says once when they were missing)."""
    import json

    if isinstance(meta, (bytes, str)):
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = None
    meta = meta if isinstance(meta, dict) else {}
    height, width = meta.get("orig_height"), meta.get("orig_width")
    recorded = bool(height and width) and "crop_top" in meta and "crop_left" in meta
    return {"original_size": torch.tensor([int(height or shape[0]), int(width or shape[1])]),
            "crop_top_left": torch.tensor([int(meta.get("crop_top", 0)), int(meta.get("crop_left", 0))]),
            "size_recorded": recorded}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {"pixel_values": torch.stack([s["pixel_values"] for s in samples]),
             "conditioning_pixel_values": torch.stack([s["conditioning_pixel_values"] for s in samples]),
             "text": [s["text"] for s in samples]}
    for name in ("latents", "text_embeds", "text_pooled"):
        if all(name in s for s in samples):
            batch[name] = torch.stack([s[name] for s in samples])
    if all("original_size" in s for s in samples):
        batch["sizes"] = {"original_size": torch.stack([s["original_size"] for s in samples]),
                          "crop_top_left": torch.stack([s["crop_top_left"] for s in samples]),
                          "recorded": all(s["size_recorded"] for s in samples)}
    return batch


class SkipBatches:
    """Drop the batches this worker already served before a resume (DataLoader
    hands out worker batches round-robin, so worker i served batches i, i+W, ...)."""

    def __init__(self, total: int):
        self.total = total

    def __call__(self, source):
        worker = torch.utils.data.get_worker_info()
        workers, index = (worker.num_workers, worker.id) if worker else (1, 0)
        skip = len(range(index, self.total, workers))
        for i, batch in enumerate(source):
            if i >= skip:
                yield batch


def make_dataset(urls: list[str], condition: str, resolution: int, batch_size: int, seed: int,
                 shuffle_buffer: int = 1000, flip: bool = True, skip_batches: int = 0, latents: bool = False,
                 buckets: bool = False, max_bad_fraction: float = 0.01, text: bool | str = False):
    """Unreadable members and samples are skipped and counted per shard (train/bad_samples.py);
    each batch carries the counts since the one before under bad_samples.KEY."""
    import webdataset as wds

    from .bad_samples import BadSamples

    bad = BadSamples(urls, max_bad_fraction)
    return wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        bad.visits,
        wds.tarfile_to_samples(handler=bad.handler),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed),
        bad.decode,
        Augment(condition, resolution, flip and not latents, seed, latents, buckets, bad=bad, text=text),
        BucketBatches(batch_size) if buckets else wds.batched(batch_size, collation_fn=collate, partial=False),
        bad.attach,
        SkipBatches(skip_batches),
    )


def missing_members(url: str, condition: str) -> str | None:
    """What the shard's first sample lacks of what training reads (a wrong --condition shows
    here, before any step), or None; a shard that cannot be read is left to the bad-sample count."""
    import webdataset as wds

    try:
        for sample in wds.WebDataset([url], shardshuffle=False, empty_check=False, nodesplitter=None):
            missing = [m for m in ("jpg", f"{condition}.png") if m not in sample]
            have = sorted(k.removesuffix(".png") for k in sample if k.endswith(".png"))
            return f"{' or '.join(missing)} (it has: {', '.join(have) or 'no conditions'})" if missing else None
    except Exception:
        return None
    return None


def cached_latents_match(urls: list[str], pretrained: str, scaling_factor: float, shape: list[int],
                         resolution: int, shift_factor: float = 0.0) -> tuple[bool, str]:
    """Whether the shards' cached latents fit this run (judged on the first sample), and why.

    `shift_factor`: the VAE's (0 when it has none). Shards built before the shift was applied
    record none: they fit a VAE without a shift (the same numbers), not one with a shift."""
    import json

    import webdataset as wds

    for sample in wds.WebDataset(urls[:1], shardshuffle=False, empty_check=False, nodesplitter=None):
        meta = json.loads(sample["json"]) if "json" in sample else {}
        info = meta.get("latents")
        if not info or "latents.npy" not in sample:
            return False, "the shards hold no cached latents"
        same_model = info.get("model") == pretrained or (
            os.path.exists(str(info.get("model"))) and os.path.exists(pretrained)
            and os.path.samefile(str(info.get("model")), pretrained))
        if not same_model:
            return False, f"the shards' latents were made with {info.get('model')!r}, not this base {pretrained!r}"
        if abs(float(info.get("scaling_factor", 0)) - scaling_factor) > 1e-6 or list(info.get("shape", [])) != shape:
            return False, (f"the shards' latents ({info.get('shape')}, scaling {info.get('scaling_factor')}) do not fit "
                           f"this run ({shape} at resolution {resolution}, scaling {scaling_factor})")
        recorded = info.get("shift_factor")
        if recorded is None and shift_factor:
            return False, (f"the shards' latents were made without the VAE's shift ({shift_factor}): rebuild them "
                           f"with --latents")
        if recorded is not None and abs(float(recorded) - shift_factor) > 1e-6:
            return False, f"the shards' latents have shift {recorded}, this base's VAE {shift_factor}"
        if (meta.get("width"), meta.get("height")) != (resolution, resolution):
            return False, (f"the stored images are {meta.get('width')}x{meta.get('height')}, the run trains at "
                           f"{resolution}: crops would not match the latents")
        return True, f"cached latents from the shards ({info.get('model')})"
    return False, "the first shard is empty"


#: cores each training process keeps for its step before any go to loader workers (default_loader_workers)
STEP_CORES = 2
#: the most loader workers a process gets by default
MAX_DEFAULT_WORKERS = 8
#: where launchers put the number of training processes on this machine (the names accelerate reads:
#: torchrun and `accelerate launch` set the first, train/ray_train.py too; the others are MPI's)
LOCAL_WORLD_SIZE_VARS = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")


def default_loader_workers(cores: int, local_processes: int = 1) -> int:
    """The loader workers each training process starts when --dataloader-num-workers is
    not set: 0 when its share of the cores is 2 or fewer, else min(8, share - 2).

    The share: this machine's `cores` (those this process may run on) split evenly among
    its `local_processes` training processes (one per GPU under accelerate, torchrun or
    Ray Train). The step keeps 2 of its share: one core for the training loop itself
    (Python, kernel launches, the optimizer; on a CPU-only run the step's own math, which
    wants every core it can get) and one for what runs beside it (the loader's prefetch
    thread, logging and checkpoint writes, the OS). A worker only helps on a core the step
    does not need: on 2 cores, 0 workers ran 8.48 steps/s against 6.84 with 2 (tiny SDXL,
    bench/sdxl_vs_diffusers.py), the workers preempting the step, and each worker process
    costs about 0.5 GiB more RSS (torch imported again). Where cores are spare, workers
    decode, crop and batch while the step runs, which is what keeps a GPU fed. At most 8:
    a worker decodes a 512 px sample (JPEG, condition PNG, crop, flip) in a few ms, so 8
    supply many times what one GPU's step consumes; more would only cost memory.
    """
    share = max(0, cores) // max(1, local_processes)
    return 0 if share <= STEP_CORES else min(MAX_DEFAULT_WORKERS, share - STEP_CORES)


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS reports one
    (taskset, a cgroup cpuset, a Slurm or container allocation), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_processes() -> int:
    """Training processes on this machine, as the launcher says (LOCAL_WORLD_SIZE and the
    like); 1 when started plainly."""
    for name in LOCAL_WORLD_SIZE_VARS:
        try:
            value = int(os.environ.get(name, ""))
        except ValueError:
            continue
        if value >= 1:
            return value
    return 1


def loader_workers(requested: int | None, cores: int | None = None,
                   processes: int | None = None) -> tuple[int, str]:
    """(the loader workers a run starts, the line that says so): `requested`
    (--dataloader-num-workers) when given, else default_loader_workers of this process's
    cores and the machine's training processes (found here unless passed)."""
    if requested is not None:
        return requested, f"loader workers: {requested} (--dataloader-num-workers)"
    cores = available_cores() if cores is None else cores
    processes = local_processes() if processes is None else processes
    workers = default_loader_workers(cores, processes)
    share = f"{cores} core{'s' if cores != 1 else ''} for {processes} process{'es' if processes != 1 else ''}"
    why = ("workers would take CPU from the step" if workers == 0
           else f"{STEP_CORES} cores per process kept for the step" + (
               f", at most {MAX_DEFAULT_WORKERS} workers" if workers == MAX_DEFAULT_WORKERS else ""))
    return workers, f"loader workers: {workers} ({share}: {why}; set --dataloader-num-workers)"


def make_loader(dataset, num_workers: int, seed: int = 0) -> torch.utils.data.DataLoader:
    """Its own generator: creating the iterator must not draw from the global RNG that a
    resumed run has just restored (that one draw would shift every noise sample after)."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       persistent_workers=num_workers > 0,
                                       generator=torch.Generator().manual_seed(seed))


def hf_rows_as_samples(rows, condition: str, image_column: str = "image",
                       conditioning_column: str = "conditioning_image", text_column: str = "text"):
    """Rows of a `datasets` dataset with diffusers' columns, as the shard samples Augment reads."""
    for row in rows:
        yield {"jpg": row[image_column], f"{condition}.png": row[conditioning_column], "txt": row[text_column] or "",
               "__key__": row.get("key")}


def make_hf_dataset(source: str, condition: str, resolution: int, batch_size: int, seed: int,
                    shuffle_buffer: int = 1000, flip: bool = True, skip_batches: int = 0, config_name: str | None = None):
    """A `datasets` dataset (save_to_disk folder, a published folder/repo with one config
    per condition, or any hub id with diffusers' columns), streamed and repeated."""
    import datasets
    import webdataset as wds
    from datasets.distributed import split_dataset_by_node

    if os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_info.json")):
        dataset = datasets.load_from_disk(source).to_iterable_dataset()
    else:
        dataset = datasets.load_dataset(source, config_name or condition if _has_config(source, condition) else config_name,
                                        split="train", streaming=True)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dataset = split_dataset_by_node(dataset, rank=int(os.environ.get("RANK", 0)), world_size=world)
    dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)

    def forever():
        epoch = 0
        while True:
            dataset.set_epoch(epoch)
            yield from hf_rows_as_samples(dataset, condition)
            epoch += 1

    return wds.DataPipeline(forever, Augment(condition, resolution, flip, seed),
                            wds.batched(batch_size, collation_fn=collate, partial=False), SkipBatches(skip_batches))


def _has_config(source: str, condition: str) -> bool:
    try:
        import datasets

        return condition in datasets.get_dataset_config_names(source)
    except Exception:
        return False


register_object_stores()  # at import, so DataLoader worker processes (which import this module) have it too

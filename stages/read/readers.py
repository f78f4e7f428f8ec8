"""Readers: turn `--input` specs into a sorted listing of input references, and
fetch one reference's bytes (plus captions/fields it already carries).

Listing happens once on the driver (cheap: names and offsets only); fetching
happens inside shard tasks, so a slow or broken source only costs its own sample.
"""

from __future__ import annotations

import functools
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import fsspec

from .http_fetch import HttpOptions, http_get

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LIST_EXTS = (".tsv", ".txt", ".csv", ".parquet", ".jsonl")
TAR_EXTS = (".tar",)


class InputError(ValueError):
    """An `--input` spec that cannot be listed; names the spec and the problem."""


@dataclass(frozen=True)
class InputRef:
    """One input image: where it is, and what it already comes with."""

    source: str
    kind: str  # "file" | "tar" | "hf"
    caption: str | None = None
    location: dict[str, Any] = field(default_factory=dict)
    #: where a caption that comes with this input is found (said in reports and dataset cards)
    caption_origin: str = ""


@dataclass
class Fetched:
    data: bytes
    caption: str | None
    meta: dict[str, Any]  # metadata json the input already had (our shards, img2dataset)
    conditions: dict[str, bytes]  # condition members an existing shard already had


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def _has_image_ext(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTS)


def _fs(spec: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(spec)
    return fs, path


def _unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """fsspec strips protocols; put them back so workers can reopen the path."""
    from fsspec.implementations.local import LocalFileSystem

    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _sidecar_caption(fs: fsspec.AbstractFileSystem, image_path: str, existing: set[str]) -> str | None:
    stem, _ = os.path.splitext(image_path)
    txt = stem + ".txt"
    if txt not in existing:
        return None
    with fs.open(txt, "rb") as handle:
        return handle.read().decode("utf-8", errors="replace").strip() or None


def _list_files(fs: fsspec.AbstractFileSystem, paths: Iterable[str]) -> list[InputRef]:
    paths = sorted(paths)
    existing = set(paths)
    refs = []
    for path in paths:
        if _has_image_ext(path):
            refs.append(InputRef(_unstrip(fs, path), "file", _sidecar_caption(fs, path, existing),
                                caption_origin="sidecar .txt files"))
    return refs


def list_folder(spec: str) -> list[InputRef]:
    fs, root = _fs(spec)
    return _list_files(fs, fs.find(root))


def list_glob(spec: str) -> list[InputRef]:
    fs, pattern = _fs(spec)
    matched = fs.glob(pattern)
    # sidecar captions live beside the images even when the glob names only images
    siblings = {os.path.splitext(p)[0] + ".txt" for p in matched if _has_image_ext(p)}
    present = [p for p in siblings if fs.exists(p)]
    return _list_files(fs, list(matched) + present)


def iter_url_table(spec: str, url_column: str = "url", caption_column: str = "caption",
                   batch_rows: int = 65_536) -> Iterator[InputRef]:
    """The rows of a .txt (one path/URL per line, optional TAB caption), .csv/.tsv, .jsonl or
    .parquet list, in file order, read in batches: memory stays flat however long the list."""
    fs, path = _fs(spec)
    lower = path.lower()
    if lower.endswith(".txt"):
        origin = "the URL list's TAB-separated captions"
        with fs.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                line = line.rstrip("\n")
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                url, _, caption = line.partition("\t")
                yield InputRef(url.strip(), "file", caption.strip() or None, caption_origin=origin)
        return
    import pyarrow.csv
    import pyarrow.json
    import pyarrow.parquet

    origin = f"the URL list's {caption_column!r} column"
    with fs.open(path, "rb") as handle:
        if lower.endswith(".parquet"):
            source = pyarrow.parquet.ParquetFile(handle)
            names = source.schema_arrow.names
            batches = source.iter_batches(batch_size=batch_rows, columns=[c for c in (url_column, caption_column)
                                                                         if c in names])
        elif lower.endswith((".csv", ".tsv")):
            parse = pyarrow.csv.ParseOptions(delimiter="\t" if lower.endswith(".tsv") else ",")
            reader = pyarrow.csv.open_csv(handle, parse_options=parse,
                                          read_options=pyarrow.csv.ReadOptions(block_size=1 << 22))
            names, batches = reader.schema.names, reader
        else:
            table = pyarrow.json.read_json(handle)  # pyarrow has no streaming JSON reader: read in one go
            names, batches = table.column_names, table.to_batches(max_chunksize=batch_rows)
        if url_column not in names:
            raise InputError(f"{spec}: no column {url_column!r} (columns: {names}); set url_column")
        for batch in batches:
            urls = batch.column(url_column).to_pylist()
            captions = (batch.column(caption_column).to_pylist() if caption_column in batch.schema.names
                        else [None] * len(urls))
            for u, c in zip(urls, captions):
                if u:
                    yield InputRef(str(u), "file", (str(c).strip() or None) if c is not None else None,
                                   caption_origin=origin)


def list_url_table(spec: str, url_column: str = "url", caption_column: str = "caption") -> list[InputRef]:
    return list(iter_url_table(spec, url_column, caption_column))


def list_tar(spec: str) -> list[InputRef]:
    """Index a WebDataset tar (img2dataset's or ours) by member offsets, without extracting it."""
    fs, path = _fs(spec)
    url = _unstrip(fs, path)
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, base = os.path.split(member.name)
            key, dot, ext = base.partition(".")
            if not dot:
                continue
            key = os.path.join(directory, key) if directory else key
            if key not in samples:
                samples[key] = {}
                order.append(key)
            samples[key][ext.lower()] = (member.offset_data, member.size)
    refs = []
    for key in order:
        members = samples[key]
        image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
        if image_ext is None:
            continue
        refs.append(InputRef(f"{url}#{key}", "tar", None, {"tar": url, "image": image_ext, "members": members},
                            caption_origin="the input shards' .txt members (img2dataset or WebDataset)"))
    return refs


def _is_hf_dataset_dir(spec: str) -> bool:
    return os.path.isdir(spec) and any(
        os.path.exists(os.path.join(spec, name)) for name in ("dataset_info.json", "dataset_dict.json", "state.json")
    )


def list_hf(spec: str) -> list[InputRef]:
    dataset = _load_hf(spec)
    width = len(str(len(dataset)))
    return [InputRef(f"{spec}[{i:0{width}d}]", "hf", None, {"dataset": spec, "index": i},
                     caption_origin="the Hugging Face dataset's caption column") for i in range(len(dataset))]


@functools.lru_cache(maxsize=8)
def _load_hf(spec: str):
    import datasets

    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        try:
            return datasets.load_dataset(name, split=split or "train")
        except Exception as exc:
            raise InputError(f"{spec}: cannot load Hugging Face dataset {name!r} ({exc}); offline, save it with "
                             "save_to_disk and pass the folder instead") from None
    loaded = datasets.load_from_disk(spec)
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]
    return loaded


@functools.lru_cache(maxsize=8)
def _undecoded_hf(spec: str, image_column: str):
    """The dataset with its image column left as bytes: we hash and decode them ourselves."""
    import datasets

    dataset = _load_hf(spec)
    if image_column not in dataset.column_names:
        raise InputError(f"{spec}: no image column {image_column!r} (columns: {dataset.column_names}); set image_column")
    return dataset.cast_column(image_column, datasets.Image(decode=False))


def list_inputs(specs: list[str], url_column: str = "url", caption_column: str = "caption") -> list[InputRef]:
    """Every input of a build, sorted by source so shard assignment is deterministic."""
    if not specs:
        raise InputError("no --input given")
    refs: list[InputRef] = []
    for spec in specs:
        lower = spec.lower()
        if spec.startswith("hf:") or _is_hf_dataset_dir(spec):
            found = list_hf(spec)
        elif lower.endswith(TAR_EXTS) or ("{" in spec and ".tar" in lower):
            import braceexpand

            found = [r for one in braceexpand.braceexpand(spec) for r in list_tar(one)]
        elif _is_glob(spec):
            found = list_glob(spec)
        elif lower.endswith(LIST_EXTS):
            fs, path = _fs(spec)
            if not fs.exists(path):
                raise InputError(f"{spec}: list file does not exist")
            found = list_url_table(spec, url_column, caption_column)
        else:
            fs, path = _fs(spec)
            if not fs.exists(path):
                raise InputError(f"{spec}: no such file or folder")
            found = list_folder(spec) if fs.isdir(path) else _list_files(fs, [path])
        if not found:
            raise InputError(f"{spec}: no images found (looked for {', '.join(IMAGE_EXTS)})")
        refs.extend(found)
    refs.sort(key=lambda r: r.source)
    return refs


# ---------------------------------------------------------------- fetching ---


def _read_range(url: str, offset: int, size: int) -> bytes:
    with fsspec.open(url, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def fetch(ref: InputRef, image_column: str = "image", caption_column: str = "caption",
          http: HttpOptions | None = None) -> Fetched:
    """The bytes of one input and whatever it already carries; raises on any failure
    (FetchError with a reason for HTTP(S) URLs)."""
    if ref.kind == "file" and ref.source.lower().startswith(("http://", "https://")):
        return Fetched(http_get(ref.source, http or HttpOptions()), ref.caption, {}, {})
    if ref.kind == "file":
        with fsspec.open(ref.source, "rb") as handle:
            return Fetched(handle.read(), ref.caption, {}, {})
    if ref.kind == "tar":
        members = ref.location["members"]
        tar = ref.location["tar"]
        data = _read_range(tar, *members[ref.location["image"]])
        caption = _read_range(tar, *members["txt"]).decode("utf-8", errors="replace").strip() if "txt" in members else None
        meta = json.loads(_read_range(tar, *members["json"])) if "json" in members else {}
        conditions = {
            ext[: -len(".png")]: _read_range(tar, *span)
            for ext, span in members.items()
            if ext.endswith(".png") and ext.count(".") == 1
        }
        return Fetched(data, caption or None, meta if isinstance(meta, dict) else {}, conditions)
    if ref.kind == "hf":
        row = _undecoded_hf(ref.location["dataset"], image_column)[ref.location["index"]]
        value = row[image_column]
        data = value.get("bytes") if isinstance(value, dict) else None
        if data is None and isinstance(value, dict) and value.get("path"):
            with fsspec.open(value["path"], "rb") as handle:
                data = handle.read()
        if data is None:
            raise InputError(f"{ref.source}: image column holds no bytes")
        caption = row.get(caption_column)
        return Fetched(data, str(caption).strip() or None if caption is not None else None, {}, {})
    raise InputError(f"{ref.source}: unknown input kind {ref.kind!r}")


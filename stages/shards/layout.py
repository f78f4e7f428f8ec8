"""Names and orders of the shard layout (docs/SCHEMA.md): where shards, stats and the
index files live in an output folder, and the fixed order of a sample's members. Every
writer and reader of a build takes them from here."""

from __future__ import annotations

SCHEMA_VERSION = 1
SHARDS_DIR = "shards"
STATS_SUFFIX = "_stats.json"
MANIFEST = "manifest.json"
#: member order inside a sample; later conditions sort after these by name
CONDITION_ORDER = ("canny", "mlsd", "hed", "scribble", "openpose", "seg", "depth", "normal", "lineart")
#: stats lists with one entry per kept sample, in key order
PER_SAMPLE_FIELDS = ("keys", "sources", "caption_sources", "caption_words", "phashes")


def condition_sort_key(name: str) -> tuple[int, str]:
    return (CONDITION_ORDER.index(name) if name in CONDITION_ORDER else len(CONDITION_ORDER), name)


def tar_path(shard: str) -> str:
    return f"{SHARDS_DIR}/{shard}.tar"


def stats_path(shard: str) -> str:
    return f"{SHARDS_DIR}/{shard}{STATS_SUFFIX}"


#: `build --text-embeddings MODEL`: each sample's prompt embeddings (docs/SCHEMA.md)
TEXT_MEMBER = "text.npy"  # float16 [L, D]: the hidden states the denoiser attends to
TEXT_POOLED_MEMBER = "text_pooled.npy"  # float16 [P]: the pooled embedding, families that have one (SDXL)
#: the empty prompt's embeddings, once per build beside manifest.json (prompt dropout needs no encoder)
EMPTY_TEXT = "text_embeddings_empty.npy"
EMPTY_TEXT_POOLED = "text_embeddings_empty_pooled.npy"

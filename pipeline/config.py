"""The typed config of `controlforge build`.

One object holds everything a build needs; it is loaded from YAML, overridden by
CLI flags, written into `manifest.json`, and is what each Ray task receives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.config import ConfigError, load_config as load_typed_config
from stages.read.http_fetch import USER_AGENT

__all__ = ["BuildConfig", "ConfigError", "load_config"]

DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-base"

#: Fields whose change alters shard content; a resumed build must agree on them.
CONTENT_FIELDS = (
    "conditions", "resolution", "resize_mode", "min_size", "max_aspect", "max_pixels",
    "samples_per_shard", "caption_model", "caption_prompt", "caption_max_tokens",
    "caption_beams", "keep_captions", "seed", "jpeg_quality", "annotator_params",
    "min_condition_coverage", "near_duplicates", "min_depth_std", "latents", "min_clip_score", "clip_model",
    "annotator_dtype", "text_embeddings",
)


class BuildConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: list[str] = Field(default_factory=list, description="repeatable: a folder (recursive), a glob "
                             "('photos/**/*.jpg'), a .txt/.csv/.jsonl/.parquet list of paths or URLs, WebDataset .tar "
                             "shards ('data/{00000..00009}.tar'), a saved HF dataset folder, or hf:NAME[:split]")
    output: str = Field("out/build", description="output folder (local or fsspec URL such as s3://...); a rerun "
                        "resumes it")
    conditions: list[str] = Field(default_factory=lambda: ["canny"], description="condition names, space- or "
                                  "comma-separated")
    resolution: int = Field(512, ge=8, description="output side in pixels")
    resize_mode: Literal["center_crop", "keep_ratio", "pad"] = Field("center_crop", description="keep_ratio: short "
                                                                     "side = resolution, records aspect buckets")
    min_size: int = Field(256, ge=1, description="reject images whose shorter side is smaller (too_small)")
    max_aspect: float = Field(3.0, ge=1.0, description="reject images whose long/short side ratio is larger (bad_aspect)")
    max_pixels: int = Field(100_000_000, ge=1, description="decompression-bomb limit in pixels, checked before decoding")
    jpeg_quality: int = Field(95, ge=1, le=100, description="quality of the stored KEY.jpg when an image is re-encoded")
    samples_per_shard: int = Field(1000, ge=1, description="inputs per shard (the unit of work and of resume)")

    fetch_timeout: float = Field(10.0, gt=0, description="seconds to connect to a URL, and without a byte while reading")
    fetch_retries: int = Field(2, ge=0, description="further tries after a timeout, a reset or HTTP 408/429/5xx")
    user_agent: str = Field(USER_AGENT, description="the User-Agent header of URL fetches")
    respect_opt_out: bool = Field(True, description="skip images served with X-Robots-Tag noai / noimageai or "
                                  "tdm-reservation: 1 (opted_out); --no-respect-opt-out fetches them")
    allow_address: list[str] = Field(default_factory=list, description="repeatable: an address range (CIDR) that URL "
                                     "fetches may reach although it is link-local or cloud metadata (169.254.0.0/16, "
                                     "fd00:ec2::254, metadata.google.internal: blocked_address otherwise)")

    caption_model: str = Field(DEFAULT_CAPTION_MODEL, description="BLIP hub id or local folder; 'none' skips captioning")
    keep_captions: bool = Field(False, description="use captions that come with the input; BLIP only for the rest")
    caption_column: str = Field("caption", description="caption column of list/parquet/HF-dataset inputs")
    url_column: str = Field("url", description="URL or path column of csv/parquet/jsonl lists")
    image_column: str = Field("image", description="image column of HF-dataset inputs")
    caption_prompt: str = Field("", description="text BLIP continues, e.g. 'a photography of'")
    caption_max_tokens: int = Field(40, ge=1, description="longest caption in tokens")
    caption_beams: int = Field(3, ge=1, description="beam search width")
    caption_batch_size: int = Field(16, ge=1, description="images per BLIP forward pass")
    caption_num_gpus: float | None = Field(None, ge=0, description="GPUs per captioner actor (also --num-gpus); "
                                           "None = 1 if the cluster has GPUs")
    caption_concurrency: int | None = Field(None, ge=1, description="captioner actors; None = one per GPU, else 1")

    annotator_params: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per condition, its "
                                                        "annotator's settings, e.g. {\"hed\": {\"weights\": \"/w\"}} "
                                                        "(JSON on the command line)")
    latents: str | None = Field(None, description="a base model (diffusers folder or hub id) whose VAE encodes each "
                                "stored image into KEY.latents.npy, so training skips the VAE encoder")
    text_embeddings: str | None = Field(None, description="a base model (diffusers folder or hub id; SD 1.x/2.x, "
                                        "SDXL, SD3 or Flux) whose text encoders encode each caption into KEY.text.npy (and "
                                        "KEY.text_pooled.npy), so training never loads them")
    min_condition_coverage: float | None = Field(None, ge=0, le=1, description="reject a sample when a condition "
                                                 "map has less than this share of non-zero pixels (empty_condition)")
    min_clip_score: float | None = Field(None, ge=0, le=100, description="reject samples whose CLIP image-caption "
                                         "score (100 x cosine) is below this (low_clip_score)")
    clip_model: str = Field("openai/clip-vit-base-patch32", description="CLIPModel (folder or hub id) for min_clip_score")
    min_depth_std: float | None = Field(None, ge=0, description="reject a depth map whose standard deviation "
                                        "(0-255 scale) is below this: a flat map teaches nothing (flat_depth)")
    near_duplicates: int | None = Field(None, ge=0, le=31, description="reject images within this pHash Hamming "
                                        "distance of an earlier kept one, across the build (near_duplicate)")
    annotator_num_gpus: float | None = Field(None, ge=0, description="GPU share of the network-annotator actor; "
                                             "None = 0.5 if the cluster has GPUs")
    licence_policy: Literal["any", "commercial"] = Field(
        "any", description="commercial: before any work, refuse every condition whose annotator weights are not "
        "licensed for commercial use (or whose licence is unknown), naming them and a permissive alternative")
    annotator_dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="precision of the network annotators, BLIP and the CLIP gate: auto = fp16 on CUDA for "
        "the networks that tolerate it, fp32 on a CPU; recorded in each sample's json")
    seed: int = Field(0, description="seed of the per-image random annotator parameters")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per shard task (read, decode, annotate, write)")
    executor: Literal["auto", "ray", "local"] = Field(
        "auto", description="auto: Ray when a cluster is given (ray_address, RAY_ADDRESS, ray job submit) or running, "
        "or the build has more than auto_local_max_inputs inputs; else one local process (no Ray start-up)")
    auto_local_max_inputs: int = Field(64, ge=0, description="auto runs builds up to this many inputs locally")
    ray_address: str | None = Field(None, description="Ray cluster to join: host:port, ray://..., or auto for the "
                                    "one `ray start` made here; None = RAY_ADDRESS, else a new embedded cluster")
    preview: int = Field(16, ge=0, description="samples drawn into OUT/preview.png at the end; 0 = none")
    report_samples: int = Field(1000, ge=0, description="samples in the grid of OUT/report.html; 0 = no report")
    lock_stale_seconds: float = Field(3600.0, gt=0, description="take over a lock from another host after this "
                                      "long without a heartbeat (same host: when its pid is dead)")
    overwrite: bool = Field(False, description="replace a previous build in the output folder")

    @field_validator("conditions", mode="before")
    @classmethod
    def _split_conditions(cls, value: Any) -> Any:
        """'canny,depth', ['canny,depth'] and ['canny', 'depth'] are the same list."""
        if isinstance(value, str):
            value = [value]
        return [part.strip() for item in value for part in str(item).split(",") if part.strip()]

    @field_validator("input", mode="before")
    @classmethod
    def _listify_input(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("allow_address", mode="before")
    @classmethod
    def _parse_ranges(cls, value: Any) -> Any:
        """Each entry a valid range, so a typo stops the build before it starts."""
        from stages.read.address_guard import parse_networks

        value = [value] if isinstance(value, str) else value
        return [str(network) for network in parse_networks(value)]

    @property
    def captioning(self) -> bool:
        return self.caption_model.lower() != "none"

    @classmethod
    def content_default(cls, name: str) -> Any:
        """What a manifest written before `name` existed meant by leaving it out."""
        return cls.model_fields[name].get_default(call_default_factory=True)

    def content_signature(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in CONTENT_FIELDS}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                model: type[BaseModel] = BuildConfig) -> Any:
    """A build config (or `model`) from YAML and CLI overrides; see common.config."""
    return load_typed_config(path, overrides, model=model)

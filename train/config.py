"""The typed configs of `controlforge train`, `sample` and `eval` (YAML + CLI flags, as for
build): each setting and its default written once, here."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: where `controlforge sample` puts the control and how it weights it (train/sampler.py)
GuidanceMode = Literal["paper", "lllyasviel", "diffusers", "both", "uncond"]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shards: list[str] = Field(default_factory=list, description="build folders, .tar paths, brace patterns, http(s)/fsspec URLs")
    dataset: str | None = Field(None, description="instead of shards: a datasets folder or hub id with image/conditioning_image/text")
    condition: str = "canny"
    pretrained_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    controlnet: str | None = Field(None, description="resume from an existing ControlNet (hub id or folder) instead of copying the UNet")
    output_dir: str = "out/controlnet"

    resolution: int = Field(512, ge=8)
    train_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_train_steps: int = Field(1000, ge=1)
    learning_rate: float = Field(1e-5, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False
    prompt_dropout: float = Field(0.5, ge=0, le=1, description="share of prompts replaced by '' per sample per step (paper: 0.5)")
    unlock_decoder: bool = Field(False, description="also train the UNet decoder (the reference code's sd_locked=False)")
    decoder_learning_rate: float = Field(1e-6, gt=0)
    only_mid_control: bool = False
    timestep_sampling: Literal["uniform", "cubic"] = Field("uniform", description="'uniform' (the paper) or 'cubic' (T2I-Adapter: more high-noise steps, where the condition decides the layout)")
    consistency_weight: float = Field(0.0, ge=0, description="ControlNet++'s consistency loss, this times (0 = "
                                      "off): the one-step clean-image prediction at a low-noise timestep, decoded and "
                                      "re-annotated differentiably, against the condition (canny; SD 1.x/2.x, SDXL)")
    consistency_max_timestep: int = Field(200, ge=1, le=1000, description="the consistency loss's timesteps are "
                                          "drawn below this (ControlNet++: 200 of 1000)")
    controlnet_init: Literal["zero", "random"] = Field("zero", description="'zero': the paper's zero convolutions; 'random': default init of those layers (ablation)")

    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    allow_tf32: bool = True
    compile: bool = False

    shuffle_buffer: int = Field(1000, ge=1)
    dataloader_num_workers: int | None = Field(None, ge=0, description="loader worker processes per training "
                                               "process; None = from the cores: 0 when a process has 2 or fewer, "
                                               "else min(8, its cores - 2) (train/data.py default_loader_workers)")
    flip: bool | None = Field(None, description="random horizontal flips; None = on, except for openpose (and off "
                              "when cached latents are used)")
    buckets: bool = Field(False, description="batch by the aspect buckets a keep_ratio build recorded (every batch "
                          "one size) instead of square crops")
    cached_latents: bool = Field(True, description="use the shards' KEY.latents.npy when they were made with this "
                                 "base's VAE at this resolution (the images skip the VAE encoder; SD3 and Flux still "
                                 "encode the condition); false = always encode")
    cached_text_embeddings: bool = Field(True, description="use the shards' prompt embeddings (KEY.text.npy, build "
                                         "--text-embeddings) when they were made with this base: its text encoders "
                                         "are then never loaded; false = always encode the prompts")

    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="stop when more than this share of the samples "
                                    "read so far was unreadable (each one is counted per shard and skipped; judged from the 100th sample on)")

    checkpointing_steps: int = Field(500, ge=1)
    checkpoints_total_limit: int | None = Field(3, ge=1)
    resume: str | None = Field(None, description="'latest' or a checkpoint folder")

    validation_steps: int = Field(500, ge=1)
    num_validation_images: int = Field(4, ge=0)
    validation_shards: list[str] = Field(default_factory=list, description="held-out shards for validation and the controllability curve (default: the first training shard)")
    validation_guidance_scale: float = Field(7.5, ge=1.0)
    validation_inference_steps: int = Field(20, ge=1)
    validation_mode: GuidanceMode | None = Field(None, description="guidance weighting of the validation samples, "
                                                 "as `controlforge sample --mode` (None: the same default, paper; "
                                                 "both for SD3 and Flux, which validate through their diffusers "
                                                 "pipeline). Validating as you will sample keeps the "
                                                 "controllability curve, the stop signal and OUT/best on that curve")
    validation_annotator: dict[str, Any] = Field(default_factory=dict, description="parameters of the condition's annotator (e.g. weights) for the controllability metric")
    stop_after_convergence: int | None = Field(None, ge=0, description="end the run this many steps after sudden convergence")
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    seed: int = 0
    use_ema: bool = Field(False, description="keep an EMA of the ControlNet weights and save that")
    ema_decay: float = Field(0.9999, gt=0, lt=1)

    ray: bool = Field(False, description="run the same loop under Ray Train's TorchTrainer (RAY_ADDRESS / ray job submit)")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one process each)")
    gpus_per_worker: float = Field(1.0, ge=0, description="GPUs per Ray Train worker; 0 = CPU workers with gloo")

    @field_validator("shards", "validation_shards", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @property
    def flip_enabled(self) -> bool:
        return self.flip if self.flip is not None else self.condition != "openpose"


#: where a sample's prompt comes from (train/sample_cli.py resolve_prompt)
PromptMode = Literal["none", "default", "auto", "user"]


class SampleConfig(BaseModel):
    """`controlforge sample`: one or more ControlNets, each with its condition image (or
    conditions drawn from a shard), or none (the base model alone)."""

    model_config = ConfigDict(extra="forbid")

    pretrained_model: str = Field("stable-diffusion-v1-5/stable-diffusion-v1-5", description="base model: hub id or folder")
    controlnet: list[str] = Field(default_factory=list, description="repeatable: a trained ControlNet (folder or hub "
                                  "id); none = the base model alone, with the same prompts and seeds (give --shard or "
                                  "--image for the conditions eval compares with)")
    image: list[str] = Field(default_factory=list, description="repeatable: the condition image for each --controlnet")
    scale: list[float] = Field(default_factory=list, description="repeatable: each ControlNet's scale (none given: 1 each)")
    shard: str | None = Field(None, description="draw conditions (and source captions) from this shard instead of --image")
    condition: list[str] = Field(default_factory=lambda: ["canny"], description="repeatable: the condition member "
                                 "to read from --shard, one per --controlnet (in the same order) to compose several")
    num: int = Field(4, description="samples to draw from --shard")
    prompt_mode: PromptMode = Field("auto", description="none, default, auto (BLIP), user")
    prompt: str | None = Field(None, description="the prompt for --prompt-mode user")
    negative_prompt: str = ""
    caption_model: str = Field("Salesforce/blip-image-captioning-base", description="BLIP for --prompt-mode auto")
    mode: GuidanceMode | None = Field(None, description="guidance weighting (None: paper; both for bases sampled "
                                      "through their diffusers pipeline, SD3 and Flux): paper = control in the "
                                      "conditional branch weighted by resolution; lllyasviel, diffusers = other "
                                      "weightings; both = both branches; uncond = unconditional branch only; "
                                      "--guidance-scale 1 = no CFG")
    steps: int = Field(20, description="DDIM steps")
    guidance_scale: float = Field(9.0, description="CFG scale")
    resolution: int = 512
    seed: int = Field(0, description="sample i uses seed + i, whatever the batch size")
    batch_size: int = Field(16, ge=1, description="samples drawn together; a sample is the same in any batch size, up "
                            "to float rounding")
    output: str = "out/samples"

    @field_validator("controlnet", "image", "scale", "condition", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, int, float)) else value


class EvalConfig(BaseModel):
    """`controlforge eval`: re-annotate a sample folder's images and compare."""

    model_config = ConfigDict(extra="forbid")

    folder: str = Field(description="a `controlforge sample` output folder")
    condition: str = Field(description="which annotator re-annotates the images")
    weights: str | None = Field(None, description="the annotator's weights (hub id or folder)")
    clip_model: str | None = Field(None, description="a CLIP model (folder or hub id) for the CLIP score of image vs "
                                   "prompt")
    shuffled: bool = Field(False, description="also score each image against another sample's condition (the "
                           "chance level)")

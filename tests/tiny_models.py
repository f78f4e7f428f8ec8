"""Tiny models built from configs and saved locally, loaded back through the same
`from_pretrained` paths a real model takes. Random weights: they check plumbing,
shapes, determinism and formats, never caption quality."""

from __future__ import annotations

from pathlib import Path

WORDS = ["a", "photo", "of", "cat", "dog", "the", "on", "with", "red", "blue", "sky", "man", "table", "rocket"]


def make_tiny_blip(folder: str | Path) -> Path:
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32, intermediate_size=37,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=vocab.index("[DEC]"), sep_token_id=vocab.index("[SEP]"),
                         eos_token_id=vocab.index("[SEP]")),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def make_tiny_upernet(folder: str | Path) -> Path:
    """UperNet (ConvNeXt backbone) with 150 ADE20K classes, random weights, plus its image processor."""
    import torch
    from transformers import ConvNextConfig, SegformerImageProcessor, UperNetConfig, UperNetForSemanticSegmentation

    folder = Path(folder)
    backbone = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    config = UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=24,
                           auxiliary_channels=8, num_labels=150, use_auxiliary_head=False)
    torch.manual_seed(0)
    UperNetForSemanticSegmentation(config).eval().save_pretrained(folder)
    SegformerImageProcessor(size={"height": 64, "width": 64}, do_reduce_labels=False).save_pretrained(folder)
    return folder


def make_tiny_dpt(folder: str | Path) -> Path:
    """A DPT depth model from a tiny config, random weights, plus its image processor."""
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    folder = Path(folder)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                       image_size=64, patch_size=16, neck_hidden_sizes=[8, 16, 24, 32], fusion_hidden_size=16,
                       backbone_out_indices=[0, 1, 2, 3], head_in_index=-1)
    torch.manual_seed(0)
    DPTForDepthEstimation(config).eval().save_pretrained(folder)
    DPTImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=False).save_pretrained(folder)
    return folder


def make_tiny_clip_tokenizer(folder: str | Path):
    """A byte-level CLIP tokenizer with no merges: every character is one token.
    Same class and files as the real one (vocab.json + merges.txt), 500-odd tokens."""
    import json

    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    tokenizer.save_pretrained(folder)
    return tokenizer


#: sizes of the SD-shaped bases: tiny (the tests) and medium (bench/validation_memory.py)
SD_SIZES = {
    "tiny": dict(unet=dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, cross_attention_dim=32,
                           attention_head_dim=4, norm_num_groups=8,
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
                 vae=dict(block_out_channels=(8, 8, 16, 16), norm_num_groups=8, sample_size=64),
                 text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2)),
    "medium": dict(unet=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, sample_size=16,
                             cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32,
                             down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                             up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
                   vae=dict(block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=32,
                            sample_size=128),
                   text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4)),
}


def make_tiny_t5_tokenizer(folder: str | Path | None = None):
    """A word-level T5 tokenizer (the real class; the real one needs a download) knowing a
    few words of the tests' captions and the digits; saved to `folder` when given."""
    from transformers import T5TokenizerFast

    words = ("a the an of on in with and picture photo synthetic number shapes square circle red green blue light "
             "dark background cat dog").split()
    tokenizer = T5TokenizerFast(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
                                + [(f"\u2581{w}", -5.0) for w in words] + [(str(d), -6.0) for d in range(10)],
                                extra_ids=0)
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


def make_tiny_sd(folder: str | Path, size: str = "tiny") -> Path:
    """A Stable-Diffusion-shaped pipeline folder (unet, vae with SD's 8x factor, CLIP text
    encoder, tokenizer, DDPM scheduler) from small configs (SD_SIZES[size]), random weights."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder, sizes = Path(folder), SD_SIZES[size]
    torch.manual_seed(0)
    tokenizer = make_tiny_clip_tokenizer(folder / "tokenizer")
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **sizes["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, **sizes["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), num_attention_heads=4,
                                                max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.eos_token_id, **sizes["text"]))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(folder)
    return folder


def make_tiny_clip(folder: str | Path) -> Path:
    """A CLIPModel (text + vision) from tiny configs with its processor, random weights."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    tokenizer = make_tiny_clip_tokenizer(folder / "tok")
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                         num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=16,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.eos_token_id),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                           num_hidden_layers=2, image_size=32, patch_size=8),
                        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def make_tiny_sdxl(folder: str | Path) -> Path:
    """An SDXL-shaped pipeline folder from tiny configs, random weights: UNet with the
    text_time added embedding (addition_time_embed_dim 8; its projection input is 6 time
    ids x 8 + the second encoder's 16-dim pooled projection), two CLIP text encoders (the
    second with a projection), both with the real CLIP tokenizer, SD's 8x VAE."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(0)
    tokenizer = make_tiny_clip_tokenizer(folder / "tokenizer")
    tokenizer_2 = make_tiny_clip_tokenizer(folder / "tokenizer_2")

    def text_config(**extra):
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37, num_attention_heads=4,
                              num_hidden_layers=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, **extra)

    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
                                transformer_layers_per_block=1)
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=8, sample_size=64)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text_config()),
                              text_encoder_2=CLIPTextModelWithProjection(text_config(projection_dim=16)),
                              tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler
                              ).save_pretrained(folder)
    return folder


def make_tiny_sd3(folder: str | Path) -> Path:
    """An SD3-shaped pipeline folder from tiny configs, random weights: an MMDiT transformer
    (2 layers, patch 2), two CLIP text encoders with projections (hidden 16 each, so their
    concatenation fills joint_attention_dim 32; pooled 2 x 16 = 32), no T5 (diffusers then
    uses zeros in its place, as for SD3 without T5), a VAE with SD3's shift factor."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(0)
    tokenizers = [make_tiny_clip_tokenizer(folder / name) for name in ("tokenizer", "tokenizer_2")]

    def encoder():
        tok = tokenizers[0]
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=16, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id, projection_dim=16))

    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                        pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=8, sample_size=64, shift_factor=0.0609, scaling_factor=1.5305,
                        use_quant_conv=False, use_post_quant_conv=False)
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                             text_encoder=encoder(), tokenizer=tokenizers[0], text_encoder_2=encoder(),
                             tokenizer_2=tokenizers[1], text_encoder_3=None, tokenizer_3=None).save_pretrained(folder)
    return folder


def make_tiny_flux(folder: str | Path) -> Path:
    """A Flux-shaped pipeline folder from tiny configs, random weights: a transformer with one
    double- and one single-stream block and the guidance embedding, a CLIP text encoder
    (pooled 16) and a T5 encoder (d_model 32) with a word-level T5 tokenizer made here (the
    real one needs a download), a VAE with Flux's shift and scale (4 latent channels, packed
    2x2 into 16)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder = Path(folder)
    torch.manual_seed(0)
    tokenizer = make_tiny_clip_tokenizer(folder / "tokenizer")
    tokenizer_2 = make_tiny_t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=37,
                                        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=16,
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.eos_token_id))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                                 decoder_start_token_id=0))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=8, sample_size=64, shift_factor=0.1159, scaling_factor=0.3611,
                        use_quant_conv=False, use_post_quant_conv=False)
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=clip, tokenizer=tokenizer,
                 text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=transformer).save_pretrained(folder)
    return folder

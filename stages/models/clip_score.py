"""CLIP image-caption agreement per sample: 100 x cosine similarity of the CLIP image and
text embeddings, floored at 0 (the CLIPScore convention). Used by the build's
`--min-clip-score` gate (captions that do not describe their picture) and by eval."""

from __future__ import annotations

from typing import Sequence

from .precision import resolve, torch_dtype


class ClipScorer:
    def __init__(self, model: str, device: str | None = None, batch_size: int = 32, precision: str = "fp32"):
        resolve(precision, "cpu")  # an unknown name fails here, not in a worker
        self.model_name, self.device, self.batch_size, self.precision = model, device, batch_size, precision
        self.model = self.processor = None

    def setup(self) -> None:
        if self.model is not None:
            return
        import torch
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.processor = CLIPProcessor.from_pretrained(self.model_name)
            model = CLIPModel.from_pretrained(self.model_name)
        except (OSError, ValueError) as exc:
            raise ValueError(f"CLIP model {self.model_name!r} cannot be loaded ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); without hub access copy a CLIPModel folder here and pass it") from None
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.resolved_precision = resolve(self.precision, self.device)
        self.model = model.to(self.device, torch_dtype(self.resolved_precision)).eval()

    def __call__(self, images: Sequence, captions: list[str]) -> list[float]:
        import torch

        self.setup()
        scores: list[float] = []
        for start in range(0, len(captions), self.batch_size):
            inputs = self.processor(text=captions[start:start + self.batch_size],
                                    images=list(images[start:start + self.batch_size]), return_tensors="pt",
                                    padding=True, truncation=True).to(self.device)
            with torch.no_grad():
                image_emb = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.model.dtype))
                text_emb = self.model.get_text_features(input_ids=inputs["input_ids"],
                                                        attention_mask=inputs.get("attention_mask"))
            image_emb = getattr(image_emb, "pooler_output", image_emb)
            text_emb = getattr(text_emb, "pooler_output", text_emb)
            cos = torch.nn.functional.cosine_similarity(image_emb, text_emb)
            scores.extend((100 * cos.clamp(min=0)).float().cpu().tolist())
        return scores

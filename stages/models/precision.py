"""One precision setting for every network of a build (`--annotator-dtype`): fp32, fp16,
bf16, or auto = fp16 on CUDA for the networks that tolerate it and fp32 on a CPU (where
half precision is slow and, for some ops, missing)."""

from __future__ import annotations

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve(precision: str, device: str, half_safe: bool = True) -> str:
    """The precision a network on `device` runs in: never "auto"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "fp16" if str(device).startswith("cuda") and half_safe else "fp32"


def torch_dtype(resolved: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[resolved]

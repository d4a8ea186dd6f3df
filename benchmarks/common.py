"""Shared benchmark helpers."""

from __future__ import annotations

from pathlib import Path


def build_vit_b32(path: Path, seed: int = 0) -> Path:
    """Save the full CLIP ViT-B/32 architecture with random weights (the real model's
    FLOPs; its weights cannot be downloaded here) as a local checkpoint directory."""
    import torch
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(projection_dim=512)).save_pretrained(path, safe_serialization=True)
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(path)
    return Path(path)


def build_vit_b32_model(seed: int = 0):
    """The full CLIP ViT-B/32 architecture with random weights, in memory (eval mode, fp32)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    return CLIPModel(CLIPConfig(projection_dim=512)).eval()


def ready_batch(embedder, count: int, size: int, device: str = "cpu"):
    """`count` inputs in the form the runtime's model itself takes, for a forward-only floor:
    OpenVINO's compiled tower takes uint8 (N, size, size, 3) crops (it normalises them in its
    graph), torch takes normalised (N, 3, size, size) pixel values."""
    import numpy as np
    import torch

    if embedder.backend == "openvino":
        return np.random.default_rng(count).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    return torch.randn(count, 3, size, size, device=device, dtype=embedder.dtype)

"""Small random-weight open_clip ViT CLIPs for tests of the speed
settings (no training, no files)."""

from __future__ import annotations

CAPTIONS = [
    "a red circle",
    "two small blue squares on a grey background, one of them large",
    "x",
    "a green star",
]


def random_vit_clip(
    width: int, image_size: int, patch_size: int, embed_dim: int, captions: int = 3
):
    """(seeded open_clip CLIP with 2+2 blocks, token ids of the first `captions` CAPTIONS)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=embed_dim,
        vision_cfg={
            "image_size": image_size,
            "layers": 2,
            "width": width,
            "patch_size": patch_size,
            "head_width": 32,
        },
        text_cfg={
            "context_length": 77,
            "vocab_size": 49408,
            "width": width,
            "heads": width // 32,
            "layers": 2,
        },
    ).eval()
    return model, open_clip.get_tokenizer("ViT-B-32")(CAPTIONS[:captions])


def as_clip(model, device: str = "cpu", **settings):
    """`models.clip.Clip` around `model` (moved and cast in place, as load_clip's are) under
    `settings`, with open_clip's eval preprocess at the model's image size and ViT-B-32's
    tokenizer."""
    import open_clip

    from models.clip import Clip

    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return Clip(
        "random-vit",
        model,
        open_clip.image_transform(size, is_train=False),
        open_clip.get_tokenizer("ViT-B-32"),
        device=device,
        **settings,
    )

"""Test-wide settings: offline hub, one thread, and small timm models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fimaq  # noqa: E402,F401  (torchvision shim before timm)

torch.set_num_threads(1)

TINY_VIT = (
    "deit_tiny_patch16_224",
    dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=10),
)
TINY_SWIN = (
    "swin_tiny_patch4_window7_224",
    dict(img_size=56, depths=(2, 2), num_heads=(2, 4), embed_dim=32, num_classes=10),
)
_SMALL = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=10)
#: one small configuration per family beyond ViT/DeiT and Swin (and per variant of a family's layers)
TINY_FAMILIES = {
    "eva02": ("eva02_tiny_patch14_224", dict(_SMALL, ref_feat_shape=(4, 4))),
    "eva02_swiglu": ("eva02_tiny_patch14_224", dict(_SMALL, ref_feat_shape=(4, 4), scale_mlp=True)),
    "eva_unfused": ("eva02_tiny_patch14_224", dict(_SMALL, ref_feat_shape=(4, 4), qkv_fused=False)),
    "beit": ("beit_base_patch16_224", dict(_SMALL)),
    "relpos": ("vit_relpos_small_patch16_224", dict(_SMALL)),
    "srelpos": ("vit_srelpos_small_patch16_224", dict(_SMALL)),
    "cait": ("cait_xxs24_224", dict(_SMALL, depth_token_only=2)),
    "swinv2": (
        "swinv2_tiny_window8_256",
        dict(img_size=64, window_size=4, depths=(2, 2), num_heads=(2, 4), embed_dim=32, num_classes=10),
    ),
}


def tiny_model(which: str = "vit", seed: int = 0):
    """A small randomly initialised timm model: ``vit``, ``swin`` or a key of :data:`TINY_FAMILIES`."""
    import timm

    arch, kwargs = {"vit": TINY_VIT, "swin": TINY_SWIN, **TINY_FAMILIES}[which]
    torch.manual_seed(seed)
    return timm.create_model(arch, **kwargs).eval()


@pytest.fixture
def tiny_vit():
    return tiny_model("vit")


@pytest.fixture
def tiny_swin():
    return tiny_model("swin")

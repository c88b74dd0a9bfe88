"""Encoder plugins: every registered encoder (including third-party ones installed later) is checked for shapes,
gradients, the absence of a classifier and kwargs validation; then architecture-specific checks (small-image
stem, ViT patch/position embedding, attention against a naive reference)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from sslrun.core.config import ExperimentConfig, PluginRef
from sslrun.core.errors import ConfigError
from sslrun.core.plugins.registry import get_registry
from sslrun.core.plugins.resolve import build_encoder

ENCODERS = get_registry("encoder").names()
BUILTIN = {"small_cnn", "resnet18", "resnet34", "resnet50", "vit_tiny", "vit_small"}


def _cfg(name: str, **kwargs) -> ExperimentConfig:
    return ExperimentConfig(encoder=PluginRef(name, dict(kwargs)))


def test_builtin_encoders_are_registered():
    assert set(ENCODERS) >= BUILTIN


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("size", [28, 32])
def test_forward_backward_shapes(name: str, size: int):
    torch.manual_seed(0)
    enc = build_encoder(_cfg(name), image_size=size)
    assert isinstance(enc.output_dim, int) and enc.output_dim > 0
    x = torch.randn(2, 3, size, size)
    y = enc(x)
    assert y.shape == (2, enc.output_dim)
    assert torch.isfinite(y).all()
    y.pow(2).mean().backward()
    no_grad = [n for n, p in enc.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not no_grad, f"parameters that got no gradient: {no_grad[:5]}"


@pytest.mark.parametrize("name", ENCODERS)
def test_no_classifier(name: str):
    enc = build_encoder(_cfg(name), image_size=32)
    names = [n for n, _ in enc.named_parameters()]
    assert not [n for n in names if n.split(".")[0] in ("fc", "head", "classifier", "heads")]
    # no layer produces ImageNet logits
    assert not [m for m in enc.modules() if isinstance(m, nn.Linear) and m.out_features == 1000]


@pytest.mark.parametrize("name", ENCODERS)
def test_unknown_kwarg_is_a_config_error(name: str):
    with pytest.raises(ConfigError, match="unknown encoder.kwargs key 'not_a_kwarg'"):
        build_encoder(_cfg(name, not_a_kwarg=1), image_size=32)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("small_cnn", {"width": "wide"}, "expected int"),
        ("small_cnn", {"width": 0}, "width must be >= 1"),
        ("vit_tiny", {"global_pool": "max"}, "global_pool"),
        ("vit_tiny", {"patch_size": 64}, "patch_size"),
        ("resnet18", {"zero_init_residual": 1}, "expected bool"),
    ],
)
def test_bad_kwarg_values(name: str, kwargs: dict, match: str):
    with pytest.raises(ConfigError, match=match):
        build_encoder(_cfg(name, **kwargs), image_size=32)


def test_small_cnn_width():
    enc = build_encoder(_cfg("small_cnn", width=8), image_size=28)
    assert enc.output_dim == 64
    assert enc(torch.randn(3, 3, 28, 28)).shape == (3, 64)


# ---- ResNet stem --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "dim"), [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_resnet_dims(name: str, dim: int):
    assert build_encoder(_cfg(name), image_size=32).output_dim == dim


@pytest.mark.parametrize(
    ("image_size", "small_stem", "expected"),
    [(32, None, True), (64, None, True), (96, None, False), (None, None, False), (32, False, False), (224, True, True)],
)
def test_resnet_stem_choice(image_size, small_stem, expected):
    kwargs = {} if small_stem is None else {"small_stem": small_stem}
    enc = build_encoder(_cfg("resnet18", **kwargs), image_size=image_size)
    assert enc.small_stem is expected
    if expected:
        assert enc.conv1.kernel_size == (3, 3) and enc.conv1.stride == (1, 1)
        assert isinstance(enc.maxpool, nn.Identity)
    else:
        assert enc.conv1.kernel_size == (7, 7) and enc.conv1.stride == (2, 2)
        assert isinstance(enc.maxpool, nn.MaxPool2d)


def test_resnet_small_stem_keeps_resolution():
    """The CIFAR stem keeps a 4x4 map before pooling at 32 px; the ImageNet stem collapses it to 1x1."""
    seen = {}
    for stem in (True, False):
        enc = build_encoder(_cfg("resnet18", small_stem=stem), image_size=32)
        hook = enc.layer4.register_forward_hook(lambda m, i, o, s=stem: seen.__setitem__(s, o.shape[-2:]))
        enc(torch.randn(2, 3, 32, 32))
        hook.remove()
    assert seen[True] == (4, 4) and seen[False] == (1, 1)


def test_resnet_state_dict_is_torchvision_compatible():
    enc = build_encoder(_cfg("resnet18", small_stem=False), image_size=224)
    tv = torchvision.models.resnet18(weights=None)
    result = tv.load_state_dict(enc.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    tv.fc = nn.Identity()
    tv.eval(), enc.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(tv(x), enc(x))


# ---- ViT ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("image_size", "patch"), [(28, 4), (32, 4), (64, 4), (96, 8), (224, 16), (None, 16)])
def test_vit_default_patch_size(image_size, patch):
    enc = get_registry("encoder").get("vit_tiny")(image_size=image_size, depth=1)
    assert enc.patch_size == patch
    assert enc.pos_embed.shape == (1, 1 + ((image_size or 224) // patch) ** 2, 192)


def test_vit_exposes_what_mae_needs():
    enc = get_registry("encoder").get("vit_small")(image_size=32, depth=2)
    assert enc.output_dim == enc.embed_dim == 384
    assert isinstance(enc.patch_embed, nn.Conv2d) and isinstance(enc.blocks, nn.ModuleList)
    assert isinstance(enc.norm, nn.LayerNorm) and enc.cls_token.shape == (1, 1, 384)
    x = torch.randn(2, 3, 32, 32)
    tokens = enc.patch_tokens(x)
    assert tokens.shape == (2, 64, 384)
    # running the blocks on all tokens by hand is exactly forward()
    torch.testing.assert_close(enc.forward_tokens(tokens)[:, 0], enc(x))


def test_vit_other_input_size_interpolates_pos_embed():
    enc = get_registry("encoder").get("vit_tiny")(image_size=32, depth=2).eval()
    assert enc.pos_embed_for(8, 8) is enc.pos_embed
    assert enc.pos_embed_for(12, 10).shape == (1, 1 + 120, 192)
    assert enc(torch.randn(2, 3, 48, 40)).shape == (2, 192)
    # a 2x2 average of the embedding grid is what a half-size grid should roughly look like: bicubic keeps
    # the embedding smooth rather than scrambling positions
    half = enc.pos_embed_for(4, 4)[0, 1:].reshape(4, 4, -1)
    grid = enc.pos_embed[0, 1:].reshape(8, 8, -1)
    pooled = grid.reshape(4, 2, 4, 2, -1).mean(dim=(1, 3))
    assert torch.nn.functional.cosine_similarity(half.flatten(0, 1), pooled.flatten(0, 1)).min() > 0.8


def test_vit_mean_pool_and_batch_independence():
    enc = get_registry("encoder").get("vit_tiny")(image_size=32, depth=2, global_pool="mean").eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(enc(x)[1:2], enc(x[1:2]), rtol=1e-4, atol=1e-5)
    tokens = enc.forward_tokens(enc.patch_tokens(x))
    torch.testing.assert_close(enc(x), tokens[:, 1:].mean(1))


def test_sincos_pos_embed_matches_formula():
    from sslrun.plugins.encoders.vit import sincos_pos_embed_2d

    dim, gh, gw = 8, 3, 2
    emb = sincos_pos_embed_2d(dim, gh, gw)
    q = dim // 4
    for i in range(gh):
        for j in range(gw):
            row = emb[i * gw + j]
            for k in range(q):
                w = 1.0 / 10000 ** (k / q)
                expected = [math.sin(i * w), math.cos(i * w), math.sin(j * w), math.cos(j * w)]
                got = [row[k], row[q + k], row[2 * q + k], row[3 * q + k]]
                assert [float(g) for g in got] == pytest.approx(expected, abs=1e-6)


def test_attention_matches_naive_reference():
    from sslrun.plugins.encoders.vit import Attention

    torch.manual_seed(0)
    attn = Attention(dim=12, num_heads=3)
    x = torch.randn(2, 5, 12)
    qkv = attn.qkv(x)  # (N, L, 3D)
    q, k, v = qkv[..., :12], qkv[..., 12:24], qkv[..., 24:]
    out = torch.zeros(2, 5, 12)
    for n in range(2):
        for h in range(3):
            sl = slice(4 * h, 4 * h + 4)
            scores = q[n, :, sl] @ k[n, :, sl].T / math.sqrt(4)
            out[n, :, sl] = torch.softmax(scores, dim=-1) @ v[n, :, sl]
    torch.testing.assert_close(attn(x), attn.proj(out), rtol=1e-5, atol=1e-5)

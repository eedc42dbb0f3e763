"""Our ViT on its own: the paper's definitions, both attention paths, position-embedding resampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from app.model import Attention, PatchEmbed, VisionTransformer, ViTConfig, resample_pos_embed

TOL = {"atol": 1e-5, "rtol": 1e-4}


def test_attention_fast_and_weights_paths_agree_on_one_instance(perturb):
    attn = perturb(Attention(dim=48, num_heads=3, qkv_bias=True)).eval()
    x = torch.randn(2, 17, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast, none = attn(x, need_weights=False)
        slow, weights = attn(x, need_weights=True)
        fast_again, _ = attn(x)  # flip back: the instance holds no path state
    assert none is None
    assert weights.shape == (2, 3, 17, 17)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 17))
    torch.testing.assert_close(fast, slow, **TOL)
    torch.testing.assert_close(fast, fast_again, atol=0, rtol=0)


def test_attention_is_softmax_qkt_over_sqrt_d_times_v(perturb):
    """Written out per head from the paper, independently of both paths."""
    dim, heads = 32, 4
    attn = perturb(Attention(dim, heads, qkv_bias=False)).eval()
    x = torch.randn(1, 5, dim, generator=torch.Generator().manual_seed(1))
    d = dim // heads
    with torch.no_grad():
        q, k, v = attn.qkv(x)[0].split(dim, dim=-1)  # (T, D) each, heads side by side
        outs, maps = [], []
        for h in range(heads):
            qh, kh, vh = (t[:, h * d : (h + 1) * d] for t in (q, k, v))
            a = torch.softmax(qh @ kh.T / d**0.5, dim=-1)
            maps.append(a)
            outs.append(a @ vh)
        expected = attn.proj(torch.cat(outs, dim=-1))[None]
        out, weights = attn(x, need_weights=True)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(weights[0], torch.stack(maps), **TOL)


def test_patch_embedding_is_a_linear_projection_of_flattened_patches(perturb):
    embed = perturb(PatchEmbed(patch_size=8, in_chans=3, embed_dim=16))
    x = torch.randn(2, 3, 16, 24, generator=torch.Generator().manual_seed(2))
    patches = x.unfold(2, 8, 8).unfold(3, 8, 8)  # (B, C, gh, gw, P, P)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 2 * 3, 3 * 8 * 8)  # row-major grid, (C, P, P) flattened
    expected = patches @ embed.proj.weight.reshape(16, -1).T + embed.proj.bias
    torch.testing.assert_close(embed(x), expected, **TOL)


def test_forward_features_same_tokens_with_and_without_attentions(make_tiny_vit, tiny_config):
    model = make_tiny_vit()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model.forward_features(x)
        with_maps = model.forward_features(x, attentions=True)
    assert plain.attentions is None
    assert len(with_maps.attentions) == tiny_config.depth
    assert with_maps.attentions[0].shape == (3, tiny_config.num_heads, 17, 17)
    torch.testing.assert_close(plain.tokens, with_maps.tokens, **TOL)
    logits = model.forward_head(plain.tokens)
    torch.testing.assert_close(logits, model(x), **TOL)


def test_forward_features_computes_only_the_layers_asked(make_tiny_vit, tiny_config):
    model = make_tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        every = model.forward_features(x, attentions=True)
        last = model.forward_features(x, attentions=True, layers={tiny_config.depth - 1})
    assert [a is None for a in last.attentions] == [True] * (tiny_config.depth - 1) + [False]
    torch.testing.assert_close(last.attentions[-1], every.attentions[-1], **TOL)
    torch.testing.assert_close(last.tokens, every.tokens, **TOL)


def test_headless_model_returns_the_class_token(make_tiny_vit, tiny_config):
    model = make_tiny_vit(ViTConfig.from_dict({**tiny_config.to_dict(), "num_classes": 0}))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x).tokens
        assert model.forward_head(tokens) is None
        torch.testing.assert_close(model(x), tokens[:, 0])
    assert not any(k.startswith("head") for k in model.state_dict())


def test_block_is_pre_norm_residual(make_tiny_vit):
    """x + MSA(LN(x)), then x + MLP(LN(x)), as in the paper's equations (2) and (3)."""
    block = make_tiny_vit().blocks[0]
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        y = x + block.attn(block.norm1(x))[0]
        expected = y + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(y))))
        torch.testing.assert_close(block(x)[0], expected, **TOL)


def test_non_square_images(make_tiny_vit, tiny_config):
    cfg = ViTConfig.from_dict({**tiny_config.to_dict(), "image_size": [16, 40]})
    model = make_tiny_vit(cfg)
    assert cfg.grid == (2, 5)
    with torch.no_grad():
        features = model.forward_features(torch.randn(1, 3, 16, 40), attentions=True)
    assert features.tokens.shape == (1, 11, 32)


@pytest.mark.parametrize(("old", "new"), [((4, 4), (6, 6)), ((6, 6), (3, 3)), ((4, 4), (3, 5)), ((4, 4), (4, 4))])
def test_resample_pos_embed_matches_timm(old, new):
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 1 + old[0] * old[1], 24, generator=torch.Generator().manual_seed(4))
    ours = resample_pos_embed(pos, old, new)
    theirs = resample_abs_pos_embed(pos, new_size=list(new), old_size=list(old), num_prefix_tokens=1)
    assert ours.shape == (1, 1 + new[0] * new[1], 24)
    torch.testing.assert_close(ours[:, :1], pos[:, :1], atol=0, rtol=0)  # class token kept as it is
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_resample_pos_embed_keeps_dtype():
    pos = torch.randn(1, 17, 8).to(torch.bfloat16)
    assert resample_pos_embed(pos, (4, 4), (5, 5)).dtype == torch.bfloat16


def test_bfloat16_forward_keeps_attention_rows_normalised(make_tiny_vit):
    model = make_tiny_vit().to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32).to(torch.bfloat16)
    with torch.no_grad():
        features = model.forward_features(x, attentions=True)
    assert features.tokens.dtype == torch.bfloat16
    assert features.attentions[0].dtype == torch.float32  # softmax in float32
    torch.testing.assert_close(features.attentions[-1].sum(-1), torch.ones(2, 2, 17))


def test_config_round_trip():
    cfg = ViTConfig(image_size=(24, 40), patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_dim=8, qkv_bias=False)
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="divisible"):
        VisionTransformer(ViTConfig(embed_dim=30, num_heads=4, depth=1))

"""The ADM UNet against upstream guided-diffusion's golden output, names and behaviour."""

import json
import math
from pathlib import Path

import pytest
import torch

from debias.config import ModelConfig
from debias.convert import unet_kwargs_from_flags
from debias.models.factory import unet_kwargs
from debias.models.layers import AttentionBlock, qkv_attention
from debias.models.unet import UNetModel

GOLDEN = torch.load(
    Path(__file__).parent / "fixtures" / "unet_adm_small.pt", weights_only=True
)
CONFIG = json.loads(GOLDEN["config_json"])

# The paper's CelebA-HQ 256 training flags, as strings from a command line.
CELEBA_HQ_FLAGS = {
    "attention_resolutions": "16",
    "class_cond": "False",
    "diffusion_steps": "1000",
    "dropout": "0.0",
    "image_size": "256",
    "learn_sigma": "True",
    "noise_schedule": "linear",
    "num_channels": "128",
    "num_head_channels": "64",
    "num_res_blocks": "1",
    "resblock_updown": "True",
    "use_fp16": "False",
    "use_scale_shift_norm": "True",
}


def golden_model(**overrides) -> UNetModel:
    """The golden config (with overrides) holding the golden weights, in eval mode."""
    model = UNetModel(**{**CONFIG, **overrides})
    model.load_state_dict(GOLDEN["state_dict"], strict=True)
    return model.eval()


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter small random values, so no branch is a zero-initialised no-op."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    return model


def upstream_attention(qkv: torch.Tensor, heads: int, legacy_order: bool) -> torch.Tensor:
    """guided-diffusion's QKVAttentionLegacy / QKVAttention, written with einsum."""
    batch, width, length = qkv.shape
    ch = width // (3 * heads)
    if legacy_order:
        q, k, v = qkv.reshape(batch * heads, 3 * ch, length).split(ch, dim=1)
    else:
        q, k, v = (part.reshape(batch * heads, ch, length) for part in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(batch, -1, length)


@pytest.mark.parametrize(
    "use_checkpoint, channels_last",
    [(False, False), (True, False), (False, True)],
    ids=["plain", "checkpoint", "channels_last"],
)
def test_golden_output(use_checkpoint, channels_last):
    model = golden_model(use_checkpoint=use_checkpoint)
    x = GOLDEN["x"]
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(x, GOLDEN["t"])
    error = (out - GOLDEN["out"]).abs().max().item()
    print(f"golden max abs error: {error:.2e}")
    assert out.shape == (4, 6, 16, 16)
    assert error <= 1e-4


def test_state_dict_names_and_shapes_match_upstream():
    ours = {name: tuple(t.shape) for name, t in UNetModel(**CONFIG).state_dict().items()}
    upstream = {name: tuple(t.shape) for name, t in GOLDEN["state_dict"].items()}
    assert ours == upstream


@pytest.mark.parametrize("legacy_order", [True, False])
def test_qkv_attention_matches_upstream_einsum(legacy_order):
    qkv = torch.randn(2, 3 * 4 * 8, 10, generator=torch.Generator().manual_seed(0))
    ours = qkv_attention(qkv, 4, legacy_order=legacy_order)
    torch.testing.assert_close(ours, upstream_attention(qkv, 4, legacy_order))


def test_new_attention_order_differs_only_with_several_heads():
    x, t = GOLDEN["x"], GOLDEN["t"]
    with torch.no_grad():
        legacy, new = golden_model()(x, t), golden_model(use_new_attention_order=True)(x, t)
    assert (legacy - new).abs().max() > 1e-3  # 4 heads of 16 channels at 8x8 and 4x4

    single = {"num_head_channels": -1, "num_heads": 1}
    with torch.no_grad():
        legacy = golden_model(**single)(x, t)
        new = golden_model(**single, use_new_attention_order=True)(x, t)
    torch.testing.assert_close(legacy, new)


def test_class_conditional_model_uses_labels():
    model = randomize_(UNetModel(**{**CONFIG, "num_classes": 10})).eval()
    x, t = GOLDEN["x"], GOLDEN["t"]
    with torch.no_grad():
        out_a = model(x, t, torch.tensor([0, 1, 2, 3]))
        out_b = model(x, t, torch.tensor([9, 1, 2, 3]))
    assert out_a.shape == (4, 6, 16, 16)
    assert (out_a[0] - out_b[0]).abs().max() > 1e-4
    torch.testing.assert_close(out_a[1:], out_b[1:])
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)
    with pytest.raises(ValueError, match="class-conditional"):
        golden_model()(x, t, torch.zeros(4, dtype=torch.long))


def test_grey_model_with_learned_sigma():
    params = ModelConfig(model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1, attention_resolutions=[7],
                         learn_sigma=True)
    model = UNetModel(**unet_kwargs(params, image_size=28, channels=1, num_classes=None))
    out = randomize_(model).eval()(torch.randn(2, 1, 28, 28), torch.tensor([3, 700]))
    assert out.shape == (2, 2, 28, 28)
    assert torch.isfinite(out).all()


def test_unet_kwargs_map_resolutions_to_downsample_rates():
    common = dict(model_channels=32, num_res_blocks=1, num_head_channels=16)
    params = ModelConfig(channel_mult=[1, 2, 2, 2], attention_resolutions=[16, 8], learn_sigma=True,
                         use_scale_shift_norm=False, resblock_updown=False, **common)
    built = UNetModel(**unet_kwargs(params, image_size=32, channels=3, num_classes=None))
    direct = UNetModel(
        image_size=32, in_channels=3, out_channels=6, channel_mult=(1, 2, 2, 2),
        attention_resolutions=(2, 4), **common,
    )
    assert built.state_dict().keys() == direct.state_dict().keys()
    attention_blocks = [m for m in built.modules() if isinstance(m, AttentionBlock)]
    assert len(attention_blocks) == 1 + 1 + 1 + 2 + 2  # down at 16, 8; middle; up at 8, 16


@pytest.mark.parametrize(
    "image_size, resolutions, message",
    [(32, [12], "resolution 12"), (32, [64], "resolution 64"), (30, [15], "image size 30")],
)
def test_unet_kwargs_reject_impossible_layouts(image_size, resolutions, message):
    params = ModelConfig(model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1,
                         attention_resolutions=resolutions)
    with pytest.raises(ValueError, match=message):
        unet_kwargs(params, image_size=image_size, channels=3, num_classes=None)


def test_only_2d_is_supported():
    with pytest.raises(ValueError, match="dims=3"):
        UNetModel(**{**CONFIG, "dims": 3})


def test_flags_of_the_paper_celeba_hq_model():
    kwargs = unet_kwargs_from_flags(CELEBA_HQ_FLAGS)
    assert kwargs["channel_mult"] == (1, 1, 2, 2, 4, 4)
    assert kwargs["attention_resolutions"] == (256 // 16,)
    assert kwargs["in_channels"] == 3 and kwargs["out_channels"] == 6
    assert kwargs["num_classes"] is None
    assert kwargs["use_scale_shift_norm"] and kwargs["resblock_updown"]
    assert not kwargs["use_fp16"] and not kwargs["use_checkpoint"]
    assert kwargs["num_head_channels"] == 64 and kwargs["num_res_blocks"] == 1

    with torch.device("meta"):
        model = UNetModel(**kwargs)
    attention_blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    # 16x16 is level 4 (512 channels): 1 down block, the middle, 2 up blocks; 512 / 64 = 8 heads.
    assert len(attention_blocks) == 4
    assert all(block.num_heads == 8 for block in attention_blocks)
    assert sum(p.numel() for p in model.parameters()) > 50_000_000


def test_flags_defaults_and_overrides():
    kwargs = unet_kwargs_from_flags(
        {"image_size": 32, "attention_resolutions": "32,16,8", "class_cond": True,
         "num_classes": "10", "in_channels": 1, "channel_mult": "1,2,2"}
    )
    assert kwargs["attention_resolutions"] == (1, 2, 4)
    assert kwargs["num_classes"] == 10
    assert kwargs["in_channels"] == kwargs["out_channels"] == 1
    assert kwargs["channel_mult"] == (1, 2, 2)
    assert unet_kwargs_from_flags({"image_size": "32"})["channel_mult"] == (1, 2, 2, 2)
    assert unet_kwargs_from_flags({"class_cond": "yes"})["num_classes"] == 1000
    with pytest.raises(ValueError, match="image size 48"):
        unet_kwargs_from_flags({"image_size": 48})
    with pytest.raises(ValueError, match="boolean"):
        unet_kwargs_from_flags({"learn_sigma": "maybe"})


def test_gradients_reach_every_parameter_with_and_without_checkpointing():
    x, t = GOLDEN["x"], GOLDEN["t"]
    grads = []
    for use_checkpoint in (False, True):
        model = golden_model(use_checkpoint=use_checkpoint).train()
        (model(x, t) ** 2).mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert all(g is not None and g.abs().max() > 0 for g in grads[0].values())
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_fp16_torso_stays_close_to_fp32():
    model = golden_model(use_fp16=True)
    assert model.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
    assert model.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32  # GroupNorm
    with torch.no_grad():
        out = model(GOLDEN["x"], GOLDEN["t"])
    assert out.dtype == torch.float32
    assert (out - GOLDEN["out"]).abs().max() < 2e-2

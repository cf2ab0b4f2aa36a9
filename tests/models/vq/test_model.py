"""VQ tokenizer: shapes, straight-through gradients, EMA codebook, restarts, save/load, VQGAN."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

from mmrag.config import ConfigError
from mmrag.models.vq.model import (
    EMAQuantizer,
    PerceptualLoss,
    VQConfig,
    VQModel,
    convert_taming_state_dict,
    images_to_tensor,
    load_taming_vqgan,
    psnr,
    square_resize,
    tensor_to_images,
)

TINY = VQConfig.preset("tiny")


@pytest.fixture
def model() -> VQModel:
    torch.manual_seed(0)
    return VQModel(TINY)


def test_presets_and_validation() -> None:
    assert TINY.grid_size == 8 and TINY.tokens_per_image == 64
    small = VQConfig.preset("small")
    assert small.image_size == 64 and small.grid_size == 16 and small.tokens_per_image == 256
    with pytest.raises(ConfigError, match="multiple"):
        VQConfig(image_size=62, channel_mult=(1, 2, 4))
    with pytest.raises(ConfigError, match="norm_groups"):
        VQConfig(channels=12, norm_groups=8)
    assert VQConfig.from_json(small.to_json()) == small


def test_shapes(model: VQModel) -> None:
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    out = model(x)
    assert out.recon.shape == (3, 3, 16, 16)
    assert out.codes.shape == (3, 8, 8) and out.codes.dtype == torch.int64
    codes = model.encode(x)
    assert codes.shape == (3, 8, 8)
    assert int(codes.min()) >= 0 and int(codes.max()) < TINY.codebook_size
    pixels = model.decode(codes)
    assert pixels.shape == (3, 3, 16, 16)
    assert float(pixels.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="codes must be"):
        model.decode(torch.full((1, 8, 8), TINY.codebook_size))


def test_patch_size_shapes() -> None:
    config = TINY.replace(patch_size=2, image_size=32)
    assert config.grid_size == 8
    m = VQModel(config)
    assert m(torch.zeros(2, 3, 32, 32)).recon.shape == (2, 3, 32, 32)
    assert m.encode(torch.zeros(2, 3, 32, 32)).shape == (2, 8, 8)


def test_loss_is_finite_and_straight_through_reaches_the_encoder(model: VQModel) -> None:
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(x)
    recon_loss = (out.recon - x).pow(2).mean()
    assert torch.isfinite(recon_loss) and torch.isfinite(out.commitment_loss)
    recon_loss.backward()  # reconstruction only: the encoder gets gradient through the codes
    grad = model.encoder.conv_in.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    assert model.quantize.codebook.grad is None  # the codebook is an EMA buffer


def test_ema_moves_codes_to_their_data_and_eval_freezes_them() -> None:
    config = TINY.replace(ema_decay=0.5, dead_code_threshold=0.0, codebook_size=4, code_dim=2)
    torch.manual_seed(0)
    q = EMAQuantizer(config).train()
    target = torch.tensor([3.0, -2.0])
    z = target.view(1, 2, 1, 1).expand(2, 2, 4, 4).contiguous()  # every vector = target
    code = int(q(z).codes[0, 0, 0])
    before = float((q.codebook[code] - target).norm())
    for _ in range(10):
        q(z)
    after = float((q.codebook[code] - target).norm())
    assert after < 0.01 * before
    frozen = q.codebook.clone()
    q.eval()
    q(z + 1.0)
    assert torch.equal(frozen, q.codebook)


def test_dead_code_restart_revives_unused_codes() -> None:
    config = TINY.replace(codebook_size=16, code_dim=2, ema_decay=0.9, dead_code_threshold=0.5)
    torch.manual_seed(0)
    data = torch.randn(4, 2, 8, 8)  # 256 vectors spread around the origin
    for threshold, expect_growth in ((0.0, False), (0.5, True)):
        q = EMAQuantizer(config.replace(dead_code_threshold=threshold)).train()
        q.codebook.copy_(torch.full((16, 2), 50.0))  # every code far from the data...
        q.codebook[0] = 0.0  # ...except one, which takes every assignment
        q.ema_sum.copy_(q.codebook)
        used_before = len(q(data).codes.unique())
        assert used_before == 1
        for _ in range(60):
            q(data)
        q.eval()
        used_after = len(q(data).codes.unique())
        if expect_growth:
            assert used_after >= 12, used_after  # restarts brought most codes into use
            assert q.usage() >= 0.75
        else:
            assert used_after == 1  # without restarts the dead codes stay dead


def test_save_load_round_trip(model: VQModel, tmp_path: Path) -> None:
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    model.train()(x)  # move the EMA buffers off their initial values
    model.eval()
    model.save_pretrained(tmp_path / "vq")
    loaded = VQModel.from_pretrained(tmp_path / "vq")
    assert loaded.config == model.config
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.decode(model.encode(x)), model.decode(model.encode(x)))
    assert torch.equal(loaded.quantize.ema_count, model.quantize.ema_count)
    TINY.replace(codebook_size=32).save(tmp_path / "vq" / "config.json")
    with pytest.raises(RuntimeError):
        VQModel.from_pretrained(tmp_path / "vq")


def test_same_codes_ignores_the_decoder_only(model: VQModel) -> None:
    other = VQModel(model.config)
    other.load_state_dict(model.state_dict())
    assert model.same_codes(other)
    with torch.no_grad():
        other.decoder.conv_out.weight.add_(1.0)
        other.post_quant_conv.bias.add_(1.0)
    assert model.same_codes(other)  # a refined decoder draws the same codes differently
    with torch.no_grad():
        other.quantize.codebook[0].add_(1.0)
    assert not model.same_codes(other)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.encoder.conv_in.weight.add_(1.0)
    assert not model.same_codes(other)
    assert not model.same_codes(VQModel(model.config.replace(codebook_size=32)))


def test_pil_round_trip_flattens_transparency_onto_white(model: VQModel) -> None:
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))  # fully transparent, non-square
    x = images_to_tensor([rgba], 16)
    assert x.shape == (1, 3, 16, 16)
    assert torch.equal(x, torch.ones_like(x))  # white
    assert square_resize(rgba, 16).size == (16, 16)
    images = tensor_to_images(x)
    assert images[0].getpixel((0, 0)) == (255, 255, 255)
    decoded = model.decode_images(model.encode_images([rgba, rgba]))
    assert [im.size for im in decoded] == [(16, 16), (16, 16)]


def test_psnr_values() -> None:
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[1] += 0.2  # 0.1 on the [0, 1] scale: MSE 0.01 -> 20 dB
    values = psnr(y, x)
    assert values[1] == pytest.approx(20.0, abs=1e-4)
    assert values[0] == pytest.approx(100.0)  # identical: capped by the MSE floor


def test_perceptual_loss_on_a_random_network() -> None:
    efficientnet = pytest.importorskip("mmrag.encoders.efficientnet")
    torch.manual_seed(0)
    loss = PerceptualLoss(efficientnet.EfficientNetLite0(), blocks=3)
    loss.train()
    assert not loss.net.training  # batch-norm statistics stay frozen
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    recon = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    value = loss(recon, x)
    assert float(value.detach()) > 0
    value.backward()
    assert recon.grad is not None and float(recon.grad.abs().sum()) > 0
    assert all(p.grad is None for p in loss.net.parameters())


# --- taming-transformers VQGAN conversion ----------------------------------------------------

DDCONFIG: dict[str, Any] = {
    "double_z": False,
    "z_channels": 32,
    "resolution": 16,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "dropout": 0.0,
}
PARAMS: dict[str, Any] = {"ddconfig": DDCONFIG, "n_embed": 16, "embed_dim": 8}


def _conv(out: dict[str, tuple[int, ...]], name: str, cout: int, cin: int, k: int) -> None:
    out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin, k, k), (cout,)


def _norm(out: dict[str, tuple[int, ...]], name: str, c: int) -> None:
    out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)


def _resnet(out: dict[str, tuple[int, ...]], name: str, cin: int, cout: int) -> None:
    _norm(out, f"{name}.norm1", cin)
    _conv(out, f"{name}.conv1", cout, cin, 3)
    _norm(out, f"{name}.norm2", cout)
    _conv(out, f"{name}.conv2", cout, cout, 3)
    if cin != cout:
        _conv(out, f"{name}.nin_shortcut", cout, cin, 1)


def _attn(out: dict[str, tuple[int, ...]], name: str, c: int) -> None:
    _norm(out, f"{name}.norm", c)
    for part in ("q", "k", "v", "proj_out"):
        _conv(out, f"{name}.{part}", c, c, 1)


def taming_shapes(dd: dict[str, Any], n_embed: int, embed_dim: int) -> dict[str, tuple[int, ...]]:
    """The key -> shape layout of a taming `VQModel` state dict, following the constructors of
    taming/modules/diffusionmodules/model.py (Encoder, Decoder) and taming/models/vqgan.py."""
    out: dict[str, tuple[int, ...]] = {}
    ch, mult, nres = dd["ch"], dd["ch_mult"], dd["num_res_blocks"]
    levels = len(mult)
    _conv(out, "encoder.conv_in", ch, dd["in_channels"], 3)
    res, in_mult = dd["resolution"], (1, *mult)
    for i in range(levels):
        block_in, block_out = ch * in_mult[i], ch * mult[i]
        for j in range(nres):
            _resnet(out, f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if res in dd["attn_resolutions"]:
                _attn(out, f"encoder.down.{i}.attn.{j}", block_in)
        if i != levels - 1:
            _conv(out, f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
            res //= 2
    for prefix in ("encoder", "decoder"):
        c = ch * mult[-1]
        _resnet(out, f"{prefix}.mid.block_1", c, c)
        _attn(out, f"{prefix}.mid.attn_1", c)
        _resnet(out, f"{prefix}.mid.block_2", c, c)
    _norm(out, "encoder.norm_out", block_in)
    _conv(out, "encoder.conv_out", dd["z_channels"], block_in, 3)
    _conv(out, "quant_conv", embed_dim, dd["z_channels"], 1)
    out["quantize.embedding.weight"] = (n_embed, embed_dim)
    _conv(out, "post_quant_conv", dd["z_channels"], embed_dim, 1)
    block_in = ch * mult[-1]
    _conv(out, "decoder.conv_in", block_in, dd["z_channels"], 3)
    for i in reversed(range(levels)):
        block_out = ch * mult[i]
        for j in range(nres + 1):
            _resnet(out, f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if res in dd["attn_resolutions"]:
                _attn(out, f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            _conv(out, f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
            res *= 2
    _norm(out, "decoder.norm_out", block_in)
    _conv(out, "decoder.conv_out", dd["out_ch"], block_in, 3)
    out["loss.discriminator.main.0.weight"] = (64, 3, 4, 4)  # training-only parts
    out["loss.perceptual_loss.net.slice1.0.weight"] = (64, 3, 3, 3)
    return out


@pytest.fixture
def taming_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = taming_shapes(DDCONFIG, 16, 8)
    return {k: torch.randn(shape, generator=g) * 0.1 for k, shape in shapes.items()}


def test_taming_layout_has_the_expected_keys(taming_state: dict[str, torch.Tensor]) -> None:
    for key in (
        "encoder.down.0.block.0.conv1.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.1.attn.0.q.weight",
        "encoder.down.0.downsample.conv.weight",
        "decoder.up.1.upsample.conv.weight",
        "decoder.up.0.block.1.conv2.bias",
        "decoder.mid.attn_1.proj_out.weight",
    ):
        assert key in taming_state, key
    assert "encoder.down.1.downsample.conv.weight" not in taming_state  # last level
    assert "decoder.up.0.upsample.conv.weight" not in taming_state  # first level


def test_taming_conversion_loads_strictly_and_places_every_tensor(
    taming_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    model = load_taming_vqgan(taming_state, PARAMS)
    own = model.state_dict()
    converted = convert_taming_state_dict(taming_state)
    assert not any(k.startswith("loss.") for k in converted)
    assert set(converted) == set(own)  # strict: nothing missing, nothing left over
    pairs = {
        "encoder.down.0.block.0.conv1.weight": "encoder.levels.0.blocks.0.conv1.weight",
        "encoder.down.1.block.0.nin_shortcut.bias": "encoder.levels.1.blocks.0.shortcut.bias",
        "encoder.down.1.attn.0.k.weight": "encoder.levels.1.attns.0.k.weight",
        "encoder.down.0.downsample.conv.weight": "encoder.levels.0.resample.conv.weight",
        "decoder.up.1.upsample.conv.weight": "decoder.levels.1.resample.conv.weight",
        "decoder.up.1.attn.1.v.bias": "decoder.levels.1.attns.1.v.bias",
        "decoder.mid.block_2.conv1.weight": "decoder.mid.block_2.conv1.weight",
        "quantize.embedding.weight": "quantize.codebook",
        "post_quant_conv.weight": "post_quant_conv.weight",
    }
    for theirs, ours in pairs.items():
        assert torch.equal(own[ours], taming_state[theirs]), ours
    # Every source tensor (but the loss) lands somewhere, unchanged.
    sources = [v for k, v in taming_state.items() if not k.startswith("loss.")]
    targets = list(own.values())
    assert all(any(t is s or torch.equal(t, s) for t in targets) for s in sources)
    # The converted model runs: 16 px -> 8 x 8 codes -> 16 px, and survives save/load.
    assert model.config.grid_size == 8 and model.config.norm_groups == 32
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = model.encode(x)
    assert codes.shape == (2, 8, 8)
    # The codes are the nearest codebook rows to quant_conv(encoder(x)), as in taming.
    z = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, 8)
    nearest = torch.cdist(z, taming_state["quantize.embedding.weight"]).argmin(1)
    assert torch.equal(codes.flatten(), nearest)
    model.save_pretrained(tmp_path / "converted")
    again = VQModel.from_pretrained(tmp_path / "converted")
    assert torch.equal(again.decode(codes), model.decode(codes))


class Callback:
    """An arbitrary pickled object, as Lightning checkpoints can hold: must not be unpickled."""


def test_taming_checkpoint_file_is_read_without_pickle(
    taming_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": taming_state, "global_step": 5}, path)
    model = load_taming_vqgan(path, PARAMS)
    assert torch.equal(model.quantize.codebook, taming_state["quantize.embedding.weight"])
    torch.save({"state_dict": taming_state, "callback": Callback()}, tmp_path / "bad.ckpt")
    with pytest.raises(pickle.UnpicklingError, match=r"[Ww]eights only"):
        load_taming_vqgan(tmp_path / "bad.ckpt", PARAMS)
    broken = dict(taming_state)
    del broken["decoder.conv_out.bias"]
    with pytest.raises(RuntimeError, match=r"conv_out\.bias"):
        load_taming_vqgan(broken, PARAMS)
    with pytest.raises(ConfigError, match="double_z"):
        load_taming_vqgan(taming_state, {**PARAMS, "ddconfig": {**DDCONFIG, "double_z": True}})
    assert math.isfinite(float(model.decode(torch.zeros(1, 8, 8, dtype=torch.long)).mean()))


@pytest.mark.pretrained
def test_the_shipped_small_vq_reconstructs_unseen_shapes() -> None:
    """checkpoints/vq (see its RECIPE.md): drawn shapes it never saw come back above 24 dB."""
    path = Path(__file__).resolve().parents[3] / "checkpoints" / "vq"
    if not (path / "model.safetensors").is_file():
        pytest.skip("checkpoints/vq is not present")
    model = VQModel.from_pretrained(path)
    assert model.config == VQConfig.preset("small")
    images = []
    for rgb in ((220, 30, 30), (30, 160, 60), (40, 60, 220)):
        image = Image.new("RGB", (128, 128), "white")
        draw = ImageDraw.Draw(image)
        draw.ellipse((24, 24, 104, 104), fill=rgb)
        draw.rectangle((50, 50, 78, 78), fill=(250, 220, 40))
        images.append(image)
    codes = model.encode_images(images)
    assert codes.shape == (3, 16, 16)
    x = images_to_tensor(images, 64)
    values = psnr(model.decode(codes), x)
    assert float(values.min()) > 24.0, values

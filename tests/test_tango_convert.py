"""``diffusion-pref convert tango``: a tiny checkpoint written in the declare-lab hub layout, with the real key names
(latent-diffusion VAE names, AudioLDM HiFi-GAN names, ``unet.``/``text_encoder.`` prefixes), converts, loads as a
Tango backbone and gives the same outputs as the same weights loaded directly."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from diffusion_pref.config import load_config


def _ldm_vae_names(state, n_blocks):
    """diffusers AutoencoderKL names -> latent-diffusion (AudioLDM) names, written out from the LDM module layout."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in state.items():
        name = key.replace("conv_norm_out", "norm_out")
        m = re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(\w+)$", name)
        if m:
            part, layer, kind = m.groups()
            if layer != "group_norm" and kind == "weight":
                value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
            out[f"{part}.mid.attn_1.{attn[layer]}.{kind}"] = value
            continue
        m = re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)$", name)
        if m:
            name = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
        m = re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", name)
        if m:
            name = f"encoder.down.{m.group(1)}.block.{m.group(2)}.{m.group(3)}"
        m = re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)$", name)
        if m:
            name = f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
        m = re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", name)
        if m:
            name = f"decoder.up.{n_blocks - 1 - int(m.group(1))}.block.{m.group(2)}.{m.group(3)}"
        m = re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)$", name)
        if m:
            name = f"decoder.up.{n_blocks - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        out[name.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def write_hub_layout(tiny_dir, src):
    """The tiny Tango of ``tiny_dir`` as declare-lab publishes Tango (see commands/convert.py's docstring)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import SpeechT5HifiGan, T5EncoderModel

    src.mkdir(parents=True)
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "unet")
    text = T5EncoderModel.from_pretrained(tiny_dir / "text_encoder")
    vae = AutoencoderKL.from_pretrained(tiny_dir / "vae")
    vocoder = SpeechT5HifiGan.from_pretrained(tiny_dir / "vocoder")
    # the "hub" text encoder: its config and tokenizer in one folder (as google/flan-t5-large holds them)
    t5 = src.parent / "flan-t5-tiny"
    shutil.copytree(tiny_dir / "tokenizer", t5)
    shutil.copy(tiny_dir / "text_encoder" / "config.json", t5 / "config.json")
    (src / "configs").mkdir()
    (src / "configs" / "diffusion_model_config.json").write_text(
        json.dumps({k: v for k, v in unet.config.items() if not k.startswith("_")}))
    (src / "main_config.json").write_text(json.dumps({
        "text_encoder_name": str(t5), "scheduler_name": "stabilityai/stable-diffusion-2-1", "unet_model_name": None,
        "unet_model_config_path": "configs/diffusion_model_config.json", "snr_gamma": 5.0}))
    main = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    main.update({f"text_encoder.{k}": v for k, v in text.state_dict().items()})
    torch.save(main, src / "pytorch_model_main.bin")
    c = vae.config
    vae_state = _ldm_vae_names(vae.state_dict(), len(c.block_out_channels))
    vocoder_state = {k.replace("upsampler.", "ups."): v for k, v in vocoder.state_dict().items()
                     if k not in ("mean", "scale")}
    vae_state.update({f"vocoder.{k}": v for k, v in vocoder_state.items()})
    torch.save(vae_state, src / "pytorch_model_vae.bin")
    (src / "vae_config.json").write_text(json.dumps({
        "image_key": "fbank", "subband": 1, "embed_dim": c.latent_channels, "time_shuffle": 1,
        "ddconfig": {"double_z": True, "z_channels": c.latent_channels, "resolution": c.sample_size,
                     "downsample_time": False, "in_channels": 1, "out_ch": 1, "ch": c.block_out_channels[0],
                     "ch_mult": [b // c.block_out_channels[0] for b in c.block_out_channels],
                     "num_res_blocks": c.layers_per_block, "attn_resolutions": [], "dropout": 0.0},
        "scale_factor": c.scaling_factor,
        "norm_num_groups": c.norm_num_groups,  # the tiny model's; the real VAE uses latent-diffusion's 32
    }))
    shutil.copy(tiny_dir / "stft_config.json", src / "stft_config.json")
    return src


def backbone_of(folder):
    from diffusion_pref.pipelines import load_backbone

    return load_backbone(load_config(None, [f"model.pretrained={folder}"]).model)


def test_hub_layout_converts_and_matches_the_direct_load(tiny_tango_dir, tmp_path):
    from diffusion_pref.cli import main

    src = write_hub_layout(tiny_tango_dir, tmp_path / "hub")
    dst = tmp_path / "converted"
    assert main(["convert", "tango", "--src", str(src), "--dst", str(dst)]) == 0
    ours, direct = backbone_of(dst), backbone_of(tiny_tango_dir)
    for name in ("denoiser", "text_encoder", "vae", "vocoder"):
        a, b = getattr(ours, name).state_dict(), getattr(direct, name).state_dict()
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key}"
    assert ours.scheduler.config.prediction_type == "v_prediction"
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps"):
        assert ours.scheduler.config[key] == direct.scheduler.config[key]
    waves = torch.randn(2, ours.samples_for(0.64)) * 0.2
    torch.testing.assert_close(ours.encode(waves), direct.encode(waves), rtol=0, atol=0)
    prompts = ["a dog barking", "rain"]
    text_a, text_b = ours.encode_prompts(prompts), direct.encode_prompts(prompts)
    torch.testing.assert_close(text_a, text_b, rtol=0, atol=0)
    latents = ours.encode(waves)
    torch.testing.assert_close(ours.decode(latents), direct.decode(latents), rtol=0, atol=0)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(ours.predict(latents, t, ours.conditioning(text_a)),
                                   direct.predict(latents, t, direct.conditioning(text_b)), rtol=0, atol=0)


def test_convert_errors_name_the_missing_piece(tiny_tango_dir, tmp_path):
    from diffusion_pref.commands.convert import ConvertError, convert_tango

    src = write_hub_layout(tiny_tango_dir, tmp_path / "hub")
    shutil.rmtree(src / "configs")
    with pytest.raises(ConvertError, match="--unet-config"):
        convert_tango(src, tmp_path / "out")
    from diffusion_pref.pipelines.stable_diffusion import ModelLoadError

    with pytest.raises(ModelLoadError, match="convert it first"):  # the hub layout given to train / generate
        backbone_of(src)
    (src / "pytorch_model_main.bin").unlink()
    with pytest.raises(ConvertError, match="pytorch_model_main.bin: missing"):
        convert_tango(src, tmp_path / "out", unet_config=str(tiny_tango_dir / "unet" / "config.json"))


def test_vocoder_weight_norm_is_folded(tiny_tango_dir):
    """A vocoder saved with weight norm (weight_g, weight_v) converts to the same weights as one saved without."""
    from transformers import SpeechT5HifiGan

    from diffusion_pref.commands.convert import convert_vocoder

    vocoder = SpeechT5HifiGan.from_pretrained(tiny_tango_dir / "vocoder")
    plain = {f"vocoder.{k.replace('upsampler.', 'ups.')}": v for k, v in vocoder.state_dict().items()
             if k not in ("mean", "scale")}
    normed = dict(plain)
    w = normed.pop("vocoder.conv_pre.weight")
    g = w.norm(dim=(1, 2), keepdim=True)  # torch's weight_norm(dim=0): w = g * v / ||v||, here v = 2w
    normed["vocoder.conv_pre.weight_g"], normed["vocoder.conv_pre.weight_v"] = g, 2 * w
    a = convert_vocoder(plain, 160, 16000, tiny_tango_dir).state_dict()
    b = convert_vocoder(normed, 160, 16000, tiny_tango_dir).state_dict()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_stft_buffers_are_compared_with_our_mel_bank(tiny_tango_dir, tmp_path, caplog):
    """pytorch_model_stft.bin (TacotronSTFT's buffers): its mel_basis is checked against diffusion_pref.audio's."""
    from diffusion_pref.audio import MelSettings, mel_basis
    from diffusion_pref.commands.convert import _check_stft_buffers

    settings = MelSettings.from_dict(json.loads((tiny_tango_dir / "stft_config.json").read_text()))
    torch.save({"mel_basis": mel_basis(settings).clone()}, tmp_path / "pytorch_model_stft.bin")
    with caplog.at_level("WARNING"):
        _check_stft_buffers(tmp_path, settings)
    assert "differs" not in caplog.text
    torch.save({"mel_basis": mel_basis(settings) * 1.01}, tmp_path / "pytorch_model_stft.bin")
    with caplog.at_level("WARNING"):
        _check_stft_buffers(tmp_path, settings)
    assert "mel filter bank differs" in caplog.text

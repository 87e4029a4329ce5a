"""ImageReward v1.0 (Xu et al. 2023) on transformers BLIP modules, without the `image-reward` package.

Architecture (as `ImageReward.ImageReward` builds it): a BLIP ViT-L/16 at 224 px (width 1024, 24 blocks, 16
heads), a BERT-base text encoder whose every layer cross-attends to all image tokens (BLIP's `med`), and an
MLP head 768 -> 1024 -> 128 -> 64 -> 16 -> 1 whose ReLUs are commented out in the official code (an affine map
at eval time). Reward = `(mlp(text_encoder(prompt, image)[CLS]) - 0.16717362830052426) / 1.0333394966054072`.

Preprocessing as the official `_transform(224)`: torchvision Resize(224, bicubic) on the PIL image, CenterCrop 224,
RGB, ToTensor, OpenAI mean/std. Text: the `bert-base-uncased` tokenizer plus BLIP's `[DEC]` / `[ENC]` special
tokens (vocab 30524), padded to max_length=35 and truncated; input ids are used as-is ([CLS] first, no [ENC]).

Checkpoint `THUDM/ImageReward`: `ImageReward.pt` (a plain state dict, loaded with weights_only=True) and
`med_config.json` (the BERT config). Key mapping onto the transformers modules:

    blip.visual_encoder.cls_token                -> vision.embeddings.class_embedding
    blip.visual_encoder.pos_embed                -> vision.embeddings.position_embedding
    blip.visual_encoder.patch_embed.proj.*       -> vision.embeddings.patch_embedding.*
    blip.visual_encoder.blocks.{i}.norm1.*       -> vision.encoder.layers.{i}.layer_norm1.*
    blip.visual_encoder.blocks.{i}.attn.qkv.*    -> vision.encoder.layers.{i}.self_attn.qkv.*  (same [q; k; v] layout)
    blip.visual_encoder.blocks.{i}.attn.proj.*   -> vision.encoder.layers.{i}.self_attn.projection.*
    blip.visual_encoder.blocks.{i}.norm2.*       -> vision.encoder.layers.{i}.layer_norm2.*
    blip.visual_encoder.blocks.{i}.mlp.fc{1,2}.* -> vision.encoder.layers.{i}.mlp.fc{1,2}.*
    blip.visual_encoder.norm.*                   -> vision.post_layernorm.*
    blip.text_encoder.<name>                     -> text.<name>  (BLIP's med and BlipTextModel share names)
    mlp.layers.{0,2,4,6,7}.*                     -> mlp.layers.{0,2,4,6,7}.*
    blip.vision_proj.*, blip.text_proj.*, blip.text_encoder.embeddings.position_ids: unused, dropped

The official loader uses `strict=False` and ignores missing keys; here every parameter the score needs must be
present (other, unused keys are ignored with a warning). The ViT's LayerNorm eps is 1e-6 (BLIP's `vit.py`); the ViT size is read from the checkpoint's shapes,
its head count is `vision_heads` (16 for ViT-L).

Example:

    from diffusion_pref.reward_models import load_reward_model
    ir = load_reward_model("imagereward")                      # THUDM/ImageReward + bert-base-uncased tokenizer
    ir = load_reward_model("imagereward", pretrained="/ckpt/ImageReward", tokenizer="/ckpt/bert-base-uncased")
    rewards = ir.score(prompts, images)                        # [n], README demo values -2.0 .. 0.6
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .base import batch_slices, build_rating_mlp, check_prompts, default_device, images_to_pil
from .base import load_state_dict_file, openai_clip_pixels, resolve_file

if TYPE_CHECKING:
    import torch

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_LENGTH = 35
_VISION_RENAMES = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("norm.", "post_layernorm."),
]
_BLOCK_RENAMES = [
    ("norm1.", "layer_norm1."),
    ("norm2.", "layer_norm2."),
    ("attn.qkv.", "self_attn.qkv."),
    ("attn.proj.", "self_attn.projection."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.fc2.", "mlp.fc2."),
]
_IGNORED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")


def split_imagereward_state(state: Mapping[str, "torch.Tensor"]) -> tuple[dict, dict, dict, list[str]]:
    """Official ImageReward.pt keys -> (vision, text, mlp) state dicts for the transformers modules, + unknown keys."""
    vision, text, mlp, unknown = {}, {}, {}, []
    for key, value in state.items():
        if key.startswith(_IGNORED_PREFIXES):
            continue
        if key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder."):]
            if rest.startswith("blocks."):
                _, idx, sub = rest.split(".", 2)
                for old, new in _BLOCK_RENAMES:
                    if sub.startswith(old):
                        vision[f"encoder.layers.{idx}.{new}{sub[len(old):]}"] = value
                        break
                else:
                    unknown.append(key)
                continue
            for old, new in _VISION_RENAMES:
                if rest == old or rest.startswith(old) and old.endswith("."):
                    vision[new + rest[len(old):]] = value
                    break
            else:
                unknown.append(key)
        elif key.startswith("blip.text_encoder."):
            text[key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp."):
            mlp[key[len("mlp."):]] = value
        else:
            unknown.append(key)
    return vision, text, mlp, unknown


def _vision_config(vision_state: Mapping[str, "torch.Tensor"], heads: int):
    from transformers import BlipVisionConfig

    width = vision_state["embeddings.class_embedding"].shape[-1]
    patch = vision_state["embeddings.patch_embedding.weight"].shape[-1]
    positions = vision_state["embeddings.position_embedding"].shape[1]
    grid = round((positions - 1) ** 0.5)
    depth = 1 + max(int(k.split(".")[2]) for k in vision_state if k.startswith("encoder.layers."))
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vision_state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=heads,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # BLIP's vit.py: partial(nn.LayerNorm, eps=1e-6)
        attention_dropout=0.0,
    )


def _text_config(med: Mapping[str, Any], encoder_width: int):
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        encoder_hidden_size=encoder_width,  # the official code overrides med's encoder_width with the ViT width
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=med.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=med.get("attention_probs_dropout_prob", 0.1),
        pad_token_id=med.get("pad_token_id", 0),
        is_decoder=True,  # makes BlipTextModel build the cross-attention; forward runs with is_decoder=False
    )


class ImageReward:
    name = "imagereward"
    scale = "standardised reward (mlp - 0.167) / 1.033, roughly zero-mean unit-variance; README demo -2.0 .. 0.6"

    def __init__(
        self,
        pretrained: str = "THUDM/ImageReward",
        tokenizer: str | None = None,
        med_config: str | None = None,
        vision_heads: int = 16,
        device: Any = None,
        batch_size: int = 8,
    ):
        """`pretrained`: hub repo or local folder with `ImageReward.pt` + `med_config.json`, or the .pt/.safetensors
        file itself (then `med_config.json` is looked for beside it unless `med_config` is given).
        `tokenizer`: BERT tokenizer folder or hub id; default `pretrained` if it is a folder with a `vocab.txt`,
        else `bert-base-uncased` (what the official code loads)."""
        from transformers import BertTokenizer, BlipTextModel, BlipVisionModel

        self.device = default_device(device)
        self.batch_size = batch_size
        ckpt_path = resolve_file(pretrained, "ImageReward.pt", "imagereward checkpoint")
        if med_config is None:
            beside = os.path.join(os.path.dirname(ckpt_path), "med_config.json")
            med_config = beside if os.path.isfile(beside) else pretrained
        med_path = resolve_file(med_config, "med_config.json", "imagereward med_config")
        with open(med_path) as f:
            med = json.load(f)

        vision_sd, text_sd, mlp_sd, unknown = split_imagereward_state(load_state_dict_file(ckpt_path))
        unmapped_vit = [k for k in unknown if k.startswith("blip.visual_encoder.")]
        if unmapped_vit:  # a ViT variant this mapping does not know: scores would be wrong, so stop
            raise RuntimeError(f"imagereward: unmapped ViT keys in {ckpt_path}: {unmapped_vit[:5]}")
        if unknown:  # the official loader is strict=False; modules the score does not use are harmless
            import warnings

            warnings.warn(f"imagereward: ignoring {len(unknown)} unused keys in {ckpt_path}, e.g. {unknown[:3]}")
        if "embeddings.class_embedding" not in vision_sd:
            raise RuntimeError(f"imagereward: {ckpt_path} has no blip.visual_encoder weights; is it ImageReward.pt?")
        vision_config = _vision_config(vision_sd, vision_heads)
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(_text_config(med, vision_config.hidden_size), add_pooling_layer=False)
        for module, sd, what in ((self.vision, vision_sd, "visual_encoder"), (self.text, text_sd, "text_encoder")):
            missing, extra = module.load_state_dict(sd, strict=False)
            if missing or extra:
                raise RuntimeError(
                    f"imagereward: blip.{what} weights in {ckpt_path} do not match the architecture "
                    f"(missing {list(missing)[:5]}, unexpected {list(extra)[:5]})"
                )
        self.mlp = build_rating_mlp(mlp_sd, self.name)
        self.vision = self.vision.float().to(self.device).eval()
        self.text = self.text.float().to(self.device).eval()
        self.mlp = self.mlp.to(self.device)
        self.image_size = vision_config.image_size

        if tokenizer is None:
            local = os.path.isdir(pretrained) and os.path.isfile(os.path.join(pretrained, "vocab.txt"))
            tokenizer = pretrained if local else "bert-base-uncased"
        self.tokenizer = BertTokenizer.from_pretrained(tokenizer)
        # BLIP's init_tokenizer: these two tokens are why the vocab is 30524; they never occur in prompts.
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        if len(self.tokenizer) != med["vocab_size"]:
            raise ValueError(
                f"imagereward: tokenizer {tokenizer} has {len(self.tokenizer)} tokens with [DEC]/[ENC], "
                f"med_config says vocab_size {med['vocab_size']}; use the bert-base-uncased vocabulary"
            )

    def score(self, prompts: Sequence[str], media: Any) -> "torch.Tensor":
        import torch

        images = images_to_pil(media, self.name)
        prompts = check_prompts(prompts, len(images), self.name)
        out = []
        with torch.no_grad():
            for sl in batch_slices(len(images), self.batch_size):
                pixels = openai_clip_pixels(images[sl], self.image_size).to(self.device)
                image_embeds = self.vision(pixel_values=pixels).last_hidden_state  # [b, 1 + patches, width]
                text = self.tokenizer(
                    prompts[sl], padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
                )
                hidden = self.text(
                    input_ids=text["input_ids"].to(self.device),
                    attention_mask=text["attention_mask"].to(self.device),
                    encoder_hidden_states=image_embeds,
                    encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long, device=self.device),
                    is_decoder=False,
                ).last_hidden_state  # [b, 35, 768]
                reward = self.mlp.layers(hidden[:, 0].float())[:, 0]
                out.append((reward - REWARD_MEAN) / REWARD_STD)
        return torch.cat(out).float().cpu() if out else torch.zeros(0)

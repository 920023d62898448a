"""Build state dicts laid out exactly as the official ALBEF containers (docs/model.md §3.2), from the key patterns alone.

Every tensor gets a distinct fill so a test can check that each key landed in the right parameter.
"""

from __future__ import annotations

import torch

from albef.model.config import AlbefConfig


def vit_keys(cfg: AlbefConfig, prefix: str, grid_tokens: int) -> dict[str, tuple[int, ...]]:
    v = cfg.vision
    w, hidden = v.width, int(v.width * v.mlp_ratio)
    keys: dict[str, tuple[int, ...]] = {
        f"{prefix}.cls_token": (1, 1, w),
        f"{prefix}.pos_embed": (1, grid_tokens, w),
        f"{prefix}.patch_embed.proj.weight": (w, 3, v.patch_size, v.patch_size),
        f"{prefix}.patch_embed.proj.bias": (w,),
    }
    for i in range(v.depth):
        b = f"{prefix}.blocks.{i}"
        keys.update(
            {
                f"{b}.norm1.weight": (w,),
                f"{b}.norm1.bias": (w,),
                f"{b}.attn.qkv.weight": (3 * w, w),
                f"{b}.attn.qkv.bias": (3 * w,),
                f"{b}.attn.proj.weight": (w, w),
                f"{b}.attn.proj.bias": (w,),
                f"{b}.norm2.weight": (w,),
                f"{b}.norm2.bias": (w,),
                f"{b}.mlp.fc1.weight": (hidden, w),
                f"{b}.mlp.fc1.bias": (hidden,),
                f"{b}.mlp.fc2.weight": (w, hidden),
                f"{b}.mlp.fc2.bias": (w,),
            }
        )
    keys[f"{prefix}.norm.weight"] = (w,)
    keys[f"{prefix}.norm.bias"] = (w,)
    return keys


def bert_keys(cfg: AlbefConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    t = cfg.text
    h, inter = t.hidden_size, t.intermediate_size
    keys: dict[str, tuple[int, ...]] = {
        f"{prefix}.embeddings.position_ids": (1, t.max_position_embeddings),
        f"{prefix}.embeddings.word_embeddings.weight": (t.vocab_size, h),
        f"{prefix}.embeddings.position_embeddings.weight": (t.max_position_embeddings, h),
        f"{prefix}.embeddings.token_type_embeddings.weight": (t.type_vocab_size, h),
        f"{prefix}.embeddings.LayerNorm.weight": (h,),
        f"{prefix}.embeddings.LayerNorm.bias": (h,),
    }
    for layer in range(t.num_hidden_layers):
        b = f"{prefix}.encoder.layer.{layer}"
        blocks = ["attention"] + (["crossattention"] if layer >= t.fusion_layer else [])
        for blk in blocks:
            kv_in = t.encoder_width if blk == "crossattention" else h
            keys.update(
                {
                    f"{b}.{blk}.self.query.weight": (h, h),
                    f"{b}.{blk}.self.query.bias": (h,),
                    f"{b}.{blk}.self.key.weight": (h, kv_in),
                    f"{b}.{blk}.self.key.bias": (h,),
                    f"{b}.{blk}.self.value.weight": (h, kv_in),
                    f"{b}.{blk}.self.value.bias": (h,),
                    f"{b}.{blk}.output.dense.weight": (h, h),
                    f"{b}.{blk}.output.dense.bias": (h,),
                    f"{b}.{blk}.output.LayerNorm.weight": (h,),
                    f"{b}.{blk}.output.LayerNorm.bias": (h,),
                }
            )
        keys.update(
            {
                f"{b}.intermediate.dense.weight": (inter, h),
                f"{b}.intermediate.dense.bias": (inter,),
                f"{b}.output.dense.weight": (h, inter),
                f"{b}.output.dense.bias": (h,),
                f"{b}.output.LayerNorm.weight": (h,),
                f"{b}.output.LayerNorm.bias": (h,),
            }
        )
    return keys


def mlm_keys(cfg: AlbefConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    t = cfg.text
    h = t.hidden_size
    return {
        f"{prefix}.cls.predictions.bias": (t.vocab_size,),
        f"{prefix}.cls.predictions.transform.dense.weight": (h, h),
        f"{prefix}.cls.predictions.transform.dense.bias": (h,),
        f"{prefix}.cls.predictions.transform.LayerNorm.weight": (h,),
        f"{prefix}.cls.predictions.transform.LayerNorm.bias": (h,),
        f"{prefix}.cls.predictions.decoder.weight": (t.vocab_size, h),
        f"{prefix}.cls.predictions.decoder.bias": (t.vocab_size,),
    }


def head_keys(cfg: AlbefConfig, suffix: str = "") -> dict[str, tuple[int, ...]]:
    d, vw, th = cfg.embed_dim, cfg.vision.width, cfg.text.hidden_size
    keys = {
        f"vision_proj{suffix}.weight": (d, vw),
        f"vision_proj{suffix}.bias": (d,),
        f"text_proj{suffix}.weight": (d, th),
        f"text_proj{suffix}.bias": (d,),
    }
    return keys


def _fill(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i, (key, shape) in enumerate(shapes.items()):
        if key.endswith("position_ids"):
            out[key] = torch.arange(shape[1]).unsqueeze(0)
        elif (
            key.endswith("pos_embed")
            or len(shape) <= 1
            or shape[0] * (shape[1] if len(shape) > 1 else 1) < 5e5
        ):
            out[key] = torch.randn(shape, generator=gen) * 0.02
        else:  # big matrices: a distinct constant per key keeps generation fast
            out[key] = torch.full(shape, 1e-4 * (i + 1))
    return out


def official_state(cfg: AlbefConfig, container: str, queue_size: int = 256, seed: int = 0) -> dict:
    """``'flat'`` = a released retrieval file (flickr30k.pth / mscoco.pth); ``'pretrain'`` = ALBEF.pth."""
    tokens = cfg.vision.num_patches + 1
    if container == "flat":
        shapes: dict[str, tuple[int, ...]] = {"temp": ()}
        shapes.update(vit_keys(cfg, "visual_encoder", tokens))
        shapes.update(bert_keys(cfg, "text_encoder"))
        shapes.update(head_keys(cfg))
        shapes.update({"itm_head.weight": (2, cfg.text.hidden_size), "itm_head.bias": (2,)})
        state = _fill(shapes, seed)
        state["temp"] = torch.tensor(0.07)
        return state
    assert container == "pretrain"
    grid = (
        cfg.vision.image_res * 2 // 3 // cfg.vision.patch_size
    ) ** 2 + 1  # a 256 px file for a 384 px model
    shapes = {"temp": ()}
    shapes.update(vit_keys(cfg, "visual_encoder", grid))
    shapes.update(bert_keys(cfg, "text_encoder.bert"))
    shapes.update(mlm_keys(cfg, "text_encoder"))
    shapes.update(head_keys(cfg))
    shapes.update({"itm_head.weight": (2, cfg.text.hidden_size), "itm_head.bias": (2,)})
    shapes.update(vit_keys(cfg, "visual_encoder_m", grid))
    shapes.update(head_keys(cfg, "_m"))
    shapes.update(bert_keys(cfg, "text_encoder_m.bert"))
    shapes.update(mlm_keys(cfg, "text_encoder_m"))
    state = _fill(shapes, seed)
    state["temp"] = torch.tensor(0.07)
    state["image_queue"] = torch.nn.functional.normalize(torch.randn(cfg.embed_dim, queue_size), dim=0)
    state["text_queue"] = torch.nn.functional.normalize(torch.randn(cfg.embed_dim, queue_size), dim=0)
    state["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    # tied tensors, as in the saved files
    state["text_encoder.cls.predictions.decoder.weight"] = state[
        "text_encoder.bert.embeddings.word_embeddings.weight"
    ]
    state["text_encoder.cls.predictions.decoder.bias"] = state["text_encoder.cls.predictions.bias"]
    return {"model": state, "config": {"image_res": 256}, "epoch": 29}

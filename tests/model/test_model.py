"""Numerical behaviour of the ALBEF modules (docs/model.md §1, 5.5-5.7), checked against independent references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from albef.model.factory import create_model

CAPTIONS = ["a small red circle left of a large blue square", "two dogs", "a b c d e f g h", "x"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    m = create_model("albef-tiny")
    # non-trivial biases/LN so every term matters
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


@pytest.fixture(scope="module")
def inputs(model, tokenizer):
    torch.manual_seed(2)
    pixels = torch.randn(4, 3, 96, 96)
    ids, mask = (torch.from_numpy(a) for a in tokenizer(CAPTIONS))
    return pixels, ids, mask


def test_shapes_and_normalisation(model, inputs) -> None:
    pixels, ids, mask = inputs
    with torch.no_grad():
        iemb, itok = model.encode_image(pixels)
        temb, ttok = model.encode_text(ids, mask)
    assert iemb.shape == (4, 64) and itok.shape == (4, 37, 128)
    assert temb.shape == (4, 64) and ttok.shape == (4, 30, 128)
    assert torch.allclose(iemb.norm(dim=-1), torch.ones(4)) and torch.allclose(
        temb.norm(dim=-1), torch.ones(4)
    )


def test_multi_modal_equals_fusion_of_text(model, inputs) -> None:
    pixels, ids, mask = inputs
    with torch.no_grad():
        _, itok = model.encode_image(pixels)
        _, ttok = model.encode_text(ids, mask)
        fused = model.fusion(ttok, mask, itok)
        mm = model.multi_modal(ids, mask, itok)
    assert torch.equal(fused, mm)


def test_batch_of_one_equals_row_of_batch(model, inputs) -> None:
    pixels, ids, mask = inputs
    with torch.no_grad():
        iemb, itok = model.encode_image(pixels)
        temb, ttok = model.encode_text(ids, mask)
        logits = model.itm_logits(ttok, mask, itok)
        for i in range(4):
            e1, t1 = model.encode_image(pixels[i : i + 1])
            te1, tt1 = model.encode_text(ids[i : i + 1], mask[i : i + 1])
            l1 = model.itm_logits(tt1, mask[i : i + 1], t1)
            assert torch.allclose(e1, iemb[i : i + 1], atol=1e-6) and torch.allclose(
                t1, itok[i : i + 1], atol=1e-5
            )
            assert torch.allclose(te1, temb[i : i + 1], atol=1e-6) and torch.allclose(
                tt1, ttok[i : i + 1], atol=1e-5
            )
            assert torch.allclose(l1, logits[i : i + 1], atol=1e-5)


def test_eval_mode_is_deterministic(model, inputs) -> None:
    pixels, ids, mask = inputs
    with torch.no_grad():
        a = model.encode_image(pixels)[1], model.encode_text(ids, mask)[1]
        b = model.encode_image(pixels)[1], model.encode_text(ids, mask)[1]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_padding_length_changes_cls_only_by_noise(model, inputs) -> None:
    pixels, ids, mask = inputs
    longest = int(mask.sum(1).max())
    with torch.no_grad():
        _, itok = model.encode_image(pixels)
        e30, t30 = model.encode_text(ids, mask)
        el, tl = model.encode_text(ids[:, :longest], mask[:, :longest])
        l30 = model.itm_logits(t30, mask, itok)
        ll = model.itm_logits(tl, mask[:, :longest], itok)
    assert torch.allclose(e30, el, atol=1e-5) and torch.allclose(l30, ll, atol=1e-4)


def test_kv_cached_itm_equals_plain(model, inputs) -> None:
    pixels, ids, mask = inputs
    with torch.no_grad():
        _, itok = model.encode_image(pixels[:1])
        _, ttok = model.encode_text(ids, mask)
        plain = model.itm_logits(ttok, mask, itok.expand(4, -1, -1))
        cached = model.itm_logits_kv(ttok, mask, model.image_kv(itok))
    assert (plain - cached).abs().max() <= 1e-5


def test_text_mode_equals_huggingface_bert(model, inputs) -> None:
    """The text encoder (layers below fusion_layer) is plain BERT: compare with transformers' BertModel."""
    from transformers import BertConfig, BertModel

    _, ids, mask = inputs
    t = model.config.text
    hf = BertModel(
        BertConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            num_hidden_layers=t.fusion_layer,
            num_attention_heads=t.num_attention_heads,
            intermediate_size=t.intermediate_size,
            max_position_embeddings=t.max_position_embeddings,
            layer_norm_eps=t.layer_norm_eps,
            hidden_act="gelu",
            attn_implementation="eager",
        ),
        add_pooling_layer=False,
    ).eval()
    ours = {k: v for k, v in model.text_encoder.state_dict().items() if not k.startswith("cls.")}
    missing, unexpected = hf.load_state_dict(ours, strict=False)
    assert not missing or all("position_ids" in k for k in missing)
    assert all(".layer." in k and int(k.split(".")[2]) >= t.fusion_layer for k in unexpected)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model.text_encoder(ids, mask, mode="text")
    real = mask.bool()
    assert (ref[real] - got[real]).abs().max() < 1e-5


def _reference_fusion_layer(layer, x, mask, img, heads):
    """One fusion layer written from docs/model.md §1.2 with plain tensor ops."""

    def attn(block, q_in, kv_in, add_mask):
        b, n, h = q_in.shape
        d = h // heads

        def split(t):
            return t.view(b, -1, heads, d).transpose(1, 2)

        sa = block.self
        q = split(F.linear(q_in, sa.query.weight, sa.query.bias))
        k = split(F.linear(kv_in, sa.key.weight, sa.key.bias).expand(b, -1, -1))
        v = split(F.linear(kv_in, sa.value.weight, sa.value.bias).expand(b, -1, -1))
        s = q @ k.transpose(-1, -2) / math.sqrt(d)
        if add_mask is not None:
            s = s + add_mask
        ctx = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, h)
        out = F.linear(ctx, block.output.dense.weight, block.output.dense.bias)
        return F.layer_norm(
            out + q_in, (h,), block.output.LayerNorm.weight, block.output.LayerNorm.bias, 1e-12
        )

    ext = (1.0 - mask[:, None, None, :].float()) * -10000.0
    x = attn(layer.attention, x, x, ext)
    x = attn(layer.crossattention, x, img, None)
    inter = F.gelu(
        F.linear(x, layer.intermediate.dense.weight, layer.intermediate.dense.bias), approximate="none"
    )
    out = F.linear(inter, layer.output.dense.weight, layer.output.dense.bias)
    return F.layer_norm(
        out + x, (x.shape[-1],), layer.output.LayerNorm.weight, layer.output.LayerNorm.bias, 1e-12
    )


def test_fusion_and_itm_equal_spec_reference(model, inputs) -> None:
    pixels, ids, mask = inputs
    t = model.config.text
    with torch.no_grad():
        _, itok = model.encode_image(pixels)
        _, x = model.encode_text(ids, mask)
        ours = model.itm_logits(x, mask, itok)
        for layer in model.text_encoder.encoder.layer[t.fusion_layer :]:
            x = _reference_fusion_layer(layer, x, mask, itok, t.num_attention_heads)
        ref = F.linear(x[:, 0], model.itm_head.weight, model.itm_head.bias)
    assert (ours - ref).abs().max() < 1e-5


def test_vit_equals_spec_reference(model, inputs) -> None:
    """timm's ViT forward equals the official vit.py arithmetic (pre-norm blocks, eps 1e-6, exact GELU)."""
    pixels, _, _ = inputs
    vit = model.visual_encoder
    heads = model.config.vision.heads
    with torch.no_grad():
        x = vit.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = (
            torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            + vit.pos_embed[:, : x.shape[1] + 1]
        )
        for blk in vit.blocks:
            b, n, c = x.shape
            h = F.layer_norm(x, (c,), blk.norm1.weight, blk.norm1.bias, 1e-6)
            qkv = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(b, n, 3, heads, c // heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            a = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
            x = x + F.linear(
                (a @ v).transpose(1, 2).reshape(b, n, c), blk.attn.proj.weight, blk.attn.proj.bias
            )
            h = F.layer_norm(x, (c,), blk.norm2.weight, blk.norm2.bias, 1e-6)
            x = x + F.linear(
                F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)),
                blk.mlp.fc2.weight,
                blk.mlp.fc2.bias,
            )
        ref = F.layer_norm(x, (x.shape[-1],), vit.norm.weight, vit.norm.bias, 1e-6)
        emb, ours = model.encode_image(pixels)
        ref_emb = F.normalize(
            F.linear(ref[:, 0], model.vision_proj.weight, model.vision_proj.bias), dim=-1, eps=1e-12
        )
    assert (ours - ref).abs().max() < 1e-5
    assert (emb - ref_emb).abs().max() < 1e-6


def test_mlm_head_is_tied(tokenizer) -> None:
    m = create_model("albef-tiny", with_mlm=True)
    assert m.text_encoder.cls.predictions.decoder.weight is m.text_encoder.embeddings.word_embeddings.weight
    ids, mask = (torch.from_numpy(a) for a in tokenizer(["a red circle"]))
    with torch.no_grad():
        out = m.mlm_logits(ids, mask, m.encode_image(torch.randn(1, 3, 96, 96))[1])
    assert out.shape == (1, 30, 30522)
    with pytest.raises(RuntimeError):
        create_model("albef-tiny").mlm_logits(ids, mask, torch.zeros(1, 37, 128))

"""One training step's objectives on an ALBEF model: the module that DDP wraps (docs/model.md §2.1-2.5).

``AlbefObjective`` holds the online model, its momentum copies and the queues, and its ``forward`` returns
the losses of one batch in the official order: EMA update -> momentum features -> ITC (with distillation)
-> enqueue -> ITM with hard negatives -> MLM (pretraining only).

Modes: ``retrieval`` (idx positives against batch and queue, same-idx pairs masked for the hard negatives,
no temp clamp, no MLM) and ``pretrain`` (diagonal targets, diagonal masked, temp clamped to [0.001, 0.5],
MLM when enabled).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from albef.model.albef import ALBEF
from albef.model.text import CLS_ID, MASK_ID, PAD_ID
from albef.model.train import losses as L
from albef.model.train.momentum import FeatureQueues, MomentumEncoders

MODES = ("retrieval", "pretrain")


class AlbefObjective(nn.Module):
    def __init__(
        self,
        model: ALBEF,
        mode: str = "retrieval",
        queue_size: int = 65536,
        momentum: float = 0.995,
        distill: bool = True,
        itm: bool = True,
        mlm: bool = False,
        mlm_probability: float = 0.15,
        clamp_temp: bool | None = None,
        itm_in_warmup: bool = False,
        group_negatives: float = 0.0,
        itm_pairs_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if mlm and mode != "pretrain":
            raise ValueError("MLM is a pretraining objective (mode: pretrain)")
        if mlm and not model.with_mlm:
            raise ValueError("MLM needs a model built with the MLM head (with_mlm=True)")
        self.model = model
        self.mode = mode
        self.momentum = float(momentum)
        self.distill = bool(distill)
        self.use_itm = bool(itm)
        self.use_mlm = bool(mlm)
        self.mlm_probability = float(mlm_probability)
        self.clamp_temp = (mode == "pretrain") if clamp_temp is None else bool(clamp_temp)
        self.itm_in_warmup = bool(itm_in_warmup)
        if not 0.0 <= group_negatives <= 1.0:
            raise ValueError(f"group_negatives is a probability, not {group_negatives!r}")
        self.group_negatives = float(group_negatives)
        if itm_pairs_weight < 0:
            raise ValueError(f"itm_pairs_weight must be >= 0, not {itm_pairs_weight!r}")
        self.itm_pairs_weight = float(itm_pairs_weight)
        self.momentum_encoders = MomentumEncoders(model)
        self.queues = FeatureQueues(model.config.embed_dim, queue_size)

    def extra_state(self) -> dict[str, object]:
        """What a checkpoint holds besides the model: the momentum encoders and the queues."""
        return {"momentum": self.momentum_encoders.state_dict(), "queues": self.queues.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.momentum_encoders.load_state_dict(state["momentum"])
        self.queues.load_state_dict(state["queues"])

    def forward(
        self,
        image: Tensor,
        ids: Tensor,
        mask: Tensor,
        idx: Tensor,
        alpha: float,
        warmup: bool = False,
        group: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Losses of one batch: ``loss_itc``, ``loss_itm``, ``loss_mlm`` (0 when off), ``loss`` (their sum),
        plus detached diagnostics (``itm_acc``, ``n_neg``, the momentum features ``image_feat_m``/
        ``text_feat_m`` that were enqueued).

        ``warmup`` (training from scratch only, never in the official recipes): ITC contrasts the online
        features of the batch with each other, gradients through both sides, no momentum/queue/distillation.
        A random initialisation maps every input to nearly the same [CLS] feature; with momentum keys (no
        gradient) the ALBEF ITC then sits at ``log N`` for a long time, while the two-sided loss leaves that
        plateau within tens of steps. The trainer copies the online weights into the momentum encoders when
        the warm-up ends, so the exact ALBEF objective starts from informative keys.

        ``group`` [B] (optional, with ``group_negatives`` > 0): items of one group are known hard negatives of
        each other (different images, same group); each ITM negative is then, with that probability, a
        random group-mate instead of the ITC-mined one.
        """
        m = self.model
        B = image.shape[0]
        alpha = alpha if self.distill else 0.0
        if self.clamp_temp:
            with torch.no_grad():
                m.temp.clamp_(0.001, 0.5)
        image_feat, image_tokens = m.encode_image(image)
        text_feat, text_tokens = m.encode_text(ids, mask)
        if warmup:
            return self._warmup(image_feat, text_feat, idx, (text_tokens, mask, image_tokens), group)

        # ---- ITC: EMA update first, then the momentum features, then the loss, then the enqueue.
        with torch.no_grad():
            self.momentum_encoders.update(m, self.momentum)
            image_feat_m, image_tokens_m = self.momentum_encoders.image_feat(image)
            text_feat_m, _ = self.momentum_encoders.text_feat(ids, mask)
            q = self.queues
            image_feat_all = torch.cat([image_feat_m.t().float(), q.image_queue.clone()], dim=1)
            text_feat_all = torch.cat([text_feat_m.t().float(), q.text_queue.clone()], dim=1)
            if self.mode == "retrieval":
                idx_all = torch.cat([idx.view(1, -1), q.idx_queue.clone()], dim=1)
                targets = L.idx_targets(idx, idx_all)
            else:
                targets = L.diagonal_targets(B, image_feat_all.shape[1], device=image.device)
            sim_i2t_m = sim_t2i_m = None
            if alpha > 0:
                sim_i2t_m = image_feat_m.float() @ text_feat_all / m.temp
                sim_t2i_m = text_feat_m.float() @ image_feat_all / m.temp
        sim_i2t = image_feat.float() @ text_feat_all / m.temp
        sim_t2i = text_feat.float() @ image_feat_all / m.temp
        loss_itc = L.itc_loss(sim_i2t, sim_t2i, targets, sim_i2t_m, sim_t2i_m, alpha)
        self.queues.enqueue(image_feat_m, text_feat_m, idx)

        out: dict[str, Tensor] = {"loss_itc": loss_itc}
        zero = loss_itc.new_zeros(())
        # ---- ITM with in-batch hard negatives.
        if self.use_itm:
            loss_itm, itm_acc, n_neg, loss_pairs = self._itm(
                sim_i2t[:, :B],
                sim_t2i[:, :B],
                text_tokens,
                mask,
                image_tokens,
                idx if self.mode == "retrieval" else None,
                group,
            )
            out.update(loss_itm=loss_itm, itm_acc=itm_acc, n_neg=n_neg, loss_itm_pairs=loss_pairs)
        else:
            out.update(loss_itm=zero, itm_acc=zero, n_neg=zero, loss_itm_pairs=zero)
        # ---- MLM with distillation (pretraining).
        out["loss_mlm"] = self._mlm(ids, mask, image_tokens, image_tokens_m, alpha) if self.use_mlm else zero
        out["loss"] = out["loss_itc"] + out["loss_itm"] + out["loss_mlm"]
        out["image_feat_m"] = image_feat_m.detach()
        out["text_feat_m"] = text_feat_m.detach()
        return out

    def _warmup(
        self,
        image_feat: Tensor,
        text_feat: Tensor,
        idx: Tensor,
        tokens: tuple[Tensor, Tensor, Tensor] | None = None,
        group: Tensor | None = None,
    ) -> dict[str, Tensor]:
        B = image_feat.shape[0]
        positives_idx = idx if self.mode == "retrieval" else None
        sim_i2t = image_feat.float() @ text_feat.float().t() / self.model.temp
        targets = (
            L.idx_targets(idx, idx)
            if positives_idx is not None
            else L.diagonal_targets(B, B, image_feat.device)
        )
        loss_itc = L.itc_loss(sim_i2t, sim_i2t.t(), targets)
        zero = loss_itc.new_zeros(())
        out: dict[str, Tensor] = {"loss_itc": loss_itc, "loss_mlm": zero}
        if self.itm_in_warmup and self.use_itm and tokens is not None:
            text_tokens, mask, image_tokens = tokens
            loss_itm, itm_acc, n_neg, loss_pairs = self._itm(
                sim_i2t, sim_i2t.t(), text_tokens, mask, image_tokens, positives_idx, group
            )
            out.update(loss_itm=loss_itm, itm_acc=itm_acc, n_neg=n_neg, loss_itm_pairs=loss_pairs)
        else:  # by default no ITM yet: its negatives come from ITC similarities that mean little so far
            out.update(loss_itm=zero, itm_acc=zero, n_neg=zero, loss_itm_pairs=zero)
        out["loss"] = out["loss_itc"] + out["loss_itm"]
        out["image_feat_m"] = image_feat.detach()
        out["text_feat_m"] = text_feat.detach()
        return out

    def _itm(
        self,
        sim_i2t: Tensor,
        sim_t2i: Tensor,
        text_tokens: Tensor,
        mask: Tensor,
        image_tokens: Tensor,
        idx: Tensor | None,
        group: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """ALBEF's ITM loss (one positive and up to two negatives per row), plus, with ``itm_pairs_weight``,
        that weight times :meth:`_itm_pairs`; returns (loss, accuracy, number of negatives, pairs loss)."""
        m = self.model
        B = text_tokens.shape[0]
        pos_cls = m.fusion(text_tokens, mask, image_tokens)[:, 0, :]
        with torch.no_grad():
            positives = L.positive_mask(B, idx, device=text_tokens.device)
            # A negative image for each text (t2i weights), a negative text for each image (i2t weights).
            neg_image, valid_t = L.sample_hard_negatives(L.hard_negative_weights(sim_t2i, positives))
            neg_text, valid_i = L.sample_hard_negatives(L.hard_negative_weights(sim_i2t, positives))
            if group is not None and self.group_negatives > 0:
                mates = L.group_mates(group, positives)
                neg_image, valid_t = L.mix_group_negatives(neg_image, valid_t, mates, self.group_negatives)
                neg_text, valid_i = L.mix_group_negatives(neg_text, valid_i, mates, self.group_negatives)
        rows_t = valid_t.nonzero().squeeze(1)
        rows_i = valid_i.nonzero().squeeze(1)
        n_neg = int(rows_t.numel() + rows_i.numel())
        logits_parts = [pos_cls]
        if n_neg:
            # Texts [text_i ; text_neg_i] with images [image_neg_i ; image_i], rows without a negative left out.
            t_idx = torch.cat([rows_t, neg_text[rows_i]])
            v_idx = torch.cat([neg_image[rows_t], rows_i])
            neg_cls = m.fusion(text_tokens[t_idx], mask[t_idx], image_tokens[v_idx])[:, 0, :]
            logits_parts.append(neg_cls)
        logits = m.itm_head(torch.cat(logits_parts, dim=0))
        labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(n_neg, dtype=torch.long)]).to(
            logits.device
        )
        loss = L.itm_loss(logits, labels)
        acc = (logits.detach().argmax(dim=1) == labels).float().mean()
        pairs = loss.new_zeros(())
        if self.itm_pairs_weight > 0 and B > 1:
            pairs = self._itm_pairs(text_tokens, mask, image_tokens, positives)
            loss = loss + self.itm_pairs_weight * pairs
        return loss, acc, torch.tensor(float(n_neg)), pairs.detach()

    def _itm_pairs(
        self, text_tokens: Tensor, mask: Tensor, image_tokens: Tensor, positives: Tensor
    ) -> Tensor:
        """Contrastive ITM over every in-batch pair (a from-scratch aid, not in the official recipes).

        The match margin (ITM logit 1 - logit 0) of all B x B (text, image) pairs, a cross-entropy over the
        batch's images for each text and over its texts for each image, positives sharing the target mass.
        From random weights the binary ITM loss is first minimised by the class prior ("no match") and its
        gradient to the fusion layers then nearly vanishes; this loss has no such minimum, so the fused
        [CLS] must come to depend on the pair. Each image's cross-attention keys/values are computed once.
        """
        m = self.model
        B = text_tokens.shape[0]
        t_idx = torch.arange(B, device=text_tokens.device).repeat_interleave(B)
        v_idx = torch.arange(B, device=text_tokens.device).repeat(B)
        kv = [(k[v_idx], v[v_idx]) for k, v in m.image_kv(image_tokens)]
        logits = m.itm_head(m.fusion(text_tokens[t_idx], mask[t_idx], image_kv=kv)[:, 0, :])
        margin = (logits[:, 1] - logits[:, 0]).float().view(B, B)  # [text, image]
        targets = positives.float() / positives.float().sum(dim=1, keepdim=True)
        return (L.soft_cross_entropy(margin, targets) + L.soft_cross_entropy(margin.t(), targets.t())) / 2

    def _mlm(
        self, ids: Tensor, mask: Tensor, image_tokens: Tensor, image_tokens_m: Tensor, alpha: float
    ) -> Tensor:
        m = self.model
        vocab = m.config.text.vocab_size
        masked_ids, labels = L.mask_tokens(
            ids, vocab, self.mlm_probability, pad_id=PAD_ID, cls_id=CLS_ID, mask_id=MASK_ID
        )
        sel = labels != L.IGNORE_INDEX
        # The vocabulary projection only at masked positions: the loss ignores the others (exact, cheaper).
        hidden = m.text_encoder(masked_ids, mask, image_tokens=image_tokens, mode="multi_modal")
        logits = m.text_encoder.cls(hidden[sel])
        logits_m = None
        if alpha > 0:
            with torch.no_grad():
                enc_m = self.momentum_encoders.text_encoder_m
                hidden_m = enc_m(masked_ids, mask, image_tokens=image_tokens_m, mode="multi_modal")
                logits_m = enc_m.cls(hidden_m[sel])
        return L.mlm_loss(logits, labels[sel], logits_m, alpha)

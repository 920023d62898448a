"""The official retrieval evaluation: itm_eval ranks, score matrices vs direct ITM calls, R@1-vs-K, `albef eval`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from albef.model.train.evaluate import (
    FILL,
    compute_features,
    evaluate,
    itm_eval,
    restrict_k,
    score_matrices,
)

# ----------------------------------------------------------------------------------------- itm_eval


def _scores_with_ranks(n_cols: int, gts: list[list[int]], wanted: list[int], seed: int) -> np.ndarray:
    """Rows whose best ground-truth column lands exactly at position wanted[r] (other GTs further down)."""
    rng = np.random.default_rng(seed)
    rows = []
    for gt, rank in zip(gts, wanted, strict=True):
        others = [c for c in range(n_cols) if c not in gt]
        assert rank <= len(others)
        rng.shuffle(others)
        order = others[:rank] + [gt[0]]
        tail = others[rank:] + list(gt[1:])
        rng.shuffle(tail)
        order += tail
        row = np.empty(n_cols, dtype=np.float32)
        row[order] = np.linspace(10, -10, n_cols)  # strictly descending along `order`
        assert min(int(np.where(np.argsort(-row) == g)[0][0]) for g in gt) == rank
        rows.append(row)
    return np.stack(rows)


def test_itm_eval_known_ranks() -> None:
    n_img, n_txt = 4, 14
    img2txt = [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9], [10, 11, 12, 13]]
    txt2img = [i for i, ts in enumerate(img2txt) for _ in ts]
    i2t = _scores_with_ranks(n_txt, img2txt, wanted=[0, 3, 7, 10], seed=0)
    t2i_ranks = [0, 0, 1, 0, 2, 3, 0, 1, 0, 3, 0, 0, 0, 2]
    t2i = _scores_with_ranks(n_img, [[g] for g in txt2img], wanted=t2i_ranks, seed=1)
    res = itm_eval(i2t, t2i, txt2img, img2txt)
    # image->text ranks 0, 3, 7, 10 -> R@1 1/4, R@5 2/4, R@10 3/4
    assert res["txt_r1"] == pytest.approx(25.0)
    assert res["txt_r5"] == pytest.approx(50.0)
    assert res["txt_r10"] == pytest.approx(75.0)
    # text->image: 8 of 14 at rank 0, all < 5
    assert res["img_r1"] == pytest.approx(100 * 8 / 14)
    assert res["img_r5"] == pytest.approx(100.0) and res["img_r10"] == pytest.approx(100.0)
    assert res["txt_r_mean"] == pytest.approx(50.0)
    assert res["img_r_mean"] == pytest.approx((100 * 8 / 14 + 200) / 3)
    assert res["r_mean"] == pytest.approx((res["txt_r_mean"] + res["img_r_mean"]) / 2)


def _official_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """Retrieval.py's loop, verbatim in spirit (valid when there are no ties)."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        rank = 1e20
        for i in img2txt[index]:
            tmp = np.where(inds == i)[0][0]
            rank = min(rank, tmp)
        ranks[index] = rank
    tr = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    return tr + ir


def test_itm_eval_matches_the_official_loop_on_random_scores() -> None:
    rng = np.random.default_rng(3)
    n_img = 30
    img2txt, txt2img = [], []
    for i in range(n_img):
        n = int(rng.integers(1, 6))
        img2txt.append(list(range(len(txt2img), len(txt2img) + n)))
        txt2img += [i] * n
    i2t = rng.normal(size=(n_img, len(txt2img))).astype(np.float32)
    t2i = rng.normal(size=(len(txt2img), n_img)).astype(np.float32)
    res = itm_eval(i2t, t2i, txt2img, img2txt)
    ours = [res[k] for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")]
    assert ours == pytest.approx(_official_itm_eval(i2t, t2i, txt2img, img2txt))


def test_ties_and_edge_cases() -> None:
    # Ties follow albef.model.ranking (tests/model/test_ranking.py): ascending index order.
    # GT column 2 ties with column 1 at the top: it ranks second (position 1); GT column 1 ranks first.
    tie = np.array([[0.0, 5.0, 5.0]], dtype=np.float32)
    t2i = np.zeros((3, 1), dtype=np.float32)
    assert itm_eval(tie, t2i, [0, 0, 0], [[2]])["txt_r1"] == 0.0
    assert itm_eval(tie, t2i, [0, 0, 0], [[1]])["txt_r1"] == 100.0
    # An image without ground-truth texts is a miss, as in the official code.
    res = itm_eval(np.zeros((2, 1), np.float32), np.zeros((1, 2), np.float32), [0], [[0], []])
    assert res["txt_r10"] == 50.0
    with pytest.raises(ValueError, match="do not match"):
        itm_eval(np.zeros((2, 3)), np.zeros((3, 2)), [0, 1], [[0], [1]])


# ----------------------------------------------------------------------------------------- score matrices


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from albef.model.data.synth import generate

    out = tmp_path_factory.mktemp("evalsynth") / "ds"
    generate(out, 40, seed=5, size=48, progress=False)  # 10 groups: test = 1 group of 4 images
    return out


@pytest.fixture(scope="module")
def small_eval(synth_set: Path):
    """Eval set of 6 images (the first 3 of val and of test) and 2 captions each: hard negatives included."""
    from albef.model.data.annotations import EvalSet, load_eval_set

    val, test = load_eval_set(synth_set / "val.json"), load_eval_set(synth_set / "test.json")
    es = EvalSet()
    for part in (val.subset(3), test.subset(3)):
        for i, img in enumerate(part.images):
            es.images.append(img)
            es.img2txt.append([])
            for t in part.img2txt[i][:2]:
                es.img2txt[-1].append(len(es.texts))
                es.texts.append(part.texts[t])
                es.txt2img.append(len(es.images) - 1)
    return es


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path):
    from albef.model.factory import create_model

    return create_model(None, tiny_checkpoint)


@pytest.fixture(scope="module")
def feats(model, small_eval, tokenizer):
    return compute_features(
        model, small_eval.images, small_eval.texts, tokenizer, batch_size=4, progress=False
    )


def test_features_match_direct_encoders(model, small_eval, tokenizer, feats) -> None:
    from albef.model.image import preprocess

    cfg = model.config
    assert feats["image_tokens"].shape[0] == len(small_eval.images)
    assert feats["text_tokens"].shape[:2] == (len(small_eval.texts), 30)
    with torch.no_grad():
        pix = torch.from_numpy(preprocess(small_eval.images[:2], cfg.vision.image_res, cfg.mean, cfg.std))
        emb, _ = model.encode_image(pix)
        ids, mask = tokenizer(small_eval.texts[-3:])
        temb, _ = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
    torch.testing.assert_close(feats["image_emb"][:2], emb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feats["text_emb"][-3:], temb, atol=1e-5, rtol=1e-5)
    assert torch.equal(feats["text_mask"][-3:], torch.from_numpy(mask))


def test_score_matrices_top_k_equal_direct_itm_calls(model, feats) -> None:
    k = 3
    model.train()  # evaluation must switch to eval mode (no dropout) and restore the caller's mode
    sm = score_matrices(model, feats, k, batch_size=5, progress=False)
    assert model.training
    model.eval()
    n_img, n_txt = sm.sims.shape
    np.testing.assert_allclose(sm.sims, (feats["image_emb"] @ feats["text_emb"].T).numpy(), atol=1e-6)
    assert sm.i2t.shape == (n_img, n_txt) and sm.t2i.shape == (n_txt, n_img)
    # All shortlisted pairs of both directions, scored directly in one itm_logits call.
    pairs = [(t, i, "i2t") for i in range(n_img) for t in np.argsort(-sm.sims[i], kind="stable")[:k]]
    pairs += [(t, i, "t2i") for t in range(n_txt) for i in np.argsort(-sm.sims[:, t], kind="stable")[:k]]
    t_idx, i_idx = [p[0] for p in pairs], [p[1] for p in pairs]
    with torch.no_grad():
        direct = model.itm_logits(
            feats["text_tokens"][t_idx], feats["text_mask"][t_idx], feats["image_tokens"][i_idx]
        )[:, 1].numpy()
    got = np.array([sm.i2t[i, t] if d == "i2t" else sm.t2i[t, i] for t, i, d in pairs])
    np.testing.assert_allclose(got, direct, atol=1e-5, rtol=1e-5)
    # Exactly the shortlist is scored; everything else is the -100 fill.
    assert (sm.i2t != FILL).sum() == n_img * k and (sm.t2i != FILL).sum() == n_txt * k
    assert all(sm.i2t[i, t] != FILL for t, i, d in pairs if d == "i2t")
    assert all(sm.t2i[t, i] != FILL for t, i, d in pairs if d == "t2i")
    # Without the image K/V cache (per-image K/V for i2t, plain itm_logits for t2i): the same numbers.
    plain = score_matrices(model, feats, k, batch_size=5, progress=False, kv_cache_bytes=0)
    np.testing.assert_allclose(plain.i2t, sm.i2t, atol=1e-5)
    np.testing.assert_allclose(plain.t2i, sm.t2i, atol=1e-5)


def test_smaller_k_derived_equals_a_separate_run(model, feats, small_eval, tokenizer) -> None:
    full = score_matrices(model, feats, 5, batch_size=8, progress=False)
    separate = score_matrices(model, feats, 2, batch_size=8, progress=False)
    derived = restrict_k(full, 2)
    np.testing.assert_array_equal(derived.i2t == FILL, separate.i2t == FILL)
    np.testing.assert_allclose(derived.i2t, separate.i2t, atol=1e-5)
    np.testing.assert_allclose(derived.t2i, separate.t2i, atol=1e-5)
    args = (small_eval.txt2img, small_eval.img2txt)
    assert itm_eval(derived.i2t, derived.t2i, *args) == itm_eval(separate.i2t, separate.t2i, *args)
    with pytest.raises(ValueError):
        restrict_k(separate, 5)

    report = evaluate(
        model, small_eval, tokenizer, k_test=2, ks_for_plot=[1, 2, 5], batch_size=8, progress=False
    )
    assert report["r1_vs_k"]["k"] == [1, 2, 5]
    sep = itm_eval(separate.i2t, separate.t2i, *args)
    assert report["itm"] == pytest.approx(sep)
    assert report["r1_vs_k"]["txt_r1"][1] == pytest.approx(sep["txt_r1"])
    assert report["itc"] == pytest.approx(itm_eval(full.sims, full.sims.T, *args))
    k5 = itm_eval(full.i2t, full.t2i, *args)
    assert report["r1_vs_k"]["img_r1"][2] == pytest.approx(k5["img_r1"])
    assert report["n_images"] == 6 and report["n_texts"] == len(small_eval.texts)


# ----------------------------------------------------------------------------------------- albef eval


def test_albef_eval_end_to_end(synth_set: Path, tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from albef.cli import main

    out, plot = tmp_path / "report.json", tmp_path / "r1.png"
    argv = ["eval", "--checkpoint", str(tiny_checkpoint), "--data", str(synth_set / "test.json"),
            "--k-test", "4", "--batch-size", "8", "--out", str(out), "--plot", str(plot), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "ITC only" in text and "ITC+ITM (k=4)" in text and "r_mean" in text
    report = json.loads(out.read_text())
    test = json.loads((synth_set / "test.json").read_text())
    assert report["n_images"] == len(test) and report["n_texts"] == sum(len(e["caption"]) for e in test)
    for table in ("itc", "itm"):
        assert set(report[table]) >= {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"}
        assert all(0.0 <= v <= 100.0 for v in report[table].values())
    assert report["k_test"] == 4 and report["r1_vs_k"]["k"] == [1, 2, 4]
    # synthetic data (scenes.json beside the annotations): the caption-truth metrics come too
    truth = report["truth"]
    for table in ("itc", "itm"):
        assert set(truth[table]) == {"t2i_p1", "t2i_p5", "i2t_p1", "i2t_p5"}
        assert all(0.0 <= v <= 100.0 for v in truth[table].values())
    assert truth["swap"]["cases"] > 0 and 0 < truth["swap"]["chance"] <= 50.0
    assert "caption truth (%)" in text and "swap suite:" in text
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r1.png", "report.json"]  # no temp files left

    assert main(["eval", "--checkpoint", str(tmp_path / "none"), "--data", str(synth_set / "test.json")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert main([*argv[:3], "--data", str(synth_set / "test.json"), "--k-test", "0"]) == 2
    assert "--k-test" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "nope.png", "caption": ["x"]}]))
    assert main([*argv[:3], "--data", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert "image file not found" in err and len(err.splitlines()) == 1

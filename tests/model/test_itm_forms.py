"""The ITM graphs' exact savings (albef.model.itm_flops, the adapters in albef.model.export_adapters): the
bilinear cross-attention, the [CLS]-only last layer, packed image->text texts, trimmed and shared texts, all
equal to the plain ``model.itm_logits`` within 1e-4, on albef-tiny and on the base configuration. The base
configuration runs at 64 px (17 image tokens instead of 577; widths, heads and depth as in the paper) so that
its tests take seconds; the bench exports it at 384 px, where the export's own validation holds the graphs to
the same bound (bench/results/rerank.json)."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

TEXTS = [
    "a small red circle left of a large blue square",
    "a green triangle above a yellow circle and there is a large purple square below a small red circle",
    "purple",
    "there is a yellow triangle below a blue triangle",
]
LONG = " ".join(["a small red circle left of a large blue square"] * 3)  # 30 tokens after truncation


@pytest.fixture(scope="module", params=[("albef-tiny", None), ("albef-base", 64)], ids=["tiny", "base-64px"])
def model(request: pytest.FixtureRequest):
    import torch

    from albef.model.factory import create_model

    torch.manual_seed(0)
    name, res = request.param
    return create_model(name, image_res=res).eval()


def _inputs(model, seed: int = 3) -> dict:
    from albef.model.export_adapters import example_inputs

    # ragged real lengths, the full one included; the features are the model's own
    return example_inputs(model, batch=4, seed=seed, lengths=[30, 17, 9, 1])


def test_every_form_equals_the_plain_path(model) -> None:
    import torch

    from albef.model.export_adapters import ImageKVAdapter, ItmAdapter, ItmKVAdapter

    ex = _inputs(model)
    tok, mask, img = ex["text_tokens"], ex["attention_mask"], ex["image_tokens"]
    with torch.no_grad():
        pairs = model.itm_logits(tok, mask, img)
        one_text = model.itm_logits(tok[1:2].expand(4, -1, -1), mask[1:2].expand(4, -1), img)
        one_image = model.itm_logits(tok, mask, img[:1].expand(4, -1, -1))
        for form in ("kv", "bilinear"):
            adapter = ItmAdapter(model, form).eval()
            assert (adapter(tok, mask, img) - pairs).abs().max() < 1e-4
            # one text shared by the images, at its full padded length and trimmed to its 17 real tokens
            assert (adapter(tok[1:2], mask[1:2], img) - one_text).abs().max() < 1e-4
            assert (adapter(tok[1:2, :17], mask[1:2, :17], img) - one_text).abs().max() < 1e-4
        kv = ImageKVAdapter(model)(img[:1])
        assert (ItmKVAdapter(model)(tok, mask, *kv) - one_image).abs().max() < 1e-4
        # packing follows the mask, holes included, as the plain path's attention mask does
        holes = mask.clone()
        holes[0, 3:7] = 0
        holes[1, 10] = 0
        ref = model.itm_logits(tok, holes, img[:1].expand(4, -1, -1))
        assert (ItmKVAdapter(model)(tok, holes, *kv) - ref).abs().max() < 1e-4
        assert (ref - one_image).abs().max() > 1e-3  # the holes changed the answer: the check could fail
    assert pairs[:, 1].std() > 1e-3 and one_text[:, 1].std() > 1e-3  # the logits depend on the pair


def test_the_cost_model_counts_what_the_adapters_compute(model) -> None:
    """Every matrix product of the adapters, counted by torch's FLOP counter, equals albef.model.itm_flops."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from albef.model.export_adapters import ImageKVAdapter, ItmAdapter, ItmKVAdapter
    from albef.model.itm_flops import (
        dims_of,
        i2t_query_macs,
        image_kv_macs,
        official_pair_macs,
        t2i_query_macs,
    )

    d = dims_of(model.config)
    ex = _inputs(model)
    tok, mask, img = ex["text_tokens"], ex["attention_mask"], ex["image_tokens"]

    def flops(fn, *args) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn(*args)
        return counter.get_total_flops()

    for form in ("kv", "bilinear"):
        got = flops(ItmAdapter(model, form), tok[2:3, :9], mask[2:3, :9], img)
        assert got == t2i_query_macs(d, form, 9, 4).flops
    lengths = [int(n) for n in mask[:, :17].sum(1)]
    kv = ImageKVAdapter(model)(img[:1])
    assert (
        flops(ItmKVAdapter(model), tok[:, :17], mask[:, :17], *kv)
        == i2t_query_macs(d, lengths, include_image_kv=False).flops
    )
    assert flops(ImageKVAdapter(model), img[:1]) == image_kv_macs(d).flops
    assert flops(model.itm_logits, tok, mask, img) == official_pair_macs(d).scaled(4).flops


def test_base_costs_and_which_form_each_configuration_exports() -> None:
    from albef.model.config import AlbefConfig
    from albef.model.export_adapters import itm_forms
    from albef.model.itm_flops import (
        bilinear_max_length,
        dims_of,
        i2t_query_macs,
        image_kv_macs,
        official_pair_macs,
        t2i_query_macs,
    )

    configs = {
        name: AlbefConfig.from_dict(json.loads((Path("model/configs") / f"{name}.json").read_text()))
        for name in ("albef-base", "albef-tiny", "albef-tiny-synth")
    }
    base = dims_of(configs["albef-base"])
    official = official_pair_macs(base)
    # the figures: 11.5 GFLOP a pair, of which the per-pair image K/V are about 70%
    assert official.flops / 1e9 == pytest.approx(11.48, abs=0.01)
    assert image_kv_macs(base).flops / official.flops == pytest.approx(0.711, abs=0.005)
    # bilinear is cheaper than K/V below d = 64 tokens: always, at base; the tiny models switch at 19 and 12
    assert bilinear_max_length(base) == 30
    assert [bilinear_max_length(dims_of(configs[n])) for n in ("albef-tiny", "albef-tiny-synth")] == [19, 12]
    forms = {n: itm_forms(SimpleNamespace(config=c)) for n, c in configs.items()}  # type: ignore[arg-type]
    assert forms["albef-base"] == {"itm": "bilinear"}
    assert forms["albef-tiny"] == {"itm": "kv", "itm_short": {"form": "bilinear", "max_length": 19}}
    # a 12-token text against 32 images: about a fifth of the official work; image->text about a ninth
    t2i = t2i_query_macs(base, "bilinear", 12, 32).flops / (32 * official.flops)
    i2t = i2t_query_macs(base, [12] * 32).flops / (32 * official.flops)
    assert 0.15 < t2i < 0.25 and 0.08 < i2t < 0.15
    assert t2i_query_macs(base, "kv", 12, 32).flops > 3 * t2i_query_macs(base, "bilinear", 12, 32).flops


# -- the exported graphs, through the runtime -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint: Path):
    from albef.model.factory import create_model

    return create_model(None, tiny_checkpoint).eval()


def test_runtime_trims_shares_the_text_and_picks_the_form(tiny_bundle: Path, tiny_model) -> None:
    import torch

    from albef.model.runtime import Bundle

    bundle = Bundle.load(tiny_bundle)
    assert bundle.itm_forms == {"itm": "kv", "itm_short": {"form": "bilinear", "max_length": 19}}
    rng = np.random.default_rng(0)
    _, img = bundle.encode_pixels(rng.standard_normal((5, 3, 96, 96)).astype(np.float32))
    _, tok, mask = bundle.encode_texts([*TEXTS, LONG])
    lengths = mask.sum(1)
    assert tok.shape[1] == 30 and lengths.max() == 30 and lengths.min() < 10
    assert bundle.itm_role(int(lengths[0])) == "itm_short" and bundle.itm_role(30) == "itm"
    t, m, x = (torch.from_numpy(a) for a in (tok, mask, img))
    with torch.no_grad():
        for j in range(
            len(lengths)
        ):  # each text against every image: itm_short for short texts, itm for LONG
            ref = tiny_model.itm_logits(t[j : j + 1].expand(5, -1, -1), m[j : j + 1].expand(5, -1), x).numpy()
            got = bundle.itm_scores(tok[j : j + 1], mask[j : j + 1], img)
            assert got.shape == (5, 2) and np.abs(got - ref).max() < 1e-4
        ref = tiny_model.itm_logits(t, m, x).numpy()
        assert np.abs(bundle.itm_scores(tok, mask, img) - ref).max() < 1e-4  # pairs, one row each
        ref = tiny_model.itm_logits(t, m, x[:1].expand(5, -1, -1)).numpy()
    assert np.abs(bundle.itm_scores_for_image(img[:1], tok, mask) - ref).max() < 1e-4
    # the short texts alone are trimmed to their longest (fewer columns than the 30 they are padded to)
    short = bundle.itm_scores_for_image(img[:1], tok[:4], mask[:4])
    assert np.abs(short - ref[:4]).max() < 1e-4 and lengths[:4].max() < 30
    bad = mask.copy()
    bad[1, 0] = 0
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        bundle.itm_scores_for_image(img[:1], tok, bad)
    with pytest.raises(ValueError, match="3 texts but 5 images"):
        bundle.itm_scores(tok[:3], mask[:3], img)


def _official_graphs(model, out: Path, ex) -> None:
    """itm.onnx and itm_kv.onnx as format-2 bundles held them: the plain model paths, traced."""
    import torch
    from torch import nn

    from albef.model.export_adapters import ImageKVAdapter, kv_names

    class Itm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, t, m, x):
            return self.model.itm_logits(t, m, x)

    class ItmKV(Itm):
        def forward(self, t, m, *kv):
            pairs = [(kv[2 * i], kv[2 * i + 1]) for i in range(len(kv) // 2)]
            return self.model.itm_logits_kv(t, m, pairs)

    kvn = kv_names(model)
    text = {0: "batch", 1: "length"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kv = [a[:1].contiguous() for a in ImageKVAdapter(model)(ex["image_tokens"])]
        args = (ex["text_tokens"], ex["attention_mask"])
        for name, mod, inputs, extra in (
            ("itm.onnx", Itm(), (*args, ex["image_tokens"]), {"image_tokens": {0: "image_batch"}}),
            ("itm_kv.onnx", ItmKV(), (*args, *kv), {n: {0: "kv_batch"} for n in kvn}),
        ):
            names = ["text_tokens", "text_mask", *(["image_tokens"] if name == "itm.onnx" else kvn)]
            torch.onnx.export(
                mod.eval(),
                inputs,
                str(out / name),
                input_names=names,
                output_names=["itm_logits"],
                dynamic_axes={"text_tokens": text, "text_mask": text, "itm_logits": {0: "batch"}, **extra},
                opset_version=17,
                dynamo=False,
            )


def test_a_format_2_bundle_still_loads_and_gives_the_same_logits(
    tiny_bundle: Path, tiny_model, tmp_path: Path
) -> None:
    from albef.model.export_adapters import example_inputs
    from albef.model.runtime import Bundle, bundle_id_from_files

    old = tmp_path / "format2"
    shutil.copytree(tiny_bundle, old)
    _official_graphs(tiny_model, old, example_inputs(tiny_model, batch=2))
    for name in ("itm_short.onnx", "itm_short.int8.onnx"):
        (old / name).unlink()
    manifest = json.loads((old / "manifest.json").read_text())
    manifest.pop("itm_forms")
    manifest["format_version"] = 2
    manifest["io"].pop("itm_short")
    for v in manifest["variants"].values():
        v["files"].pop("itm_short")
    files = {
        f.name: {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "bytes": f.stat().st_size}
        for f in sorted(old.iterdir())
        if f.name != "manifest.json"
    }
    manifest.update(files=files, bundle_id=bundle_id_from_files(files))
    (old / "manifest.json").write_text(json.dumps(manifest))

    new, legacy = Bundle.load(tiny_bundle), Bundle.load(old)
    assert legacy.itm_forms is None and "itm_short" not in legacy._files
    rng = np.random.default_rng(1)
    _, img = new.encode_pixels(rng.standard_normal((3, 3, 96, 96)).astype(np.float32))
    _, tok, mask = new.encode_texts(TEXTS)
    one_text = legacy.itm_scores(tok[:1], mask[:1], img)  # repeated for its graph, trimmed
    assert one_text.shape == (3, 2) and np.abs(one_text - new.itm_scores(tok[:1], mask[:1], img)).max() < 1e-4
    a = legacy.itm_scores_for_image(img[:1], tok, mask)
    assert np.abs(a - new.itm_scores_for_image(img[:1], tok, mask)).max() < 1e-4
    # and the trimming is exact for the official graphs too: the same as their untrimmed, padded call
    sess = legacy.session("itm_kv")
    feeds = {"text_tokens": tok, "text_mask": mask}
    for i, arr in enumerate(legacy.image_kv(img[:1])):
        feeds[f"{'kv'[i % 2]}{i // 2}"] = arr
    assert np.abs(sess.run(None, feeds)[0] - a).max() < 1e-5


def test_rankings_of_the_synthetic_split_are_unchanged(tokenizer, tmp_path: Path) -> None:
    """The shipped, trained albef-tiny-synth on a synthetic test split: the runtime's re-ranked order (new
    graphs) is the torch evaluation's (the plain model), query by query, in both directions."""
    from albef.model.data.annotations import load_eval_set
    from albef.model.data.synth import generate
    from albef.model.export import export_bundle, runtime_score_matrices
    from albef.model.factory import create_model
    from albef.model.ranking import rank
    from albef.model.runtime import Bundle
    from albef.model.train.evaluate import compute_features, score_matrices

    ckpt = Path("model/weights/albef-tiny-synth")
    model = create_model(None, ckpt).eval()
    out = tmp_path / "bundle"
    export_bundle(model, out, variants=["fp32"], checkpoint=ckpt, progress=False, explain=False)
    generate(tmp_path / "synth", 200, seed=11, size=64, progress=False)
    es = load_eval_set(tmp_path / "synth" / "test.json")
    k = 8
    sims, i2t, t2i = runtime_score_matrices(Bundle.load(out), es.images, es.texts, k)
    feats = compute_features(model, es.images, es.texts, tokenizer, progress=False)
    ref = score_matrices(model, feats, k, progress=False)
    compared = rows = 0
    for got, want in ((i2t, ref.i2t), (t2i, ref.t2i)):
        assert np.array_equal(got == -100, want == -100) and np.abs(got - want).max() < 1e-4
        for row_got, row_want in zip(got, want, strict=True):
            order = rank(row_want, k=k)
            rows += 1
            if np.all(np.abs(np.diff(row_want[order])) > 2e-4):  # no near-tie the rounding could flip
                assert list(rank(row_got, k=k)) == list(order)
                compared += 1
    assert len(es.images) >= 10 and len(es.texts) > 3 * len(es.images)
    assert compared >= 0.8 * rows  # whole re-ranked orders, not only a few rows

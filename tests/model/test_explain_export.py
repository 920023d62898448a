"""The explain graph (albef.model.export_explain): ONNX Runtime against torch autograd on the eager model, the
layer rule, the manifest section, and bundles without it (format 1, ``--no-explain``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.explain import format1_copy, torch_gradcam

TOL = 1e-4  # the bound on |ONNX - torch autograd|


def _pairs(model, n: int = 3, seed: int = 11):
    """(text tokens, mask, image tokens) of ``n`` single pairs with ragged texts (full, shorter, short)."""
    from albef.model.export import example_inputs

    ex = example_inputs(model, batch=n, seed=seed)
    assert ex["attention_mask"].sum(1).unique().numel() == n  # the padding really differs per pair
    return [
        (ex["text_tokens"][i : i + 1], ex["attention_mask"][i : i + 1], ex["image_tokens"][i : i + 1])
        for i in range(n)
    ]


def test_the_graph_equals_torch_autograd(tiny_bundle: Path, tiny_checkpoint: Path) -> None:
    """The ONNX graph's attention, gradient and logits against the eager model's own cross-attention
    probabilities and their autograd gradient (retain_grad + backward), and the Grad-CAM built from them."""
    from albef.model.factory import create_model
    from albef.model.runtime import Bundle
    from albef.service.explain import gradcam

    model = create_model(None, tiny_checkpoint).eval()
    bundle = Bundle.load(tiny_bundle)
    layer = bundle.explain_info["fusion_layer"]
    diffs = {"attention": 0.0, "grad": 0.0, "logits": 0.0, "gradcam": 0.0}
    for text, mask, image in _pairs(model):
        ref = torch_gradcam(model, layer, text, mask, image)
        got = bundle.explain(text.numpy(), mask.numpy(), image.numpy())
        # the attention really is the eager model's: rows of probabilities over the image tokens, CLS included
        np.testing.assert_allclose(ref["attention"].sum(-1), 1.0, atol=1e-5)
        assert got["attention"].shape == (1, *ref["attention"].shape)
        diffs["attention"] = max(
            diffs["attention"], float(np.abs(got["attention"][0] - ref["attention"]).max())
        )
        diffs["grad"] = max(diffs["grad"], float(np.abs(got["attention_grad"][0] - ref["grad"]).max()))
        diffs["logits"] = max(diffs["logits"], float(np.abs(got["itm_logits"][0] - ref["logits"]).max()))
        maps = gradcam(got["attention"], got["attention_grad"], mask.numpy())
        assert maps.per_token.shape == ref["per_token"].shape and maps.side == 6
        diffs["gradcam"] = max(
            diffs["gradcam"],
            float(np.abs(maps.per_token - ref["per_token"]).max()),
            float(np.abs(maps.overall - ref["overall"]).max()),
        )
        # a gradient that is there: not all zero, with both signs (the clamp matters)
        assert np.abs(ref["grad"]).max() > 1e-3 and (ref["grad"] < 0).any() and (ref["grad"] > 0).any()
        assert np.abs(maps.overall).max() > 1e-6
    print(f"max |ONNX - torch autograd|: {diffs}")  # noqa: T201 - the figure the report quotes
    assert all(v <= TOL for v in diffs.values()), diffs
    assert diffs["attention"] <= 1e-5
    # the manifest's own validation figures (measured by the export) are within the bound too
    val = bundle.explain_info["validation"]
    assert val["tolerance"] == TOL and max(val["attention"], val["attention_grad"], val["itm_logits"]) <= TOL


def test_another_layer_is_exported_and_checked(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """``export_explain(layer=1)``: the last fusion layer's map, different from the default one's, and again
    equal to torch autograd at that layer (run through ONNX Runtime directly). It shows why the default is
    never the last layer: only the [CLS] row has a gradient there."""
    import onnxruntime as ort

    from albef.model.export_explain import export_explain
    from albef.model.factory import create_model

    model = create_model(None, tiny_checkpoint).eval()
    section = export_explain(model, tmp_path, layer=1)
    assert section["fusion_layer"] == 1 and section["encoder_layer"] == model.config.text.fusion_layer + 1
    sess = ort.InferenceSession(str(tmp_path / "explain.onnx"), providers=["CPUExecutionProvider"])
    text, mask, image = _pairs(model, n=2)[1]
    feeds = {"text_tokens": text.numpy(), "text_mask": mask.numpy(), "image_tokens": image.numpy()}
    _logits, attention, grad = sess.run(None, feeds)
    ref0, ref1 = (torch_gradcam(model, layer, text, mask, image) for layer in (0, 1))
    assert (
        np.abs(attention[0] - ref1["attention"]).max() <= TOL and np.abs(grad[0] - ref1["grad"]).max() <= TOL
    )
    assert np.abs(ref0["attention"] - ref1["attention"]).max() > 1e-3  # the layers really differ
    assert np.abs(grad[0][:, 1:]).max() == 0 and np.abs(grad[0][:, 0]).max() > 1e-3  # [CLS] only
    assert np.abs(ref0["grad"][:, 1:]).max() > 1e-4  # at the default layer every token has one


def test_layer_rule_and_bad_layers(tiny_checkpoint: Path, tmp_path: Path, vocab_path: Path) -> None:
    from albef.model.export import export_bundle
    from albef.model.export_explain import default_explain_layer, explain_layer_for
    from albef.model.factory import create_model

    # the official layer is the third of six fusion layers (encoder layer 8 of ALBEF-base); never the last
    assert [default_explain_layer(n) for n in (6, 4, 3, 2, 1)] == [2, 2, 1, 0, 0]
    with pytest.raises(ValueError, match="no fusion layer"):
        default_explain_layer(0)
    model = create_model(None, tiny_checkpoint)
    assert explain_layer_for(model, None) == 0 and explain_layer_for(model, 1) == 1
    with pytest.raises(ValueError, match="outside the 2 fusion layers"):
        export_bundle(model, tmp_path / "b", explain_layer=2, vocab=vocab_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_bundle_records_the_explain_graph(tiny_bundle: Path) -> None:
    import onnx

    from albef.model.runtime import BUNDLE_FORMAT_VERSION, Bundle

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["format_version"] == BUNDLE_FORMAT_VERSION == 3
    ex = manifest["explain"]
    assert ex["file"] == "explain.onnx" and "explain.onnx" in manifest["files"]
    assert (ex["fusion_layer"], ex["encoder_layer"], ex["num_fusion_layers"], ex["grid_side"]) == (0, 2, 2, 6)
    assert ex["weights"] == "float32" and ex["opset"] == 18
    assert manifest["io"]["explain"]["outputs"]["attention_grad"] == [1, 4, 30, 37]
    # fp32 only: the int8 variant has no explain file of its own, and uses the fp32 graph
    assert (
        "explain" not in manifest["variants"]["int8"]["files"]
        and not (tiny_bundle / "explain.int8.onnx").exists()
    )
    graph = onnx.load(str(tiny_bundle / "explain.onnx"))
    assert [i.name for i in graph.graph.input] == ["text_tokens", "text_mask", "image_tokens"]
    assert [o.name for o in graph.graph.output] == ["itm_logits", "attention", "attention_grad"]
    int8 = Bundle.load(tiny_bundle, variant="int8", eager=True)
    fp32 = Bundle.load(tiny_bundle)
    ids, mask = fp32.tokenize(["a small red circle"])
    _, text = fp32.encode_ids(ids, mask)
    _, image = fp32.encode_pixels(np.zeros((1, 3, 96, 96), np.float32))
    a, b = int8.explain(text, mask, image), fp32.explain(text, mask, image)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the same graph on the same inputs
    # a text shorter than the graph's length is padded, with the same result
    n = int(mask.sum())
    short = fp32.explain(text[:, : n + 1], mask[:, : n + 1], image)
    assert short["attention"].shape[2] == n + 1
    np.testing.assert_allclose(short["attention_grad"][:, :, :n], b["attention_grad"][:, :, :n], atol=1e-6)
    assert fp32.token_strings(ids[0][1:n]) == ["a", "small", "red", "circle"]


def test_a_format_1_bundle_still_loads_and_serves_search(tiny_bundle: Path, tmp_path: Path) -> None:
    from albef.model.runtime import Bundle, BundleError

    old = Bundle.load(format1_copy(tiny_bundle, tmp_path / "old"), eager=True)
    new = Bundle.load(tiny_bundle)
    assert not old.has_explain and new.has_explain
    ids, mask = old.tokenize(["a small red circle"])
    _, text = old.encode_ids(ids, mask)
    _, image = old.encode_pixels(np.zeros((1, 3, 96, 96), np.float32))
    np.testing.assert_array_equal(old.itm_scores(text, mask, image), new.itm_scores(text, mask, image))
    with pytest.raises(BundleError, match="no explain graph"):
        old.explain(text, mask, image)


def test_cli_without_the_explain_graph(
    tiny_checkpoint: Path, vocab_path: Path, tmp_path: Path, capsys
) -> None:
    from albef.cli import main
    from albef.model.runtime import Bundle

    out = tmp_path / "bundle"
    argv = ["export", str(tiny_checkpoint), str(out), "--variants", "fp32", "--vocab", str(vocab_path)]
    assert main([*argv, "--no-explain"]) == 0
    assert "explain:" not in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        "explain" not in manifest and not (out / "explain.onnx").exists() and manifest["format_version"] == 3
    )
    assert not Bundle.load(out).has_explain
    assert main([*argv, "--force", "--explain-layer", "5"]) == 1
    assert "explain layer 5 is outside the 2 fusion layers" in capsys.readouterr().err
    assert not (out / "explain.onnx").exists()  # the published bundle was left as it was

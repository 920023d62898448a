"""`albef export` and albef.model.export: bundle contents, manifest, validation, atomicity, CLI errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

# albef-tiny (37 image tokens) has a second text->image graph for texts of at most 19 tokens
ROLES = ("image_encoder", "text_encoder", "itm", "itm_short", "image_kv", "itm_kv")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(*argv: str) -> int:
    from albef.cli import main

    return main(list(argv))


def test_bundle_files_and_manifest(tiny_bundle: Path, tiny_checkpoint: Path, vocab_path: Path) -> None:
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    names = {p.name for p in tiny_bundle.iterdir()}
    expected = {f"{r}.onnx" for r in ROLES} | {f"{r}.int8.onnx" for r in ROLES}
    expected |= {"explain.onnx", "tokenizer.json", "vocab.txt", "preprocess.json", "manifest.json"}
    assert names == expected
    # every file is listed with its real hash and size; the id is the hash over those hashes
    assert set(manifest["files"]) == expected - {"manifest.json"}
    for name, info in manifest["files"].items():
        assert info["sha256"] == sha(tiny_bundle / name)
        assert info["bytes"] == (tiny_bundle / name).stat().st_size
    lines = "".join(f"{n}:{manifest['files'][n]['sha256']}\n" for n in sorted(manifest["files"]))
    assert manifest["bundle_id"] == hashlib.sha256(lines.encode()).hexdigest()
    assert manifest["source"]["sha256"] == sha(tiny_checkpoint / "model.safetensors")
    assert manifest["model"]["name"] == "albef-tiny" and manifest["opset"] == 17
    assert manifest["libraries"]["onnxruntime"] and manifest["libraries"]["torch"]
    assert set(manifest["variants"]) == {"fp32", "int8"}
    assert manifest["variants"]["int8"]["files"]["itm_kv"] == "itm_kv.int8.onnx"
    assert sha(tiny_bundle / "vocab.txt") == sha(vocab_path)
    pre = json.loads((tiny_bundle / "preprocess.json").read_text())
    assert pre["image_res"] == 96 and pre["interpolation"] == "bicubic" and pre["resize"] == "square"
    assert pre["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    # validation figures were measured and the fp32 ones are within the export tolerance
    val = manifest["variants"]["fp32"]["validation"]
    for key in ("image_emb", "text_emb", "itm_logits", "itm_kv_vs_itm"):
        assert 0 <= val[key] <= 1e-4
    assert manifest["variants"]["int8"]["validation"]["image_emb"] > val["image_emb"]


def test_graphs_have_dynamic_batch_and_length(tiny_bundle: Path) -> None:
    def dims(model: onnx.ModelProto, name: str) -> list[str | int]:
        for vi in [*model.graph.input, *model.graph.output]:
            if vi.name == name:
                return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        raise KeyError(name)

    text = onnx.load(str(tiny_bundle / "text_encoder.onnx"), load_external_data=False)
    assert dims(text, "input_ids") == ["batch", "length"]
    assert dims(text, "text_tokens") == ["batch", "length", 128]
    image = onnx.load(str(tiny_bundle / "image_encoder.onnx"), load_external_data=False)
    assert dims(image, "pixels") == ["batch", 3, 96, 96]
    assert dims(image, "image_emb") == ["batch", 64]
    kv = onnx.load(str(tiny_bundle / "itm_kv.onnx"), load_external_data=False)
    assert dims(kv, "k0") == ["kv_batch", 4, 37, 32]
    assert [i.name for i in kv.graph.input] == ["text_tokens", "text_mask", "k0", "v0", "k1", "v1"]
    assert max(o.version for o in kv.opset_import if o.domain in ("", "ai.onnx")) == 17


def test_cli_export_and_bf16_decision(
    tiny_checkpoint: Path, vocab_path: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "bundle"
    rc = run_cli(
        "export", str(tiny_checkpoint), str(out), "--variants", "fp32,bf16", "--vocab", str(vocab_path)
    )
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["variants"]) == {"fp32"}
    bf16 = manifest["variants_not_shipped"]["bf16"]
    probe = bf16["probe"]
    # the decision is a measurement: either ORT has no bf16 kernel (recorded error) or it was not faster
    assert probe["fp32_gflops"] > 0
    assert (probe["supported"] is False and "MatMul" in probe["error"]) or probe["faster"] is False
    assert not list(tmp_path.glob("bundle.tmp-*"))
    # an existing bundle is not overwritten without --force
    assert run_cli("export", str(tiny_checkpoint), str(out), "--variants", "fp32") == 1
    assert "exists" in capsys.readouterr().err
    # a replacement that fails validation (no float path matches PyTorch bit for bit: tolerance 0) leaves
    # the published bundle untouched and no temporary folder behind
    before = {p.name: sha(p) for p in out.iterdir()}
    rc = run_cli(
        "export", str(tiny_checkpoint), str(out), "--variants", "fp32", "--force", "--tolerance", "0"
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("albef export: error: ONNX Runtime differs from PyTorch by more than 0")
    assert {p.name: sha(p) for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    # with --force a valid export replaces it
    assert run_cli("export", str(tiny_checkpoint), str(out), "--variants", "fp32", "--force") == 0
    after = json.loads((out / "manifest.json").read_text())
    assert after["variants_not_shipped"] == {} and after["created"] >= manifest["created"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_rerank_scope_int8_shares_fp32_encoders(
    tiny_checkpoint: Path, vocab_path: Path, tmp_path: Path, capsys
) -> None:
    """``--int8-scope rerank``: the int8 variant's encoders are fp32's own files (same features, so the
    same indexes), its re-ranking graphs are integer; the manifest says so and the runtime serves it."""
    from albef.model.runtime import Bundle

    out = tmp_path / "bundle"
    argv = ["export", str(tiny_checkpoint), str(out), "--vocab", str(vocab_path), "--no-explain"]
    assert run_cli(*argv, "--int8-scope", "rerank") == 0
    assert "int8 (rerank scope) vs fp32" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    f32, int8 = manifest["variants"]["fp32"]["files"], manifest["variants"]["int8"]
    assert int8["scope"] == "rerank" and "re-ranking graphs" in int8["weights"]
    assert {r: int8["files"][r] for r in ("image_encoder", "text_encoder")} == {
        "image_encoder": "image_encoder.onnx",
        "text_encoder": "text_encoder.onnx",
    }
    assert not list(out.glob("*_encoder.int8.onnx"))
    for role in ("itm", "itm_short", "image_kv", "itm_kv"):
        ops = {n.op_type for n in onnx.load(str(out / int8["files"][role])).graph.node}
        assert int8["files"][role] == f"{role}.int8.onnx" and "MatMulInteger" in ops
    val = int8["validation"]
    assert val["image_emb_min_cos"] == pytest.approx(1.0) and val["failed"] == []
    assert 0 < val["max_int8_weight"] <= 64
    b32, b8 = Bundle.load(out, variant="fp32"), Bundle.load(out, variant="int8")
    from PIL import Image

    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)) for _ in range(2)]
    e32, tok32 = b32.encode_images(images)
    e8, _ = b8.encode_images(images)
    np.testing.assert_array_equal(e32, e8)
    ttok, mask = b32.encode_texts(["a red square", "two blue circles"])[1:]
    img = np.repeat(tok32[:1], 2, axis=0)
    assert 0 < np.abs(b32.itm_scores(ttok, mask, img) - b8.itm_scores(ttok, mask, img)).max() < 0.05
    assert set(f32.values()) < set(manifest["files"])


def test_cli_rejects_bad_arguments(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    assert run_cli("export", str(tmp_path / "nope"), str(tmp_path / "o")) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert run_cli("export", str(tiny_checkpoint), str(tmp_path / "o"), "--variants", "fp32,fp8") == 2
    assert "fp8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse's own check of the choices
        run_cli("export", str(tiny_checkpoint), str(tmp_path / "o"), "--int8-scope", "encoders")
    assert exc.value.code == 2 and "invalid choice: 'encoders'" in capsys.readouterr().err
    assert (
        run_cli("export", str(tiny_checkpoint), str(tmp_path / "o"), "--vocab", str(tmp_path / "v.txt")) == 1
    )
    assert "vocab file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert run_cli("export", str(bad), str(tmp_path / "o")) == 1
    assert "cannot load" in capsys.readouterr().err
    assert list(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_adapters_reproduce_the_model(tiny_checkpoint: Path) -> None:
    import torch

    from albef.model.export import ImageKVAdapter, ItmAdapter, ItmKVAdapter, example_inputs
    from albef.model.factory import create_model

    model = create_model(None, tiny_checkpoint)
    ex = example_inputs(model, batch=3)
    with torch.no_grad():
        plain = ItmAdapter(model)(
            ex["text_tokens"], ex["attention_mask"], ex["image_tokens"][:1].expand(3, -1, -1)
        )
        kv = ImageKVAdapter(model)(ex["image_tokens"][:1])
        cached = ItmKVAdapter(model)(ex["text_tokens"], ex["attention_mask"], *kv)
    assert len(kv) == 4 and kv[0].shape == (1, 4, 37, 32)
    assert torch.allclose(plain, cached, atol=1e-5)
    # ragged masks were really exercised (padding differs per row)
    assert ex["attention_mask"].sum(1).unique().numel() == 3
    assert np.isfinite(plain.numpy()).all()


def test_runtime_evaluation_equals_the_torch_evaluation(
    tiny_bundle: Path, tiny_checkpoint: Path, tokenizer, tmp_path: Path
) -> None:
    """The R@K figures written into manifests (make_evaluator, ONNX Runtime) are the official protocol:
    the same score matrices as helper B's torch evaluation, hence the same recalls."""
    from albef.model.data.annotations import load_eval_set
    from albef.model.data.synth import generate
    from albef.model.export import make_evaluator, runtime_score_matrices
    from albef.model.factory import create_model
    from albef.model.runtime import Bundle
    from albef.model.train.evaluate import compute_features, itm_eval, score_matrices

    generate(tmp_path / "synth", 40, seed=3, size=48, progress=False)
    test_json = tmp_path / "synth" / "test.json"
    es = load_eval_set(test_json)
    assert len(es.images) >= 3 and len(es.texts) > len(es.images)
    k = 3
    sims, i2t, t2i = runtime_score_matrices(Bundle.load(tiny_bundle), es.images, es.texts, k)
    model = create_model(None, tiny_checkpoint)
    feats = compute_features(model, es.images, es.texts, tokenizer, progress=False)
    ref = score_matrices(model, feats, k, progress=False)
    assert np.abs(sims - ref.sims).max() < 1e-4
    assert np.array_equal(i2t == -100, ref.i2t == -100) and np.array_equal(t2i == -100, ref.t2i == -100)
    assert np.abs(i2t - ref.i2t).max() < 1e-4 and np.abs(t2i - ref.t2i).max() < 1e-4
    report = make_evaluator(test_json, k_test=k)(tiny_bundle, "fp32")
    expected = itm_eval(ref.i2t, ref.t2i, es.txt2img, es.img2txt)
    assert report["itm"]["r_mean"] == pytest.approx(expected["r_mean"], abs=1e-3)
    assert report["images"] == len(es.images) and report["k_test"] == k

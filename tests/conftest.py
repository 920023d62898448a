"""Fixtures shared by more than one test folder. Session-scoped artefacts are built once per test run in a temp
folder: the random albef-tiny (checkpoint and bundle), the synthetic test split and its index, the demo cache.

A folder's own fixtures are in its conftest.py; helpers that are not fixtures are in tests/helpers/."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers.demo import TEST_SYNTH, PreparedDemo

os.environ.setdefault("ALBEF_LOG_LEVEL", "WARNING")

SYNTH_IMAGES = 400  # the synthetic generator keeps 10% for test: 40 images, about 160 captions
SYNTH_SEED = 0


@pytest.fixture(scope="session")
def vocab_path() -> Path:
    from albef.model.text import default_vocab_path

    return default_vocab_path()


@pytest.fixture(scope="session")
def tokenizer(vocab_path: Path):
    from albef.model.text import AlbefTokenizer

    return AlbefTokenizer.from_vocab(vocab_path)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised albef-tiny (seed 0) saved in our format."""
    import torch

    from albef.model.checkpoint import save_albef
    from albef.model.factory import create_model

    torch.manual_seed(0)
    model = create_model("albef-tiny")
    out = tmp_path_factory.mktemp("ckpt") / "albef-tiny-random"
    save_albef(model, out, source={"init": "random", "seed": 0})
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, vocab_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random albef-tiny exported once as a model bundle (fp32 + int8) for the ONNX runtime."""
    from albef.model.export import export_bundle
    from albef.model.factory import create_model

    out = tmp_path_factory.mktemp("bundle") / "albef-tiny-random"
    export_bundle(
        create_model(None, tiny_checkpoint),
        out,
        variants=["fp32", "int8"],
        vocab=vocab_path,
        checkpoint=tiny_checkpoint,
        progress=False,
    )
    return out


# -- bundles ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def index_bundle_dir(tiny_bundle: Path) -> Path:
    """The bundle the index tests build with: the shared random tiny bundle."""
    return tiny_bundle


@pytest.fixture(scope="session")
def other_bundle_dir(index_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A different, valid bundle: same graphs but another vocab.txt file, hence another bundle id."""
    from albef.model.runtime import bundle_id_from_files

    out = tmp_path_factory.mktemp("other-bundle") / "bundle"
    shutil.copytree(index_bundle_dir, out)
    vocab = out / "vocab.txt"
    vocab.write_bytes(vocab.read_bytes() + b"[extra]\n")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["vocab.txt"] = {
        "sha256": hashlib.sha256(vocab.read_bytes()).hexdigest(),
        "bytes": vocab.stat().st_size,
    }
    manifest["bundle_id"] = bundle_id_from_files(manifest["files"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


# -- the synthetic test split and its index -----------------------------------------------------------------
@pytest.fixture(scope="session")
def service_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``albef data synth`` output (128 px, as the benchmark); the index is built from its test split."""
    from albef.model.data.synth import generate

    out = tmp_path_factory.mktemp("service-synth") / "synth"
    generate(out, SYNTH_IMAGES, SYNTH_SEED, size=128, progress=False)
    return out


@pytest.fixture(scope="session")
def service_index(service_synth: Path, tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exact (Flat) index of the synthetic test split, built with the random tiny bundle. Read-only:
    tests that change an index copy it first (:func:`tests.helpers.service.copy_index`)."""
    from albef.index.builder import BuildOptions, build
    from albef.model.runtime import Bundle

    out = tmp_path_factory.mktemp("service-index") / "index"
    build(
        out, Bundle.load(tiny_bundle), [service_synth / "test.json"], BuildOptions(progress=False, workers=2)
    )
    return out


# -- the demo (albef demo, the browser test) ----------------------------------------------------------------
@pytest.fixture(scope="session")
def demo_checkpoint() -> Path:
    from albef.demo import shipped_checkpoint

    path = shipped_checkpoint()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file(), (
        f"the shipped tiny checkpoint is missing: {path}"
    )
    return path


@pytest.fixture(scope="session")
def prepared_demo(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> PreparedDemo:
    """A cold ``prepare`` into an empty cache (export, gallery, index)."""
    from albef.demo import prepare

    cache = tmp_path_factory.mktemp("demo") / "cache"
    lines: list[str] = []
    result = prepare(cache, checkpoint=demo_checkpoint, synth=TEST_SYNTH, progress=False, say=lines.append)
    return PreparedDemo(cache, result, lines)

"""The bundle's files besides the graphs: tokenizer, vocab, preprocessing, and the manifest that hashes them.

The manifest records where the model came from (checkpoint hashes), the library versions, the graphs' I/O,
and per variant its files and validation figures; the bundle id is the sha256 over the file hashes.
"""

from __future__ import annotations

import json
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from albef import atomic
from albef.model.albef import ALBEF
from albef.model.config import AlbefConfig
from albef.model.export_adapters import io_description
from albef.model.runtime import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    MANIFEST_FILE,
    PREPROCESS_FILE,
    TOKENIZER_FILE,
    VOCAB_FILE,
    bundle_id_from_files,
    sha256_file,
)
from albef.model.text import AlbefTokenizer, default_vocab_path

__all__ = [
    "package_version",
    "library_versions",
    "source_info",
    "checkpoint_vocab",
    "resolve_vocab",
    "write_text_files",
    "base_manifest",
    "write_manifest",
]


def package_version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def library_versions() -> dict[str, str | None]:
    names = ("torch", "onnx", "onnxruntime", "timm", "tokenizers", "numpy", "pillow", "albef-search")
    out = {n: package_version(n) for n in names}
    out["python"] = platform.python_version()
    return out


def source_info(checkpoint: str | Path | None) -> dict[str, Any]:
    """The checkpoint's path and sha256 (of the weights file for our folder format)."""
    if checkpoint is None:
        return {"path": None, "sha256": None, "note": "in-memory model"}
    p = Path(checkpoint)
    weights = p / "model.safetensors" if p.is_dir() else p
    info: dict[str, Any] = {"path": str(p), "sha256": sha256_file(weights), "file": weights.name}
    cfg = p / "config.json" if p.is_dir() else None
    if cfg is not None and cfg.is_file():
        info["config_sha256"] = sha256_file(cfg)
        try:
            info["provenance"] = json.loads(cfg.read_text()).get("source", {})
        except json.JSONDecodeError:
            pass
    return info


def checkpoint_vocab(checkpoint: str | Path | None) -> Path | None:
    """A checkpoint folder may carry its own ``vocab.txt`` (the shipped tiny model does), so a fresh install
    exports it without the optional vocab package."""
    if checkpoint is None:
        return None
    p = Path(checkpoint)
    candidate = (p if p.is_dir() else p.parent) / VOCAB_FILE
    return candidate if candidate.is_file() else None


def resolve_vocab(vocab: str | Path | None, checkpoint: str | Path | None) -> Path:
    """The vocab to ship: the one asked for, else the checkpoint's own, else the default one."""
    return Path(vocab) if vocab is not None else checkpoint_vocab(checkpoint) or default_vocab_path()


def write_text_files(out: Path, vocab_path: Path, config: AlbefConfig) -> None:
    """Tokenizer, vocab and preprocessing: what the runtime needs to turn texts and images into inputs."""
    tok = AlbefTokenizer.from_vocab(vocab_path, max_tokens=config.max_tokens)
    tok.save(out / TOKENIZER_FILE)
    shutil.copyfile(vocab_path, out / VOCAB_FILE)
    atomic.write_json(
        out / PREPROCESS_FILE,
        {
            "image_res": config.vision.image_res,
            "mean": list(config.mean),
            "std": list(config.std),
            "interpolation": "bicubic",
            "resize": "square",
            "scale": 1 / 255,
            "channels": "RGB",
            "layout": "NCHW",
        },
    )


def base_manifest(
    model: ALBEF, checkpoint: str | Path | None, opset: int, files32: dict[str, str]
) -> dict[str, Any]:
    """The manifest before validation: the fp32 variant only; later steps add figures and variants."""
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model.config.to_dict(),
        "source": source_info(checkpoint),
        "opset": opset,
        "libraries": library_versions(),
        "io": io_description(model),
        "variants": {"fp32": {"files": files32, "weights": "float32"}},
        "variants_not_shipped": {},
    }


def write_manifest(out: Path, base: dict[str, Any]) -> dict[str, Any]:
    """Hash every file except the manifest; the bundle id is the sha256 over those hashes."""
    files = {}
    for f in sorted(out.iterdir()):
        if f.name == MANIFEST_FILE or not f.is_file():
            continue
        files[f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    manifest = {**base, "files": files, "bundle_id": bundle_id_from_files(files)}
    atomic.write_json(out / MANIFEST_FILE, manifest)
    return manifest

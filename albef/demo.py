"""``albef demo``: the shipped tiny model, exported, over a synthetic gallery, indexed and served with the web page.

Steps (each cached under the demo cache folder and reused while its inputs are unchanged):

1. export the shipped checkpoint ``model/weights/albef-tiny-synth/`` to an ONNX model bundle (``cache/bundle``);
2. generate the synthetic gallery with ``albef data synth`` (``cache/data``): the same dataset as the tiny recipe
   (``model/train/recipes/tiny-synth.yaml``), so the gallery is its held-out test split, unseen in training;
3. index the test split, images and captions (``cache/index``);
4. serve it (the REST API and the web page at ``/``).

The cache folder is ``--cache``, else ``$ALBEF_DEMO_CACHE``, else ``~/.cache/albef-search/demo``. Each step's
inputs are recorded as a *key* in ``cache/demo.json``: the checkpoint's sha256 and the library versions for the
bundle, the generator version and its parameters for the data, the bundle id and the data key for the index.
A step runs again when its key differs or its output is missing; a warm run therefore only loads the index and
starts the server (torch is not even imported). Every step writes into a temporary folder and renames it, and a
file lock keeps two demos from building into the same cache at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from albef import __version__, atomic

log = logging.getLogger(__name__)

__all__ = [
    "DEMO_SYNTH",
    "DemoError",
    "DemoResult",
    "default_cache_dir",
    "shipped_checkpoint",
    "checkpoint_sha256",
    "prepare",
]

# The demo gallery: the test split of scenes of a seed of its own. The shipped model trains on seed 0
# (model/train/recipes/tiny-synth-truth.yaml), and a smaller generation with the same seed would repeat the
# first scenes of the larger one, so the gallery has another seed; tests/albef/test_demo.py checks that none
# of its scenes is a training scene.
DEMO_SYNTH: dict[str, int] = {"images": 3000, "seed": 31, "size": 128}
DEMO_SPLIT = "test"
STAMP_FILE = "demo.json"
STEPS = 4

Say = Callable[[str], None]


class DemoError(RuntimeError):
    """The demo cannot be prepared (e.g. the shipped checkpoint is missing); the message says why."""


@dataclass
class DemoResult:
    cache_dir: Path
    bundle: Path
    data: Path
    index: Path
    rebuilt: dict[str, bool] = field(default_factory=dict)  # step -> True if it ran, False if reused
    seconds: dict[str, float] = field(default_factory=dict)


def default_cache_dir() -> Path:
    from albef.settings import DemoSettings

    env = DemoSettings()
    if env.demo_cache is not None:
        return env.demo_cache.expanduser()
    return (env.xdg_cache_home or Path.home() / ".cache") / "albef-search" / "demo"


def shipped_checkpoint() -> Path:
    """``model/weights/albef-tiny-synth/`` inside the installed ``albef.model`` package."""
    import albef.model

    return Path(albef.model.__file__).resolve().parent / "weights" / "albef-tiny-synth"


def checkpoint_sha256(path: Path) -> str:
    """sha256 over the files that define the model (config.json and the weights), names included."""
    path = Path(path)
    files = (
        [path]
        if path.is_file()
        else sorted(
            p
            for p in path.iterdir()
            if p.is_file() and (p.name == "config.json" or p.suffix == ".safetensors")
        )
    )
    if not files:
        raise DemoError(f"no checkpoint files in {path}")
    h = hashlib.sha256()
    for f in files:
        digest = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
        h.update(f"{f.name}\0{digest.hexdigest()}\n".encode())
    return h.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _bundle_key(checkpoint: Path) -> dict[str, Any]:
    from albef.model.runtime import BUNDLE_FORMAT_VERSION

    return {
        "checkpoint_sha256": checkpoint_sha256(checkpoint),
        "albef_search": __version__,
        "torch": _version("torch"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "bundle_format": BUNDLE_FORMAT_VERSION,
        "variants": ["fp32"],
    }


def _data_key(synth: dict[str, int]) -> dict[str, Any]:
    from albef.model.data.synth import GENERATOR_VERSION

    return {"generator": GENERATOR_VERSION, **synth, "albef_search": __version__}


def _index_key(bundle_id: str, data_key: dict[str, Any]) -> dict[str, Any]:
    from albef.index.layout import FORMAT_VERSION

    return {
        "bundle_id": bundle_id,
        "data": data_key,
        "split": DEMO_SPLIT,
        "faiss": _version("faiss-cpu"),
        "index_format": FORMAT_VERSION,
        "albef_search": __version__,
    }


# -- cache bookkeeping ---------------------------------------------------------------------------------------
def _read_stamp(cache: Path) -> dict[str, Any]:
    try:
        data = json.loads((cache / STAMP_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_stamp(cache: Path, stamp: dict[str, Any]) -> None:
    atomic.write_json(cache / STAMP_FILE, stamp, sort_keys=True)


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise DemoError(
                f"another `albef demo` is preparing {cache}; wait for it or use another --cache"
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished ``tmp`` folder to ``final``; an old ``final`` is moved aside first, then removed."""
    atomic.publish_dir(tmp, final, replace_existing=True)


def _clean_stale(cache: Path) -> None:
    """Temporary folders left by an interrupted run (we hold the lock, so none is in use)."""
    for p in cache.iterdir():
        if p.is_dir() and p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
            shutil.rmtree(p, ignore_errors=True)


def _bundle_ok(path: Path, bundle_id: str | None) -> bool:
    from albef.model.runtime import BundleError, read_manifest

    try:
        return bundle_id is not None and read_manifest(path).get("bundle_id") == bundle_id
    except (BundleError, OSError, ValueError):
        return False


def _data_ok(path: Path) -> bool:
    return (path / f"{DEMO_SPLIT}.json").is_file() and (path / "dataset.json").is_file()


def _index_ok(path: Path) -> bool:
    from albef.index.layout import current_version

    return current_version(path) is not None


# -- the steps -------------------------------------------------------------------------------------------------
def _export(checkpoint: Path, out: Path, progress: bool) -> str:
    import torch

    from albef.model.export import export_bundle
    from albef.model.factory import create_model

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model = create_model(None, checkpoint)
    manifest = export_bundle(
        model, out, variants=["fp32"], checkpoint=checkpoint, overwrite=True, progress=progress
    )
    return str(manifest["bundle_id"])


def _generate(out: Path, synth: dict[str, int], progress: bool) -> None:
    from albef.model.data.synth import generate

    generate(out, synth["images"], synth["seed"], synth["size"], overwrite=True, progress=progress)


def _build_index(cache: Path, bundle_dir: Path, data: Path, out: Path, progress: bool) -> None:
    from albef.index.builder import BuildOptions, build
    from albef.model.runtime import Bundle

    bundle = Bundle.load(bundle_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=cache))
    try:
        build(
            tmp,
            bundle,
            [data / f"{DEMO_SPLIT}.json"],
            BuildOptions(progress=progress, workers=2, keep_versions=1),
        )
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare(
    cache_dir: str | Path | None = None,
    *,
    checkpoint: str | Path | None = None,
    synth: dict[str, int] | None = None,
    force: bool = False,
    progress: bool = True,
    say: Say | None = None,
) -> DemoResult:
    """Make sure the cache holds a bundle of ``checkpoint`` (default: the shipped tiny model), the synthetic
    gallery and its index; build what is missing or stale. ``say`` receives the "i/4 ..." progress lines."""
    say = say or (lambda line: log.info(line))
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache = cache.resolve()
    ckpt = Path(checkpoint) if checkpoint is not None else shipped_checkpoint()
    if not (ckpt / "config.json").is_file() and not ckpt.is_file():
        raise DemoError(
            f"model checkpoint not found: {ckpt} (the shipped tiny model is "
            "model/weights/albef-tiny-synth/; reinstall with `pip install -e '.[train]'`)"
        )
    synth = dict(DEMO_SYNTH if synth is None else synth)
    result = DemoResult(cache, cache / "bundle", cache / "data", cache / "index")
    with _cache_lock(cache):
        _clean_stale(cache)
        stamp = {} if force else _read_stamp(cache)

        # 1. model bundle
        t0 = time.perf_counter()
        key = _bundle_key(ckpt)
        entry = stamp.get("bundle") or {}
        if entry.get("key") == key and _bundle_ok(result.bundle, entry.get("bundle_id")):
            say(f"1/{STEPS} model bundle: cached ({result.bundle})")
            result.rebuilt["bundle"] = False
        else:
            say(f"1/{STEPS} exporting model {ckpt.name} to ONNX ...")
            bundle_id = _export(ckpt, result.bundle, progress)
            stamp["bundle"] = {"key": key, "bundle_id": bundle_id}
            _write_stamp(cache, stamp)
            result.rebuilt["bundle"] = True
        bundle_id = stamp["bundle"]["bundle_id"]
        result.seconds["bundle"] = round(time.perf_counter() - t0, 2)

        # 2. synthetic gallery
        t0 = time.perf_counter()
        dkey = _data_key(synth)
        if (stamp.get("data") or {}).get("key") == dkey and _data_ok(result.data):
            say(f"2/{STEPS} synthetic gallery: cached ({result.data})")
            result.rebuilt["data"] = False
        else:
            say(
                f"2/{STEPS} generating the synthetic gallery ({synth['images']} scenes, seed {synth['seed']}) ..."
            )
            _generate(result.data, synth, progress)
            stamp["data"] = {"key": dkey}
            _write_stamp(cache, stamp)
            result.rebuilt["data"] = True
        result.seconds["data"] = round(time.perf_counter() - t0, 2)

        # 3. index of the test split
        t0 = time.perf_counter()
        ikey = _index_key(bundle_id, dkey)
        if (stamp.get("index") or {}).get("key") == ikey and _index_ok(result.index):
            say(f"3/{STEPS} index: cached ({result.index})")
            result.rebuilt["index"] = False
        else:
            say(f"3/{STEPS} indexing the {DEMO_SPLIT} split (images and captions) ...")
            _build_index(cache, result.bundle, result.data, result.index, progress)
            stamp["index"] = {"key": ikey}
            _write_stamp(cache, stamp)
            result.rebuilt["index"] = True
        result.seconds["index"] = round(time.perf_counter() - t0, 2)
    return result

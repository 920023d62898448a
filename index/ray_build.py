"""Step 2 of a build/add on a Ray cluster: ``albef index build|add --ray auto|ADDRESS`` (the ``cluster`` extra).

Only the encoding moves to the cluster. The plan (:mod:`.plan`), the shard files and their layout
(:mod:`.encode`), FAISS, SQLite and the version publish (:mod:`.publish`) stay on the driver, unchanged:

1. **Hash** (Ray Data tasks): the images of the shards still to encode are read and hashed (sha256 of the
   bytes) in parallel. From the hashes the driver tells each shard the duplicates it must know of: images of
   earlier shards with the same bytes, and images the index holds already.
2. **Decode** (Ray Data ``flat_map`` tasks, one per shard): a shard's images are read, decoded and
   preprocessed and cut into encoder batches by :class:`albef.index.encode.ImageShard`, the local build's
   rule, so the batches (and with them the vectors) are the local build's. Text shards are cut into the
   local text batches (:func:`albef.index.encode.text_batches`).
3. **Encode** (Ray Data ``map_batches`` over an actor pool): each actor loads the bundle once and holds its
   ONNX Runtime sessions: on CPU, or with ``gpus_per_actor`` on a GPU through the CUDA execution provider
   when ONNX Runtime has it.
4. **Commit** (driver): results come back in input order; each complete shard is written as a local build
   writes it (:func:`albef.index.encode.save_npz`, looked up when called, as the crash tests' helper needs),
   image shards in plan order. A killed driver therefore leaves what a killed local build leaves (committed
   shards, a prefix; nothing published), and ``--resume``, local or on Ray, continues from them.

Faults are Ray's to repair, with Ray Data's defaults (``max_restarts``/``max_retries`` passed as remote
arguments are deprecated in Ray 2.60): an actor whose process dies is restarted and its unfinished batches run
again (``max_restarts=-1``, ``max_task_retries=-1``); a hash or decode task lost with its worker is run again
(Ray's ``max_retries=3`` for system failures). Results are written only once a whole shard has come back, so
a retried batch is never committed twice.

Every node needs albef-search with the ``cluster`` extra, and the bundle and the source images at the same
paths as on the driver (a shared file system); the driver checks that the actors see the same bundle id.
Vectors equal a local build's bit for bit when the actors run on the same CPU type with the same ONNX Runtime
(tests/index/test_ray_build.py; the batches are the local build's, so batch composition cannot differ); on a
GPU they are not expected to be bit-identical.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from albef.index import encode
from albef.index.encode import (
    ImageShard,
    committed_image_hashes,
    encode_image_batch,
    encode_text_batch,
    image_shard_arrays,
    ordered_map,
    read_image,
    shard_items,
    shard_path,
    text_batches,
    text_shard_arrays,
)
from albef.index.errors import IndexError_
from albef.index.options import BuildOptions, Encoder

log = logging.getLogger(__name__)

EXTRA = "cluster"  # pip install 'albef-search[cluster]'
HASH_BATCH = 64  # images per hashing call


class RayUnavailableError(IndexError_):
    """Ray is not installed, or the cluster cannot be reached."""


class RayBuildError(IndexError_):
    """The encoding pipeline on the cluster failed (after Ray's own retries)."""


def import_ray() -> Any:
    """``ray`` and ``ray.data``, or a :class:`RayUnavailableError` naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data ships in the ray[data] extra only
    except ImportError as exc:
        raise RayUnavailableError(
            f"--ray needs Ray Data, which is not installed ({exc}): pip install 'albef-search[{EXTRA}]'"
        ) from exc
    return ray


@dataclass
class RayOptions:
    address: str = "auto"  # "auto" (the running cluster), "HOST:PORT" of its head, or "local" (ray.init())
    actors: int | None = None  # encoder actors; None: the cluster's CPUs (GPUs) allow, one CPU left over
    threads: int = 1  # ONNX Runtime intra-op threads of an actor, and the CPUs it reserves
    gpus_per_actor: float = 0.0  # > 0: actors are placed on GPUs and use the CUDA execution provider

    def check(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise IndexError_("--ray-actors must be at least 1")
        if self.threads < 1:
            raise IndexError_("--threads must be at least 1")
        if self.gpus_per_actor < 0:
            raise IndexError_("--ray-gpus must not be negative")


class RayEncoder:
    """A :class:`~albef.index.options.ShardEncoder` that encodes on a Ray cluster (see the module docstring).

    :meth:`connect` joins the cluster (callers that want to fail before touching the index call it first);
    a call connects if that has not happened and, if it connected, disconnects when done. A process that is
    connected already (``ray.init`` of its own) keeps its connection."""

    def __init__(self, options: RayOptions | None = None) -> None:
        self.options = options or RayOptions()
        self.options.check()
        self._ray = import_ray()
        self._own = False

    def connect(self) -> None:
        if not self._ray.is_initialized():
            _connect(self._ray, self.options.address)
            self._own = True

    def __call__(
        self,
        wdir: Path,
        plan: dict[str, Any],
        bundle: Encoder,
        opts: BuildOptions,
        known: dict[str, int],
        bar: Any,
    ) -> dict[str, Any]:
        path = getattr(bundle, "path", None)
        if path is None:
            raise IndexError_("a Ray build needs a bundle loaded from a folder (albef.model.runtime.Bundle)")
        self.connect()
        # Ray prints its drivers' error messages ("a worker died ...") to stdout, which is the CLI's result
        # (--json): they go to stderr while this runs, like every other diagnostic.
        with contextlib.redirect_stdout(sys.stderr):
            try:
                return _run(
                    self._ray, self.options, wdir, plan, bundle, Path(path).resolve(), opts, known, bar
                )
            finally:
                if self._own:
                    self._ray.shutdown()
                    self._own = False


def _connect(ray: Any, address: str) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address not in ("auto", "local") and port.isdigit():
        try:  # fail in a second, not after Ray's minute of retries
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
        except OSError as exc:
            raise RayUnavailableError(f"no Ray cluster at {address}: {exc}") from exc
    try:
        ray.init(
            address=address,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        if address == "auto":
            raise RayUnavailableError(
                "no running Ray cluster found (auto looks at RAY_ADDRESS and at the cluster `ray start` "
                "started on this machine): pass --ray HOST:PORT of its head"
            ) from exc
        raise RayUnavailableError(f"cannot connect to the Ray cluster {address!r}: {exc}") from exc


def _run(
    ray: Any,
    ro: RayOptions,
    wdir: Path,
    plan: dict[str, Any],
    bundle: Encoder,
    bundle_path: Path,
    opts: BuildOptions,
    known: dict[str, int],
    bar: Any,
) -> dict[str, Any]:
    ray_log = logging.getLogger("ray.data")
    ctx = ray.data.DataContext.get_current()
    saved = (ray_log.level, ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options)
    ray_log.setLevel(logging.WARNING)  # its INFO lines are not JSON; ours say enough
    ctx.enable_progress_bars = False  # the build's own bar counts items
    ctx.print_on_execution_start = False
    ctx.execution_options = copy.copy(ctx.execution_options)
    ctx.execution_options.preserve_order = True  # shards come back in plan order, and are committed so
    try:
        return _pipeline(ray, ro, wdir, plan, bundle, bundle_path, opts, known, bar)
    finally:
        ray_log.setLevel(saved[0])
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options = saved[1:]


def _pipeline(
    ray: Any,
    ro: RayOptions,
    wdir: Path,
    plan: dict[str, Any],
    bundle: Encoder,
    bundle_path: Path,
    opts: BuildOptions,
    known: dict[str, int],
    bar: Any,
) -> dict[str, Any]:
    resources = ray.cluster_resources()
    actors = ro.actors or default_actors(resources, ro)
    check_resources(resources, actors, ro)
    info: dict[str, Any] = {
        "name": "ray",
        "address": ro.address,
        "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
        "cluster_cpus": resources.get("CPU", 0),
        "cluster_gpus": resources.get("GPU", 0),
        "actors": actors,
        "threads_per_actor": ro.threads,
        "gpus_per_actor": ro.gpus_per_actor,
    }
    seen, pending = committed_image_hashes(wdir, plan)
    text_pending = [s for s in range(plan["n_text_shards"]) if not shard_path(wdir, "text", s).is_file()]
    log.info(
        "ray build",
        extra={
            **{k: v for k, v in info.items() if k != "name"},  # `name` is a LogRecord attribute
            "image_shards": len(pending),
            "text_shards": len(text_pending),
        },
    )
    t0 = time.perf_counter()
    hashes = _hash_images(ray, plan, opts, pending)
    info["hash_s"] = round(time.perf_counter() - t0, 3)
    work = _image_work(plan, opts, pending, hashes, seen, known) + _text_work(plan, opts, text_pending)
    if not work:
        return info
    actors = info["actors"] = min(actors, len(work))  # an actor with no shard to encode only costs its start
    spec = {
        "bundle": str(bundle_path),
        "variant": getattr(bundle, "variant", "fp32"),
        "bundle_id": bundle.bundle_id,
    }
    ds = (
        ray.data.from_items(work, override_num_blocks=len(work))
        .flat_map(_prepare, fn_kwargs={"spec": spec, "opts": opts}, num_cpus=1)
        .map_batches(
            _EncodeActor,
            fn_constructor_kwargs={
                "cfg": {
                    **spec,
                    "threads": ro.threads,
                    "gpu": ro.gpus_per_actor > 0,
                    "token_dtype": opts.token_dtype,
                    "text_features": opts.text_features,
                }
            },
            batch_size=1,  # one row is one encoder batch of the local build
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=ro.threads,
            num_gpus=ro.gpus_per_actor or None,
        )
    )
    collector = _Collector(wdir, plan, bundle, opts, bar, pending, text_pending)
    t1 = time.perf_counter()
    try:
        for row in ds.iter_rows():
            collector.add(row)
    except IndexError_:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever Ray raised after its retries
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RayBuildError(f"the Ray build failed ({type(exc).__name__}): {first}") from exc
    collector.finish()
    info["encode_s"] = round(time.perf_counter() - t1, 3)
    info["per_actor"] = collector.per_actor
    return info


def check_resources(resources: dict[str, float], actors: int, ro: RayOptions) -> None:
    """Refuse a pool the cluster cannot hold: Ray would wait for the resources without end (with every CPU
    held by an actor, the decode tasks could never run)."""
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if ro.gpus_per_actor > 0 and gpus < actors * ro.gpus_per_actor:
        raise IndexError_(
            f"{actors} actors of {ro.gpus_per_actor:g} GPUs need {actors * ro.gpus_per_actor:g} GPUs; "
            f"the cluster has {gpus:g}"
        )
    need = actors * ro.threads + 1
    if cpus < need:
        raise IndexError_(
            f"{actors} actors of {ro.threads} CPUs (--threads) and one CPU for decoding need {need:g} CPUs; "
            f"the cluster has {cpus:g}: pass fewer --ray-actors"
        )


def default_actors(resources: dict[str, float], ro: RayOptions) -> int:
    """Actors when ``--ray-actors`` is not given: one per GPU share, else one per ``threads`` CPUs but one."""
    if ro.gpus_per_actor > 0:
        return max(1, int(resources.get("GPU", 0) // ro.gpus_per_actor))
    # One CPU is left to the hash and decode tasks: with every CPU held by an actor they could never run.
    return max(1, int((resources.get("CPU", 1) - 1) // ro.threads))


# -- 1. hashing -------------------------------------------------------------------------------------------
def _hash_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs on the cluster: sha256 of each file's bytes ("" when it cannot be read)."""
    shas = []
    for p in batch["path"].tolist():
        try:
            if "://" in p:
                raise ValueError("remote URI")
            shas.append(hashlib.sha256(Path(p).read_bytes()).hexdigest())
        except (OSError, ValueError):
            shas.append("")
    return {"plan_idx": batch["plan_idx"], "sha256": np.array(shas, dtype=object)}


def _hash_images(ray: Any, plan: dict[str, Any], opts: BuildOptions, pending: list[int]) -> dict[int, str]:
    images = plan["images"]
    items = [
        {"plan_idx": i, "path": images[i]["path"]}
        for s in pending
        for i in shard_items(plan, opts, "image", s)
    ]
    if not items:
        return {}
    n_blocks = max(1, min(len(items) // HASH_BATCH, 1024))
    ds = ray.data.from_items(items, override_num_blocks=n_blocks).map_batches(
        _hash_batch, batch_size=HASH_BATCH, batch_format="numpy", num_cpus=1
    )
    out: dict[int, str] = {}
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        out.update(zip(b["plan_idx"].tolist(), b["sha256"].tolist(), strict=True))
    return out


def _image_work(
    plan: dict[str, Any],
    opts: BuildOptions,
    pending: list[int],
    hashes: dict[int, str],
    seen: dict[str, int],
    known: dict[str, int],
) -> list[dict[str, Any]]:
    """One row per image shard to encode, with the hashes its items must be compared with.

    ``seen`` (the committed shards' images) is extended in plan order with each hash's first occurrence:
    what the local build's ``seen`` holds when it reaches the shard. (It records only images that decoded;
    an image with the bytes of one that did not fails the same way, so it never looks.)"""
    images = plan["images"]
    first = dict(seen)
    rows = []
    for s in pending:
        idxs = shard_items(plan, opts, "image", s)
        shas = {hashes.get(i, "") for i in idxs} - {""}
        prior = {h: first[h] for h in shas if h in first}
        for i in idxs:
            h = hashes.get(i, "")
            if h:
                first.setdefault(h, i)
        work = {
            "items": [[i, images[i]["path"], hashes.get(i, "")] for i in idxs],
            "seen": prior,
            "known": {h: known[h] for h in shas if h in known},
        }
        rows.append({"kind": "image", "shard": s, "work": json.dumps(work)})
    return rows


def _text_work(plan: dict[str, Any], opts: BuildOptions, pending: list[int]) -> list[dict[str, Any]]:
    texts = plan["texts"]
    rows = []
    for s in pending:
        batches = [[t["caption"] for t in texts[r.start : r.stop]] for r in text_batches(plan, opts, s)]
        rows.append({"kind": "text", "shard": s, "work": json.dumps({"batches": batches})})
    return rows


# -- 2. decoding ------------------------------------------------------------------------------------------
def _pack(arrays: dict[str, np.ndarray]) -> tuple[bytes, list[list[Any]]]:
    """Arrays -> (one buffer, [name, dtype, shape] each): exact, and one bytes column whatever the shapes."""
    spec = [[k, a.dtype.str, list(a.shape)] for k, a in arrays.items()]
    return b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values()), spec


def _unpack(buf: bytes, spec: list[list[Any]]) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for name, dtype, shape in spec:
        dt = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        out[name] = np.frombuffer(buf, dtype=dt, count=n // dt.itemsize, offset=pos).reshape(shape)
        pos += n
    return out


def _row(kind: str, shard: int, seq: int, n: int, meta: dict[str, Any], data: bytes = b"") -> dict[str, Any]:
    return {"kind": kind, "shard": shard, "seq": seq, "n": n, "meta": json.dumps(meta), "data": data}


@lru_cache(maxsize=4)
def _preprocessor(path: str, variant: str, bundle_id: str) -> Any:
    """The bundle on this worker, for its preprocessing and tokenizer (no ONNX session is opened)."""
    from albef.model.runtime import Bundle

    bundle = Bundle.load(path, variant=variant)
    _check_same_bundle(bundle, bundle_id)
    return bundle


def _check_same_bundle(bundle: Any, bundle_id: str) -> None:
    if bundle.bundle_id != bundle_id:
        raise IndexError_(
            f"the bundle at {bundle.path} on {socket.gethostname()} is {bundle.bundle_id[:16]}..., not the "
            f"driver's {bundle_id[:16]}...: every node needs the same bundle at the same path"
        )


def _prepare(row: dict[str, Any], *, spec: dict[str, str], opts: BuildOptions) -> Iterator[dict[str, Any]]:
    """Runs on the cluster: one work row -> its encoder batches (then, for an image shard, a summary row)."""
    work = json.loads(row["work"])
    shard = int(row["shard"])
    if row["kind"] == "text":
        for seq, captions in enumerate(work["batches"]):
            yield _row("text", shard, seq, len(captions), {"captions": captions})
        return
    bundle = _preprocessor(spec["bundle"], spec["variant"], spec["bundle_id"])
    items = work["items"]
    rule = ImageShard(shard, work["known"], work["seen"], opts.batch_size)
    seq = 0

    def decode(item: list[Any]) -> dict[str, Any]:
        res = read_image(item[1], bundle, opts)
        if "sha256" in res and item[2] and res["sha256"] != item[2]:
            return {"error": "unreadable: the file changed during the build"}
        return res

    def emit(batch: list[dict[str, Any]] | None) -> Iterator[dict[str, Any]]:
        nonlocal seq
        if batch is None:
            return
        pixels = np.stack([b.pop("pixels") for b in batch])
        data, arrays = _pack({"pixels": pixels})
        yield _row("image", shard, seq, len(batch), {"rows": batch, "arrays": arrays}, data)
        seq += 1

    with ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="albef-decode") as pool:
        ahead = 2 * opts.batch_size + 2 * opts.workers
        for item, res in ordered_map(pool, lambda it: (it, decode(it)), items, ahead):
            yield from emit(rule.add(int(item[0]), item[1], res))
        yield from emit(rule.take())
    yield _row("image", shard, seq, -1, {"errors": rule.errors, "dups": rule.dups, "batches": seq})


# -- 3. encoding ------------------------------------------------------------------------------------------
class _EncodeActor:
    """Runs on the cluster, one per actor: the bundle's sessions, loaded once; encodes one batch a row."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        import ray

        self.bundle = actor_bundle(cfg["bundle"], cfg["variant"], cfg["threads"], cfg["gpu"])
        _check_same_bundle(self.bundle, cfg["bundle_id"])
        for role in ("image_encoder", "text_encoder"):
            self.bundle.session(role)
        self.token_dtype = cfg["token_dtype"]
        self.text_features = cfg["text_features"]
        self.who = {
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "provider": self.bundle.session("image_encoder").get_providers()[0],
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        metas, datas = [], []
        for i in range(len(batch["kind"])):
            meta = json.loads(str(batch["meta"][i]))
            n = int(batch["n"][i])
            t0 = time.perf_counter()
            if n < 0:  # an image shard's summary: passed through
                data = b""
            elif str(batch["kind"][i]) == "image":
                pixels = _unpack(bytes(batch["data"][i]), meta.pop("arrays"))["pixels"]
                emb, stored, scales = encode_image_batch(self.bundle, pixels, self.token_dtype)
                out = {"emb": emb, "tokens": stored}
                if scales is not None:
                    out["scales"] = scales
                data, meta["arrays"] = _pack(out)
            else:
                emb, ids, mask, tokens = encode_text_batch(
                    self.bundle, meta.pop("captions"), self.text_features
                )
                out = {"emb": emb, "token_ids": ids, "mask": mask}
                if tokens is not None:
                    out["tokens"] = tokens
                data, meta["arrays"] = _pack(out)
            meta["by"] = {**self.who, "s": round(time.perf_counter() - t0, 6)}
            metas.append(json.dumps(meta))
            datas.append(data)
        return {
            "kind": batch["kind"],
            "shard": batch["shard"],
            "seq": batch["seq"],
            "n": batch["n"],
            "meta": np.array(metas, dtype=object),
            "data": np.array(datas, dtype=object),
        }


def actor_bundle(path: str, variant: str, threads: int, gpu: bool) -> Any:
    """The bundle an encoder actor holds: CPU sessions, or (``gpu``) CUDA ones where ONNX Runtime has the
    provider, the CPU provider taking what CUDA lacks."""
    from albef.model.runtime import Bundle

    if not gpu:
        return Bundle.load(path, variant=variant, intra_op_threads=threads)

    class CudaBundle(Bundle):
        """Sessions on this actor's GPU (CUDA execution provider; CPU where it lacks a kernel)."""

        def session(self, role: str) -> Any:
            sess = self._sessions.get(role)
            if sess is None:
                import onnxruntime as ort

                so = ort.SessionOptions()
                so.intra_op_num_threads = threads
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                providers = ["CPUExecutionProvider"]
                if "CUDAExecutionProvider" in ort.get_available_providers():
                    providers.insert(0, "CUDAExecutionProvider")
                sess = ort.InferenceSession(str(self.path / self._files[role]), so, providers=providers)
                self._sessions[role] = sess
            return sess

    return CudaBundle.load(path, variant=variant, intra_op_threads=threads)


# -- 4. committing ----------------------------------------------------------------------------------------
class _Collector:
    """Gathers the encoded batches of each shard; writes a shard when it is complete (image shards in plan
    order, so the committed ones are always a prefix, as a local build leaves them)."""

    def __init__(
        self,
        wdir: Path,
        plan: dict[str, Any],
        bundle: Encoder,
        opts: BuildOptions,
        bar: Any,
        image_shards: list[int],
        text_shards: list[int],
    ) -> None:
        self.wdir, self.plan, self.bundle, self.opts, self.bar = wdir, plan, bundle, opts, bar
        self.images: dict[int, dict[str, Any]] = {s: {"batches": {}, "summary": None} for s in image_shards}
        self.image_order = list(image_shards)
        self.texts: dict[int, dict[int, dict[str, Any]]] = {s: {} for s in text_shards}
        self.text_expected = {s: len(text_batches(plan, opts, s)) for s in text_shards}
        self.per_actor: dict[str, dict[str, Any]] = {}

    def add(self, row: dict[str, Any]) -> None:
        meta = json.loads(row["meta"])
        shard, seq, n = int(row["shard"]), int(row["seq"]), int(row["n"])
        arrays = _unpack(bytes(row["data"]), meta["arrays"]) if n >= 0 else {}
        if n >= 0:
            by = meta["by"]
            st = self.per_actor.setdefault(
                str(by["pid"]),
                {"node": by["node"], "provider": by.get("provider"), "batches": 0, "items": 0, "s": 0.0},
            )
            st["batches"] += 1
            st["items"] += n
            st["s"] = round(st["s"] + by["s"], 6)
            self.bar.update(n)
        if row["kind"] == "text":
            self.texts[shard][seq] = arrays
            if len(self.texts[shard]) == self.text_expected[shard]:
                self._commit_text(shard)
            return
        entry = self.images[shard]
        if n < 0:
            entry["summary"] = meta
        else:
            entry["batches"][seq] = {"rows": meta["rows"], "pid": meta["by"]["pid"], **arrays}
        while self.image_order and self._complete(self.image_order[0]):
            self._commit_image(self.image_order.pop(0))

    def _complete(self, shard: int) -> bool:
        e = self.images[shard]
        return e["summary"] is not None and len(e["batches"]) == e["summary"]["batches"]

    def _commit_image(self, shard: int) -> None:
        e = self.images.pop(shard)
        batches = [e["batches"][k] for k in range(e["summary"]["batches"])]
        rows = [r for b in batches for r in b["rows"]]
        arrays = image_shard_arrays(
            rows,
            [b["emb"] for b in batches],
            [b["tokens"] for b in batches],
            [b["scales"] for b in batches if "scales" in b],
            e["summary"]["errors"],
            e["summary"]["dups"],
            self.bundle,
            self.opts,
        )
        encode.save_npz(shard_path(self.wdir, "image", shard), arrays)  # looked up when called
        n_other = len(e["summary"]["errors"]) + len(e["summary"]["dups"])
        self.bar.update(n_other)
        log.info(
            "shard committed",
            extra={
                "kind": "image",
                "shard": shard,
                "items": len(rows) + n_other,
                "actor_pids": sorted({b["pid"] for b in batches}),
            },
        )

    def _commit_text(self, shard: int) -> None:
        parts = self.texts.pop(shard)
        ordered = [parts[k] for k in range(len(parts))]
        arrays = text_shard_arrays(
            shard_items(self.plan, self.opts, "text", shard),
            [(p["emb"], p["token_ids"], p["mask"], p.get("tokens")) for p in ordered],
        )
        encode.save_npz(shard_path(self.wdir, "text", shard), arrays)
        log.info("shard committed", extra={"kind": "text", "shard": shard, "items": len(arrays["plan_idx"])})

    def finish(self) -> None:
        left = sorted(self.images) + sorted(self.texts)
        if left:
            raise RayBuildError(f"the Ray pipeline ended with {len(left)} shards incomplete")

"""What one running service holds: the bundle, the served index version, the stages, and the hot swap.

Loading happens in the background after start-up (``/healthz`` answers at once, ``/readyz`` says 503 until
the bundle and the index are loaded). If the index folder has no published version yet, the service waits
for one: the poller loads it as soon as the ``current`` pointer appears.

Hot swap: every ``reload_interval_s`` the poller reads the index's ``current`` pointer (one small file). When
it names a new version, a new :class:`IndexReader` is opened off the event loop (refused if it was built
with another bundle) and replaces the served one in one assignment. Requests lease the reader they started
with (:meth:`ServiceState.lease`), so in-flight requests finish on the old version; the old reader is closed
when its last lease ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from albef.service.engine import SearchEngine, Stages
from albef.service.errors import NotReadyError
from albef.service.metrics import Metrics
from albef.service.protocols import IndexView, ModelBundle
from albef.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["ServiceState", "ReaderHandle", "bundle_path_for"]


class ReaderHandle:
    """An index reader with a lease count; closed once retired and no request holds it."""

    def __init__(self, reader: IndexView) -> None:
        self.reader = reader
        self._refs = 0
        self._retired = False
        self._lock = threading.Lock()

    def acquire(self) -> IndexView | None:
        """The reader with one more lease, or None if it was already retired and closed (a swap won the race)."""
        with self._lock:
            if self._retired and self._refs == 0:
                return None
            self._refs += 1
        return self.reader

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            close = self._retired and self._refs == 0
        if close:
            self.reader.close()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            close = self._refs == 0
        if close:
            self.reader.close()


def bundle_path_for(index_dir: Path, explicit: Path | None) -> Path:
    """The bundle to serve: the explicit one, else the path the index manifest records."""
    if explicit is not None:
        return Path(explicit)
    from albef.index.layout import read_manifest, version_path

    manifest = read_manifest(version_path(index_dir))
    recorded = (manifest.get("bundle") or {}).get("path")
    if not recorded:
        raise NotReadyError("the index manifest records no model bundle path; pass --model")
    return Path(recorded)


def _warm_up(bundle: ModelBundle) -> None:
    """One call of every graph, so the first request does not pay ONNX Runtime's first-run set-up."""
    import numpy as np

    r = bundle.image_res
    _, image_tokens = bundle.encode_pixels(np.zeros((1, 3, r, r), np.float32))
    ids, mask = bundle.tokenize(["warm up"])
    _, text_tokens = bundle.encode_ids(ids, mask)
    bundle.itm_scores(text_tokens, mask, image_tokens)
    bundle.itm_scores(text_tokens, mask, np.repeat(image_tokens, 8, axis=0).astype(np.float16))  # as stored
    bundle.itm_scores_for_image(bundle.image_kv(image_tokens), text_tokens, mask)


class ServiceState:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.bundle: ModelBundle | None = None
        self.stages: Stages | None = None
        self.engine: SearchEngine | None = None
        self._handle: ReaderHandle | None = None
        self.status = "starting"  # why we are not ready (for /readyz)
        self._load_lock = threading.Lock()
        self._refused_version: str | None = None

    # -- readiness and leases -----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.engine is not None and self._handle is not None

    @property
    def reader(self) -> IndexView | None:
        h = self._handle
        return h.reader if h is not None else None

    @contextlib.contextmanager
    def lease(self) -> Iterator[IndexView]:
        """The current reader, kept open for the duration of the block even if a swap happens meanwhile."""
        while True:
            handle = self._handle
            if handle is None or self.engine is None:
                raise NotReadyError(f"not ready: {self.status}")
            reader = handle.acquire()
            if reader is not None:
                break
        try:
            yield reader
        finally:
            handle.release()

    # -- loading ------------------------------------------------------------------------------------------
    def try_load(self) -> bool:
        """Load the bundle and the current index version if not done yet (blocking; run it in a thread)."""
        from albef.index import current_version

        with self._load_lock:
            if self.ready:
                return True
            index_dir = self.settings.index_dir
            if index_dir is None:
                self.status = "no index folder configured (ALBEF_INDEX_DIR or --index)"
                return False
            if current_version(index_dir) is None:
                self.status = f"waiting for an index version in {index_dir}"
                return False
            try:
                self._load(Path(index_dir))
            except Exception as exc:  # noqa: BLE001 - reported by /readyz and the log, retried by the poller
                self.status = f"load failed: {exc}"
                log.exception("loading the bundle or the index failed")
                return False
            return True

    def _load(self, index_dir: Path) -> None:
        from albef.cpu import cpu_info
        from albef.index import IndexReader
        from albef.model.runtime import Bundle
        from albef.service.images import UploadPolicy

        s = self.settings
        if self.bundle is None:
            path = bundle_path_for(index_dir, s.bundle)
            self.bundle = Bundle.load(path, variant=s.variant, intra_op_threads=s.threads, eager=True)
            _warm_up(self.bundle)
            log.info(
                "bundle loaded",
                extra={
                    "bundle": str(path),
                    "bundle_id": self.bundle.bundle_id,
                    "variant": s.variant,
                    "cpu": cpu_info(),
                    **self.bundle.validation_summary(),
                },
            )
        reader = IndexReader.open(
            index_dir, bundle_id=self.bundle.bundle_id, encoder=self.bundle, search_threads=s.faiss_threads
        )
        if self.stages is None:
            self.stages = Stages(
                self.bundle,
                batch_max_size=s.batch_max_size,
                batch_max_wait_ms=s.batch_max_wait_ms,
                itm_max_pairs=s.itm_max_pairs,
                queue_max=s.queue_max,
                retry_after_s=s.retry_after_s,
                metrics=self.metrics,
            )
        self._swap(reader)
        self.engine = SearchEngine(
            self.bundle,
            self.stages,
            metrics=self.metrics,
            uploads=UploadPolicy.from_settings(s),
            max_in_flight=s.max_in_flight,
        )
        self.status = "ready"
        self.metrics.ready.set(1)

    def _swap(self, reader: IndexView) -> None:
        old, self._handle = self._handle, ReaderHandle(reader)
        self.metrics.set_index(
            reader.version,
            self.bundle.bundle_id if self.bundle else "",
            {k: reader.count(k) for k in ("image", "text")},
        )
        log.info("serving index version", extra={"index": str(reader.index_dir), "version": reader.version})
        if old is not None:
            old.retire()

    def check_reload(self) -> str | None:
        """Swap to the index's current version if it changed (blocking). Returns the new version or None."""
        from albef.index import IndexReader, current_version

        if not self.ready:
            self.try_load()
            return self.reader.version if self.ready else None
        index_dir = self.settings.index_dir
        assert index_dir is not None and self.bundle is not None
        version = current_version(index_dir)
        if version is None or version == self.reader.version or version == self._refused_version:
            return None  # a refused version is not retried (nor logged again) until the pointer moves on
        try:
            reader = IndexReader.open(
                index_dir,
                bundle_id=self.bundle.bundle_id,
                version=version,
                encoder=self.bundle,
                search_threads=self.settings.faiss_threads,
            )
        except Exception:  # noqa: BLE001 - keep serving the old version
            self._refused_version = version
            self.metrics.reloads.labels(result="error").inc()
            log.exception(
                "index reload failed; still serving the old version",
                extra={"version": version, "serving": self.reader.version},
            )
            return None
        self._swap(reader)
        self.metrics.reloads.labels(result="ok").inc()
        return version

    async def run(self) -> None:
        """Load (in a thread), then poll for new index versions until cancelled."""
        await asyncio.to_thread(self.try_load)
        interval = self.settings.reload_interval_s
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.check_reload)
            except Exception:  # noqa: BLE001 - the poller must survive anything
                log.exception("index poll failed")

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
        if self.stages is not None:
            self.stages.close()
        if self._handle is not None:
            self._handle.retire()
            self._handle = None
        self.engine = None
        self.metrics.ready.set(0)

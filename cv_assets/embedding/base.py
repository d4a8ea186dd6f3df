"""What every embedder offers, and the batch plumbing they share.

An embedder turns images into unit vectors of `dim` floats and says which model made
them (`model_version`, stored with every vector so that vectors of different models
are never compared). `embed_sources` decodes files/bytes/arrays in a worker pool
while the model works on the previous batch; a source that cannot be used lands in
`errors` with its reason and never fails the rest of the batch.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from cv_assets.embedding.images import ImageError, ImageSource, array_to_rgb, describe_source, load_image

EMBEDDING_DIM = 512


class ModelUnavailableError(RuntimeError):
    """The model's weights cannot be loaded; the message says where it looked and what to do."""


class EmbedderConfigError(ValueError):
    """The embedder settings ask for something this machine cannot do (e.g. CUDA without a GPU)."""


@dataclass
class EmbedOutcome:
    """Vectors for the sources that worked (`ok` gives their positions) and a reason for each that did not."""

    vectors: np.ndarray
    ok: list[int] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)

    def by_index(self) -> dict[int, np.ndarray]:
        return {index: self.vectors[row] for row, index in enumerate(self.ok)}


def available_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def _as_rgb_array(image: Any, label: str) -> np.ndarray:
    return array_to_rgb(np.asarray(image), label)


def chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def prefetched(batches: Sequence[Sequence[Any]], work: Callable[[Any], Any], workers: int) -> Iterator[list[Any]]:
    """Yield `[work(item) for item in batch]` per batch, working on the next batch in a
    thread pool while the caller uses the current one (`workers == 0`: no threads).

    Decoding (Pillow, OpenCV) releases the GIL, so the pool runs beside the model.
    """
    if not batches:
        return
    if workers <= 0:
        for batch in batches:
            yield [work(item) for item in batch]
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embed-prep") as pool:
        pending: list[Future] = [pool.submit(work, item) for item in batches[0]]
        for index in range(len(batches)):
            ready = [future.result() for future in pending]
            if index + 1 < len(batches):
                pending = [pool.submit(work, item) for item in batches[index + 1]]
            yield ready


class Embedder:
    """Shared interface and batch logic; subclasses implement `_prepare` and `_embed_prepared`."""

    family: str = ""
    dim: int = EMBEDDING_DIM
    device: str = "cpu"
    # What computes the vectors and in which number format (recorded in asset metadata
    # beside model_version, which they never change). ClipEmbedder sets its own.
    backend: str = "numpy"
    precision: str = "fp32"
    batch_size: int = 32
    prefetch_workers: int = 1
    # Whether decoding and `_prepare` run in the worker pool beside the model (True) or just
    # before it, on `prepare_threads` threads while it waits (False: the model uses every core).
    prepare_in_workers: bool = True
    prepare_threads: int = 1
    # JPEGs may be decoded at a reduced scale while both sides stay at least this large.
    decode_min_side: int | None = None

    @property
    def model_version(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- subclass hooks ------------------------------------------------------------
    def _prepare(self, image: np.ndarray) -> Any:
        """Per-image CPU work (resize, histogram ...) on a decoded RGB uint8 array."""
        raise NotImplementedError

    def _embed_prepared(self, prepared: list[Any]) -> Any:
        """One batch of prepared items -> (n, dim) float32 unit vectors (or what `_collect` takes)."""
        raise NotImplementedError

    def _load_source(self, source: ImageSource, name: str | None) -> np.ndarray:
        return load_image(source, name, min_side=self.decode_min_side)

    def ensure_ready(self) -> None:
        """Load whatever the embedder needs now (errors surface here, not mid-batch)."""

    # -- batch plumbing ------------------------------------------------------------
    def _run(self, items: list[tuple[int, str, Any]], load: Callable[[Any, str], np.ndarray],
             strict: bool) -> EmbedOutcome:
        """Decode and prepare each batch, embed batch by batch in this thread: in the worker
        pool beside the model (`prepare_in_workers`), or on `prepare_threads` threads just
        before it.

        strict: the first bad item raises; otherwise it lands in `errors` with its reason."""

        def attempt(step, label: str, value):
            try:
                return step(value), None
            except ImageError as exc:
                if strict:
                    raise
                return None, str(exc)
            except Exception as exc:  # one bad item never fails the batch
                if strict:
                    raise
                return None, f"{label}: {type(exc).__name__}: {exc}"

        def work(item: tuple[int, str, Any]):
            index, label, payload = item
            return (index, label, *attempt(lambda value: self._prepare(load(value, label)), label, payload))

        ok: list[int] = []
        errors: dict[int, str] = {}
        vectors: list[np.ndarray] = []
        batches = chunked(items, self.batch_size)
        # (Its threads start at the first task: none when the workers prepare.)
        with ThreadPoolExecutor(max_workers=self.prepare_threads, thread_name_prefix="embed-prepare") as preparers:
            if self.prepare_in_workers:
                ready = prefetched(batches, work, self.prefetch_workers)
            else:
                # Decoding beside a model that uses every core slows it more than it saves
                # (JPEG files, OpenVINO bf16 on 2 cores: 0.75 of the forward-only speed beside
                # it, 0.83 before it).
                ready = (list(preparers.map(work, batch)) for batch in batches)
            for batch in ready:
                good = []
                for index, label, value, error in batch:
                    if error is None:
                        good.append((index, value))
                    else:
                        errors[index] = error
                if good:
                    vectors.append(self._embed_prepared([value for _, value in good]))
                    ok.extend(index for index, _ in good)
        return EmbedOutcome(vectors=self._collect(vectors), ok=ok, errors=errors)

    def _collect(self, parts: list[Any]) -> np.ndarray:
        """The `_embed_prepared` results of one call -> one (n, dim) float32 matrix. (A GPU
        embedder returns device tensors there and copies them back here, all at once.)"""
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, self.dim), dtype=np.float32)

    # -- public API ----------------------------------------------------------------
    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Decoded RGB uint8 (H, W, 3) frames -> (N, dim) float32 unit vectors.

        A frame that is not a valid image raises `ImageError` (decoded frames are
        trusted input; use `embed_sources` for untrusted files)."""
        self.ensure_ready()
        items = [(index, f"image {index}", image) for index, image in enumerate(images)]
        return self._run(items, _as_rgb_array, strict=True).vectors

    def embed_regions(self, regions: Sequence[np.ndarray]) -> np.ndarray:
        """Regions cut from frames (any aspect ratio: a search's crops, a detector's boxes) ->
        vectors of all their content. An embedder whose preprocessing crops its input (CLIP's
        centre crop) letterboxes them first; this one sees every pixel as it is."""
        return self.embed_images(regions)

    def embed_sources(self, sources: Sequence[ImageSource], names: Sequence[str] | None = None) -> EmbedOutcome:
        """Arrays, PIL images, paths or encoded bytes -> vectors for the good ones, reasons for the rest."""
        self.ensure_ready()
        names = list(names) if names is not None else [None] * len(sources)
        if len(names) != len(sources):
            raise ValueError(f"{len(names)} names for {len(sources)} sources")
        items = [(index, describe_source(source, name), source)
                 for index, (source, name) in enumerate(zip(sources, names))]
        return self._run(items, self._load_source, strict=False)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    # -- the inherited CLIPEmbeddingService names -------------------------------------
    def generate_embedding(self, image: ImageSource) -> np.ndarray:
        """One image (array, PIL image, path or bytes) -> (dim,) unit vector; raises ImageError."""
        self.ensure_ready()
        return self._collect([self._embed_prepared([self._prepare(self._load_source(image, None))])])[0]

    @staticmethod
    def compute_similarity(a: np.ndarray, b: np.ndarray) -> float:
        """Cosine similarity of two vectors (any scale)."""
        a = np.asarray(a, dtype=np.float64).ravel()
        b = np.asarray(b, dtype=np.float64).ravel()
        if a.shape != b.shape:
            raise ValueError(f"cannot compare vectors of shapes {a.shape} and {b.shape}")
        denom = np.linalg.norm(a) * np.linalg.norm(b)
        return float(a @ b / denom) if denom > 0 else 0.0

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "model_version": self.model_version, "device": self.device, "dim": self.dim,
                "backend": self.backend, "precision": self.precision}

"""The CLIP embedder: transformers `CLIPModel`, loaded lazily once, batched and pipelined.

- Weights: a hub id (from the local Hugging Face cache; `local_files_only` by default)
  or a directory written by `save_pretrained`. Safetensors only (no pickle), no
  remote code, revision pinnable.
- Device, backend, precision: `runtime.choose_runtime` (auto = CUDA torch fp16; on a
  CPU OpenVINO when installed, bf16 where the processor has it, else fp32), every core
  this process may run on. OpenVINO towers are converted from the torch model and
  cached on disk (`openvino_backend.py`).
- Lazy torch: what keys and feeds the towers (version, weights' hash, preprocessing,
  sizes) is read from the checkpoint's files (`describe_checkpoint`), so an OpenVINO
  cache hit never imports transformers' modelling code nor loads the torch weights
  (seconds per process: each step of a multiprocess run is one). The torch model is
  loaded on first need: the torch backend, a cache miss, or the `model` property.
- Version: `<repo>@<commit>` for hub models, `clip:<dir>@sha256:<12 hex>` for a local
  directory (hash of the weights and preprocessor config), stored with every vector.
- Preprocessing: `preprocess.py` (arrays and torch kernels, no PIL round trip). The CPU
  makes uint8 crops; the model's side normalises them (in OpenVINO's graph, or one torch
  operation on the batch). Files for the next batch are decoded in a worker thread while
  the model runs; on a GPU the workers resize too, batches go up through pinned memory
  and the CPU stages the next batch while the GPU runs the current one (see
  `ClipEmbedder.__init__`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cv_assets.embedding.base import (
    EMBEDDING_DIM,
    Embedder,
    ModelUnavailableError,
    available_cores,
)
from cv_assets.embedding.locate import _looks_like_path, unavailable_message
from cv_assets.embedding.preprocess import (
    PreprocessConfig,
    crops_from_pixel_values,
    mean_colour,
    normalise_batch,
    pad_to_square,
    resize_and_crop,
)
from cv_assets.embedding.runtime import Capabilities, choose_runtime, probe_capabilities, torch_dtype
from cv_assets.settings import EmbedderSettings

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors",)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
MODEL_CONFIG = "config.json"
HASH_CHUNK_BYTES = 8 * 1024 * 1024
# Decoding a JPEG at 1/2, 1/4 or 1/8 scale is nearly free; keep at least twice the
# model's input size so the final antialiased resize still has real detail to work with.
DECODE_OVERSAMPLING = 2
MAX_PREFETCH_WORKERS = 32


@dataclass(frozen=True)
class ClipCheckpoint:
    """A checkpoint as the embedder needs it, without its weights in memory."""

    directory: Path
    model_version: str
    # The weights' hash (keys the OpenVINO cache): sha256 of the files, or of the tensors.
    weights_id: str
    preprocess: PreprocessConfig
    projection_dim: int
    text_max_length: int


def configure_cpu_threads(device: str) -> None:
    """CPU: the model's matrix products use every available core. GPU: the CPU only resizes,
    one image per worker thread, so each worker keeps to one OpenMP thread (8 workers x
    16 OpenMP threads would fight over 16 cores)."""
    torch.set_num_threads(available_cores() if device == "cpu" else 1)


def weights_digest(directory: Path) -> str:
    """sha256 over the safetensors weights and the preprocessor config (both decide the vectors)."""
    digest = hashlib.sha256()
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in directory.glob(pattern)})
    config = directory / PREPROCESSOR_CONFIG
    for path in files + ([config] if config.is_file() else []):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    return digest.hexdigest()


def _hub_snapshot_dir(settings: EmbedderSettings) -> Path | None:
    """The cached snapshot directory of a hub model (its name is the commit hash)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(settings.model, "config.json", cache_dir=settings.cache_dir,
                                   revision=settings.revision)
    return Path(found).parent if isinstance(found, str) else None


def _model_version(settings: EmbedderSettings, directory: Path, local: bool, digest: str | None) -> str:
    if local:
        return f"clip:{directory.name}@sha256:{digest[:12]}"
    if directory.parent.name == "snapshots":
        return f"{settings.model}@{directory.name}"
    # Not found in the cache layout (unusual): the pinned revision is the best name left.
    return f"{settings.model}@{settings.revision or 'unresolved'}"


def _hub_weights_id(directory: Path) -> str | None:
    """In the hub cache each weights file links to blobs/<sha256 of its content>: the
    weights' hash for free. None when the layout is not that."""
    names = []
    for path in sorted(directory.glob("*.safetensors")):
        blob = Path(os.path.realpath(path)).name
        if not (path.is_symlink() and len(blob) == 64 and all(c in "0123456789abcdef" for c in blob)):
            return None
        names.append(f"{path.name}={blob}")
    return "sha256-blobs:" + ",".join(names) if names else None


def state_dict_digest(model: Any) -> str:
    """sha256 over the model's tensors (names, dtypes, shapes, bytes): the weights' hash of a
    model that exists only in memory."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _read_model_config(directory: Path) -> dict | None:
    """The checkpoint's config.json as a dict (None where it cannot be read)."""
    try:
        return json.loads((directory / MODEL_CONFIG).read_text())
    except (OSError, ValueError):
        return None


def describe_checkpoint(settings: EmbedderSettings, config: dict | None = None) -> ClipCheckpoint | None:
    """The checkpoint named by `settings`, read from its files without transformers or torch
    (`config`: the model's config as a dict, where the caller has the model). None where the
    files do not say enough (a hub model not downloaded yet): loading the model comes first."""
    local_dir = Path(settings.model).expanduser()
    local = local_dir.is_dir()
    if _looks_like_path(settings.model) and not local:
        raise ModelUnavailableError(unavailable_message(settings, "the directory does not exist")) from None
    directory = local_dir if local else (_hub_snapshot_dir(settings) or Path(settings.model))
    config = config or _read_model_config(directory)
    try:
        image_size = int(config["vision_config"]["image_size"])
        projection_dim = int(config["projection_dim"])
        text_max_length = int(config["text_config"]["max_position_embeddings"])
    except (TypeError, KeyError, ValueError):
        return None
    default = PreprocessConfig.for_image_size(image_size)
    config_file = directory / PREPROCESSOR_CONFIG
    preprocess = PreprocessConfig.from_file(config_file, default) if config_file.is_file() else default
    digest = weights_digest(directory) if local else None
    version = _model_version(settings, directory, local, digest)
    weights_id = f"sha256:{digest}" if digest else (_hub_weights_id(directory) or version)
    return ClipCheckpoint(directory, version, weights_id, preprocess, projection_dim, text_max_length)


def load_clip_model(settings: EmbedderSettings, device: str, dtype: torch.dtype = torch.float32) -> Any:
    """The torch `CLIPModel` named by `settings`, or `ModelUnavailableError` (never a hub stack trace)."""
    from transformers import CLIPModel
    from transformers.utils import logging as hf_logging

    local_dir = Path(settings.model).expanduser()
    local = local_dir.is_dir()
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no progress bars or loading chatter in every run's log
    hf_logging.disable_progress_bar()
    try:
        model = CLIPModel.from_pretrained(
            str(local_dir) if local else settings.model,
            revision=settings.revision,
            cache_dir=settings.cache_dir,
            local_files_only=settings.local_files_only,
            use_safetensors=True,
            dtype=dtype,
        )
    except Exception as exc:  # OSError, HFValidationError, SafetensorError ...: all mean "not loadable"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        reason = f"{type(exc).__name__}: {first_line}"
        if local and not any(local_dir.glob("*.safetensors")):
            reason = "no *.safetensors weights in it (pickled .bin weights are never loaded)"
        raise ModelUnavailableError(unavailable_message(settings, reason)) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


class PinnedBatches:
    """A small ring of page-locked host buffers for uint8 batches bound for the GPU.

    A copy from pinned memory is a true asynchronous DMA: the CPU stacks the next batch
    while the GPU still copies and runs the current one. A buffer is reused only after
    the copy out of it has finished (its CUDA event)."""

    def __init__(self, slots: int = 2):
        self.slots = slots
        self._buffers: list[tuple[torch.Tensor, Any]] = []
        self._next = 0
        self._guard = threading.Lock()  # two callers never fill the same slot

    def stage(self, crops: list[np.ndarray]) -> torch.Tensor:
        """Stack `crops` into a pinned buffer and start its copy to the GPU; returns the GPU tensor."""
        with self._guard:
            return self._stage(crops)

    def _stage(self, crops: list[np.ndarray]) -> torch.Tensor:
        shape = (len(crops), *crops[0].shape)
        if len(self._buffers) < self.slots:
            self._buffers.append((torch.empty(0, dtype=torch.uint8), None))
        slot = self._next
        self._next = (self._next + 1) % self.slots
        buffer, done = self._buffers[slot]
        if done is not None:
            done.synchronize()
        if buffer.numel() < int(np.prod(shape)):
            buffer = torch.empty(int(np.prod(shape)), dtype=torch.uint8, pin_memory=True)
        host = buffer[: int(np.prod(shape))].view(shape)
        np.stack(crops, out=host.numpy())
        on_device = host.to("cuda", non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._buffers[slot] = (buffer, done)
        return on_device


class ClipEmbedder(Embedder):
    """CLIP image and text embeddings (512-d, unit norm), the inherited `CLIPEmbeddingService`.

    `backend` and `precision` say what runs the model ("torch"/"openvino", "fp32"/"bf16"/
    "fp16"); assets record them beside `model_version`, which they never change (every
    backend and precision gives the same vectors to within cosine 0.999).
    """

    family = "clip"

    def __init__(self, settings: EmbedderSettings | None = None, capabilities: Capabilities | None = None):
        self.settings = settings or EmbedderSettings()
        runtime = choose_runtime(self.settings.device, self.settings.backend, self.settings.precision,
                                 capabilities or probe_capabilities())
        self.device, self.backend, self.precision = runtime.device, runtime.backend, runtime.precision
        # The torch model's dtype: OpenVINO converts from (and checks against) the fp32 model.
        self.dtype = torch_dtype(self.precision) if self.backend == "torch" else torch.float32
        on_cpu = self.device == "cpu"
        self.batch_size = self.settings.batch_size if on_cpu else self.settings.cuda_batch_size
        # On a CPU the model already uses every core: each batch is decoded and resized just
        # before its forward pass, one thread per core (a thread working beside the model
        # takes a core from one of its threads, and the others wait for that one at every
        # layer: with OpenVINO bf16 on 2 cores, frames 0.90 of the forward-only speed beside
        # it, 0.93 before it; JPEG files 0.75 and 0.83). On a GPU the CPU is free: every core
        # but one decodes and resizes beside the model so it never waits.
        self.prefetch_workers = min(MAX_PREFETCH_WORKERS, max(1, available_cores() - 1))
        self.prepare_in_workers = not on_cpu
        self.prepare_threads = available_cores()
        self._checkpoint: ClipCheckpoint | None = None
        self._model = None  # the torch CLIPModel, loaded on first need (`_torch_model`)
        self._tokenizer = None
        self._image_tower = None
        self._text_tower = None
        self._pinned = PinnedBatches() if not on_cpu else None
        self.threads = available_cores()  # OpenVINO's inference threads (torch's: configure_cpu_threads)
        # Reentrant: loading under the lock may compile a tower, and a cache miss then loads
        # the torch model (`_torch_model`, which takes the lock too).
        self._lock = threading.RLock()

    # -- loading -------------------------------------------------------------------
    def ensure_ready(self) -> None:
        self._load()

    @classmethod
    def from_model(
        cls,
        model: Any,
        *,
        model_version: str,
        preprocess: PreprocessConfig | None = None,
        device: str = "auto",
        backend: str = "torch",
        precision: str = "auto",
        batch_size: int = 32,
        dtype: torch.dtype | None = None,
        compiled_cache_dir: Path | None = None,
        capabilities: Capabilities | None = None,
        threads: int | None = None,
    ) -> "ClipEmbedder":
        """Wrap a `CLIPModel` already in memory (benchmarks, notebooks); the caller names its version.
        (`dtype` is the older spelling of `precision` for the torch backend.)"""
        if dtype is not None:
            precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        settings = EmbedderSettings(model=f"<in-memory {model_version}>", device=device, backend=backend,
                                    precision=precision, batch_size=batch_size, cuda_batch_size=batch_size,
                                    compiled_cache_dir=compiled_cache_dir)
        embedder = cls(settings, capabilities)
        configure_cpu_threads(embedder.device)
        if threads:
            embedder.threads = threads
            torch.set_num_threads(threads)
        model = model.to(device=embedder.device, dtype=embedder.dtype).eval()
        config = model.config
        preprocess = preprocess or PreprocessConfig.for_image_size(int(config.vision_config.image_size))
        weights_id = f"state-sha256:{state_dict_digest(model)}" if embedder.backend == "openvino" else model_version
        checkpoint = ClipCheckpoint(Path("."), model_version, weights_id, preprocess, int(config.projection_dim),
                                    int(config.text_config.max_position_embeddings))
        with embedder._lock:
            embedder._model = model
            embedder._install(checkpoint)
        return embedder

    def _install(self, checkpoint: ClipCheckpoint) -> None:
        projection = checkpoint.projection_dim
        if projection != EMBEDDING_DIM:
            raise ModelUnavailableError(
                f"CLIP model {self.settings.model!r} projects to {projection} dimensions; "
                f"the stores hold {EMBEDDING_DIM}-d vectors (use a ViT-B/32-style checkpoint)")
        self.decode_min_side = DECODE_OVERSAMPLING * checkpoint.preprocess.shortest_edge
        if self.backend == "openvino":
            self._image_tower = self._compile_tower(checkpoint, "image")
            # OpenVINO computes in f32 where the CPU lacks the requested format: report what runs.
            if self._image_tower.precision != self.precision:
                log.warning("embedder.precision %s is not supported by this CPU's OpenVINO plugin; running %s",
                            self.precision, self._image_tower.precision)
                self.precision = self._image_tower.precision
        self._checkpoint = checkpoint

    def _compile_tower(self, checkpoint: ClipCheckpoint, tower: str):
        from cv_assets.embedding.openvino_backend import load_tower

        # The torch model only to convert: a good cache entry is loaded and checked without it.
        return load_tower(self._torch_model, tower, weights_id=checkpoint.weights_id, precision=self.precision,
                          cache_dir=self.compiled_cache_dir, threads=self.threads,
                          preprocess=checkpoint.preprocess)

    @property
    def compiled_cache_dir(self) -> Path:
        from cv_assets.embedding.openvino_backend import default_compiled_cache_dir

        configured = self.settings.compiled_cache_dir
        return Path(configured).expanduser() if configured else default_compiled_cache_dir()

    def _load(self) -> ClipCheckpoint:
        if self._checkpoint is None:
            with self._lock:
                if self._checkpoint is None:
                    self._install_checkpoint()
        return self._checkpoint

    def _install_checkpoint(self) -> None:
        """Read the checkpoint and make the image side ready (lock held). The torch model is
        loaded here only where it is needed now: the torch backend, an OpenVINO cache miss,
        or a checkpoint whose files are not there yet (a hub model `from_pretrained` fetches)."""
        started = time.perf_counter()
        configure_cpu_threads(self.device)
        checkpoint = describe_checkpoint(self.settings)
        if checkpoint is None:
            checkpoint = describe_checkpoint(self.settings, self._torch_model().config.to_dict())
        if self.backend == "torch":
            self._torch_model()
        self._install(checkpoint)
        log.info("loaded CLIP %s on %s (%s %s, torch model %s) in %.1fs", checkpoint.model_version, self.device,
                 self.backend, self.precision, "loaded" if self._model is not None else "not needed",
                 time.perf_counter() - started)

    def _torch_model(self):
        """The torch `CLIPModel`, loaded once, on first need."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = load_clip_model(self.settings, self.device, self.dtype)
        return self._model

    @property
    def model(self):
        """The torch `CLIPModel` (on the OpenVINO backend: the fp32 model it was converted from),
        loaded on first use."""
        self._load()
        return self._torch_model()

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return self._load().preprocess

    @property
    def model_version(self) -> str:
        return self._load().model_version

    @property
    def model_directory(self) -> Path:
        return self._load().directory

    # -- images --------------------------------------------------------------------
    def _prepare(self, image: np.ndarray) -> np.ndarray:
        """The model's uint8 (h, w, 3) input crop (normalised on the model's side)."""
        return resize_and_crop(image, self._load().preprocess)

    def embed_regions(self, regions) -> np.ndarray:
        """CLIP's processor centre-crops to a square, which would keep only the middle of a
        tall or wide region (a box fit's slab, the whole 16:9 frame): each region is first
        letterboxed into a square of the mean colour, which normalises to zero."""
        fill = mean_colour(self._load().preprocess)
        return self.embed_images([pad_to_square(region, fill) for region in regions])

    def _embed_prepared(self, prepared: list[np.ndarray]):
        checkpoint = self._load()
        if self.device == "cuda":
            # Stays on the GPU, unsynchronised: the CPU goes on to stage the next batch while
            # this one runs; `_collect` copies every batch back at once.
            on_device = self._pinned.stage(prepared)
            return self._forward_torch(normalise_batch(on_device, checkpoint.preprocess, self.dtype))
        return self.forward(np.stack(prepared))

    def _collect(self, parts: list[Any]) -> np.ndarray:
        if parts and isinstance(parts[0], torch.Tensor):
            return torch.cat(parts).cpu().numpy()
        return super()._collect(parts)

    def _forward_torch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            output = self.model.get_image_features(pixel_values=pixel_values.to(self.dtype))
            return torch.nn.functional.normalize(_features(output).float(), dim=-1)

    def forward(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """One ready batch -> (N, 512) float32 unit vectors. `pixels`: uint8 (N, h, w, 3) crops
        (what `_prepare` makes: the OpenVINO tower's own input, normalised in its graph; torch
        normalises them first) or normalised float (N, 3, h, w) pixel values (torch's own
        input; OpenVINO gets the crops they were made from)."""
        preprocess = self._load().preprocess
        pixels = torch.as_tensor(pixels)
        if self._image_tower is not None:
            if pixels.dtype != torch.uint8:
                pixels = crops_from_pixel_values(pixels, preprocess)
            return self._image_tower(pixels.numpy())
        if pixels.dtype == torch.uint8:
            pixels = normalise_batch(pixels.to(self.device), preprocess, self.dtype)
        return self._forward_torch(pixels).cpu().numpy()

    # -- text ----------------------------------------------------------------------
    def _load_tokenizer(self):
        if self._tokenizer is None:
            from transformers import CLIPTokenizer

            directory = self._load().directory
            try:
                self._tokenizer = CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)
            except Exception as exc:
                raise ModelUnavailableError(
                    f"CLIP model {self.settings.model!r} has no usable tokenizer in {directory} "
                    f"({type(exc).__name__}: {exc}); save the CLIPTokenizer with the checkpoint "
                    "(tokenizer.json or vocab.json + merges.txt) to use text search") from None
        return self._tokenizer


    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Text queries -> (N, 512) float32 unit vectors in the same space as the images."""
        if isinstance(texts, str):
            texts = [texts]
        checkpoint = self._load()
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokenizer = self._load_tokenizer()
        if self.backend == "openvino" and self._text_tower is None:
            with self._lock:
                if self._text_tower is None:
                    self._text_tower = self._compile_tower(checkpoint, "text")
        vectors = []
        for start in range(0, len(texts), self.batch_size):
            tokens = tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                               max_length=checkpoint.text_max_length, return_tensors="pt")
            if self._text_tower is not None:
                vectors.append(self._text_tower(tokens["input_ids"].numpy().astype(np.int64),
                                                tokens["attention_mask"].numpy().astype(np.int64)))
                continue
            with torch.inference_mode():
                features = _features(self.model.get_text_features(**tokens.to(self.device)))
                vectors.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(vectors, axis=0).astype(np.float32, copy=False)


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output is the projection; 4.x a tensor.
    return output.pooler_output if hasattr(output, "pooler_output") else output


# The name the inherited services used.
CLIPEmbeddingService = ClipEmbedder

"""CLIP's image and text towers run by OpenVINO on the CPU, converted from the loaded `CLIPModel`.

Converting a ViT-B/32 from torch takes ~30 s, so each converted tower is kept on disk:

    <cache_dir>/<key>/
        model.xml, model.bin    the OpenVINO IR (f32 weights; precision is a compile option)
        probe.npz               a fixed probe input and the torch model's vectors for it
        manifest.json           what was converted, and the IR's sizes, xml and probe digests
        compiled/               OpenVINO's own cache of the compiled blob (faster reloads)

The image tower takes the uint8 (N, h, w, 3) RGB crops themselves: converting them to
float and normalising (mean/std of the checkpoint's preprocessor config) is part of the
graph, so the CPU only resizes and stacks, and the pixels cross into OpenVINO at a
quarter of the float size.

`key` is a digest of the weights' hash, the backend, the precision, the tower, what the
tower takes (for the image tower: the crops and their mean/std) and the OpenVINO
version, so another checkpoint, precision, normalisation or OpenVINO release never
reuses a model built for something else. A tower is compiled once per process (the embedder
holds it). A cache entry that cannot be read, does not match its manifest or gives
vectors that disagree with its stored probe vectors is deleted and rebuilt; a new entry
is written to a temporary folder and renamed into place, so a process that dies
half-way, or two processes converting at once, never leave a broken entry. Since the
probe's vectors are stored with the entry, a good entry is loaded and checked without
the torch model: that is loaded only to convert (a miss or a rebuild).

An entry is a few hundred MB, and one written by an older cache format or OpenVINO
release is never read again: whenever an entry is written, those (and staging folders a
dead process left over a day ago) are deleted (`prune_dead_entries`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cv_assets.embedding.preprocess import PreprocessConfig, normalise_batch, pixel_mean_and_scale

log = logging.getLogger(__name__)

# 3: the entry holds the probe input and the torch model's vectors for it (probe.npz).
# 2: the image tower takes uint8 NHWC crops and normalises them (1 took normalised float).
CACHE_FORMAT = 3
# The converted tower must agree with the torch fp32 tower on the probe input at least this
# well; f32 agrees to ~1e-7, bf16 to ~1e-4, a damaged file not at all.
PROBE_MIN_COSINE = 0.999
PROBE_FILE = "probe.npz"
OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
FROM_OV_PRECISION = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


class OpenVinoCacheError(RuntimeError):
    """A cache entry is unusable (missing, truncated, altered or wrong)."""


class _NoTelemetry:
    """Stands in for `openvino_telemetry.Telemetry` (the methods OVC calls): nothing is sent."""

    def __init__(self, *args, **kwargs):
        pass

    def _nothing(self, *args, **kwargs):
        return None

    init = send_event = send_error = send_stack_trace = start_session = end_session = force_shutdown = _nothing


@contextmanager
def _without_usage_telemetry():
    """Importing OpenVINO's converter and `convert_model` report usage to Google Analytics
    unless the user opted out, from a process forked off a background thread: an offline
    service has nowhere to send it, and a fork from a threaded process can abort the child.
    A no-op class stands in while converting (OVC looks `Telemetry` up at call time)."""
    try:
        import openvino_telemetry
    except ImportError:  # not installed: OVC uses its own stub
        yield
        return
    saved = openvino_telemetry.Telemetry
    openvino_telemetry.Telemetry = _NoTelemetry
    try:
        yield
    finally:
        openvino_telemetry.Telemetry = saved


def _openvino():
    """The `openvino` module, imported with usage telemetry off (its import reports too)."""
    with _without_usage_telemetry():
        import openvino
    return openvino


def openvino_version() -> str:
    return _openvino().__version__


def tower_inputs(tower: str, preprocess: PreprocessConfig | None) -> dict[str, Any]:
    """What the compiled tower takes: part of its cache key, so an entry is never fed other input."""
    if tower == "text":
        return {"input_ids": "i64 (N, L)", "attention_mask": "i64 (N, L)"}
    mean, scale = pixel_mean_and_scale(preprocess)
    return {"pixels": "u8 (N, H, W, 3) RGB", "mean": mean, "scale": scale}


def cache_key(weights_id: str, tower: str, precision: str, inputs: dict[str, Any]) -> str:
    payload = json.dumps({"weights": weights_id, "backend": "openvino", "precision": precision, "tower": tower,
                          "inputs": inputs, "openvino": openvino_version(), "format": CACHE_FORMAT}, sort_keys=True)
    return f"{tower}-{precision}-{hashlib.sha256(payload.encode()).hexdigest()[:20]}"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


# -- the towers as plain modules (traced by openvino.convert_model) --------------------------------


def _features(output: Any):
    # transformers 5 returns an output object whose pooler_output is the projection; 4.x a tensor.
    return output.pooler_output if hasattr(output, "pooler_output") else output


def image_tower(model: Any):
    import torch

    class ImageTower(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, pixel_values):
            features = _features(self.clip.get_image_features(pixel_values=pixel_values))
            return torch.nn.functional.normalize(features.float(), dim=-1)

    return ImageTower(model).eval()


def text_tower(model: Any):
    import torch

    class TextTower(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, input_ids, attention_mask):
            features = _features(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))
            return torch.nn.functional.normalize(features.float(), dim=-1)

    return TextTower(model).eval()


def image_example(model: Any, batch: int = 2):
    import torch

    size = int(model.config.vision_config.image_size)
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(batch, 3, size, size, generator=generator)


def text_example(model: Any, batch: int = 2, length: int = 8):
    import torch

    config = model.config.text_config
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, max(4, min(int(config.vocab_size), 400) - 2), (batch, length), generator=generator)
    ids[:, 0] = int(config.bos_token_id) if config.bos_token_id is not None else 0
    eos = int(config.eos_token_id) if config.eos_token_id is not None else int(config.vocab_size) - 1
    ids[:, -1] = eos
    ids[1, length // 2] = eos  # a padded row: the pooled position differs per row
    mask = torch.ones_like(ids)
    mask[1, length // 2 + 1:] = 0
    return ids, mask


def _normalise_in_graph(converted: Any, preprocess: PreprocessConfig):
    """The image tower, taking uint8 NHWC crops: OpenVINO converts and normalises them itself."""
    ov = _openvino()
    from openvino.preprocess import PrePostProcessor

    steps = PrePostProcessor(converted)
    pixels = steps.input(0)
    pixels.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    pixels.model().set_layout(ov.Layout("NCHW"))
    mean, scale = pixel_mean_and_scale(preprocess)
    pixels.preprocess().convert_element_type(ov.Type.f32).mean(mean).scale(scale)
    return steps.build()


def _convert(model: Any, tower: str, preprocess: PreprocessConfig | None):
    ov = _openvino()
    import torch

    # Tracing warns about every shape check it freezes; the towers take a fixed image size
    # and tokenizer-made text (never longer than the model's positions), so none matters.
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), _without_usage_telemetry():
        warnings.simplefilter("ignore")
        if tower == "image":
            example = image_example(model)
            size = example.shape[-1]
            converted = ov.convert_model(image_tower(model), example_input=example,
                                         input=[ov.PartialShape([-1, 3, size, size])])
            return _normalise_in_graph(converted, preprocess)
        ids, mask = text_example(model)
        return ov.convert_model(text_tower(model), example_input={"input_ids": ids, "attention_mask": mask},
                                input=[("input_ids", ov.PartialShape([-1, -1]), ov.Type.i64),
                                       ("attention_mask", ov.PartialShape([-1, -1]), ov.Type.i64)])


def probe_crops(model: Any, batch: int = 2):
    """Fixed random uint8 (batch, size, size, 3) crops: the image tower's probe input."""
    import torch

    size = int(model.config.vision_config.image_size)
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, 256, (batch, size, size, 3), generator=generator, dtype=torch.uint8)


Probe = tuple[list[np.ndarray], np.ndarray]  # the tower's input arrays, the vectors expected for them


def _reference(model: Any, tower: str, preprocess: PreprocessConfig | None) -> Probe:
    """A fixed probe input and the torch model's vectors for it."""
    import torch

    with torch.inference_mode():
        reference_model = image_tower(model) if tower == "image" else text_tower(model)
        dtype = next(model.parameters()).dtype
        if tower == "image":
            inputs = [probe_crops(model)]
            expected = reference_model(normalise_batch(inputs[0], preprocess, dtype))
        else:
            ids, mask = text_example(model)
            inputs = [ids, mask]
            expected = reference_model(ids, mask)
    return [t.numpy() for t in inputs], expected.float().numpy()


def _save_probe(path: Path, probe: Probe) -> None:
    inputs, expected = probe
    with path.open("wb") as handle:
        np.savez(handle, expected=expected, **{f"input{index}": array for index, array in enumerate(inputs)})


def _read_probe(path: Path) -> Probe:
    with np.load(path, allow_pickle=False) as stored:
        inputs = [stored[f"input{index}"] for index in range(len(stored.files) - 1)]
        return inputs, stored["expected"]


def _probe_cosine(tower: "CompiledTower", probe: Probe) -> float:
    """The lowest cosine between the tower's vectors for the probe input and the expected ones
    (-1 where the shapes differ)."""
    inputs, expected = probe
    got = tower(*inputs)
    return float((got * expected).sum(axis=1).min()) if got.shape == expected.shape else -1.0


# -- the cache -----------------------------------------------------------------------------------


class CompiledTower:
    """One compiled tower; `__call__(*arrays) -> (n, 512) float32 unit rows`, thread-safe."""

    def __init__(self, compiled: Any, precision: str, path: Path, seconds: float, built: bool):
        self.compiled = compiled
        self.precision = precision  # what OpenVINO actually computes in
        self.path = path
        self.seconds = seconds
        self.built = built  # converted in this process (False: loaded from the cache)
        self._local = threading.local()

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        result = request.infer({index: np.ascontiguousarray(a) for index, a in enumerate(arrays)})
        return np.array(result[0], dtype=np.float32, copy=True)


def default_compiled_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "cv_assets" / "openvino"


def compile_options(precision: str, threads: int) -> dict[str, Any]:
    # LATENCY: one stream that spreads each batch over every core (the embedder sends one
    # batch at a time and prepares the next one between calls).
    return {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": int(threads)}


def effective_precision(compiled: Any) -> str:
    value = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    for name, ours in FROM_OV_PRECISION.items():
        if name in value.lower().replace("float32", "f32").replace("bfloat16", "bf16").replace("float16", "f16"):
            return ours
    return "fp32"


def _write_entry(model: Any, tower: str, preprocess: PreprocessConfig | None, key: str, cache_dir: Path,
                 precision: str, weights_id: str) -> Path:
    ov = _openvino()

    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
    try:
        converted = _convert(model, tower, preprocess)
        ov.save_model(converted, staging / "model.xml", compress_to_fp16=False)
        _save_probe(staging / PROBE_FILE, _reference(model, tower, preprocess))
        manifest = {"format": CACHE_FORMAT, "tower": tower, "precision": precision, "weights": weights_id,
                    "inputs": tower_inputs(tower, preprocess), "openvino": openvino_version(),
                    "xml_sha256": _sha256_file(staging / "model.xml"),
                    "bin_bytes": (staging / "model.bin").stat().st_size,
                    "probe_sha256": _sha256_file(staging / PROBE_FILE)}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        target = cache_dir / key
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished the same entry first: theirs is as good as ours.
            shutil.rmtree(staging, ignore_errors=True)
        return target
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# A staging folder this old belongs to no running conversion (one takes ~30 s).
STALE_STAGING_SEC = 24 * 3600


def prune_dead_entries(cache_dir: Path) -> list[str]:
    """Delete the entries under `cache_dir` that this build can never read (another cache
    format or OpenVINO version in their manifest) and old staging folders; returns their
    names. Entries for other weights or precisions stay: another configuration may use them."""
    removed = []
    for path in cache_dir.iterdir() if cache_dir.is_dir() else ():
        if not path.is_dir():
            continue
        if path.name.startswith("."):
            dead = time.time() - path.stat().st_mtime > STALE_STAGING_SEC
        else:
            try:
                manifest = json.loads((path / "manifest.json").read_text())
            except (OSError, ValueError):
                continue  # unreadable: rebuilt by whoever looks it up by its key
            dead = manifest.get("format") != CACHE_FORMAT or manifest.get("openvino") != openvino_version()
        if dead:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if removed:
        log.info("removed %d OpenVINO cache entries no longer readable from %s", len(removed), cache_dir)
    return removed


def _check_entry(entry: Path) -> None:
    manifest_path = entry / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        xml, weights = entry / "model.xml", entry / "model.bin"
        if manifest.get("format") != CACHE_FORMAT:
            raise OpenVinoCacheError(f"{manifest_path}: cache format {manifest.get('format')!r}")
        if weights.stat().st_size != manifest["bin_bytes"]:
            raise OpenVinoCacheError(f"{weights}: {weights.stat().st_size} bytes, manifest says {manifest['bin_bytes']}")
        if _sha256_file(xml) != manifest["xml_sha256"]:
            raise OpenVinoCacheError(f"{xml}: content differs from its manifest")
        if _sha256_file(entry / PROBE_FILE) != manifest["probe_sha256"]:
            raise OpenVinoCacheError(f"{entry / PROBE_FILE}: content differs from its manifest")
    except OpenVinoCacheError:
        raise
    except Exception as exc:  # missing file, bad JSON, missing key
        raise OpenVinoCacheError(f"{entry}: {type(exc).__name__}: {exc}") from None


def _compile_in_memory(model: Any, tower: str, preprocess: PreprocessConfig | None, precision: str, threads: int,
                       started: float) -> CompiledTower:
    ov = _openvino()

    compiled = ov.Core().compile_model(_convert(model, tower, preprocess), "CPU", compile_options(precision, threads))
    result = CompiledTower(compiled, effective_precision(compiled), Path(), 0.0, built=True)
    if _probe_cosine(result, _reference(model, tower, preprocess)) < PROBE_MIN_COSINE:
        raise OpenVinoCacheError(f"the converted CLIP {tower} tower disagrees with the torch model")
    result.seconds = time.perf_counter() - started
    return result


def _compile_entry(entry: Path, precision: str, threads: int) -> CompiledTower:
    """Compile a checked entry and run its probe input: the vectors must match the ones the
    torch model gave when the entry was written (stored beside it)."""
    ov = _openvino()

    core = ov.Core()
    core.set_property({"CACHE_DIR": str(entry / "compiled")})
    compiled = core.compile_model(str(entry / "model.xml"), "CPU", compile_options(precision, threads))
    tower = CompiledTower(compiled, effective_precision(compiled), entry, 0.0, built=False)
    cosine = _probe_cosine(tower, _read_probe(entry / PROBE_FILE))
    if not np.isfinite(cosine) or cosine < PROBE_MIN_COSINE:
        raise OpenVinoCacheError(f"{entry}: the tower's probe vectors disagree with the stored ones "
                                 f"(min cosine {cosine:.4f})")
    return tower


# Compiled towers of this process, by cache entry, precision and threads: every embedder
# of the same weights shares one (an optimisation only: each would compile its own otherwise).
_compiled: dict[tuple[str, str, int], CompiledTower] = {}
_compiled_guard = threading.Lock()


def forget_compiled() -> None:
    """Drop this process's compiled towers (tests; the next load reads the disk cache again)."""
    with _compiled_guard:
        _compiled.clear()


def load_tower(load_model: Callable[[], Any], tower: str, *, weights_id: str, precision: str, cache_dir: Path,
               threads: int, preprocess: PreprocessConfig | None = None,
               on_rebuild: Callable[[str], None] | None = None) -> CompiledTower:
    """The compiled `tower` ("image" | "text") of the CLIP model whose weights `weights_id`
    names, at `precision`: compiled once per process, from the disk cache when a good entry
    exists, else converted now from the torch `CLIPModel` that `load_model()` returns (called
    only then) and cached; a bad entry is rebuilt once. An unwritable cache directory costs
    speed, not the run. The image tower takes uint8 crops normalised as `preprocess` says
    (required for it)."""
    key = cache_key(weights_id, tower, precision, tower_inputs(tower, preprocess))
    entry = Path(cache_dir) / key
    with _compiled_guard:
        ready = _compiled.get((str(entry), precision, threads))
        if ready is None:
            ready = _compiled[(str(entry), precision, threads)] = _load_tower(
                load_model, tower, preprocess, key, entry, weights_id=weights_id, precision=precision,
                threads=threads, on_rebuild=on_rebuild)
        return ready


def _load_tower(load_model: Callable[[], Any], tower: str, preprocess: PreprocessConfig | None, key: str,
                entry: Path, *, weights_id: str, precision: str, threads: int,
                on_rebuild: Callable[[str], None] | None) -> CompiledTower:
    started = time.perf_counter()
    built = False
    for attempt in range(2):
        if not entry.is_dir():
            model = load_model()
            log.info("converting the CLIP %s tower to OpenVINO (%s); cached at %s", tower, precision, entry)
            try:
                entry = _write_entry(model, tower, preprocess, key, entry.parent, precision, weights_id)
            except OSError as exc:
                log.warning("cannot write the OpenVINO cache at %s (%s); converting in memory for this process "
                            "(set embedder.compiled_cache_dir to a writable folder)", entry.parent, exc)
                return _compile_in_memory(model, tower, preprocess, precision, threads, started)
            built = True
            prune_dead_entries(entry.parent)
        try:
            _check_entry(entry)
            compiled = _compile_entry(entry, precision, threads)
            compiled.built, compiled.seconds = built, time.perf_counter() - started
            return compiled
        except Exception as exc:
            if attempt:
                raise
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("OpenVINO cache entry %s is unusable (%s); rebuilding it", entry, reason)
            if on_rebuild is not None:
                on_rebuild(reason)
            shutil.rmtree(entry, ignore_errors=True)
    raise AssertionError("unreachable")

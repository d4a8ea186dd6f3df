"""Embedder backends and precisions: the `auto` rules, the OpenVINO cache, and that every
backend/precision gives the fp32 torch vectors (cosine >= 0.999) under the same model_version."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from cv_assets.embedding import ClipEmbedder, EmbedderConfigError
from cv_assets.embedding.openvino_backend import forget_compiled
from cv_assets.embedding.preprocess import PreprocessConfig, normalise_batch, resize_and_crop
from cv_assets.embedding.runtime import Capabilities, Runtime, choose_runtime
from cv_assets.settings import EmbedderSettings


PLAIN_CPU = Capabilities(cuda=False, cpu_bf16=False, openvino=False)
BF16_CPU = Capabilities(cuda=False, cpu_bf16=True, openvino=False)
BF16_CPU_OV = Capabilities(cuda=False, cpu_bf16=True, openvino=True)
PLAIN_CPU_OV = Capabilities(cuda=False, cpu_bf16=False, openvino=True)
GPU = Capabilities(cuda=True, cpu_bf16=True, openvino=True)


def _frames(count: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    frames = []
    for index in range(count):
        height, width = [(180, 320), (240, 240), (300, 200), (97, 151), (720, 1280)][index % 5]
        yy, xx = np.mgrid[0:height, 0:width]
        base = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 40 * index)], axis=-1)
        frames.append(np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8))
    return frames


TEXTS = ["a red car", "blue", "a blue car in the rain at night", "red red red"]


# -- choosing the runtime -----------------------------------------------------------------------


@pytest.mark.parametrize("capabilities, expected", [
    (PLAIN_CPU, Runtime("cpu", "torch", "fp32")),          # no bf16 instructions: fp32
    (PLAIN_CPU_OV, Runtime("cpu", "openvino", "fp32")),    # OpenVINO is faster at fp32 too
    (BF16_CPU, Runtime("cpu", "torch", "bf16")),           # bf16 CPU without OpenVINO: torch bf16
    (BF16_CPU_OV, Runtime("cpu", "openvino", "bf16")),     # bf16 CPU with OpenVINO: OpenVINO bf16
    (GPU, Runtime("cuda", "torch", "fp16")),               # CUDA: torch fp16
])
def test_auto_picks_the_fastest_runtime_the_machine_has(capabilities, expected):
    assert choose_runtime("auto", "auto", "auto", capabilities) == expected


def test_explicit_choices_are_kept_and_impossible_ones_are_config_errors():
    assert choose_runtime("cpu", "torch", "auto", GPU) == Runtime("cpu", "torch", "bf16")
    assert choose_runtime("cpu", "auto", "fp32", BF16_CPU_OV) == Runtime("cpu", "openvino", "fp32")
    assert choose_runtime("auto", "torch", "bf16", PLAIN_CPU) == Runtime("cpu", "torch", "bf16")
    assert choose_runtime("cuda", "auto", "fp32", GPU) == Runtime("cuda", "torch", "fp32")
    # OpenVINO runs f32 on a CPU without the format: the runtime says so before anything loads.
    assert choose_runtime("cpu", "openvino", "bf16", PLAIN_CPU_OV) == Runtime("cpu", "openvino", "fp32")
    assert choose_runtime("cpu", "openvino", "fp16", BF16_CPU_OV) == Runtime("cpu", "openvino", "fp32")
    with pytest.raises(EmbedderConfigError, match="openvino package is not installed"):
        choose_runtime("cpu", "openvino", "auto", PLAIN_CPU)
    with pytest.raises(EmbedderConfigError, match="embedder.device is 'cuda' but torch sees no CUDA device"):
        choose_runtime("cuda", "auto", "auto", PLAIN_CPU_OV)
    with pytest.raises(EmbedderConfigError, match="backend 'openvino' runs on the CPU"):
        choose_runtime("cuda", "openvino", "auto", GPU)


def test_the_embedder_takes_its_runtime_from_the_probe_and_loads_nothing(tiny_clip_dir):
    settings = EmbedderSettings(model=str(tiny_clip_dir))
    embedder = ClipEmbedder(settings, capabilities=PLAIN_CPU)
    assert (embedder.device, embedder.backend, embedder.precision, embedder.dtype) == \
        ("cpu", "torch", "fp32", torch.float32)
    bf16 = ClipEmbedder(settings, capabilities=BF16_CPU)
    assert (bf16.backend, bf16.precision, bf16.dtype) == ("torch", "bf16", torch.bfloat16)
    ov = ClipEmbedder(settings, capabilities=BF16_CPU_OV)
    assert (ov.backend, ov.precision, ov.dtype) == ("openvino", "bf16", torch.float32)  # converts from fp32
    assert embedder._checkpoint is None and bf16._checkpoint is None and ov._checkpoint is None  # still lazy
    with pytest.raises(EmbedderConfigError, match="openvino package is not installed"):
        ClipEmbedder(settings.model_copy(update={"backend": "openvino"}), capabilities=PLAIN_CPU)


def test_cuda_uses_its_own_batch_size(tiny_clip_dir):
    if not torch.cuda.is_available():
        # The rule, without a GPU: a probe that reports one picks the CUDA batch size.
        settings = EmbedderSettings(model=str(tiny_clip_dir), batch_size=8, cuda_batch_size=256)
        assert ClipEmbedder(settings, capabilities=PLAIN_CPU).batch_size == 8
        return
    embedder = ClipEmbedder(EmbedderSettings(model=str(tiny_clip_dir)))
    assert (embedder.device, embedder.precision, embedder.batch_size) == ("cuda", "fp16", 256)


# -- every backend and precision agrees with fp32 torch ------------------------------------------


def _available_runtimes() -> list[tuple[str, str]]:
    # OpenVINO is in the default install: a machine without it fails here, it is not skipped.
    return [(backend, precision) for backend in ("torch", "openvino") for precision in ("fp32", "bf16", "fp16")]


@pytest.fixture(scope="module")
def compiled_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino-cache")


@pytest.fixture(scope="module")
def reference(tiny_clip_dir):
    fp32 = ClipEmbedder(EmbedderSettings(model=str(tiny_clip_dir), device="cpu", backend="torch", precision="fp32"))
    return fp32, fp32.embed_images(_frames()), fp32.embed_texts(TEXTS)


@pytest.mark.parametrize("backend, precision", _available_runtimes())
def test_every_backend_and_precision_stays_within_cosine_0999_of_fp32(
        backend, precision, tiny_clip_dir, compiled_cache, reference):
    fp32, images, texts = reference
    embedder = ClipEmbedder(EmbedderSettings(model=str(tiny_clip_dir), device="cpu", backend=backend,
                                             precision=precision, compiled_cache_dir=compiled_cache, batch_size=2))
    vectors = embedder.embed_images(_frames())
    assert vectors.shape == images.shape and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert (vectors * images).sum(axis=1).min() >= 0.999
    text_vectors = embedder.embed_texts(TEXTS)
    assert (text_vectors * texts).sum(axis=1).min() >= 0.999
    single = embedder.generate_embedding(_frames()[0])
    assert float(single @ images[0]) >= 0.999
    # One vector space: the version is the model's, whatever runs it; the runtime is reported.
    assert embedder.model_version == fp32.model_version
    assert embedder.backend == backend
    # OpenVINO computes in f32 where the CPU lacks bf16/fp16, and says so.
    assert embedder.precision in (precision, "fp32")
    assert embedder.describe()["backend"] == backend and embedder.describe()["precision"] == embedder.precision


# -- the OpenVINO cache --------------------------------------------------------------------------


def _openvino(tiny_clip_dir, cache) -> ClipEmbedder:
    return ClipEmbedder(EmbedderSettings(model=str(tiny_clip_dir), device="cpu", backend="openvino",
                                         precision="fp32", compiled_cache_dir=cache))


def _entries(cache):
    return sorted(path for path in cache.iterdir() if path.is_dir() and not path.name.startswith("."))


def test_openvino_cache_is_written_once_reused_and_rebuilt_when_corrupt(tiny_clip_dir, tmp_path, reference):
    _, images, _ = reference
    cache = tmp_path / "ov-cache"
    first = _openvino(tiny_clip_dir, cache)
    first.ensure_ready()
    assert first._image_tower.built
    [entry] = _entries(cache)
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["precision"] == "fp32" and manifest["tower"] == "image"
    assert manifest["weights"].startswith("sha256:")
    written = (entry / "model.bin").stat().st_mtime_ns

    # In the same process a second embedder shares the compiled tower.
    assert _openvino(tiny_clip_dir, cache)._compile_tower(first._checkpoint, "image") is first._image_tower
    # A second process (here: the process's compiled towers forgotten) loads the entry instead of converting.
    forget_compiled()
    second = _openvino(tiny_clip_dir, cache)
    second.ensure_ready()
    assert not second._image_tower.built and _entries(cache) == [entry]
    assert (entry / "model.bin").stat().st_mtime_ns == written
    np.testing.assert_allclose(second.embed_images(_frames()), first.embed_images(_frames()), atol=1e-5)

    def alter_weights():
        # Same size, other bytes: only the probe check can tell (once OpenVINO's compiled blob,
        # which holds its own copy of the weights, is gone too).
        weights = bytearray((entry / "model.bin").read_bytes())
        weights[len(weights) // 3: len(weights) // 3 + 4096] = bytes(4096)
        weights[-4096:] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        (entry / "model.bin").write_bytes(bytes(weights))
        shutil.rmtree(entry / "compiled")

    def garble_compiled_blobs():
        for blob in (entry / "compiled").iterdir():
            blob.write_bytes(b"\0garbage" * 100)

    def store_other_probe_vectors():
        # Vectors that disagree with the tower, the manifest's digest updated to match them:
        # only comparing the tower's output with them can tell.
        with np.load(entry / "probe.npz") as stored:
            arrays = {name: stored[name] for name in stored.files}
        arrays["expected"] = -arrays["expected"]
        with (entry / "probe.npz").open("wb") as handle:
            np.savez(handle, **arrays)
        manifest = json.loads((entry / "manifest.json").read_text())
        manifest["probe_sha256"] = hashlib.sha256((entry / "probe.npz").read_bytes()).hexdigest()
        (entry / "manifest.json").write_text(json.dumps(manifest))

    def drop_probe_vectors():
        # An entry without stored probe vectors (as an older layout had): rebuilt, not trusted.
        (entry / "probe.npz").unlink()
        manifest = json.loads((entry / "manifest.json").read_text())
        del manifest["probe_sha256"]
        (entry / "manifest.json").write_text(json.dumps(manifest))

    for damage in (
        alter_weights,
        garble_compiled_blobs,
        lambda: (entry / "model.bin").write_bytes((entry / "model.bin").read_bytes()[:1000]),  # truncated
        lambda: (entry / "model.xml").write_text("<not a model"),
        lambda: (entry / "manifest.json").write_text("{"),
        lambda: (entry / "model.xml").unlink(),
        lambda: (entry / "probe.npz").unlink(),
        lambda: (entry / "probe.npz").write_bytes(b"garbage"),
        store_other_probe_vectors,
        drop_probe_vectors,
    ):
        damage()
        forget_compiled()
        rebuilt = _openvino(tiny_clip_dir, cache)
        rebuilt.ensure_ready()  # never fatal
        assert (rebuilt.embed_images(_frames()) * images).sum(axis=1).min() >= 0.999
        assert _entries(cache) == [entry]
        if damage is not garble_compiled_blobs:  # OpenVINO itself recompiles over a bad blob
            assert rebuilt._image_tower.built


def test_a_warm_cache_embeds_without_the_torch_model_which_still_loads_on_demand(
        tiny_clip_dir, tmp_path, monkeypatch):
    """A good cache entry is loaded and checked against its stored probe vectors: another
    process (here: the compiled towers forgotten) embeds images and texts without loading the
    torch weights; `model` and the torch paths load them when asked."""
    from transformers import CLIPModel

    forget_compiled()
    cache = tmp_path / "ov-cache"
    first = _openvino(tiny_clip_dir, cache)
    images, texts = first.embed_images(_frames()), first.embed_texts(TEXTS)
    forget_compiled()

    def refuse(*args, **kwargs):
        raise AssertionError("the torch CLIP weights were loaded")

    with monkeypatch.context() as patched:
        patched.setattr(CLIPModel, "from_pretrained", refuse)
        second = _openvino(tiny_clip_dir, cache)
        np.testing.assert_allclose(second.embed_images(_frames()), images, atol=1e-6)
        np.testing.assert_allclose(second.embed_texts(TEXTS), texts, atol=1e-6)
        assert not second._image_tower.built and not second._text_tower.built
        assert (second.model_version, second.preprocess_config) == (first.model_version, first.preprocess_config)
        assert second._model is None
    assert isinstance(second.model, CLIPModel)  # loaded lazily, on first use
    np.testing.assert_allclose(second._forward_torch(normalise_batch(
        torch.from_numpy(np.stack([second._prepare(frame) for frame in _frames()])), second.preprocess_config)),
        images, atol=1e-5)


def test_a_warm_cache_imports_no_transformers_modelling_code(tiny_clip_dir, tmp_path):
    """What the lazy load saves in every new process: a fresh interpreter embeds images from a
    warm cache without importing transformers' CLIP modelling code."""
    cache = tmp_path / "ov-cache"
    script = f"""
import sys
import numpy as np
from cv_assets.embedding.clip import ClipEmbedder
from cv_assets.settings import EmbedderSettings
embedder = ClipEmbedder(EmbedderSettings(model={str(tiny_clip_dir)!r}, device="cpu", backend="openvino",
                                         precision="fp32", compiled_cache_dir={str(cache)!r}))
embedder.embed_images([np.zeros((40, 60, 3), np.uint8)])
print(embedder._image_tower.built, "transformers.models.clip.modeling_clip" in sys.modules)
"""
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
            for _ in range(2)]
    assert runs == [["True", "True"], ["False", "False"]]  # converted (torch needed), then loaded without it


def test_openvino_cache_key_covers_weights_and_precision(tiny_clip_dir, tiny_clip_dir_b, tmp_path):
    forget_compiled()
    cache = tmp_path / "ov-cache"
    _openvino(tiny_clip_dir, cache).ensure_ready()
    _openvino(tiny_clip_dir_b, cache).ensure_ready()
    # A bf16 CPU (injected: this one may lack it) gets its own entry.
    ClipEmbedder(EmbedderSettings(model=str(tiny_clip_dir), device="cpu", backend="openvino",
                                  precision="bf16", compiled_cache_dir=cache), capabilities=BF16_CPU_OV).ensure_ready()
    names = [entry.name for entry in _entries(cache)]
    assert len(names) == 3 and sum(name.startswith("image-bf16-") for name in names) == 1


def test_writing_an_entry_prunes_the_entries_no_build_can_read(tiny_clip_dir, tiny_clip_dir_b, tmp_path):
    import os
    import time

    forget_compiled()
    cache = tmp_path / "ov-cache"
    _openvino(tiny_clip_dir, cache).ensure_ready()
    [current] = _entries(cache)
    manifest = json.loads((current / "manifest.json").read_text())

    def fake_entry(name: str, **changes) -> None:
        (cache / name).mkdir()
        (cache / name / "manifest.json").write_text(json.dumps({**manifest, **changes}))

    fake_entry("image-fp32-oldformat", format=manifest["format"] - 1)
    fake_entry("image-fp32-oldopenvino", openvino="2023.0.0")
    (cache / "image-fp32-unreadable").mkdir()  # rebuilt by its own key's lookup, not pruned
    for staging, age_sec in ((".image-fp32-dead.tmp", 3 * 86400), (".image-fp32-running.tmp", 10)):
        (cache / staging).mkdir()
        os.utime(cache / staging, (time.time() - age_sec,) * 2)

    _openvino(tiny_clip_dir_b, cache).ensure_ready()  # writes an entry: the dead ones go
    left = {path.name for path in cache.iterdir()}
    assert {"image-fp32-oldformat", "image-fp32-oldopenvino", ".image-fp32-dead.tmp"}.isdisjoint(left)
    assert {current.name, "image-fp32-unreadable", ".image-fp32-running.tmp"} <= left
    assert len(_entries(cache)) == 3  # the current entry, the new one, the unreadable one


def test_in_memory_models_are_keyed_by_their_tensors(tiny_clip_dir, tmp_path):
    from transformers import CLIPModel

    forget_compiled()
    cache = tmp_path / "ov-cache"
    model = CLIPModel.from_pretrained(str(tiny_clip_dir))
    one = ClipEmbedder.from_model(model, model_version="mem", device="cpu", backend="openvino",
                                  precision="fp32", compiled_cache_dir=cache)
    assert one._image_tower.built
    two = ClipEmbedder.from_model(model, model_version="mem", device="cpu", backend="openvino",
                                  precision="fp32", compiled_cache_dir=cache)
    assert two._image_tower is one._image_tower  # compiled once per process
    forget_compiled()
    again = ClipEmbedder.from_model(model, model_version="mem", device="cpu", backend="openvino",
                                    precision="fp32", compiled_cache_dir=cache)
    assert not again._image_tower.built  # same tensors, same key: from the disk cache
    with torch.no_grad():
        model.visual_projection.weight.mul_(-1)
    three = ClipEmbedder.from_model(model, model_version="mem", device="cpu", backend="openvino",
                                    precision="fp32", compiled_cache_dir=cache)
    assert three._image_tower.built and len(_entries(cache)) == 2


def _torch_vectors(model, crops: np.ndarray, preprocess: PreprocessConfig) -> np.ndarray:
    with torch.inference_mode():
        features = model.get_image_features(pixel_values=normalise_batch(torch.from_numpy(crops), preprocess))
    return torch.nn.functional.normalize(features.pooler_output, dim=-1).numpy()


def test_openvino_image_tower_takes_uint8_crops_and_normalises_them_as_the_checkpoint_says(tiny_clip_dir, tmp_path):
    """The compiled tower's input is the uint8 crops; its in-graph normalisation follows the
    preprocess config (two configs, same tensors: two cache entries, each matching torch fp32)."""
    from transformers import CLIPModel

    forget_compiled()
    cache = tmp_path / "ov-cache"
    model = CLIPModel.from_pretrained(str(tiny_clip_dir))
    crops = np.stack([resize_and_crop(frame, PreprocessConfig()) for frame in _frames()])
    grey = PreprocessConfig(mean=(0.5, 0.5, 0.5), std=(0.2, 0.25, 0.3))
    towers = []
    for preprocess in (PreprocessConfig(), grey):
        embedder = ClipEmbedder.from_model(model, model_version="mem", device="cpu", backend="openvino",
                                           precision="fp32", compiled_cache_dir=cache, preprocess=preprocess)
        assert embedder._image_tower.compiled.input(0).get_element_type().to_string() == "u8"
        expected = _torch_vectors(model, crops, preprocess)
        np.testing.assert_allclose(embedder.forward(crops), expected, atol=1e-5)
        # Normalised float input (torch's form) reaches the tower as the crops it was made from.
        np.testing.assert_allclose(embedder.forward(normalise_batch(torch.from_numpy(crops), preprocess)),
                                   expected, atol=1e-5)
        towers.append(embedder._image_tower)
    assert towers[0] is not towers[1] and len(_entries(cache)) == 2
    manifests = [json.loads((entry / "manifest.json").read_text()) for entry in _entries(cache)]
    assert sorted(m["inputs"]["mean"][0] for m in manifests) == pytest.approx([0.48145466 * 255, 0.5 * 255])


def test_torch_forward_takes_the_same_uint8_crops(tiny_clip_dir):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(tiny_clip_dir))
    embedder = ClipEmbedder.from_model(model, model_version="mem", device="cpu", backend="torch", precision="fp32")
    crops = np.stack([resize_and_crop(frame, PreprocessConfig()) for frame in _frames()])
    np.testing.assert_allclose(embedder.forward(crops), _torch_vectors(model, crops, PreprocessConfig()), atol=1e-6)


def test_backend_settings_reach_the_embedder_through_config_and_the_dagster_resource(settings_factory):
    from cv_assets.defs.resources import EmbedderResource
    from cv_assets.embedding import get_embedder

    settings, _ = settings_factory(embedder={"backend": "torch", "precision": "fp32", "cuda_batch_size": 64,
                                             "compiled_cache_dir": "/tmp/somewhere"})
    assert (settings.embedder.backend, settings.embedder.precision) == ("torch", "fp32")
    assert EmbedderResource.from_settings(settings.embedder).settings() == settings.embedder
    embedder = get_embedder(settings.embedder)
    assert (embedder.backend, embedder.precision) == ("torch", "fp32")
    other = get_embedder(settings.embedder.model_copy(update={"precision": "bf16"}))
    assert other is not embedder and other.precision == "bf16"


def test_an_unwritable_cache_directory_costs_speed_not_the_run(tiny_clip_dir, tmp_path, reference):
    _, images, _ = reference
    forget_compiled()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    embedder = _openvino(tiny_clip_dir, blocker / "cache")  # cannot be created under a file
    assert (embedder.embed_images(_frames()) * images).sum(axis=1).min() >= 0.999
    assert embedder._image_tower.built


def test_converting_a_tower_sends_no_usage_telemetry(tiny_clip_dir, monkeypatch):
    """convert_model would report usage from a forked process (no network here, and a fork
    from a threaded process can abort the child): conversion starts no process at all."""
    import multiprocessing.popen_fork

    import openvino_telemetry
    from transformers import CLIPModel

    from cv_assets.embedding import openvino_backend

    started = []
    launch = multiprocessing.popen_fork.Popen._launch
    monkeypatch.setattr(multiprocessing.popen_fork.Popen, "_launch",
                        lambda self, process_obj: started.append(process_obj) or launch(self, process_obj))
    telemetry_class = openvino_telemetry.Telemetry
    openvino_backend._convert(CLIPModel.from_pretrained(str(tiny_clip_dir)), "image", PreprocessConfig())
    assert started == []
    assert openvino_telemetry.Telemetry is telemetry_class  # put back afterwards

"""CLIP image embedding throughput for every backend x precision this machine runs natively,
against the fastest forward pass here (the floor) and the per-image peer.

The model is the full ViT-B/32 architecture (CLIPConfig defaults: vision width 768,
12 layers, patch 32, projection 512) with random weights: the same FLOPs as
openai/clip-vit-base-patch32 (weights cannot be downloaded here).

Per runtime (backend x precision):
  forward    - the model's forward + L2 alone on ready batches of its own input, same
               batch sizes: for OpenVINO the uint8 (N, 224, 224, 3) crops its compiled
               graph takes (it converts and normalises them itself: a handful of
               elementwise operations beside the transformer, in the forward and in the
               floor alike); for torch normalised pixel tensors in its dtype;
  e2e frames - `ClipEmbedder.embed_images` on decoded RGB frames (as the sampler hands
               them over): resize + crop (every core, between forward passes) + stack +
               normalise + forward + L2;
  e2e jpeg   - `ClipEmbedder.embed_sources` on JPEG files: decode (DCT-scaled) + the above;
  cos        - the smallest cosine between its vectors and torch fp32's, same frames.
Floor: the fastest forward of any runtime. Peer: the per-image path the inherited
service used: PIL open, CLIPImageProcessor (PIL backend), get_image_features (fp32 on
CPU, fp16 on CUDA), one image at a time.

A precision the processor has no instructions for is emulated (torch) or silently run
in f32 (OpenVINO): it is listed as skipped unless --include-emulated. Every figure is the
median of interleaved repeats measured in this run.

    python benchmarks/embedding.py [--quick]
    python benchmarks/embedding.py --device cuda      # fp16, batch 256, pinned memory
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import ready_batch  # noqa: E402
from cv_assets.embedding import ClipEmbedder  # noqa: E402
from cv_assets.embedding.base import available_cores  # noqa: E402
from cv_assets.embedding.runtime import choose_runtime, probe_capabilities  # noqa: E402

TARGET_E2E_VS_FLOOR = 0.9
TARGET_BEST_VS_TORCH_FP32 = 2.0
TARGET_E2E_VS_PEER = 3.0
TARGET_MIN_COSINE = 0.999
UNIQUE_FRAMES = 64  # larger runs cycle through these (the embedder treats each one afresh)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--batch", type=int, help="batch size (default: 32 on CPU, 256 on CUDA)")
    parser.add_argument("--images", type=int, help="images per measurement (default: 2 batches; quick 1)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats per figure (median; default 5, quick 3)")
    parser.add_argument("--threads", type=int, help="CPU threads of every backend (default: every available core, "
                        "as in production; 1 is far less sensitive to a busy machine)")
    parser.add_argument("--include-emulated", action="store_true",
                        help="also time torch precisions this processor lacks instructions for (emulated)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    return parser.parse_args()


def synthetic_frames(count: int, height: int, width: int) -> list[np.ndarray]:
    """Frames with gradients, smooth noise and shapes (JPEG sizes like real footage)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width * 200, yy / height * 200, np.full_like(xx, 110)], axis=-1)
    frames = []
    for _ in range(count):
        coarse = rng.normal(0, 30, (height // 16 + 1, width // 16 + 1, 3)).astype(np.float32)
        frame = np.clip(base + cv2.resize(coarse, (width, height)), 0, 255).astype(np.uint8)
        for _ in range(6):
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            cv2.circle(frame, centre, int(rng.integers(10, height // 4)), colour, -1)
        frames.append(frame)
    return frames


def write_jpegs(frames: list[np.ndarray], folder: Path) -> list[Path]:
    paths = []
    for index, frame in enumerate(frames):
        path = folder / f"frame_{index:04d}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


def interleaved_medians(fns, repeats: int) -> list[float]:
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            started = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - started)
    return [statistics.median(spent) for spent in times]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def runtimes_to_measure(device: str, include_emulated: bool) -> tuple[list[tuple[str, str]], list[str]]:
    """(backend, precision) pairs this machine runs natively, and a note for each one skipped."""
    caps = probe_capabilities()
    if device == "cuda":
        return [("torch", "fp16"), ("torch", "bf16"), ("torch", "fp32")], []
    native = {"fp32": True, "bf16": caps.cpu_bf16, "fp16": caps.cpu_fp16}
    backends = ["torch"] + (["openvino"] if caps.openvino else [])
    chosen, skipped = [], []
    for backend in backends:
        for precision in ("fp32", "bf16", "fp16"):
            # OpenVINO runs a missing format as f32 (the embedder reports fp32): nothing to time.
            if native[precision] or (include_emulated and backend == "torch"):
                chosen.append((backend, precision))
            else:
                how = "emulated, several times slower than fp32" if backend == "torch" else "OpenVINO runs it in f32"
                skipped.append(f"{backend} {precision} (no {precision} instructions on this CPU: {how})")
    if not caps.openvino:
        skipped.append("openvino (not installed)")
    return chosen, skipped


def main() -> None:
    args = parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    batch = args.batch or (256 if device == "cuda" else (16 if args.quick else 32))
    repeats = args.repeats or (3 if args.quick else 5)
    n = args.images or (batch if args.quick else 2 * batch)
    runtimes, skipped = runtimes_to_measure(device, args.include_emulated)
    auto = choose_runtime(device, "auto", "auto", probe_capabilities())

    from benchmarks.common import build_vit_b32_model

    started = time.perf_counter()
    base_model = build_vit_b32_model()
    print(f"ViT-B/32 random weights built in {time.perf_counter() - started:.1f}s; device {device}, "
          f"{available_cores()} cores, batch {batch}, {n} images per figure, median of {repeats} interleaved "
          f"repeats; auto here = {auto.backend} {auto.precision}")
    for note in skipped:
        print(f"skipped: {note}")

    embedders: dict[tuple[str, str], ClipEmbedder] = {}
    for backend, precision in runtimes:
        started = time.perf_counter()
        model = copy.deepcopy(base_model)  # from_model moves the model to its dtype in place
        embedder = ClipEmbedder.from_model(model, model_version="bench:vit-b32-random", device=device,
                                           backend=backend, precision=precision, batch_size=batch,
                                           threads=args.threads)
        embedders[(backend, precision)] = embedder
        tower = embedder._image_tower
        how = (f", {'converted' if tower.built else 'loaded from the cache'} + compiled in {tower.seconds:.1f}s"
               if tower is not None else "")
        print(f"ready: {backend} {precision} (runs {embedder.precision}) in {time.perf_counter() - started:.1f}s{how}")

    unique = synthetic_frames(min(n, UNIQUE_FRAMES), args.height, args.width)
    frames = [unique[i % len(unique)] for i in range(n)]
    with tempfile.TemporaryDirectory() as folder:
        unique_paths = write_jpegs(unique, Path(folder))
        paths = [unique_paths[i % len(unique_paths)] for i in range(n)]
        print(f"inputs: {args.width}x{args.height} frames (decoded RGB) and as JPEG q90 (median "
              f"{statistics.median(p.stat().st_size for p in unique_paths) / 1024:.0f} KiB)\n")
        size = next(iter(embedders.values())).preprocess_config.crop_height

        reference = embedders.get(("torch", "fp32"))
        reference_vectors = reference.embed_images(frames) if reference is not None else None
        measured, labels = [], []
        for key, embedder in embedders.items():
            ready = [ready_batch(embedder, min(batch, n - s), size, device) for s in range(0, n, batch)]
            embedder.embed_images(frames[:2])  # warm-up: kernels, allocator, thread pools
            embedder.forward(ready[0][:2])

            def forward_only(embedder=embedder, ready=ready):
                for pixels in ready:
                    embedder.forward(pixels)
                sync(device)

            def e2e_frames(embedder=embedder):
                embedder.embed_images(frames)

            def e2e_jpeg(embedder=embedder):
                outcome = embedder.embed_sources(paths)
                assert not outcome.errors, outcome.errors

            measured += [forward_only, e2e_frames, e2e_jpeg]
            labels.append(key)

        peer_sample = unique_paths[: (8 if args.quick else 16)]
        peer_dtype = torch.float16 if device == "cuda" else torch.float32
        peer = per_image_peer(copy.deepcopy(base_model).to(device, peer_dtype).eval(), peer_sample, device,
                              peer_dtype)
        peer()  # warm-up
        # Interleaved repeats: on a shared machine every figure sees the same background load.
        seconds = interleaved_medians(measured + [peer], repeats)
        peer_ips = len(peer_sample) / seconds[-1]

        results = {}
        print("backend  precision | forward img/s | e2e frames img/s | e2e jpeg img/s | ms/img jpeg | min cos to fp32")
        for index, key in enumerate(labels):
            forward_ips, frames_ips, jpeg_ips = (n / s for s in seconds[3 * index: 3 * index + 3])
            cosine = float("nan")
            if reference_vectors is not None:
                cosine = float((embedders[key].embed_images(frames) * reference_vectors).sum(axis=1).min())
            results[key] = (forward_ips, frames_ips, jpeg_ips, cosine)
            print(f"{key[0]:8s} {key[1]:9s} | {forward_ips:13.1f} | {frames_ips:16.1f} | {jpeg_ips:14.1f} | "
                  f"{1000 / jpeg_ips:11.1f} | {cosine:.6f}", flush=True)

    floor_key = max(results, key=lambda k: results[k][0])
    best_key = max(results, key=lambda k: results[k][1])
    best_jpeg_key = max(results, key=lambda k: results[k][2])
    floor_ips = results[floor_key][0]
    print(f"\nfloor (fastest forward here): {floor_key[0]} {floor_key[1]} {floor_ips:.1f} img/s")
    print(f"best end to end: frames {best_key[0]} {best_key[1]} {results[best_key][1]:.1f} img/s; "
          f"jpeg {best_jpeg_key[0]} {best_jpeg_key[1]} {results[best_jpeg_key][2]:.1f} img/s")
    print(f"peer (per image: PIL open + CLIPImageProcessor + get_image_features, "
          f"{str(peer_dtype).replace('torch.', '')}): {peer_ips:.1f} img/s, {1000 / peer_ips:.1f} ms/img\n")

    print(f"RATIO best_e2e_vs_fastest_forward {results[best_key][1] / floor_ips:.2f} target >= {TARGET_E2E_VS_FLOOR}")
    print(f"RATIO best_jpeg_e2e_vs_fastest_forward {results[best_jpeg_key][2] / floor_ips:.2f} "
          f"target >= {TARGET_E2E_VS_FLOOR}")
    if ("torch", "fp32") in results:
        torch_fp32 = results[("torch", "fp32")][1]
        print(f"RATIO best_e2e_vs_torch_fp32_e2e {results[best_key][1] / torch_fp32:.2f} "
              f"target >= {TARGET_BEST_VS_TORCH_FP32}")
    print(f"RATIO best_jpeg_e2e_vs_peer {results[best_jpeg_key][2] / peer_ips:.2f} target >= {TARGET_E2E_VS_PEER}")
    cosines = [r[3] for r in results.values() if not np.isnan(r[3])]
    if cosines:
        print(f"RATIO min_cosine_to_fp32 {min(cosines):.5f} target >= {TARGET_MIN_COSINE}")


def per_image_peer(model, sample: list[Path], device: str, dtype: torch.dtype):
    """The inherited path, one image at a time: PIL open, CLIPImageProcessor, get_image_features."""
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil()

    def run():
        for path in sample:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pixels = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                features = model.get_image_features(pixel_values=pixels.to(device, dtype)).pooler_output
                torch.nn.functional.normalize(features.float(), dim=-1).cpu()
        sync(device)

    return run


if __name__ == "__main__":
    main()

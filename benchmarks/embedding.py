"""CLIP image embedding throughput: our batched pipeline vs the model alone and the per-image peer.

The model is the full ViT-B/32 architecture (CLIPConfig defaults: vision width 768,
12 layers, patch 32, projection 512) with random weights, built in-process: the same
FLOPs as openai/clip-vit-base-patch32 (weights cannot be downloaded here).

  e2e frames - `ClipEmbedder.embed_images` on decoded RGB frames (as the sampler hands
               them over): resize + crop + normalise + forward + L2, the next batch
               prepared in a worker thread while the model runs;
  e2e jpeg   - `ClipEmbedder.embed_sources` on JPEG files: decode (DCT-scaled when the
               file is large) + the above;
  forward    - the floor: the model's forward + L2 alone on ready tensors, same batches;
  peer       - the per-image path the inherited service used: PIL open, the
               CLIPImageProcessor (PIL backend), get_image_features, one image at a time.

Every figure is the median of a few repeats, measured in this run on this machine.

    python benchmarks/embedding.py [--quick]
    python benchmarks/embedding.py --device cuda --fp16 --batch 256
"""

from __future__ import annotations

import argparse
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

from cv_assets.embedding import ClipEmbedder  # noqa: E402
from cv_assets.embedding.base import available_cores  # noqa: E402

TARGET_E2E_VS_FORWARD = 0.9
TARGET_E2E_VS_PEER = 2.0
TARGET_MS_PER_IMAGE_B1 = 200.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--fp16", action="store_true", help="half precision (CUDA only)")
    parser.add_argument("--batch", type=int, action="append", help="batch size (repeatable; default 1, 8, 32)")
    parser.add_argument("--images", type=int, help="images per measurement (default: 2 batches, at least 32)")
    parser.add_argument("--repeats", type=int, help="repeats per figure (median; default 5, quick 1)")
    parser.add_argument("--threads", type=int, help="torch threads (default: every available core, as in production)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    return parser.parse_args()


def build_model():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(projection_dim=512)).eval()


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


def main() -> None:
    args = parse_args()
    batches = args.batch or [1, 8, 32]
    repeats = args.repeats or (1 if args.quick else 5)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    dtype = torch.float16 if (args.fp16 and device == "cuda") else torch.float32
    if args.fp16 and device != "cuda":
        print("note: --fp16 applies to CUDA only; running fp32 on CPU")

    started = time.perf_counter()
    embedder = ClipEmbedder.from_model(build_model(), model_version="bench:vit-b32-random", device=device,
                                       dtype=dtype, batch_size=max(batches))
    model = embedder.model
    if args.threads:
        torch.set_num_threads(args.threads)  # a single thread is far less sensitive to a busy machine
    print(f"device {device} ({torch.get_num_threads()} threads, {available_cores()} cores), dtype "
          f"{str(dtype).replace('torch.', '')}, ViT-B/32 random weights built in {time.perf_counter() - started:.1f}s")

    n_max = args.images or (8 if args.quick else max(32, 2 * max(batches)))
    frames = synthetic_frames(n_max, args.height, args.width)
    with tempfile.TemporaryDirectory() as folder:
        paths = write_jpegs(frames, Path(folder))
        print(f"inputs: {n_max} frames {args.width}x{args.height} (decoded RGB) and as JPEG q90 "
              f"(median {statistics.median(p.stat().st_size for p in paths) / 1024:.0f} KiB); "
              f"median of {repeats} repeat(s)\n")
        size = embedder.preprocess_config.crop_height
        # Warm-up: kernels, allocator, thread pools (excluded from every figure).
        embedder.embed_images(frames[:2])
        embedder.forward(torch.randn(2, 3, size, size, device=device, dtype=dtype))

        results = {}
        peer_batch = min([b for b in batches if b >= 8], default=max(batches))
        peer_sample = paths[: (4 if args.quick else 16)]
        peer = per_image_peer(model, peer_sample, device, dtype)
        peer()  # warm-up
        peer_ips = 0.0
        print("batch | forward img/s | e2e frames img/s (x forward) | e2e jpeg img/s (x forward) | "
              "ms/img frames | ms/img jpeg")
        for batch in batches:
            n = args.images or (max(8, batch) if args.quick else max(32, 2 * batch))
            n = min(n, n_max)
            embedder.batch_size = batch
            ready = [torch.randn(min(batch, n - s), 3, size, size, device=device, dtype=dtype)
                     for s in range(0, n, batch)]

            def forward_only():
                for pixels in ready:
                    embedder.forward(pixels)
                sync(device)

            def e2e_frames():
                embedder.embed_images(frames[:n])
                sync(device)

            def e2e_jpeg():
                outcome = embedder.embed_sources(paths[:n])
                assert not outcome.errors, outcome.errors

            # Interleaved repeats: on a shared machine each figure sees the same background load.
            measured = [forward_only, e2e_frames, e2e_jpeg] + ([peer] if batch == peer_batch else [])
            seconds = interleaved_medians(measured, repeats)
            forward_ips, frames_ips, jpeg_ips = n / seconds[0], n / seconds[1], n / seconds[2]
            if batch == peer_batch:
                peer_ips = len(peer_sample) / seconds[3]
            results[batch] = (forward_ips, frames_ips, jpeg_ips)
            print(f"{batch:5d} | {forward_ips:13.1f} | {frames_ips:12.1f} ({frames_ips / forward_ips:.2f}) "
                  f"          | {jpeg_ips:10.1f} ({jpeg_ips / forward_ips:.2f})          | "
                  f"{1000 / frames_ips:13.1f} | {1000 / jpeg_ips:11.1f}", flush=True)

        print(f"\npeer (per image: PIL open + CLIPImageProcessor + get_image_features): {peer_ips:.1f} img/s, "
              f"{1000 / peer_ips:.1f} ms/img\n")

    for batch in [b for b in batches if b >= 8]:
        forward_ips, frames_ips, jpeg_ips = results[batch]
        print(f"RATIO e2e_vs_forward_b{batch} {frames_ips / forward_ips:.2f} target >= {TARGET_E2E_VS_FORWARD}")
        print(f"RATIO jpeg_e2e_vs_forward_b{batch} {jpeg_ips / forward_ips:.2f} target >= {TARGET_E2E_VS_FORWARD}")
    print(f"bound: with free decoding and preprocessing, e2e_vs_peer_b{peer_batch} could reach at most "
          f"{results[peer_batch][0] / peer_ips:.2f} (peer time / forward-only time at batch {peer_batch})")
    print(f"RATIO e2e_vs_peer_b{peer_batch} {results[peer_batch][2] / peer_ips:.2f} target >= {TARGET_E2E_VS_PEER}")
    if 1 in results:
        print(f"RATIO ms_per_image_b1 {1000 / results[1][2]:.1f} target <= {TARGET_MS_PER_IMAGE_B1:.0f}")


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

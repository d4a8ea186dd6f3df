"""Where does each reference asset appear? Region matching by embedding (`clip_match`).

For every sampled frame, the whole frame and a grid of multi-scale overlapping square
crops are embedded in batches; each crop is compared (cosine) with every reference
asset's vector. The overlapping regions of one asset at or above the threshold are
merged into one box by letting each vote on its pixels (see `locate`): a whole frame
that contains the asset scores about as high as a tight crop, and the votes of the
small crops pin down where it is. At most one appearance per asset and frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np

Box = tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, exclusive end


@dataclass(frozen=True)
class FrameInput:
    scene_index: int
    frame_index: int
    timestamp_sec: float
    image: np.ndarray  # RGB uint8


@dataclass(frozen=True)
class ReferenceAsset:
    asset_id: int
    code: str
    vector: np.ndarray  # (512,) unit norm


@dataclass(frozen=True)
class Appearance:
    asset_id: int
    asset_code: str
    scene_index: int
    frame_index: int
    timestamp_sec: float
    bbox: Box
    confidence: float
    source: str = "clip_match"
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)


def candidate_regions(width: int, height: int, scales: Sequence[float], overlap: float) -> list[Box]:
    """The whole frame plus square crops of side `scale * min(width, height)` on a grid
    whose step leaves `overlap` between neighbours; the last row and column are aligned
    to the frame edge so no strip is left uncovered."""
    boxes: list[Box] = [(0, 0, width, height)]
    short = min(width, height)
    for scale in scales:
        side = max(8, int(round(scale * short)))
        step = max(1, int(round(side * (1.0 - overlap))))
        xs = _grid(width, side, step)
        ys = _grid(height, side, step)
        boxes.extend((x, y, x + side, y + side) for y in ys for x in xs)
    return list(dict.fromkeys(boxes))  # drop duplicates (scale 1.0 on a square frame)


def _grid(length: int, side: int, step: int) -> list[int]:
    if side >= length:
        return [0]
    starts = list(range(0, length - side + 1, step))
    if starts[-1] != length - side:
        starts.append(length - side)
    return starts


def iou(a: Box, b: Box) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def area(box: Box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def locate(boxes: Sequence[Box], scores: np.ndarray, threshold: float, vote_fraction: float, tie_margin: float) -> tuple[Box, int] | None:
    """Merge the overlapping regions that match one asset into one box; None below threshold.

    Every region at or above the threshold that overlaps the best-scoring one votes
    `(score - threshold) / area` on its pixels, so small confident crops count more than
    the whole frame. The box is the connected area around the peak where the votes reach
    `vote_fraction` of it. Also returns the representative region (the tightest within
    `tie_margin` of the best score) whose vector stands for this appearance.
    """
    above = np.flatnonzero(scores >= threshold)
    if above.size == 0:
        return None
    best = int(above[np.argmax(scores[above])])
    voters = [int(i) for i in above if iou(boxes[i], boxes[best]) > 0]
    width, height = max(b[2] for b in boxes), max(b[3] for b in boxes)
    votes = np.zeros((height, width), np.float32)
    for i in voters:
        x1, y1, x2, y2 = boxes[i]
        votes[y1:y2, x1:x2] += (scores[i] - threshold + 1e-6) / area(boxes[i])
    peak_y, peak_x = np.unravel_index(int(np.argmax(votes)), votes.shape)
    mask = (votes >= vote_fraction * votes[peak_y, peak_x]).astype(np.uint8)
    _, labels = cv2.connectedComponents(mask)
    ys, xs = np.nonzero(labels == labels[peak_y, peak_x])
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    close = [i for i in voters if scores[i] >= scores[best] - tie_margin]
    representative = min(close, key=lambda i: (area(boxes[i]), -scores[i]))
    return box, representative


def crop(image: np.ndarray, box: Box) -> np.ndarray:
    x1, y1, x2, y2 = box
    return image[y1:y2, x1:x2]


def match_frames(
    frames: Sequence[FrameInput],
    references: Sequence[ReferenceAsset],
    embed_images: Callable[[list[np.ndarray]], np.ndarray],
    *,
    threshold: float,
    scales: Sequence[float],
    overlap: float,
    vote_fraction: float,
    tie_margin: float,
    frames_per_batch: int = 4,
) -> list[Appearance]:
    """Appearances of every reference asset in every frame (at most one per asset and frame).

    Crops of a few frames are embedded together so batches stay full while memory stays
    bounded by `frames_per_batch` frames' worth of crops.
    """
    if not frames or not references:
        return []
    ref_matrix = np.stack([r.vector for r in references]).astype(np.float32)
    found: list[Appearance] = []
    for start in range(0, len(frames), frames_per_batch):
        chunk = frames[start : start + frames_per_batch]
        regions = [candidate_regions(f.image.shape[1], f.image.shape[0], scales, overlap) for f in chunk]
        crops = [crop(f.image, box) for f, boxes in zip(chunk, regions) for box in boxes]
        vectors = embed_images(crops)
        offset = 0
        for frame, boxes in zip(chunk, regions):
            frame_vectors = vectors[offset : offset + len(boxes)]
            offset += len(boxes)
            similarity = frame_vectors @ ref_matrix.T  # (regions, assets)
            for k, ref in enumerate(references):
                located = locate(boxes, similarity[:, k], threshold, vote_fraction, tie_margin)
                if located is None:
                    continue
                box, index = located
                found.append(
                    Appearance(
                        asset_id=ref.asset_id,
                        asset_code=ref.code,
                        scene_index=frame.scene_index,
                        frame_index=frame.frame_index,
                        timestamp_sec=frame.timestamp_sec,
                        bbox=box,
                        confidence=float(similarity[:, k].max()),
                        embedding=frame_vectors[index],
                    )
                )
    return found


@dataclass
class AssetScore:
    code: str
    true_positives: int = 0
    predicted: int = 0
    actual: int = 0

    @property
    def precision(self) -> float | None:
        return self.true_positives / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:
        return self.true_positives / self.actual if self.actual else None


def evaluate_against_truth(
    appearances: Sequence[Appearance],
    truth: dict[tuple[int, int], dict[str, Box]],
    evaluated_frames: Sequence[tuple[int, int]],
    codes: Sequence[str],
    min_iou: float,
) -> dict[str, AssetScore]:
    """Precision and recall per asset over the sampled frames.

    `truth[(scene, frame)]` maps each visible asset code to its box. A predicted
    appearance is a true positive when the asset is visible in that frame and the
    boxes overlap by at least `min_iou`.
    """
    scores = {code: AssetScore(code) for code in codes}
    for key in evaluated_frames:
        for code in truth.get(key, {}):
            if code in scores:
                scores[code].actual += 1
    for app in appearances:
        score = scores.get(app.asset_code)
        if score is None:
            continue
        score.predicted += 1
        gt_box = truth.get((app.scene_index, app.frame_index), {}).get(app.asset_code)
        if gt_box is not None and iou(app.bbox, gt_box) >= min_iou:
            score.true_positives += 1
    return scores

"""Shot boundaries (hard cuts) inside a clip, found in the sampler's single decode pass.

In the style of PySceneDetect's AdaptiveDetector: each frame's content change is the
mean absolute difference of its small luma image from the previous frame's (0..1). A
frame starts a new shot when its change is large in itself (`min_change`) and large
against its neighbours (`adaptive_ratio` times the mean change of the `window` frames on
each side). Sustained camera motion (a pan) changes every frame about as much, so it
never spikes above its neighbours; a cut is a lone spike.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# Keeps the ratio finite on perfectly still footage (neighbours that did not change at all).
_NO_CHANGE = 1e-4


@dataclass(frozen=True)
class Cut:
    frame_index: int  # the first frame of the new shot
    timestamp_sec: float
    change: float  # the content change at the cut, 0..1

    def as_dict(self) -> dict:
        return {"frame_index": self.frame_index, "timestamp_sec": round(self.timestamp_sec, 3),
                "change": round(self.change, 4)}


class CutDetector:
    """Feed every decoded frame's small luma image in order with `offer`, then `finish`."""

    def __init__(self, min_change: float, adaptive_ratio: float, window: int, min_shot_sec: float):
        self.min_change = min_change
        self.adaptive_ratio = adaptive_ratio
        self.window = window
        self.min_shot_sec = min_shot_sec
        self._previous: np.ndarray | None = None
        self._frames: list[tuple[int, float, float]] = []  # index, time, change (one float per frame)

    def offer(self, frame_index: int, timestamp_sec: float, luma: np.ndarray) -> None:
        if self._previous is None or self._previous.shape != luma.shape:
            change = 0.0  # the first frame, or a size change mid-stream: no comparison
        else:
            change = float(cv2.absdiff(self._previous, luma).mean()) / 255.0
        self._previous = luma
        self._frames.append((frame_index, timestamp_sec, change))

    def finish(self) -> list[Cut]:
        changes = np.array([c for _, _, c in self._frames], dtype=np.float64)
        cuts: list[Cut] = []
        for position, (index, timestamp, change) in enumerate(self._frames):
            if position == 0 or change < self.min_change:
                continue
            neighbours = np.concatenate([changes[max(0, position - self.window):position],
                                         changes[position + 1:position + 1 + self.window]])
            typical = max(float(neighbours.mean()) if neighbours.size else 0.0, _NO_CHANGE)
            if change / typical < self.adaptive_ratio:
                continue
            if cuts and timestamp - cuts[-1].timestamp_sec < self.min_shot_sec:
                continue
            cuts.append(Cut(index, timestamp, change))
        return cuts

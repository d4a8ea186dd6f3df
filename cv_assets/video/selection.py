"""Which frames of a clip to keep: guaranteed coverage first, then the strongest motion.

The rule, in order:

1. **Base frames** - for each offset in `base_offsets_sec` (0, 2, 4, 6 s) the frame
   nearest that time, dropped when the clip ends before it - and the **last frame**
   are always kept. Times are the stream's timestamps, so this holds for any rate,
   variable rates included (with a constant rate it is frame round(offset * fps)).
2. **Motion frames** fill the rest of `max_frames` (total), highest motion first.
   A motion candidate is a frame whose motion ratio exceeds the threshold. Within
   each window of half `min_spacing_sec` only the strongest candidate competes
   (two frames that close could never both be picked), and a candidate closer than
   `min_spacing_sec` to a frame already picked is skipped.

Base frames and the last frame are kept even when they alone exceed `max_frames`
(coverage wins over the cap; the cap then leaves no room for motion frames).

`KeyFrameSelector` applies the rule while frames stream past, holding on to only a
bounded pool of candidates, so a clip is decoded once and never seeked.
`select_key_frames` is the same rule as a pure function over a list of scores.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any, Generic, Sequence, TypeVar

Payload = TypeVar("Payload")

BASE, LAST, MOTION = "base", "last", "motion"


@dataclass(frozen=True)
class FramePick(Generic[Payload]):
    """One chosen frame; `payload` is whatever the caller attached (the decoded frame)."""

    frame_index: int
    timestamp_sec: float
    reasons: tuple[str, ...]
    motion_score: float
    payload: Any = None


@dataclass(frozen=True)
class _Seen:
    frame_index: int
    timestamp_sec: float
    motion_score: float
    payload: Any


class KeyFrameSelector(Generic[Payload]):
    """Feed every decoded frame to `offer` in order, then call `finish` once.

    Memory stays bounded: the base frames, the most recent frame, the strongest
    candidate of the current window and a pool of at most `5 * max_frames` window
    winners (40 frames at the default, about 125 MB of YUV at 1080p in the worst
    case of a clip full of motion). The pool is large enough that the final greedy
    pass gives the same picks as it would over every window winner of the clip:
    a pick or a kept frame rules out the winners of at most 5 half-spacing windows,
    so 5 x (picks + kept) winners always leave enough to fill the budget.
    """

    def __init__(
        self,
        *,
        base_offsets_sec: Sequence[float],
        include_last: bool,
        motion_threshold: float,
        max_frames: int,
        min_spacing_sec: float,
    ):
        self._targets = sorted(set(float(t) for t in base_offsets_sec))
        self._next_target = 0
        self._include_last = include_last
        self._threshold = motion_threshold
        self._max_frames = max_frames
        self._spacing = min_spacing_sec
        self._window_sec = min_spacing_sec / 2
        self._pool_capacity = 5 * max_frames
        self._base: dict[int, _Seen] = {}
        self._last: _Seen | None = None
        self._window: tuple[int, _Seen] | None = None
        self._pool: list[tuple[float, int, _Seen]] = []  # min-heap: weakest winner on top
        self._finished = False

    @property
    def pool_capacity(self) -> int:
        return self._pool_capacity

    def offer(self, frame_index: int, timestamp_sec: float, motion_score: float, payload: Any = None) -> None:
        seen = _Seen(frame_index, timestamp_sec, motion_score, payload)
        while self._next_target < len(self._targets) and timestamp_sec >= self._targets[self._next_target]:
            self._keep_base(self._targets[self._next_target], seen)
            self._next_target += 1
        self._last = seen
        if motion_score > self._threshold:
            self._offer_candidate(seen)

    def _keep_base(self, target: float, seen: _Seen) -> None:
        # The frame nearest the offset: this one, or the previous one when that is closer
        # (with a constant rate this is frame round(target * fps)).
        previous = self._last
        if previous is not None and target - previous.timestamp_sec < seen.timestamp_sec - target:
            self._base[previous.frame_index] = previous
        else:
            self._base[seen.frame_index] = seen

    def _offer_candidate(self, seen: _Seen) -> None:
        window = self._window_of(seen)
        if self._window is not None and self._window[0] != window:
            self._push_winner(self._window[1])
            self._window = None
        if self._window is None or seen.motion_score > self._window[1].motion_score:
            self._window = (window, seen)

    def _window_of(self, seen: _Seen) -> int:
        if self._window_sec <= 0:
            return seen.frame_index
        return math.floor(seen.timestamp_sec / self._window_sec)

    def _push_winner(self, seen: _Seen) -> None:
        # Ties on score favour the earlier frame, so the heap drops the later one first.
        heapq.heappush(self._pool, (seen.motion_score, -seen.frame_index, seen))
        if len(self._pool) > self._pool_capacity:
            heapq.heappop(self._pool)

    def finish(self) -> list[FramePick]:
        """The picks in frame order, each with its reasons and motion score."""
        if self._finished:
            raise RuntimeError("finish() was already called")
        self._finished = True
        if self._window is not None:
            self._push_winner(self._window[1])
            self._window = None
        kept: dict[int, tuple[_Seen, list[str]]] = {i: (s, [BASE]) for i, s in self._base.items()}
        if self._include_last and self._last is not None:
            kept.setdefault(self._last.frame_index, (self._last, []))[1].append(LAST)
        budget = self._max_frames - len(kept)
        for seen in self._strongest_first():
            if budget <= 0:
                break
            if seen.frame_index in kept or self._too_close(seen, kept):
                continue
            kept[seen.frame_index] = (seen, [MOTION])
            budget -= 1
        self._pool.clear()
        return [
            FramePick(s.frame_index, s.timestamp_sec, tuple(reasons), s.motion_score, s.payload)
            for _, (s, reasons) in sorted(kept.items())
        ]

    def _strongest_first(self) -> list[_Seen]:
        return [seen for _, _, seen in sorted(self._pool, key=lambda item: (-item[0], -item[1]))]

    def _too_close(self, seen: _Seen, kept: dict[int, tuple[_Seen, list[str]]]) -> bool:
        return any(abs(seen.timestamp_sec - other.timestamp_sec) < self._spacing for other, _ in kept.values())


def select_key_frames(
    motion_scores: Sequence[float],
    *,
    fps: float | None = None,
    timestamps: Sequence[float] | None = None,
    base_offsets_sec: Sequence[float] = (0.0, 2.0, 4.0, 6.0),
    include_last: bool = True,
    motion_threshold: float = 0.15,
    max_frames: int = 8,
    min_spacing_sec: float = 0.5,
) -> list[FramePick]:
    """Pick key frames from per-frame motion scores (frame i has score `motion_scores[i]`).

    Times come from `timestamps` when given, else from `fps` (frame i at i / fps).
    """
    if timestamps is None:
        if not fps or fps <= 0:
            raise ValueError("select_key_frames needs timestamps or a positive fps")
        timestamps = [i / fps for i in range(len(motion_scores))]
    if len(timestamps) != len(motion_scores):
        raise ValueError(f"{len(timestamps)} timestamps for {len(motion_scores)} motion scores")
    selector: KeyFrameSelector = KeyFrameSelector(
        base_offsets_sec=base_offsets_sec,
        include_last=include_last,
        motion_threshold=motion_threshold,
        max_frames=max_frames,
        min_spacing_sec=min_spacing_sec,
    )
    for index, (ts, score) in enumerate(zip(timestamps, motion_scores)):
        selector.offer(index, float(ts), float(score))
    return selector.finish()

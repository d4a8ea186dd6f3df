"""Where does each reference asset appear? Region matching by embedding (`clip_match`).

For every sampled frame, regions are embedded in batches and compared (cosine) with
every reference asset's vector, in two stages:

1. Find: the whole frame and a grid of square crops. Coarse to fine (the default): a
   coarse grid only; an asset whose best region comes near its threshold is a *seed*.
   Exhaustive: the full multi-scale grid.
2. Fit: around each seed, a window (tight on the sides the seed already holds) is split
   along each axis at a few positions, and the box's edges are where the part beyond a
   split stops holding the object while the part within it holds all of it (see
   `_AxisProfile`); a few rounds bisect the edges, one crop per edge each.
   The box is the object's extent, not the tightest square crop that matched: a
   reference photo matches best when the crop meets the object's edges.

An asset appears when its best region or its fitted box reaches the threshold; at most
one appearance per asset and frame. `MatchOutcome.forwards` counts every crop embedded.

A crop whose pixels did not change since the previous sampled frame of its scene (a fixed
camera's background, a prop standing still) takes that frame's vector instead of being
embedded again (`RegionSearch.reuse_unchanged`, see `unchanged`). An asset found in the
scene's frames searched before is looked for again at its last box while a region there
still hints at it, even under the seed level (`RegionSearch.track_found`): an object
leaving the frame, half cut by its edge, is still followed.
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
    return max(0, box[2] - box[0]) * max(0, box[3] - box[1])


@dataclass(frozen=True)
class RegionSearch:
    """How `match_frames` looks for each asset (the `appearances` settings carry the values).

    `coarse_to_fine`: embed the whole frame and the `coarse_scales` grid first; only an
    asset whose best coarse region scores at least `threshold - seed_margin` gets a finer
    search, around that region. Otherwise every crop of the `scales` grid is embedded.
    Either way the box is then fitted to the object's extent (see `fit_boxes`). The
    defaults are those of `AppearanceSettings`.
    """

    threshold: float
    scales: Sequence[float] = (1.0, 0.6, 0.4, 0.25)
    overlap: float = 0.5
    coarse_to_fine: bool = True
    coarse_scales: Sequence[float] = (0.6,)
    coarse_overlap: float = 0.25
    seed_margin: float = 0.45
    extent_reach: float = 0.3
    edge_reach: float = 0.05
    extent_steps: int = 3
    extent_rounds: int = 3
    tie_margin: float = 0.03
    reuse_unchanged: bool = True
    track_found: bool = True

    @property
    def seed_level(self) -> float:
        """A region scoring this much for an asset may hold it: it seeds a box fit."""
        return self.threshold - self.seed_margin


# A crop is unchanged when its pixels moved by at most UNCHANGED_MEAN_DIFF grey levels on
# average and no more than UNCHANGED_MAX_SHARE of them by over UNCHANGED_PIXEL_DIFF (codec
# noise stays under both; a small object entering the crop breaks the second).
UNCHANGED_MEAN_DIFF = 1.0
UNCHANGED_PIXEL_DIFF = 12
UNCHANGED_MAX_SHARE = 0.001


def unchanged(before: np.ndarray, after: np.ndarray) -> bool:
    """Whether two crops of the same box in two frames show the same pixels (see above)."""
    if before.shape != after.shape:
        return False
    diff = cv2.absdiff(before, after)
    moved = np.count_nonzero(diff.max(axis=-1) > UNCHANGED_PIXEL_DIFF)
    return float(diff.mean()) <= UNCHANGED_MEAN_DIFF and moved <= UNCHANGED_MAX_SHARE * diff.shape[0] * diff.shape[1]


@dataclass
class _FrameRegions:
    """Every box embedded so far for one frame, its vector and its score per asset, and the
    previous frame of its scene (whose unchanged crops it may reuse). `embedded` counts the
    forwards spent on this frame, `reused` the vectors copied from the previous one."""

    frame: "FrameInput"
    previous: "_FrameRegions | None" = None
    embedded: int = 0
    reused: int = 0
    boxes: list[Box] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    positions: dict[Box, int] = field(default_factory=dict)

    def add(self, box: Box, vector: np.ndarray, row: np.ndarray) -> None:
        self.positions[box] = len(self.boxes)
        self.boxes.append(box)
        self.vectors.append(vector)
        self.scores.append(row)

    def score_of(self, box: Box, k: int) -> float:
        return float(self.scores[self.positions[box]][k])

    def vector_of(self, box: Box) -> np.ndarray:
        return self.vectors[self.positions[box]]

    def copy_from(self, source: "_FrameRegions", box: Box) -> None:
        i = source.positions[box]
        self.add(box, source.vectors[i], source.scores[i])
        self.reused += 1


@dataclass(frozen=True)
class MatchOutcome:
    appearances: list["Appearance"]
    forwards: int  # crops embedded (the whole frame counts as one)
    frames: int
    reused: int = 0  # crops unchanged since the previous frame: its vector, no forward

    @property
    def forwards_per_frame(self) -> float:
        return self.forwards / self.frames if self.frames else 0.0


def _embed_round(states: Sequence[_FrameRegions], requests: Sequence[Sequence[Box]], embed_images, ref_matrix) -> None:
    """Embed, in one call, each frame's requested boxes that it has not embedded yet; a box
    unchanged since the previous frame copies that frame's vector (embedded earlier or in
    this call: `states` are in frame order)."""
    todo, copies, requested = [], [], set()
    for state, boxes in zip(states, requests):
        for box in dict.fromkeys(boxes):
            if box in state.positions or area(box) <= 0:
                continue
            requested.add((id(state), box))
            source = state.previous
            if (source is not None and (box in source.positions or (id(source), box) in requested)
                    and unchanged(crop(source.frame.image, box), crop(state.frame.image, box))):
                copies.append((state, box))
            else:
                todo.append((state, box))
    if todo:
        vectors = embed_images([crop(state.frame.image, b) for state, b in todo])
        scores = vectors @ ref_matrix.T
        for (state, box), vector, row in zip(todo, vectors, scores):
            state.add(box, vector, row)
            state.embedded += 1
    for state, box in copies:
        state.copy_from(state.previous, box)


def _best(state: _FrameRegions, k: int) -> tuple[Box, float] | None:
    if not state.boxes:
        return None
    i = max(range(len(state.boxes)), key=lambda i: (float(state.scores[i][k]), -area(state.boxes[i])))
    return state.boxes[i], float(state.scores[i][k])


def _window(state: _FrameRegions, seed: Box, assets: Sequence[int], search: RegionSearch) -> Box:
    """Where the object(s) seeded at `seed` can be: the seed grown on each side by
    `extent_reach` times the frame's shorter side where a neighbouring region reaching past
    that side scores like a seed for one of `assets` (the object may go on there), else by
    only `edge_reach` (the seed holds that side). A tight window leaves other objects out of
    the fit's parts. Assets seeded at one region share the window, so their fits share crops."""
    height, width = state.frame.image.shape[:2]
    floor = search.seed_level
    goes_on = [False] * 4  # past x1, y1, x2, y2
    for box, row in zip(state.boxes, state.scores):
        if _beside(box, seed) and max(row[k] for k in assets) >= floor:
            past = (box[0] < seed[0], box[1] < seed[1], box[2] > seed[2], box[3] > seed[3])
            goes_on = [a or b for a, b in zip(goes_on, past)]
    short = min(width, height)
    d = [int(round((search.extent_reach if on else search.edge_reach) * short)) for on in goes_on]
    return max(0, seed[0] - d[0]), max(0, seed[1] - d[1]), min(width, seed[2] + d[2]), min(height, seed[3] + d[3])


# A tracked asset is fitted again while a region over its last box scores at least this
# share of the seed level (where it has gone, nothing of it scores at all).
TRACK_HINT = 0.5


def _tracked_seeds(state: _FrameRegions, last_found: dict[int, Box], seeded, search: RegionSearch) -> dict:
    """asset -> (its last box, score 0) for each asset found in the scene's frames searched
    before that is not seeded here but still hinted at: a region overlapping the last box
    (not the whole frame) scores at least TRACK_HINT of the seed level. Score 0: only the
    fitted box can make it appear."""
    height, width = state.frame.image.shape[:2]
    floor = TRACK_HINT * search.seed_level
    tracked = {}
    for k, box in last_found.items():
        hints = [row[k] for b, row in zip(state.boxes, state.scores) if iou(b, box) > 0 and b != (0, 0, width, height)]
        if k not in seeded and max(hints, default=0.0) >= floor:
            tracked[k] = (box, 0.0)
    return tracked


def _beside(box: Box, seed: Box) -> bool:
    """`box` overlaps `seed` without containing it (a neighbour, not the whole frame)."""
    overlaps = min(box[2], seed[2]) > max(box[0], seed[0]) and min(box[3], seed[3]) > max(box[1], seed[1])
    contains = box[0] <= seed[0] and box[1] <= seed[1] and box[2] >= seed[2] and box[3] >= seed[3]
    return overlaps and not contains


@dataclass
class _AxisProfile:
    """Where the object starts and ends along one axis of its search window.

    A split position p cuts the window into a near part and a far part. Left of the
    object's start, the far part holds the whole object and the near part none of it:
    `far - near` is at its highest there. A colour-only embedder scores any crop with a
    piece of a flat object alike (a plateau: the innermost split of the plateau is the
    start); a photo scores highest when the crop meets the object's edge (a peak). The
    end is the mirror image (`near - far` highest).

    The first round embeds both parts at even splits. Each later round bisects each edge's
    bracket and embeds only the part beyond that edge (the near part for the start, the far
    part for the end): whether it holds any of the object is what moves the edge. The other
    part, which holds (almost) all of the object on both sides of the bracket, is
    interpolated between the bracket's ends.
    """

    axis: int  # 0: x, 1: y
    window: Box
    near: dict[int, float] = field(default_factory=dict)  # position -> score of the part before it
    far: dict[int, float] = field(default_factory=dict)  # position -> score of the part after it

    @property
    def contrast(self) -> dict[int, float]:
        return {p: self.far[p] - self.near[p] for p in self.near}

    def parts(self, position: int) -> tuple[Box, Box]:
        near, far = list(self.window), list(self.window)
        near[self.axis + 2] = position
        far[self.axis] = position
        return tuple(near), tuple(far)  # type: ignore[return-value]

    def edges(self, tie_margin: float) -> tuple[int, int]:
        """Start and end; a side where no split favours the far (near) part is the window
        border: the object reaches past it."""
        lo, hi = self.window[self.axis], self.window[self.axis + 2]
        contrast = self.contrast
        top, bottom = max(contrast.values()), min(contrast.values())
        start = max(p for p, c in contrast.items() if c >= top - tie_margin) if top > tie_margin else lo
        end = min(p for p, c in contrast.items() if c <= bottom + tie_margin) if bottom < -tie_margin else hi
        return (start, end) if start < end else (lo, hi)

    def next_probes(self, steps: int, tie_margin: float) -> dict[int, set[int]]:
        """Split position -> the parts to embed there (0: near, 1: far): first `steps` even
        splits, both parts; then, for each edge, the midpoint towards the neighbouring split
        on the object's side (where the change lies), the part beyond that edge."""
        lo, hi = self.window[self.axis], self.window[self.axis + 2]
        if not self.near:
            return {p: {0, 1} for p in _inner_positions(lo, hi, steps)}
        known = sorted(self.near)
        start, end = self.edges(tie_margin)
        probes: dict[int, set[int]] = {}
        for position, part in (((start + min((p for p in known if p > start), default=hi)) // 2, 0),
                               ((max((p for p in known if p < end), default=lo) + end) // 2, 1)):
            if lo < position < hi and position not in self.near:
                probes.setdefault(position, set()).add(part)
        return probes

    def record(self, position: int, near: float | None, far: float | None) -> None:
        """The parts' scores at a split; a part not embedded is interpolated."""
        lo, hi = self.window[self.axis], self.window[self.axis + 2]
        self.near[position] = near if near is not None else _interpolate(self.near, position, {lo: 0.0})
        self.far[position] = far if far is not None else _interpolate(self.far, position, {hi: 0.0})


def _interpolate(values: dict[int, float], position: int, borders: dict[int, float]) -> float:
    """Linear between the nearest known positions on either side (an empty part at the
    window's border scores 0); the one known side where the other is unknown."""
    known = sorted({**borders, **values}.items())
    return float(np.interp(position, [p for p, _ in known], [v for _, v in known]))


def _inner_positions(lo: int, hi: int, steps: int) -> list[int]:
    """`steps` evenly spaced positions strictly between lo and hi."""
    return sorted({int(round(v)) for v in np.linspace(lo, hi, steps + 2)[1:-1]} - {lo, hi})


@dataclass
class _ObjectFit:
    frame: int
    asset: int
    seed: Box
    window: Box
    axes: list[_AxisProfile]

    def box(self, tie_margin: float) -> Box:
        (x1, x2), (y1, y2) = (a.edges(tie_margin) if a.near else (a.window[a.axis], a.window[a.axis + 2])
                              for a in self.axes)
        return x1, y1, x2, y2


def _seed(state: _FrameRegions, k: int, search: RegionSearch) -> tuple[Box, float] | None:
    """The region to grow the object's box from: the smallest one within `tie_margin` of
    the best score (a large crop of mostly neutral background can score as high as a
    tight one), when the best comes within `seed_margin` of the threshold."""
    best = _best(state, k)
    if best is None or best[1] < search.seed_level:
        return None
    close = [b for b, row in zip(state.boxes, state.scores) if row[k] >= best[1] - search.tie_margin]
    return min(close, key=area), best[1]


def fit_boxes(states: Sequence[_FrameRegions], n_assets: int, search: RegionSearch, embed_images, ref_matrix,
              last_found: Sequence[dict[int, Box]] = ()) -> list:
    """Fit each seeded (or tracked: `last_found[f]`, asset -> box) asset's box to the object
    (see `_AxisProfile`), both axes at once, one embedding round per refinement. Returns
    [(frame, asset, box, seed score)]."""
    fits = []
    for f, state in enumerate(states):
        seeds = {k: seeded for k in range(n_assets) if (seeded := _seed(state, k, search)) is not None}
        if f < len(last_found):
            seeds.update(_tracked_seeds(state, last_found[f], seeds, search))
        by_seed: dict[Box, list[int]] = {}
        for k, (seed, _) in seeds.items():
            by_seed.setdefault(seed, []).append(k)
        windows = {seed: _window(state, seed, assets, search) for seed, assets in by_seed.items()}
        for k, (seed, score) in seeds.items():
            window = windows[seed]
            fits.append((_ObjectFit(f, k, seed, window, [_AxisProfile(0, window), _AxisProfile(1, window)]), score))
    for _ in range(search.extent_rounds):
        plans = [(fit, axis, axis.next_probes(search.extent_steps, search.tie_margin))
                 for fit, _ in fits for axis in fit.axes]
        requests = _per_frame(states, {(fit.frame, id(axis)): [axis.parts(p)[i] for p, which in probes.items() for i in which]
                                       for fit, axis, probes in plans})
        _embed_round(states, requests, embed_images, ref_matrix)
        for fit, axis, probes in plans:
            state = states[fit.frame]
            for p, which in probes.items():
                axis.record(p, *(_part_score(state, part, fit.asset) if i in which else None
                                 for i, part in enumerate(axis.parts(p))))
    boxes = {(fit.frame, id(fit)): [fit.box(search.tie_margin)] for fit, _ in fits}
    _embed_round(states, _per_frame(states, boxes), embed_images, ref_matrix)
    return [(fit.frame, fit.asset, fit.box(search.tie_margin), seed_score) for fit, seed_score in fits]


def _part_score(state: _FrameRegions, box: Box, k: int) -> float:
    """An empty part holds nothing of the object."""
    return state.score_of(box, k) if area(box) > 0 else 0.0


def _per_frame(states, boxes_by_key: dict) -> list[list[Box]]:
    requests = [[] for _ in states]
    for (f, _), boxes in boxes_by_key.items():
        requests[f] += boxes
    return requests


def _search_regions(states, search: RegionSearch, embed_images, ref_matrix) -> None:
    """Embed the whole frame and a grid: every scale, or only the coarse ones (the edge
    search around each seed is then the fine stage)."""
    scales, overlap = ((search.coarse_scales, search.coarse_overlap) if search.coarse_to_fine
                       else (search.scales, search.overlap))
    grids = [candidate_regions(s.frame.image.shape[1], s.frame.image.shape[0], scales, overlap) for s in states]
    _embed_round(states, grids, embed_images, ref_matrix)


def crop(image: np.ndarray, box: Box) -> np.ndarray:
    x1, y1, x2, y2 = box
    return image[y1:y2, x1:x2]


def match_frames(
    frames: Sequence[FrameInput],
    references: Sequence[ReferenceAsset],
    embed_images: Callable[[list[np.ndarray]], np.ndarray],
    search: RegionSearch,
    frames_per_batch: int = 4,
) -> MatchOutcome:
    """Appearances of every reference asset in every frame (at most one per asset and frame).

    A few frames are searched together so each round's crops go to the embedder in one
    full batch while memory stays bounded by `frames_per_batch` frames (and, for reuse,
    the last frame of each scene).
    """
    if not frames or not references:
        return MatchOutcome([], 0, len(frames))
    ref_matrix = np.stack([r.vector for r in references]).astype(np.float32)
    found: list[Appearance] = []
    forwards = reused = 0
    last_of_scene: dict[int, _FrameRegions] = {}
    found_in_scene: dict[int, dict[int, Box]] = {}  # scene -> asset -> box, in its last frame searched
    for start in range(0, len(frames), frames_per_batch):
        states = []
        for frame in frames[start : start + frames_per_batch]:
            states.append(_FrameRegions(frame, last_of_scene.get(frame.scene_index) if search.reuse_unchanged else None))
            last_of_scene[frame.scene_index] = states[-1]
        last_found = [found_in_scene.get(s.frame.scene_index, {}) if search.track_found else {} for s in states]
        _search_regions(states, search, embed_images, ref_matrix)
        here: list[dict[int, Box]] = [{} for _ in states]
        for f, k, box, seed_score in fit_boxes(states, len(references), search, embed_images, ref_matrix, last_found):
            confidence = max(seed_score, states[f].score_of(box, k))
            if confidence >= search.threshold:
                found.append(_appearance(states[f], references[k], box, confidence))
                here[f][k] = box
        for state, boxes in zip(states, here):
            found_in_scene[state.frame.scene_index] = boxes
        for state in states:
            forwards, reused = forwards + state.embedded, reused + state.reused
            state.previous = None  # only the last frame of each scene stays alive
    return MatchOutcome(found, forwards, len(frames), reused)


def _appearance(state: _FrameRegions, ref: ReferenceAsset, box: Box, confidence: float) -> Appearance:
    """The appearance's vector is the fitted box's: it stands for the whole object."""
    frame = state.frame
    return Appearance(
        asset_id=ref.asset_id,
        asset_code=ref.code,
        scene_index=frame.scene_index,
        frame_index=frame.frame_index,
        timestamp_sec=frame.timestamp_sec,
        bbox=box,
        confidence=confidence,
        embedding=state.vector_of(box),
    )


@dataclass
class AssetScore:
    """Frame-level counts for one asset, and how well its boxes cover the object: the mean
    IoU of each predicted box with the true box, over the frames where both exist."""

    code: str
    true_positives: int = 0
    predicted: int = 0
    actual: int = 0
    boxes_compared: int = 0
    iou_sum: float = 0.0

    @property
    def precision(self) -> float | None:
        return self.true_positives / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:
        return self.true_positives / self.actual if self.actual else None

    @property
    def mean_iou(self) -> float | None:
        return self.iou_sum / self.boxes_compared if self.boxes_compared else None


def evaluate_against_truth(
    appearances: Sequence[Appearance],
    truth: dict[tuple[int, int], dict[str, Box]],
    evaluated_frames: Sequence[tuple[int, int]],
    codes: Sequence[str],
    min_iou: float,
) -> dict[str, AssetScore]:
    """Precision, recall and mean box IoU per asset over the sampled frames.

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
        if gt_box is None:
            continue
        overlap = iou(app.bbox, gt_box)
        score.boxes_compared += 1
        score.iou_sum += overlap
        if overlap >= min_iou:
            score.true_positives += 1
    return scores

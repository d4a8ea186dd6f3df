"""Opening a clip and decoding it once, front to back, with PyAV.

Nothing here seeks: frames come out in decode order, numbered from 0, with their
time from the stream's timestamps. The header (codec, size, rate, declared frame
count and duration) is read at open and checked against the configured limits
before the first frame is decoded. Decoding errors part way through are recorded,
not raised, so the frames that did decode stay usable (status "partial").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import av
import av.error
from av.stream import Disposition

from cv_assets.video.errors import VideoInputError

# Demuxers allowed to open a clip. Keeping out image2 (patterns), concat, hls/dash
# (playlists that pull other files or URLs), tty/txt (text) and the rest.
ALLOWED_CONTAINERS = (
    "mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "mpegts", "mpeg",
    "flv", "ogg", "nut", "asf", "mxf", "m4v", "h264", "hevc", "ivf", "gif", "yuv4mpegpipe",
)
# After this many packets in a row fail to decode, the rest of the file is treated as lost.
MAX_CONSECUTIVE_PACKET_ERRORS = 50


@dataclass(frozen=True)
class DecodeLimits:
    max_width: int
    max_height: int
    max_duration_sec: float


@dataclass(frozen=True)
class StreamHeader:
    """What the container declares about the video stream, before decoding."""

    container: str
    codec: str | None
    width: int | None
    height: int | None
    fps: float | None
    declared_frames: int | None
    declared_duration_sec: float | None


@dataclass(frozen=True)
class DecodedFrame:
    index: int
    timestamp_sec: float
    frame: av.VideoFrame


class ClipDecoder:
    """An open clip. Use as a context manager; iterate `frames()` once."""

    def __init__(self, path: Path, limits: DecodeLimits, *, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(path)
        self.limits = limits
        self.decoded_frames = 0
        self.damaged_frames = 0
        self.first_damage: str | None = None
        self.errors: list[str] = []
        self._container = None
        self._stream = None
        self.header: StreamHeader | None = None
        self._last_timestamp: float | None = None
        self._first_time: float | None = None
        self._time_base: tuple[int, int] | None = None

    def __enter__(self) -> "ClipDecoder":
        self._check_y4m_header()
        self._container = self._open()
        try:
            self._stream = self._video_stream()
            self.header = self._read_header()
            self._check_header_limits()
            # Frame + slice threading: the decode floor on multi-core machines.
            self._stream.thread_type = "AUTO"
            tb = self._stream.time_base
            # Integer numerator/denominator: pts * num / den is exact where floats would drift.
            self._time_base = (tb.numerator, tb.denominator) if tb else None
        except BaseException:
            self._container.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    # -- opening -----------------------------------------------------------------

    def _open(self):
        try:
            # "file:" + whitelists: FFmpeg reads this one local file and nothing it might point to.
            return av.open(
                "file:" + str(self.path),
                container_options={
                    "protocol_whitelist": "file",
                    "format_whitelist": ",".join(ALLOWED_CONTAINERS),
                },
            )
        except av.error.FFmpegError as exc:
            raise VideoInputError(self.label, f"cannot open as video: {_diagnose_unopenable(self.path, exc)}") from None

    def _check_y4m_header(self) -> None:
        """FFmpeg refuses an absurd y4m size with a bare EBUSY ("Device or resource busy"):
        read the declared size first, so the error names the limit."""
        width, height = _y4m_declared_size(self.path)
        if width or height:
            self._check_size(width, height, "declared")

    def _video_stream(self):
        streams = [s for s in self._container.streams.video if not (s.disposition & Disposition.attached_pic)]
        if not streams:
            raise VideoInputError(self.label, f"no video stream in the {self._container.format.name} container")
        stream = streams[0]
        if stream.codec_context is None:
            raise VideoInputError(self.label, "the video stream's codec has no decoder in this FFmpeg build")
        return stream

    def _read_header(self) -> StreamHeader:
        stream, ctx = self._stream, self._stream.codec_context
        fps = _positive(stream.average_rate) or _positive(stream.guessed_rate)
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif self._container.duration:
            duration = self._container.duration / av.time_base
        else:
            duration = None
        return StreamHeader(
            container=self._container.format.name,
            codec=ctx.name,
            width=ctx.width or None,
            height=ctx.height or None,
            fps=fps if fps and fps < 1000 else None,
            declared_frames=stream.frames or None,
            declared_duration_sec=duration,
        )

    def _check_header_limits(self) -> None:
        h = self.header
        self._check_size(h.width, h.height, "declared")
        if h.declared_duration_sec and h.declared_duration_sec > self.limits.max_duration_sec:
            raise VideoInputError(
                self.label,
                f"declared duration {h.declared_duration_sec:.1f} s is above the limit "
                f"sampling.max_duration_sec={self.limits.max_duration_sec:g}",
            )

    def _check_size(self, width: int | None, height: int | None, what: str) -> None:
        lim = self.limits
        if (width or 0) > lim.max_width or (height or 0) > lim.max_height:
            raise VideoInputError(
                self.label,
                f"{what} resolution {width}x{height} is above the limit "
                f"{lim.max_width}x{lim.max_height} (sampling.max_width/max_height)",
            )

    # -- decoding ----------------------------------------------------------------

    def frames(self) -> Iterator[DecodedFrame]:
        """Every frame once, in order. Raises VideoInputError only for limit violations."""
        if self._container is None:
            raise RuntimeError("ClipDecoder.frames() outside its `with` block")
        stream = self._stream
        packets = self._container.demux(stream)
        failures_in_a_row = 0
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.FFmpegError as exc:
                # Cut-off or damaged file: keep what the decoder still holds, then stop.
                self.errors.append(f"reading stopped: {_ffmpeg_message(exc)}")
                yield from self._intact(self._flush())
                return
            try:
                decoded = packet.decode()
                failures_in_a_row = 0
            except av.error.FFmpegError as exc:
                self.errors.append(f"packet at {packet.pts} failed to decode: {_ffmpeg_message(exc)}")
                failures_in_a_row += 1
                if failures_in_a_row >= MAX_CONSECUTIVE_PACKET_ERRORS:
                    self.errors.append(f"gave up after {failures_in_a_row} undecodable packets in a row")
                    return
                continue
            yield from self._intact(self._number(frame) for frame in decoded)

    def _flush(self) -> Iterator[DecodedFrame]:
        try:
            remaining = self._stream.codec_context.decode(None)
        except av.error.FFmpegError:
            return
        for frame in remaining:
            yield self._number(frame)

    def _intact(self, frames: Iterator[DecodedFrame]) -> Iterator[DecodedFrame]:
        """The frames the decoder did not flag as corrupt (damaged data, concealed errors):
        a damaged frame keeps its index but is never handed on, and is recorded."""
        for decoded in frames:
            if decoded.frame.is_corrupt:
                self.damaged_frames += 1
                message = (f"frame {decoded.index} ({decoded.timestamp_sec:.2f} s) is damaged "
                           "(the decoder flagged it corrupt) and was not kept")
                self.first_damage = self.first_damage or message
                self.errors.append(message)
                continue
            yield decoded

    def _number(self, frame: av.VideoFrame) -> DecodedFrame:
        if frame.width > self.limits.max_width or frame.height > self.limits.max_height:
            self._check_size(frame.width, frame.height, "decoded")
        timestamp = self._timestamp(frame)
        if timestamp > self.limits.max_duration_sec:
            raise VideoInputError(
                self.label,
                f"decoded past {self.limits.max_duration_sec:g} s (sampling.max_duration_sec) although the header "
                f"declared {self.header.declared_duration_sec}",
            )
        decoded = DecodedFrame(self.decoded_frames, timestamp, frame)
        self.decoded_frames += 1
        return decoded

    def _timestamp(self, frame: av.VideoFrame) -> float:
        """Seconds since the first frame, from the frame's pts; never goes backwards."""
        previous = self._last_timestamp
        pts = frame.pts
        if pts is not None and self._time_base:
            seconds = pts * self._time_base[0] / self._time_base[1]
            if self._first_time is None:
                self._first_time = seconds - (previous or 0.0)
            timestamp = seconds - self._first_time
        elif self.header.fps:
            timestamp = 0.0 if previous is None else previous + 1.0 / self.header.fps
        else:
            raise VideoInputError(self.label, "frames carry no timestamps and the stream declares no frame rate")
        if previous is not None and timestamp < previous:
            timestamp = previous
        self._last_timestamp = timestamp
        return timestamp

    def outcome(self) -> tuple[str, str | None]:
        """("ok" | "partial" | "failed", reason) once `frames()` is exhausted."""
        declared = self.header.declared_frames if self.header else None
        if self.decoded_frames == self.damaged_frames:
            detail = f": {self.errors[0]}" if self.errors else " (the stream yields no frames)"
            return "failed", f"no frame could be decoded{detail}"
        of_declared = f" of {declared} declared" if declared else ""
        if self.errors:
            return "partial", f"decoded {self.decoded_frames}{of_declared} frames; {self.first_damage or self.errors[0]}"
        if declared and self.decoded_frames < declared:
            return "partial", f"decoded {self.decoded_frames}{of_declared} frames; the rest is missing or unreadable"
        missing = self._missing_seconds()
        if missing is not None:
            return "partial", (
                f"decoded {self.decoded_frames} frames covering {self.decoded_duration_sec:.2f} s of the "
                f"{self.header.declared_duration_sec:.2f} s declared; the rest is missing or unreadable"
            )
        return "ok", None

    @property
    def decoded_duration_sec(self) -> float | None:
        """Time of the last decoded frame plus one frame period."""
        if self._last_timestamp is None:
            return None
        return self._last_timestamp + (1.0 / self.header.fps if self.header.fps else 0.0)

    def _missing_seconds(self) -> float | None:
        """How much of the declared duration never decoded, when more than two frame periods."""
        declared = self.header.declared_duration_sec if self.header else None
        decoded = self.decoded_duration_sec
        if not declared or decoded is None:
            return None
        tolerance = 2.0 / self.header.fps if self.header.fps else 0.1
        missing = declared - decoded
        return missing if missing > tolerance else None


def _y4m_declared_size(path: Path) -> tuple[int | None, int | None]:
    """(W, H) from a YUV4MPEG2 stream header, or (None, None) for any other file."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(256)
    except OSError:
        return None, None
    if not head.startswith(b"YUV4MPEG2 "):
        return None, None
    fields = {token[:1]: token[1:] for token in head.split(b"\n", 1)[0].split(b" ")[1:] if token}
    return _y4m_int(fields.get(b"W")), _y4m_int(fields.get(b"H"))


def _y4m_int(value: bytes | None) -> int | None:
    if not value or not value.isdigit():
        return None
    return int(value[:18])  # 18 digits already far above any limit; no huge-int parsing


def _positive(rate) -> float | None:
    try:
        value = float(rate) if rate is not None else None
    except (TypeError, ZeroDivisionError):
        return None
    return value if value and value > 0 else None


def _ffmpeg_message(exc: av.error.FFmpegError) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _diagnose_unopenable(path: Path, exc: av.error.FFmpegError) -> str:
    """A reason a person can act on, from the first bytes of the file."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if _looks_like_text(head):
        return "the file is text, not video"
    if head[4:8] == b"ftyp":
        boxes = _top_level_mp4_boxes(path)
        if b"moov" not in boxes:
            return "the MP4 index (moov atom) is missing: the file was cut off or is still being written"
    if isinstance(exc, av.error.ArgumentError):
        return "not a video container format this pipeline accepts"
    return _ffmpeg_message(exc)


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    text = head.decode("utf-8", errors="replace")
    printable = sum((ch.isprintable() and ch != "\ufffd") or ch in "\t\r\n" for ch in text)
    return printable >= 0.95 * len(text)


def _top_level_mp4_boxes(path: Path) -> set[bytes]:
    """Names of the top-level ISO-BMFF boxes, reading only box headers."""
    names: set[bytes] = set()
    size_total = path.stat().st_size
    with open(path, "rb") as handle:
        offset = 0
        while offset + 8 <= size_total:
            handle.seek(offset)
            header = handle.read(16)
            size, name = struct.unpack(">I4s", header[:8])
            if size == 1 and len(header) == 16:
                size = struct.unpack(">Q", header[8:16])[0]
            elif size == 0:
                size = size_total - offset
            if size < 8:
                break
            names.add(name)
            offset += size
    return names

"""Video encoding: frames (HxWx3 uint8) to yuv420p mp4 with PyAV, for LeRobot datasets and rollout videos.

In its own module because two packages need it and neither owns it: the LeRobot writer
(`sources.lerobot_writer`) streams camera frames into its mp4 files, and `refine-eval run --video`
writes its rollouts. PyAV wheels differ in the encoders and decoders they bundle, so the codec is
the first of `CODEC_CANDIDATES` (libsvtav1 -> AV1 like LeRobot's default, then libx264, then mpeg4)
that round-trips a tiny clip (`pick_codec`), never assumed.
"""

from __future__ import annotations

import io
import os
from fractions import Fraction
from functools import cache
from pathlib import Path

import numpy as np

# Encoder name -> (codec name recorded in info.json, encoder options). Ordered by preference.
CODEC_CANDIDATES: dict[str, tuple[str, dict[str, str]]] = {
    "libsvtav1": ("av1", {"g": "2", "crf": "30", "preset": "11"}),
    "libx264": ("h264", {"g": "2", "crf": "18", "preset": "veryfast"}),
    "h264": ("h264", {"g": "2", "crf": "18"}),
    "mpeg4": ("mpeg4", {"g": "2", "qmin": "2", "qmax": "6"}),
}


@cache
def pick_codec(width: int, height: int, preferred: str | None = None) -> str:
    """The first encoder in `CODEC_CANDIDATES` that round-trips a tiny clip of this size.

    Probed, not assumed: PyAV wheels differ in which encoders and decoders they bundle (the
    common wheel encodes AV1 with libsvtav1 but decodes it with libdav1d).
    """
    names = [preferred] if preferred else list(CODEC_CANDIDATES)
    errors = []
    for name in names:
        try:
            buf = io.BytesIO()
            clip = [np.full((height, width, 3), v, np.uint8) for v in (30, 200)]
            enc = VideoEncoder(buf, 10.0, width, height, name)
            for img in clip:
                enc.add(img)
            enc.close()
            buf.seek(0)
            import av

            with av.open(buf, "r") as container:
                if len(list(container.decode(video=0))) == len(clip):
                    return name
            errors.append(f"{name}: decoded frame count differs")
        except Exception as exc:  # PyAV raises codec-specific errors; any failure means "not usable"
            errors.append(f"{name}: {exc}")
    raise RuntimeError(f"no usable video codec for {width}x{height} in this PyAV build ({'; '.join(errors)})")


class VideoEncoder:
    """One mp4 stream being written; frames get consecutive pts so timestamps are index / fps."""

    def __init__(self, target: str | os.PathLike[str] | io.BytesIO, fps: float, width: int, height: int, codec: str):
        import av

        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner per stream otherwise
        self.width, self.height = width, height
        self.frames = 0
        rate = Fraction(fps).limit_denominator(1001)
        opts = dict(CODEC_CANDIDATES.get(codec, (codec, {}))[1])
        if isinstance(target, io.BytesIO):
            self._container = av.open(target, "w", format="mp4")
        else:
            self._container = av.open(os.fspath(target), "w")
        stream = self._container.add_stream(codec, rate=rate, options=opts)
        assert isinstance(stream, av.video.stream.VideoStream)
        self._stream = stream
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.time_base = 1 / rate
        if codec == "mpeg4":
            self._stream.bit_rate = 8_000_000

    def add(self, image: np.ndarray) -> None:
        import av

        image = np.ascontiguousarray(image, dtype=np.uint8)
        if image.shape != (self.height, self.width, 3):
            raise ValueError(f"frame of shape {image.shape} in a {self.height}x{self.width}x3 video")
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = self.frames
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()


def write_mp4(path: Path, frames: list[np.ndarray], fps: float) -> None:
    """One finished mp4 at `path` from whole frames (rollouts, demonstrations): written beside it as
    `.partial.mp4` and moved in when complete, so a stopped run never leaves a truncated video under
    the final name. Odd sides lose their last row/column (yuv420p needs even sides)."""
    h, w = frames[0].shape[:2]
    h2, w2 = h - h % 2, w - w % 2
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.mp4")
    enc = VideoEncoder(partial, fps, w2, h2, pick_codec(w2, h2))
    for img in frames:
        enc.add(img[:h2, :w2])
    enc.close()
    partial.replace(path)

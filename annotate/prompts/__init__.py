"""Versioned prompt templates and what goes into a teacher request for one episode.

A template is a text file in this package (`rationale-v1.txt`) with `[system]`, `[user]` and
`[reask]` sections and `$name` placeholders. Its sha256 goes into every request key and the
manifest: editing a template makes new keys, so old answers are never passed off as answers
to the new prompt. Lines before the first section are its header: `#` comments, and `images: none`
for a template asked without keyframes (`rationale-v1-text`, the default of `annotate --frames 0`:
a text-only prompt, for a teacher that takes no images, or vLLM's CPU build, whose image path needs
a GPU), which tells the teacher it sees no image and asks for no boxes.
"""

from __future__ import annotations

import base64
import hashlib
import string
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from ..episode import Episode
from ..primitives import (
    GripperEvent,
    MotionSegment,
    gripper_events,
    gripper_positions,
    motion_primitives,
    motion_segments,
)
from .keyframes import Keyframe, encode_keyframe, select_keyframes

__all__ = [
    "DEFAULT_TEMPLATE",
    "DataURL",
    "EpisodeFacts",
    "FrameOptions",
    "Keyframe",
    "MotionSegment",
    "PromptBundle",
    "PromptTemplate",
    "build_prompt",
    "default_template",
    "episode_facts",
    "load_template",
    "reask_messages",
    "select_keyframes",
]

DEFAULT_TEMPLATE = "rationale-v1"
TEXT_TEMPLATE = "rationale-v1-text"  # the same questions asked from the facts alone (no keyframe sent)


def default_template(frames: int) -> str:
    """The template `annotate` asks with when none is named: the text-only one for `--frames 0`."""
    return TEXT_TEMPLATE if frames == 0 else DEFAULT_TEMPLATE


class DataURL(str):
    """An image as a `data:` URL, with its JSON text (`json`) made when the prompt is built.

    Base64 needs no JSON escaping, so a request body can splice `json` in as bytes instead of
    serialising ~13 KB of text per keyframe on the event loop for every request (see
    `teachers.openai_compat.encode_body`). Everywhere else it is an ordinary string.
    """

    json: bytes

    @classmethod
    def jpeg(cls, data: bytes) -> DataURL:
        encoded = base64.b64encode(data)
        url = cls("data:image/jpeg;base64," + encoded.decode("ascii"))
        url.json = b'"data:image/jpeg;base64,' + encoded + b'"'
        return url

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        # pickled once, not as the text and its JSON (a prepared request sent from a Ray task is half the size)
        return (_data_url_from_json, (self.json,))


def _data_url_from_json(raw: bytes) -> DataURL:
    url = DataURL(raw[1:-1].decode("ascii"))
    url.json = raw
    return url


@dataclass(frozen=True)
class PromptTemplate:
    """A loaded template: its version name, sections and digest."""

    version: str  # file stem, e.g. "rationale-v1"
    text: str  # the whole file
    sections: dict[str, str]  # "system" / "user" / "reask" -> template text
    images: bool = True  # False: asked without keyframes (header line `images: none`)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def render(self, section: str, **values: Any) -> str:
        return string.Template(self.sections[section]).substitute(**values).strip()


@cache
def load_template(version: str = DEFAULT_TEMPLATE) -> PromptTemplate:
    """Load a packaged template by version name."""
    try:
        text = resources.files(__name__).joinpath(f"{version}.txt").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"unknown prompt template {version!r}") from None
    sections: dict[str, str] = {}
    current: str | None = None
    images = True
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]") and stripped[1:-1].isidentifier():
            current = stripped[1:-1]
            sections[current] = ""
        elif current is not None:
            sections[current] += line
        elif stripped == "images: none":  # the header
            images = False
    missing = {"system", "user", "reask"} - set(sections)
    if missing:
        raise ValueError(f"prompt template {version!r} lacks sections {sorted(missing)}")
    return PromptTemplate(version, text, sections, images)


@dataclass
class EpisodeFacts:
    """What the data determines about an episode (given to the teacher, checked against its answer)."""

    instruction: str
    num_steps: int
    moves: list[str]  # motion primitive per step
    gripper: list[str]  # "open"/"closed" per step
    events: list[GripperEvent]
    segments: list[MotionSegment]
    start_xyz: list[float]  # end-effector position at the first step
    end_xyz: list[float]  # ... and at the last step


def episode_facts(episode: Episode) -> EpisodeFacts:
    """Motion primitives, gripper positions/events and motion segments of an episode."""
    moves = motion_primitives(episode.states)
    return EpisodeFacts(
        instruction=episode.instruction,
        num_steps=len(episode),
        moves=moves,
        gripper=list(gripper_positions(episode.states)),
        events=gripper_events(episode.states),
        segments=motion_segments(moves),
        start_xyz=[round(float(v), 4) for v in episode.states[0, :3]],
        end_xyz=[round(float(v), 4) for v in episode.states[-1, :3]],
    )


@dataclass(frozen=True)
class FrameOptions:
    """How keyframes are chosen and encoded (part of every request key)."""

    count: int = 6  # K evenly spaced keyframes (gripper-event steps are added to these); 0: no image at all
    camera: str | None = None  # None: the episode's primary (first) camera
    max_side: int = 256  # longest side in pixels after resizing (never upscaled)
    quality: int = 85  # JPEG quality when a frame has to be re-encoded

    def as_key(self) -> dict[str, Any]:
        return {"count": self.count, "camera": self.camera, "max_side": self.max_side, "quality": self.quality}


@dataclass
class PromptBundle:
    """Everything one episode's first request needs; re-asks append to `messages`."""

    messages: list[dict[str, Any]]
    facts: EpisodeFacts
    keyframes: list[Keyframe]
    image_size: tuple[int, int] | None  # (width, height) of the first keyframe sent; None: none was sent
    template: PromptTemplate
    frame_key: dict[str, Any] = field(default_factory=dict)  # the frame choice, for the request key


def _event_text(events: list[GripperEvent]) -> str:
    if not events:
        return "none (the gripper does not change state)"
    return "; ".join(f"step {e.step}: gripper {'closes' if e.kind == 'close' else 'opens'}" for e in events)


def build_prompt(
    episode: Episode,
    frames: FrameOptions | None = None,
    template: PromptTemplate | None = None,
    facts: EpisodeFacts | None = None,
) -> PromptBundle:
    """The chat messages (OpenAI format, images as JPEG data URLs) asking for one episode's rationale.

    With `frames.count == 0` no image part is sent (the user message is its text alone); the template
    must then be one asked without images (`rationale-v1-text`), and the reverse: ValueError otherwise.
    """
    frames = frames or FrameOptions()
    template = template or load_template()
    facts = facts or episode_facts(episode)
    if template.images != (frames.count > 0):
        raise ValueError(
            f"prompt template {template.version!r} is asked {'with' if template.images else 'without'} images, "
            f"but {frames.count} keyframes were chosen"
        )
    frame_key = frame_choice(episode, facts, frames)
    camera, steps = frame_key["camera"], frame_key["steps"]
    keyframes = [encode_keyframe(episode.frames[camera], s, frames.max_side, frames.quality) for s in steps]
    image_size = keyframes[0].size if keyframes else None
    w, h = image_size or (0, 0)
    values = {
        "instruction": facts.instruction,
        "num_steps": facts.num_steps,
        "last_step": facts.num_steps - 1,
        "image_width": w,
        "image_height": h,
        "keyframes": ", ".join(f"image {i + 1} = step {k.step}" for i, k in enumerate(keyframes)) or "none",
        "gripper_events": _event_text(facts.events),
        "segments": "\n".join(f"{i}. steps {s.start}..{s.end}: {s.move}" for i, s in enumerate(facts.segments)),
    }
    content: list[dict[str, Any]] = [{"type": "text", "text": template.render("user", **values)}]
    for k in keyframes:
        content.append({"type": "image_url", "image_url": {"url": DataURL.jpeg(k.jpeg)}})
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": template.render("system", **values)},
        {"role": "user", "content": content},
    ]
    return PromptBundle(messages, facts, keyframes, image_size, template, frame_key)


def frame_choice(episode: Episode, facts: EpisodeFacts, frames: FrameOptions) -> dict[str, Any]:
    """The frames a prompt shows, as the request key records them: the frame options, the camera and
    the keyframe steps. A function of the states and flags alone (nothing is decoded), so a store's
    settled keys can be matched before any frame is (the Ray backend's anti-join).
    With `count` 0 nothing is shown: no camera, no step (and no image size or quality, which then
    change nothing). ValueError when the episode has no such camera."""
    if frames.count == 0:
        return {"count": 0, "camera": None, "steps": []}
    camera = frames.camera or episode.cameras[0]
    if camera not in episode.frames:
        raise ValueError(f"episode {episode.episode_id} has no camera {camera!r} (has {episode.cameras})")
    steps = select_keyframes(facts.num_steps, [e.step for e in facts.events], frames.count)
    return {**frames.as_key(), "camera": camera, "steps": steps}


def reask_messages(template: PromptTemplate, raw_answer: str, errors: list[str]) -> list[dict[str, Any]]:
    """The two messages appended for a re-ask: the teacher's answer, then what was wrong with it."""
    listed = "\n".join(f"- {e}" for e in errors[:20])
    return [
        {"role": "assistant", "content": raw_answer},
        {"role": "user", "content": template.render("reask", errors=listed)},
    ]

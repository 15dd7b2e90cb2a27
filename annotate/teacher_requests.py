"""An episode made ready to ask: its prompt, its request key and the facts its answer is checked against.

Live mode (the engine) and batch mode build every request here, so that both send the same
bytes under the same key and a store written by one settles the other. The key covers
everything that changes an answer and nothing else: a rerun with the same inputs finds every
answer in the store and pays nothing twice. Preparation is CPU work only (no I/O to the
teacher); the engine runs it in a producer thread.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..schemas import SchemaDetail, SemanticContext, schema_digest, teacher_response_format
from .episode import Episode
from .errors import SourceError
from .prompts import FrameOptions, PromptBundle, PromptTemplate, build_prompt
from .store import Lookup
from .teachers.base import Teacher, TeacherRequest

IMAGE_TOKENS = 258  # what Gemini bills per image up to 384 px (OpenAI: 255 for a 256 px high-detail tile)
EPISODE_FORMATS = 256  # episode-detail response formats kept (~170 KB each with the teacher's JSON of it)


@dataclass
class PreparedRequest:
    """An episode made ready to ask: the prompt, the key and the facts (frames dropped)."""

    key: str
    episode_id: str
    dataset: str
    instruction: str
    actions: np.ndarray
    states: np.ndarray
    bundle: PromptBundle
    estimated_prompt_tokens: int
    context: SemanticContext  # the episode's facts the answer is checked against
    response_format: dict[str, Any]  # the structured-output request (shared by all when `static`)
    stored: Lookup | None = None  # read ahead by the producer (None: look it up when dispatching)


def request_key(
    content_digest: str,
    frame_key: dict[str, Any],
    template_version: str,
    template_digest: str,
    schema_id: str,
    teacher: str,
    model: str,
    sampling: dict[str, Any],
    schema_detail: SchemaDetail = "static",
) -> str:
    """sha256 over everything that changes an answer (and nothing that does not).

    `static` detail adds nothing to the payload, so stores written before the detail existed keep
    their keys (their answers were validated against the same full schema); `episode` changes it.
    """
    payload: dict[str, Any] = {
        "episode": content_digest,
        "frames": frame_key,
        "prompt": [template_version, template_digest],
        "schema": [schema_id, schema_digest(schema_id)],
        "teacher": teacher,
        "model": model,
        "sampling": sampling,
    }
    if schema_detail != "static":
        payload["schema_detail"] = schema_detail
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Rough prompt size: 4 characters a token for text, IMAGE_TOKENS per image."""
    chars, images = 0, 0
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            chars += len(content)
            continue
        for part in content:
            if part.get("type") == "image_url":
                images += 1
            else:
                chars += len(part.get("text", ""))
    return chars // 4 + images * IMAGE_TOKENS


class TeacherIdentityLike(Protocol):
    """What a request key needs of a teacher: a `Teacher`, or the Ray backend's client-free identity."""

    @property
    def name(self) -> str: ...
    @property
    def model(self) -> str: ...
    def sampling(self) -> dict[str, Any]: ...


def episode_request_key(
    episode: Episode,
    frame_key: dict[str, Any],
    teacher: TeacherIdentityLike,
    template: PromptTemplate,
    schema_id: str,
    schema_detail: SchemaDetail,
) -> str:
    """The request key of `episode` asked with the frames `frame_key` names (`prompts.frame_choice`): its
    content digest over exactly the frames shown, hashed as stored. The one place both a full preparation
    and the Ray backend's decode-free anti-join compute it. A text-only prompt (no camera) hashes no frame."""
    camera = frame_key["camera"]
    return request_key(
        episode.content_digest({camera: frame_key["steps"]} if camera is not None else {}),
        frame_key,
        template.version,
        template.digest,
        schema_id,
        teacher.name,
        teacher.model,
        teacher.sampling(),
        schema_detail,
    )


def prepare_request(
    episode: Episode,
    *,
    teacher: Teacher,
    template: PromptTemplate,
    frames: FrameOptions,
    schema_id: str,
    schema_detail: SchemaDetail,
    schema_backend: str,
    static_response_format: dict[str, Any],
) -> PreparedRequest:
    """Prompt, key and facts of an episode for `teacher` (CPU work, no I/O).

    `static_response_format` is used as it is under `static` detail (one object for the whole run,
    so a teacher serialises it once); `episode` detail derives one per request from the episode's facts.
    Raises SourceError when the episode's state is not the 7-d end-effector state motion primitives need.
    """
    if episode.states.ndim != 2 or episode.states.shape[1] != 7:
        raise SourceError(
            f"episode {episode.episode_id}: the state has shape {tuple(episode.states.shape)}, but motion "
            "primitives need a 7-d end-effector state [x, y, z, roll, pitch, yaw, gripper]; "
            "map one with --state-key"
        )
    bundle = build_prompt(episode, frames, template)
    key = episode_request_key(episode, bundle.frame_key, teacher, template, schema_id, schema_detail)
    facts = bundle.facts
    context = SemanticContext(facts.num_steps, len(facts.segments), bundle.image_size)
    response_format = static_response_format
    if schema_detail == "episode":
        response_format = episode_response_format(schema_id, schema_backend, context)
    return PreparedRequest(
        key=key,
        episode_id=episode.episode_id,
        dataset=episode.dataset,
        instruction=episode.instruction,
        actions=episode.actions,
        states=episode.states,
        bundle=bundle,
        estimated_prompt_tokens=estimate_prompt_tokens(bundle.messages),
        context=context,
        response_format=response_format,
    )


@functools.lru_cache(maxsize=EPISODE_FORMATS)
def episode_response_format(schema_id: str, backend: str, context: SemanticContext) -> dict[str, Any]:
    """The `episode`-detail response format for `context`, one shared object per distinct context.

    Deriving it (~4 ms) and serialising it (~60 KB of JSON, ~2.5 ms) for every request was the
    largest CPU cost of preparing a request, and episodes of a dataset share few step counts,
    segment counts and image sizes. The same object for the same facts also lets a teacher
    serialise it once (`OpenAICompatTeacher.encode`) and vLLM build one SamplingParams for it.
    Shared, so treated as immutable, as the static format always was.
    """
    return teacher_response_format(schema_id, backend, context)


def teacher_request(prepared: PreparedRequest, messages: list[dict[str, Any]], attempt: int) -> TeacherRequest:
    """What a teacher is sent for `prepared`: the first ask's messages, or those plus the re-ask turns."""
    return TeacherRequest(
        key=prepared.key,
        episode_id=prepared.episode_id,
        messages=messages,
        response_format=prepared.response_format,
        facts=prepared.bundle.facts,
        context=prepared.context,
        attempt=attempt,
    )

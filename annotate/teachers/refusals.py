"""Which refusals of a teacher are about the run's setup, and which about one episode.

A 400 is never retried, but what it means differs. "This prompt is too long for the context window"
or "flagged by the content policy" is about one episode: that episode is rejected with the reason and
the run goes on. "The model takes no images", "the response schema cannot be compiled" or "unknown
parameter" is about the setup: every request of the run would be refused alike, so rejecting each
episode would settle a whole run of rejects that no rerun asks again. Those stop the run instead, in
one line naming the cause and the fix, and store nothing for the episodes (a rerun after the fix asks
them).

Three rules, in this order:

1. `SETUP_REFUSALS`: an HTTP 400/422 whose message matches one of the patterns below stops the run
   at its first occurrence (the live teachers raise `TeacherConfigError`; batch mode stops after
   ingesting the batch).
2. `EPISODE_REFUSALS`: a refusal matching one of these (context length, content policy) is always
   that episode's reject, however often it repeats.
3. Anything else is judged by repetition: the same refusal (`refusal_signature`: status and message,
   numbers and ids blanked) for `--refusals-to-stop` distinct episodes in a row, with no answer in
   between, stops the run too; a streak broken before that settles its episodes as rejects
   (`RefusalStreak` keeps the live engine's count).

Patterns are matched case-insensitively against the server's error message (vLLM, OpenAI, Gemini's
OpenAI-compatible endpoint, Ollama, SGLang and FastAPI-style validation bodies all carry one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .base import TeacherConfigError, redact

SETUP_STATUSES = (400, 422)  # the statuses a setup refusal comes with (404 and 401/403 are handled before)
DEFAULT_REFUSALS_TO_STOP = 3  # identical refusals of distinct episodes in a row that stop a run


@dataclass(frozen=True)
class SetupRefusal:
    """A kind of refusal that says the run's setup is wrong: what it means, and what to do."""

    name: str
    cause: str  # completes "the model M at URL ..."
    fix: str  # what the user changes
    patterns: tuple[str, ...]  # regular expressions, matched case-insensitively anywhere in the message

    def matches(self, message: str) -> bool:
        return any(re.search(p, message, re.IGNORECASE) for p in self.patterns)

    def explain(self, model: str, where: str, summary: str) -> str:
        """The one line a run stops with: the model, where it is served, the cause, the server's words, the fix."""
        return f"the model {model!r} at {where} {self.cause} ({summary}): {self.fix}"


SETUP_REFUSALS: tuple[SetupRefusal, ...] = (
    SetupRefusal(
        "no-images",
        "takes no images",
        "serve a vision-language model (every prompt carries --frames keyframe images), "
        "or annotate text-only with --frames 0",
        (
            r"not a multimodal model",  # vLLM: "<model> is not a multimodal model"
            r"requires a multimodal processor",  # newer vLLM: "... requires a multimodal processor but none ..."
            r"does not support (images?|image input|vision|multi-?modal)",
            r"image_url is only supported by certain models",  # OpenAI
            r"images? (input|inputs|content|parts?) (is|are) not supported",
            r"image_url.{0,40}not supported",
            r"missing data required for image input",  # Ollama
        ),
    ),
    SetupRefusal(
        "too-many-images",
        "takes fewer images per request than a prompt carries",
        "start the server with a larger image limit (vLLM: --limit-mm-per-prompt '{\"image\": 16}'), "
        "or ask with fewer --frames",
        (
            r"limit[-_]mm[-_]per[-_]prompt",  # vLLM (older): "You set image=1 ... in `--limit-mm-per-prompt`"
            r"at most \d+ images?\b",  # vLLM: "At most 1 image(s) may be provided in one request"
            r"too many images",
        ),
    ),
    SetupRefusal(
        "schema",
        "cannot constrain its answers to the response schema",
        "rerun with --schema-detail static (a smaller schema), or serve the model with a structured-output "
        "backend that takes this schema (vLLM: guidance takes more of JSON Schema than xgrammar)",
        (
            r"invalid schema for response_format",  # OpenAI
            r"response_format.{0,80}(not supported|unsupported|invalid|not allowed)",
            r"(not supported|unsupported|invalid).{0,80}response_format",
            r"json[ _-]?schema.{0,80}(not supported|unsupported|invalid|cannot|could not|failed|compil)",
            r"json[ _-]?schema.{0,80}too (many|large|complex)",
            r"(not supported|unsupported|cannot|could not|failed to).{0,80}json[ _-]?schema",
            r"(grammar|structured[ _]outputs?|guided[ _]decoding|guided_json).{0,80}"
            r"(not supported|unsupported|compil|invalid|failed)",
            r"not supported by (xgrammar|outlines|guidance|lm-format-enforcer)",  # vLLM's backends
            r"too many states",  # Gemini: "the specified schema produces a constraint that has too many states"
            r"schema is nested too deeply",  # vLLM: "The JSON schema is nested too deeply"
        ),
    ),
    SetupRefusal(
        "request-shape",
        "does not take refinevla's request",
        "pick the --teacher that matches the server (openai sends max_completion_tokens; gemini and "
        "openai-compatible send max_tokens), and keep --temperature and --max-tokens to what the model accepts",
        (
            r"unrecognized request argument",  # OpenAI
            r"unsupported parameter",  # OpenAI: "Unsupported parameter: 'max_tokens' is not supported with this model"
            r"unsupported value",  # OpenAI: "Unsupported value: 'temperature' does not support 0.2 with this model"
            r"unknown (parameter|field|argument|name)",  # Gemini: 'Invalid JSON payload received. Unknown name "x"'
            r"invalid json payload received",
            r"extra (inputs|fields) (are|is) not permitted|extra_forbidden",  # pydantic (vLLM, FastAPI servers)
            r"is not supported (with|by|for) this model",
        ),
    ),
)

EPISODE_REFUSALS: tuple[str, ...] = (
    # the prompt of this episode does not fit (more keyframes, a longer instruction)
    r"context[ _]?(length|window)",
    r"max_model_len",
    r"prompt (is )?too long",
    r"too many (input |prompt )?tokens",
    r"input token count",  # Gemini: "The input token count (N) exceeds the maximum number of tokens allowed"
    r"exceeds? the (maximum|max|limit)",
    # the content of this episode was refused
    r"content[ _-]?(policy|filter|management)",
    r"safety",
    r"moderation",
    r"flagged",
    r"prohibited",
)


def setup_refusal(status: int | None, message: str) -> SetupRefusal | None:
    """The kind of setup refusal an HTTP error is, or None when it may be about one episode."""
    if status not in SETUP_STATUSES:
        return None
    return next((kind for kind in SETUP_REFUSALS if kind.matches(message)), None)


def is_episode_refusal(message: str) -> bool:
    """Whether a refusal names something of one episode (its length, its content): never a setup error."""
    return any(re.search(p, message, re.IGNORECASE) for p in EPISODE_REFUSALS)


_WITH_DIGITS = re.compile(r"\S*\d\S*")


def refusal_signature(status: int | None, message: str) -> str:
    """A refusal with what differs per request blanked: every word holding a digit (counts, ids, hashes,
    request ids) becomes '#', case and spacing are folded. Two episodes refused for the same reason share it."""
    text = _WITH_DIGITS.sub("#", message.lower())
    return f"{status} {' '.join(text.split())}"


def repeated_refusal_error(count: int, summary: str, model: str, where: str) -> TeacherConfigError:
    """The one line a run stops with when `count` distinct episodes in a row were refused alike (rule 3)."""
    return TeacherConfigError(
        redact(
            f"the model {model!r} at {where} refused {count} episodes in a row alike ({summary}): a refusal of "
            "the run's setup, not of the episodes, so none was stored as rejected; fix the model or the server's "
            "options and rerun (if the server does refuse these episodes one by one, rerun with --refusals-to-stop 0 "
            "to reject them)"
        )
    )


T = TypeVar("T")


@dataclass
class RefusalStreak(Generic[T]):
    """The refusals of distinct episodes in a row that share one signature, held until the streak is judged.

    `add` holds an episode's refusal and says whether the streak has now reached `limit` distinct
    episodes (a setup error: the held episodes are settled as nothing). `take` empties it when the
    streak is broken (an answer, another refusal, the run's end): the held episodes are then rejects.
    """

    limit: int = DEFAULT_REFUSALS_TO_STOP
    signature: str | None = None
    held: list[tuple[str, T]] = field(default_factory=list)  # (episode id, what the caller settles it with)

    def add(self, signature: str, episode_id: str, item: T) -> tuple[list[tuple[str, T]], bool]:
        """Hold a refusal. Returns (the held refusals of a streak this one broke, whether this one completes a
        streak of `limit` distinct episodes)."""
        broken = self.take() if signature != self.signature else []
        self.signature = signature
        self.held.append((episode_id, item))
        return broken, len({episode for episode, _ in self.held}) >= self.limit

    def take(self) -> list[tuple[str, T]]:
        """The held refusals, and an empty streak."""
        held, self.held, self.signature = self.held, [], None
        return held

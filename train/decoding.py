"""The one decoder of a refine-train policy: batched, greedy, constrained to end in 7 action tokens.

`Policy.predict`, `refine-eval`'s SimplerEnv policy and `refine-eval attention` all decode through
`generate` here (reached through `refinevla.train.policy`), so a fix to decoding is a fix everywhere.

The policy was trained to write its rationale, `ACTION:`, 7 action tokens and EOS. At test time
a model may ramble, stop early or put a word where an action token belongs; a benchmark run
must still get an action every step. So decoding is constrained, per row, by what the row has
written so far (a logits processor — stateless, it reads the ids):

- before `ACTION:`: anything but EOS (the rationale), up to `max_rationale_tokens`; then the
  `ACTION:` tag's ids are forced (`Generated.forced_tag` says so, and the run counts it);
- after the tag: only the 256 action-token ids, 7 times; then EOS.

With `reasoning=False` the tag is appended to the prompt (the action-only baseline writes it
first anyway; a reasoning policy is then asked for its action without its rationale).

Rows are batched only with rows whose prompts have the same length (in SimplerEnv all envs of
a task share one instruction), so there is no padding and a row decodes exactly as it would
alone — checked by a test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..annotate.episode import ACTION_DIM
from .targets import ACTION_TAG, prompt_text

N_ACTION = ACTION_DIM  # one action token per action dimension


@dataclass
class Generated:
    """What one row wrote: the rationale text, the 7 action ids and the decoded action."""

    rationale: str
    action_ids: list[int]
    action: np.ndarray  # (7,) unnormalised
    forced_tag: bool  # the rationale budget ran out and `ACTION:` was forced
    new_tokens: int


def find_tag(ids: Sequence[int], tag: Sequence[int]) -> int:
    """Index of the first occurrence of `tag` in `ids`, or -1."""
    n = len(tag)
    for i in range(len(ids) - n + 1):
        if list(ids[i : i + n]) == list(tag):
            return i
    return -1


class ActionGrammar:
    """Per-row allowed next tokens, from the tokens the row has generated so far."""

    def __init__(self, tag: Sequence[int], first_action_id: int, n_bins: int, eos_id: int, budget: int) -> None:
        self.tag = list(tag)
        self.action_lo, self.action_hi = first_action_id, first_action_id + n_bins  # [lo, hi)
        self.eos = eos_id
        self.budget = budget

    def allowed(self, generated: Sequence[int]) -> tuple[str, int | None]:
        """("free", None): any token but EOS; ("force", id); ("action", None): an action id."""
        at = find_tag(generated, self.tag)
        if at >= 0:
            written = len(generated) - at - len(self.tag)
            return ("action", None) if written < N_ACTION else ("force", self.eos)
        if len(generated) >= self.budget:
            # force the tag from where the budget ran out (the tail may already be a partial tag)
            k = len(generated) - self.budget
            return ("force", self.tag[k]) if k < len(self.tag) else ("force", self.eos)
        return ("free", None)


def logits_processor(grammar: ActionGrammar, prompt_len: int) -> Any:
    """A transformers `LogitsProcessor` that masks each row's scores to what `grammar` allows."""
    import torch
    from transformers import LogitsProcessor

    class Processor(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            out = torch.full_like(scores, float("-inf"))
            for row in range(input_ids.shape[0]):
                kind, token = grammar.allowed(input_ids[row, prompt_len:].tolist())
                if kind == "force":
                    out[row, token] = 0.0
                elif kind == "action":
                    out[row, grammar.action_lo : grammar.action_hi] = scores[row, grammar.action_lo : grammar.action_hi]
                else:
                    out[row] = scores[row]
                    out[row, grammar.eos] = float("-inf")
            return out  # type: ignore[return-value]  # full_like returns a plain Tensor

    return Processor()


def generate(
    policy: Any,
    images: Sequence[np.ndarray],
    instructions: Sequence[str],
    reasoning: bool = True,
    max_rationale_tokens: int = 256,
) -> list[Generated]:
    """One `Generated` per (image, instruction); one `generate` call per prompt length (per row for a
    family that generates one row at a time)."""
    tok = policy.adapter.tokenizer(policy.processor)
    tag = tok(ACTION_TAG, add_special_tokens=False)["input_ids"]
    ids, extra = policy.adapter.encode_prompts(policy.processor, [prompt_text(t) for t in instructions], list(images))
    if not reasoning:
        ids = [row + tag for row in ids]
    results: list[Generated | None] = [None] * len(ids)
    groups: dict[tuple[int, int], list[int]] = {}  # (prompt length, row if the family generates one at a time)
    one_at_a_time = not policy.adapter.batched_generation
    for i, row in enumerate(ids):
        groups.setdefault((len(row), i if one_at_a_time else -1), []).append(i)
    for (length, _), rows in groups.items():
        sub_extra = {k: v[rows] if hasattr(v, "shape") and v.shape[:1] == (len(ids),) else v for k, v in extra.items()}
        for i, gen in zip(
            rows,
            _generate_rows(
                policy, tok, tag, [ids[i] for i in rows], sub_extra, length, reasoning, max_rationale_tokens
            ),
            strict=True,
        ):
            results[i] = gen
    return [r for r in results if r is not None]


def _generate_rows(
    policy: Any,
    tok: Any,
    tag: list[int],
    ids: list[list[int]],
    extra: dict[str, Any],
    length: int,
    reasoning: bool,
    budget: int,
) -> list[Generated]:
    import torch

    eos = tok.eos_token_id
    grammar = ActionGrammar(tag, policy.actions.first_id, policy.actions.n_bins, eos, budget if reasoning else 0)
    if not reasoning:  # the tag is in the prompt: the grammar sees it as already written
        grammar = ActionGrammar([], policy.actions.first_id, policy.actions.n_bins, eos, 0)
    input_ids = torch.tensor(ids, device=policy.device)
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **extra}
    # the prompt proper is the prefix; `ACTION:` appended for reasoning=False belongs to the causal
    # suffix, as in training (PaliGemma's token_type_ids would otherwise attend to it bidirectionally)
    prompt_len = length if reasoning else length - len(tag)
    inputs.update(policy.adapter.text_inputs([prompt_len] * len(ids), length))
    inputs = {k: v.to(policy.device) if hasattr(v, "to") else v for k, v in inputs.items()}
    limit = (budget + len(tag) if reasoning else 0) + N_ACTION + 1
    with torch.no_grad():
        out = policy.model.generate(
            **inputs,
            max_new_tokens=limit,
            do_sample=False,
            logits_processor=[logits_processor(grammar, length)],
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
        )
    results = []
    for row in out[:, length:].tolist():
        at = find_tag(row, grammar.tag) if grammar.tag else 0
        start = at + len(grammar.tag)
        action_ids = row[start : start + N_ACTION]
        results.append(
            Generated(
                rationale=tok.decode(row[:at]) if reasoning else "",
                action_ids=action_ids,
                action=policy.actions.decode(np.asarray(action_ids)),
                forced_tag=reasoning and at >= budget,
                new_tokens=start + N_ACTION,
            )
        )
    return results

"""Constrained decoding: whatever the model wants to write, every row ends in `ACTION:`, 7 action
tokens and EOS. The grammar is checked as a state machine on hand-made id sequences and against an
adversarial "model"; `generate` runs on a tiny PaliGemma policy trained by refine-train."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from refinevla.train.policy import N_ACTION, ActionGrammar, find_tag, generate, logits_processor

TAG = [50, 51]  # "ACTION:" as two ids
LO, BINS, EOS = 1000, 256, 1
BUDGET = 4


def grammar(budget: int = BUDGET, tag: Sequence[int] = TAG) -> ActionGrammar:
    return ActionGrammar(tag, first_action_id=LO, n_bins=BINS, eos_id=EOS, budget=budget)


# ---------------------------------------------------------------- find_tag
def test_find_tag_returns_the_first_occurrence() -> None:
    assert find_tag([7, 50, 51, 8, 50, 51], TAG) == 1
    assert find_tag([50, 51], TAG) == 0
    assert find_tag([9, 9, 50, 51], TAG) == 2


@pytest.mark.parametrize("ids", [[], [50], [51, 50], [50, 9, 51], [7, 8, 9]])
def test_find_tag_is_minus_one_without_the_whole_tag(ids: list[int]) -> None:
    assert find_tag(ids, TAG) == -1


def test_find_tag_accepts_any_sequence() -> None:
    assert find_tag((3, 50, 51), (50, 51)) == 1
    assert find_tag(np.array([3, 50, 51]).tolist(), TAG) == 1


# ---------------------------------------------------------------- the grammar as a state machine
def test_free_before_the_tag_and_within_the_budget() -> None:
    g = grammar()
    for generated in ([], [5], [5, 6], [5, 6, 50]):
        assert g.allowed(generated) == ("free", None)


def test_tag_is_forced_id_by_id_when_the_budget_runs_out() -> None:
    g = grammar()
    assert g.allowed([5, 6, 7, 8]) == ("force", 50)
    assert g.allowed([5, 6, 7, 8, 50]) == ("force", 51)  # a partially forced tag is continued
    assert g.allowed([5, 6, 7, 8, 50, 51]) == ("action", None)


def test_a_partial_tag_written_freely_at_the_budget_still_gets_a_whole_tag() -> None:
    g = grammar()
    # the model wrote the tag's first id as its last free token: the whole tag follows it
    assert g.allowed([5, 6, 7, 50]) == ("force", 50)
    assert g.allowed([5, 6, 7, 50, 50]) == ("force", 51)
    assert g.allowed([5, 6, 7, 50, 50, 51]) == ("action", None)


def test_zero_budget_forces_the_tag_at_once() -> None:
    assert grammar(budget=0).allowed([]) == ("force", 50)
    assert grammar(budget=0).allowed([50]) == ("force", 51)


def test_a_tag_written_freely_switches_to_actions() -> None:
    g = grammar()
    assert g.allowed([5, 50, 51]) == ("action", None)
    assert g.allowed([50, 51]) == ("action", None)


def test_exactly_seven_action_ids_then_eos() -> None:
    g = grammar()
    prefix = [5, 50, 51]
    for k in range(N_ACTION):
        assert g.allowed(prefix + [LO + k] * k) == ("action", None)
    assert g.allowed(prefix + [LO] * N_ACTION) == ("force", EOS)
    assert g.allowed(prefix + [LO] * N_ACTION + [EOS]) == ("force", EOS)  # rows done early only pad EOS


def test_an_empty_tag_means_the_tag_is_in_the_prompt() -> None:
    g = grammar(budget=0, tag=[])
    assert g.allowed([]) == ("action", None)
    assert g.allowed([LO] * 6) == ("action", None)
    assert g.allowed([LO] * 7) == ("force", EOS)


def simulate(g: ActionGrammar, choose: Callable[[int, str], int], limit: int) -> list[int]:
    """Drive the grammar as `generate` does: a row's next token is `choose` unless forced/restricted."""
    out: list[int] = []
    for t in range(limit):
        kind, token = g.allowed(out)
        if kind == "force":
            assert token is not None
            nxt = token
        else:
            nxt = choose(t, kind)
            if kind == "action":
                assert LO <= nxt < LO + BINS, "the model must be restricted to action ids here"
            else:
                assert nxt != EOS
        out.append(nxt)
        if nxt == EOS:
            break
    return out


def adversary(seed: int) -> Callable[[int, str], int]:
    """A "model" that likes the tag's ids, action ids and anything else, but never EOS in free mode."""
    rng = np.random.default_rng(seed)

    def choose(t: int, kind: str) -> int:
        if kind == "action":
            return int(rng.integers(LO, LO + BINS))
        return int(rng.choice([5, 6, 50, 50, 51, LO, LO + 255]))

    return choose


@pytest.mark.parametrize("budget", [0, 1, 2, 3, 8])
@pytest.mark.parametrize("seed", range(20))
def test_any_model_ends_in_the_tag_seven_actions_and_eos(budget: int, seed: int) -> None:
    g = grammar(budget=budget)
    out = simulate(g, adversary(seed), budget + len(TAG) + N_ACTION + 1)
    at = find_tag(out, TAG)
    assert 0 <= at <= budget
    actions = out[at + len(TAG) : at + len(TAG) + N_ACTION]
    assert len(actions) == N_ACTION and all(LO <= a < LO + BINS for a in actions)
    assert out[at + len(TAG) + N_ACTION :] == [EOS]


# ---------------------------------------------------------------- the logits processor
def test_logits_processor_applies_each_rows_state() -> None:
    torch = pytest.importorskip("torch")
    vocab = LO + BINS
    prompt = [2, 3, 4]
    processor = logits_processor(grammar(budget=5), len(prompt))
    scores = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor(
        [
            [*prompt, 5, 6, 7, 8, 9],  # budget reached: force the tag's first id
            [*prompt, 5, 6, 7, 8, 50],  # ... even after a free partial tag (a whole tag follows)
            [*prompt, 5, 50, 51, LO, LO],  # action 3 of 7
        ]
    )
    out = processor(rows, scores.clone())
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [50]
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [50]
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == list(range(LO, LO + BINS))
    assert torch.equal(out[2, LO:], scores[2, LO:])  # the model's own ranking among action ids

    free = processor(torch.tensor([[*prompt, 5, 6]]), scores[:1].clone())[0]
    assert torch.isfinite(free).nonzero().flatten().tolist() == [i for i in range(vocab) if i != EOS]
    assert torch.equal(free[free.isfinite()], scores[0][free.isfinite()])


# ---------------------------------------------------------------- generate() on a real checkpoint
INSTRUCTION = "put the carrot on the plate"


@pytest.fixture(scope="module")
def policy(paligemma_policy: Path) -> Any:
    from refinevla.train.policy import Policy

    return Policy(paligemma_policy)


@pytest.fixture(scope="module")
def tag_ids(policy: Any) -> list[int]:
    from refinevla.train.targets import ACTION_TAG

    ids: list[int] = policy.adapter.tokenizer(policy.processor)(ACTION_TAG, add_special_tokens=False)["input_ids"]
    return ids


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize(("reasoning", "budget"), [(True, 0), (True, 3), (False, 0), (False, 3)])
def test_generate_always_returns_seven_action_ids(
    policy: Any, tag_ids: list[int], reasoning: bool, budget: int
) -> None:
    (gen,) = generate(policy, frames(1), [INSTRUCTION], reasoning=reasoning, max_rationale_tokens=budget)
    lo = policy.actions.first_id
    assert lo == policy.actions.vocab_size - 256
    assert len(gen.action_ids) == N_ACTION
    assert all(lo <= i < lo + policy.actions.n_bins for i in gen.action_ids)
    np.testing.assert_array_equal(gen.action, policy.actions.decode(np.asarray(gen.action_ids)))
    assert gen.action.shape == (N_ACTION,)
    if not reasoning:
        assert (gen.rationale, gen.forced_tag, gen.new_tokens) == ("", False, N_ACTION)
    else:
        assert len(tag_ids) + N_ACTION <= gen.new_tokens <= budget + len(tag_ids) + N_ACTION
        # forced exactly when the tag did not start inside the budget
        assert gen.forced_tag == (gen.new_tokens - len(tag_ids) - N_ACTION >= budget)


def test_zero_budget_forces_the_tag(policy: Any, tag_ids: list[int]) -> None:
    (gen,) = generate(policy, frames(1), [INSTRUCTION], reasoning=True, max_rationale_tokens=0)
    assert gen.forced_tag is True
    assert gen.rationale == ""
    assert gen.new_tokens == len(tag_ids) + N_ACTION


def test_action_only_decoding_equals_reasoning_with_a_zero_budget(policy: Any) -> None:
    # Both put `ACTION:` in the causal suffix, as in training: only where the tag came from differs.
    imgs = frames(3, seed=5)
    off = generate(policy, imgs, [INSTRUCTION] * 3, reasoning=False)
    forced = generate(policy, imgs, [INSTRUCTION] * 3, reasoning=True, max_rationale_tokens=0)
    assert [g.action_ids for g in off] == [g.action_ids for g in forced]


def test_action_only_scores_its_first_action_as_a_zero_budget_reasoning_row(
    policy: Any, tag_ids: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The logits of the first action token, not just their argmax: a tag put into PaliGemma's
    bidirectional prefix (token_type 0) instead of the causal suffix changes them."""
    import refinevla.train.decoding as decoding

    seen: list[Any] = []
    original = decoding.logits_processor

    def recording(g: ActionGrammar, prompt_len: int) -> Any:
        inner = original(g, prompt_len)

        def call(input_ids: Any, scores: Any) -> Any:
            seen.append(scores.clone())
            return inner(input_ids, scores)

        return call

    monkeypatch.setattr(decoding, "logits_processor", recording)
    img = frames(1, seed=7)
    generate(policy, img, [INSTRUCTION], reasoning=False)
    off = seen[0]
    seen.clear()
    generate(policy, img, [INSTRUCTION], reasoning=True, max_rationale_tokens=0)
    forced = seen[len(tag_ids)]
    torch = pytest.importorskip("torch")
    torch.testing.assert_close(off, forced, atol=1e-5, rtol=0.0)  # the bug: ~5e-4; noise: ~6e-8


@pytest.mark.parametrize("reasoning", [True, False])
def test_a_batch_decodes_each_row_as_it_would_alone(policy: Any, reasoning: bool) -> None:
    imgs = frames(3, seed=1)
    batched = generate(policy, imgs, [INSTRUCTION] * 3, reasoning=reasoning, max_rationale_tokens=3)
    assert len(batched) == 3
    for img, got in zip(imgs, batched, strict=True):
        (alone,) = generate(policy, [img], [INSTRUCTION], reasoning=reasoning, max_rationale_tokens=3)
        assert got.action_ids == alone.action_ids
        assert (got.rationale, got.forced_tag, got.new_tokens) == (alone.rationale, alone.forced_tag, alone.new_tokens)
        np.testing.assert_array_equal(got.action, alone.action)


def test_prompts_of_different_lengths_keep_their_order(policy: Any) -> None:
    instructions = ["pick up the spoon", INSTRUCTION, "put the eggplant into the yellow basket on the left", "open"]
    tok = policy.adapter.tokenizer(policy.processor)
    lengths = {len(tok(i)["input_ids"]) for i in instructions}
    assert len(lengths) >= 3, "the test needs prompts of different lengths"
    imgs = frames(len(instructions), seed=2)
    batched = generate(policy, imgs, instructions, reasoning=True, max_rationale_tokens=3)
    for img, text, got in zip(imgs, instructions, batched, strict=True):
        (alone,) = generate(policy, [img], [text], reasoning=True, max_rationale_tokens=3)
        assert got.action_ids == alone.action_ids
        assert got.rationale == alone.rationale

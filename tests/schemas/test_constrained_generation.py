"""What a grammar-constrained decoder writes under the request schema is what the validator accepts.

vLLM's structured outputs (xgrammar, its default backend, which runs on the CPU) are used for real: the
exact schema the engine sends is compiled against a tokenizer trained here, and random logits masked by
the grammar stand in for a model that knows nothing but the grammar — the worst case for a local teacher.
Every draw must parse and pass `validate_teacher_answer`; in `episode` mode it must also pass the semantic
checks the schema can say (step bounds, segment count, box bounds). The bare structural schema sent before
constraints were carried must fail the same test, so the property is proven, not assumed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from refinevla.annotate.engine import Engine, EngineOptions
from refinevla.annotate.sources import open_source
from refinevla.annotate.teacher_requests import PreparedRequest
from refinevla.annotate.teachers.rule_based import rule_based_answer
from refinevla.annotate.teachers.vllm import VllmTeacher
from refinevla.schemas import SemanticContext, semantic_errors, validate_teacher_answer

xgr = pytest.importorskip("xgrammar")
torch = pytest.importorskip("torch")

DRAWS = 20  # constrained generations per schema (5 episodes per case: 100 draws)
MAX_TOKENS = 4000

# Semantic errors the episode schema states (the rest — tiling without gaps, x_min < x_max — stay re-asks).
EXPRESSIBLE = ("outside the episode", "segment", "outside the image")


@pytest.fixture(scope="module")
def tokenizer_info() -> Any:
    return trained_tokenizer()


def trained_tokenizer() -> Any:
    """A ByteLevel BPE tokenizer trained here on JSON answers and prose, as xgrammar sees a real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [json.dumps(x) for x in _answers_corpus()] + [
        "The robot arm moves the spoon to the left of the towel, then releases the gripper." * 3,
        '{"a": [1, 2.5, -3], "b": null, "c": "text"}',
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    return xgr.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf), stop_token_ids=[hf.eos_token_id]), hf


def _answers_corpus() -> Iterator[dict[str, Any]]:
    for p in _prepared("sample", "static", None):
        yield rule_based_answer(p.bundle.facts)


def _prepared(uri: str, detail: str, backend: str | None) -> list[PreparedRequest]:
    """The requests the engine would send for every episode (`prepare` asks nothing and stores nothing)."""
    engine = Engine(VllmTeacher("m"), _NullStore(), EngineOptions(schema_detail=detail, schema_backend=backend))  # type: ignore[arg-type]
    return [engine.prepare(ep) for ep in open_source(uri).iter_episodes()]


class _NullStore:
    """`Engine.prepare` never touches the store, so no file is made for one."""


def _schema_sent(p: PreparedRequest) -> dict[str, Any]:
    """The schema as the vllm teacher hands it to SamplingParams (the response format's json_schema)."""
    return p.response_format["json_schema"]["schema"]


def _closing_bias(info: Any, hf: Any) -> Any:
    """Closing tokens get a head start, so strings and numbers end before MAX_TOKENS; the rest is noise."""
    vocab = hf.convert_ids_to_tokens(list(range(info.vocab_size)))
    return torch.tensor([2.5 if any(c in t for c in '"]},') else 0.0 for t in vocab], dtype=torch.float32)


def _draw(compiled: Any, info: Any, bias: Any, hf: Any, seed: int) -> str:
    """One constrained random generation: seeded logits, masked by the grammar, sampled."""
    rng = np.random.default_rng(seed)
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    out: list[int] = []
    for _ in range(MAX_TOKENS):
        if matcher.is_terminated():
            break
        logits = torch.tensor(rng.normal(size=info.vocab_size), dtype=torch.float32) + bias
        matcher.fill_next_token_bitmask(bitmask)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        probs = torch.softmax(logits, dim=-1).numpy().astype(np.float64)
        token = int(rng.choice(info.vocab_size, p=probs / probs.sum()))
        assert matcher.accept_token(token), "the mask allowed a token the matcher refuses"
        if token not in info.stop_token_ids:
            out.append(token)
    assert matcher.is_terminated(), f"no end within {MAX_TOKENS} tokens"
    return hf.decode(out)


def _problems(text: str, context: SemanticContext, semantic: bool) -> list[str]:
    try:
        answer = json.loads(text)
    except json.JSONDecodeError as exc:
        return [f"not JSON: {exc}"]
    errors = validate_teacher_answer(answer)
    if semantic and not errors:
        errors = [e for e in semantic_errors(answer, context) if any(k in e for k in EXPRESSIBLE)]
    return errors


def _run(
    requests: list[PreparedRequest], tokenizer_info: Any, semantic: bool, pick: Callable[[int], bool] = lambda i: True
) -> tuple[int, list[str]]:
    info, hf = tokenizer_info
    compiler = xgr.GrammarCompiler(info)
    bias = _closing_bias(info, hf)
    draws, failures = 0, []
    for i, p in enumerate(requests):
        if not pick(i):
            continue
        compiled = compiler.compile_json_schema(json.dumps(_schema_sent(p)), any_whitespace=False)
        for d in range(DRAWS):
            text = _draw(compiled, info, bias, hf, seed=1000 * i + d)
            draws += 1
            failures += [f"{p.episode_id} draw {d}: {e}" for e in _problems(text, p.context, semantic)]
    return draws, failures


@pytest.fixture(scope="module")
def bridge_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.conftest import IMAGE, bridge_episode, specs, write_rlds

    feats = specs.bridge_features(cameras=2, image_size=IMAGE)
    eps = [bridge_episode(i, 6 + 5 * i, 2) for i in range(3)]
    return "rlds:" + write_rlds(tmp_path_factory.mktemp("bridge"), feats, eps, name="bridge_orig", num_shards=1)


@pytest.mark.parametrize("detail", ["static", "episode"])
@pytest.mark.parametrize("uri", ["sample", "bridge"])
def test_every_constrained_generation_passes_the_validator(detail, uri, bridge_uri, tokenizer_info, tmp_path):
    requests = _prepared(bridge_uri if uri == "bridge" else "sample", detail, None)
    assert requests and all(p.response_format["json_schema"]["strict"] for p in requests)
    if detail == "episode":
        assert len({json.dumps(_schema_sent(p)) for p in requests}) > 1, "each episode its own schema"
    draws, failures = _run(requests, tokenizer_info, semantic=detail == "episode", pick=lambda i: i < 5)
    assert draws == min(5, len(requests)) * DRAWS
    assert failures == [], f"{len(failures)} of {draws} draws rejected:\n" + "\n".join(failures[:10])


def test_the_bare_structural_schema_sent_before_fails_the_same_test(bridge_uri, tokenizer_info, tmp_path):
    requests = _prepared(bridge_uri, "static", "structural")
    draws, failures = _run(requests[:1], tokenizer_info, semantic=False)
    assert len(failures) >= draws // 2, f"only {len(failures)} of {draws} draws rejected: the regression check is blind"
    assert any("box" in f for f in failures) or any("start_step" in f or "end_step" in f for f in failures)

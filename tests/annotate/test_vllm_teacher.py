"""The vLLM teacher without a GPU: a fake `vllm` module stands in for the engine.

What this cannot show: that a real vLLM engine loads a model and decodes under the schema.
"""

from __future__ import annotations

import asyncio
import json
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

from refinevla.annotate.engine import Engine, EngineOptions
from refinevla.annotate.errors import RefineError
from refinevla.annotate.sources import open_source
from refinevla.annotate.store import ResultStore
from refinevla.annotate.teachers import make_teacher
from refinevla.annotate.teachers.rule_based import rule_based_answer
from refinevla.annotate.teachers.vllm import PROBE_FIELD, VllmTeacher
from refinevla.schemas import teacher_schema


@dataclass
class Params:
    kwargs: dict[str, Any]


@dataclass
class Structured:
    json: dict[str, Any]


@dataclass
class FakeLLM:
    honour_schema: bool = True
    calls: list[tuple[list[Any], Any]] = field(default_factory=list)
    answer: Any = None  # callable(messages) -> text

    def chat(self, conversations: list[Any], sampling_params: Any, use_tqdm: bool = True) -> list[Any]:
        self.calls.append((conversations, sampling_params))
        outs = []
        # vLLM takes one SamplingParams for all prompts, or a list with one per prompt.
        per_prompt = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(conversations)
        for conv, params in zip(conversations, per_prompt, strict=True):
            kw = params.kwargs
            schema = (kw.get("structured_outputs") or kw.get("guided_decoding")).json
            if PROBE_FIELD in schema["properties"]:
                text = json.dumps({PROBE_FIELD: schema["properties"][PROBE_FIELD]["enum"][0]})
            else:
                text = self.answer(conv) if self.answer else "{}"
            if not self.honour_schema:
                text = "Hello! How can I help you today?"
            outs.append(
                types.SimpleNamespace(
                    prompt_token_ids=[1] * 50,
                    outputs=[types.SimpleNamespace(text=text, finish_reason="stop", token_ids=[2] * 20)],
                )
            )
        return outs


def fake_vllm(monkeypatch: pytest.MonkeyPatch, new_api: bool = True) -> types.ModuleType:
    mod = types.ModuleType("vllm")
    mod.SamplingParams = lambda **kw: Params(kw)  # type: ignore[attr-defined]
    mod.LLM = lambda **kw: FakeLLM()  # type: ignore[attr-defined]
    sp = types.ModuleType("vllm.sampling_params")
    if new_api:
        sp.StructuredOutputsParams = Structured  # type: ignore[attr-defined]
    else:
        sp.GuidedDecodingParams = Structured  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sp)
    return mod


def test_missing_vllm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    teacher = make_teacher("vllm", model="Qwen/Qwen2.5-VL-7B-Instruct")
    with pytest.raises(RefineError, match="pip install 'refinevla\\[vllm\\]'"):
        asyncio.run(teacher.start())


def test_vllm_teacher_needs_a_model():
    with pytest.raises(RefineError, match="--model"):
        make_teacher("vllm")


def test_self_check_refuses_an_engine_that_ignores_the_schema(monkeypatch):
    fake_vllm(monkeypatch)
    teacher = VllmTeacher("m", llm=FakeLLM(honour_schema=False))
    with pytest.raises(RefineError, match="ignored the structured-output constraint"):
        asyncio.run(teacher.start())


def test_max_tokens_that_fill_the_context_window_stop_before_the_first_request(monkeypatch):
    """Declared in --vllm-args: refused before the engine loads; otherwise read from the loaded engine."""
    fake_vllm(monkeypatch)
    loaded: list[dict[str, Any]] = []
    monkeypatch.setattr(sys.modules["vllm"], "LLM", lambda **kw: loaded.append(kw) or FakeLLM())
    declared = VllmTeacher("m", max_tokens=2048, engine_args={"max_model_len": 2048})
    with pytest.raises(RefineError, match=r"--max-tokens 2048 leaves no room for the prompt.*context window of 2048"):
        asyncio.run(declared.start())
    assert loaded == [], "the engine never loads"

    engine = FakeLLM()
    engine.model_config = types.SimpleNamespace(max_model_len=1024)  # type: ignore[attr-defined]
    found = VllmTeacher("m", max_tokens=2048, llm=engine)
    with pytest.raises(RefineError, match="context window of 1024 tokens"):
        asyncio.run(found.start())
    assert engine.calls == [], "not even the start-up probe is asked"

    fits = VllmTeacher("m", max_tokens=1000, llm=engine)

    async def start_and_close() -> None:
        await fits.start()
        await fits.close()

    asyncio.run(start_and_close())
    assert len(engine.calls) == 1, "below the window: the engine is probed and the run goes on"


@pytest.mark.parametrize("new_api", [True, False])
def test_requests_are_batched_and_each_is_constrained_by_its_own_episode_schema(
    monkeypatch, tiny_rlds, tmp_path, new_api
):
    fake_vllm(monkeypatch, new_api=new_api)
    source = open_source(tiny_rlds(5))
    llm = FakeLLM()
    teacher = VllmTeacher("local-model", llm=llm, temperature=0.0, max_tokens=512, batch_window=1.0)
    facts_by_instruction = {}
    with ResultStore(tmp_path / "s.sqlite") as store:
        engine = Engine(teacher, store, EngineOptions(concurrency=8, schema_detail="episode"))
        prepared = {}
        episodes = list(source.iter_episodes())
        for ep in episodes:
            p = engine.prepare(ep)
            prepared[ep.instruction] = p
            facts_by_instruction[ep.instruction] = p.bundle.facts

        def answer(conv: list[dict[str, Any]]) -> str:
            text = conv[1]["content"][0]["text"]
            instr = next(i for i in facts_by_instruction if i in text)
            return json.dumps(rule_based_answer(facts_by_instruction[instr]))

        llm.answer = answer
        results = []
        engine.sink = results.append
        asyncio.run(engine.run(episodes, total=5))
    assert [r.status for r in results] == ["annotated"] * 5
    probe, *work = llm.calls
    assert len(probe[0]) == 1
    assert teacher.batches == [5] and len(work) == 1, "the 5 concurrent requests run as one batch"
    conversations, params = work[0]
    key = "structured_outputs" if new_api else "guided_decoding"
    assert teacher.provenance()["structured_output_api"] == f"SamplingParams.{key}"  # what the manifest records
    assert len(params) == len(conversations) == 5
    for conv, p in zip(conversations, params, strict=True):
        text = conv[1]["content"][0]["text"]
        mine = next(prep for instr, prep in prepared.items() if instr in text)
        assert p.kwargs[key].json == teacher_schema(backend="vllm", context=mine.context)
        assert p.kwargs["temperature"] == 0.0 and p.kwargs["max_tokens"] == 512
    assert len({json.dumps(p.kwargs[key].json) for p in params}) > 1, "episodes of different lengths, own schemas"
    assert conversations[0][1]["content"][1]["image_url"]["url"].startswith("data:image/jpeg;base64,")

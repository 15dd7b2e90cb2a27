"""`--teacher vllm --backend ray`: the ray.data.llm processor we configure, and the driver's passes.

vLLM cannot run here (no GPU). What is tested is everything on our side of that boundary: the
processor configuration (replicas, tensor parallelism, images, per-row errors), the request rows
(images as OpenAI image_url parts, each request's own schema as structured output), and the
driver's handling of the engine's output rows (commit before use, re-asks with the errors in a
later pass, rejects, error rows that never end the job), through the real `annotate` command on a
real local Ray (the session's cluster), with only the engine's replicas replaced by a function that
answers as vLLM's stage does (`generated_text`, `num_input_tokens`, `num_generated_tokens`,
`__inference_error__`, and an error row for a prompt with more images than the replicas admit).
What the preparation tasks did is read from their journal (`ray_backend`'s JOURNAL_ENV test hook).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from refinevla.annotate.errors import RefineError
from refinevla.annotate.ray_local import DRIVER_ENV, LocalRayCluster
from refinevla.annotate.sources import specs
from refinevla.annotate.sources.rlds_writer import write_rlds

pytest.importorskip("ray.data.llm", reason="ray.data.llm: needs the [ray] extra")

from refinevla.annotate import ray_vllm
from refinevla.annotate.batch.emulator.answers import rationale_for_prompt
from refinevla.annotate.ray_backend import JOURNAL_ENV
from tests.annotate.conftest import SEED_RE
from tests.annotate.ray_cluster import journal


def test_the_processor_runs_one_replica_per_tensor_parallel_group_with_images_and_per_row_errors() -> None:
    assert ray_vllm.replicas_for(8, 2) == 4 and ray_vllm.replicas_for(3, 1) == 3
    with pytest.raises(RefineError, match="needs GPUs: the cluster has 0") as err:
        ray_vllm.replicas_for(0, 1)
    assert "\n" not in str(err.value)
    config = ray_vllm.processor_config("Qwen/Qwen2.5-VL-7B-Instruct", 2, 4, 14)
    assert config.model_source == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert config.engine_kwargs["tensor_parallel_size"] == 2
    assert config.engine_kwargs["limit_mm_per_prompt"] == {"image": 14}
    assert config.concurrency == 4
    assert config.should_continue_on_error is True
    assert config.prepare_multimodal_stage == {"enabled": True}


def user_text(messages: list[dict[str, Any]]) -> str:
    first = next(m for m in messages if m["role"] == "user")
    return next(p["text"] for p in first["content"] if p["type"] == "text")


class FakeReplicas:
    """vLLM's replicas at the processor's boundary: each row answered as the engine stage outputs it.

    Scripts per episode seed, one behaviour per request: ok, invalid (JSON that fails the schema),
    error (the engine failed this row: `__inference_error__`, the row kept as it came in).
    """

    def __init__(self, scripts: dict[int, list[str]]) -> None:
        self.scripts = scripts
        self.seen: list[dict[str, Any]] = []  # (seed, attempt, turns, images, schema) per request
        self.built: list[Any] = []  # the processor configs built

    def answer(self, row: dict[str, Any]) -> dict[str, Any]:
        text = user_text(row["messages"])
        seed = int(SEED_RE.search(text).group(1))  # type: ignore[union-attr]
        parts = [p for m in row["messages"] if isinstance(m["content"], list) for p in m["content"]]
        self.seen.append(
            {
                "seed": seed,
                "attempt": int(row["attempt"]),
                "turns": len(row["messages"]),
                "images": sum(p["type"] == "image_url" for p in parts),
                "data_urls": all(
                    p["image_url"]["url"].startswith("data:image/jpeg;base64,")
                    for p in parts
                    if p["type"] == "image_url"
                ),
                "schema": row["sampling_params"]["structured_outputs"]["json"],
                "last": row["messages"][-1]["content"] if isinstance(row["messages"][-1]["content"], str) else "",
            }
        )
        limit = self.built[-1].engine_kwargs["limit_mm_per_prompt"]["image"]
        if self.seen[-1]["images"] > limit:  # as vLLM refuses it, on every ask
            return {
                **row,
                ray_vllm.ERROR_COLUMN: f"ValueError: At most {limit} image(s) may be provided in one prompt.",
                "generated_text": "",
            }
        script = self.scripts.get(seed) or []
        kind = script.pop(0) if script else "ok"
        if kind == "error":
            return {
                **row,
                ray_vllm.ERROR_COLUMN: "RuntimeError: prompt too long for max_model_len",
                "generated_text": "",
            }
        body = rationale_for_prompt(text) if kind == "ok" else {"observation": "half an answer"}
        out = {**row, "generated_text": json.dumps(body), "num_input_tokens": 1500, "num_generated_tokens": 300}
        return ray_vllm.postprocess(out)

    def processor(self, ds: Any) -> Any:
        # the rows as they leave the cluster's stages, answered here (so the test sees every request)
        return (self.answer(row) for row in ds.iter_rows())


@pytest.fixture
def replicas(monkeypatch: pytest.MonkeyPatch, ray_cluster: LocalRayCluster, tmp_path: Path) -> FakeReplicas:
    """The fake replicas, on the session's cluster (seen with 2 GPUs); the tasks' journal in tmp_path/tasks."""
    import ray
    import ray.data.llm

    fake = FakeReplicas({})

    def build_processor(config: Any, postprocess: Any = None, **_: Any) -> Any:
        fake.built.append(config)
        assert postprocess is ray_vllm.postprocess
        return fake.processor

    monkeypatch.setattr(ray.data.llm, "build_processor", build_processor)
    real_resources = ray.cluster_resources
    monkeypatch.setattr(ray, "cluster_resources", lambda: {**real_resources(), "GPU": 2.0})  # a 2-GPU cluster
    for k, v in DRIVER_ENV.items():  # this process joins the session's cluster, which has no token
        monkeypatch.setenv(k, v)
    (tmp_path / "tasks").mkdir()
    monkeypatch.setenv(JOURNAL_ENV, str(tmp_path / "tasks"))
    return fake


def annotate(uri: str, out: Path, cluster: LocalRayCluster, progress: str = "none") -> int:
    from refinevla.annotate.commands.annotate import AnnotateArgs, run_annotate

    args = AnnotateArgs(
        source=uri,
        teacher="vllm",
        model="Qwen/Qwen2.5-VL-7B-Instruct",
        out=out,
        backend="ray",
        ray_address=cluster.address,
        ray_workers=1,
        progress=progress,
        license="mit",
    )
    return run_annotate(args)


def prepared(tasks: Path) -> tuple[int, Counter[int]]:
    """Prompts the preparation tasks built, and how many times each chunk was prepared; the journal is then emptied."""
    done = [e for e in journal(tasks) if e["event"] == "done"]
    (tasks / "tasks.log").unlink(missing_ok=True)
    return sum(e["prompts"] for e in done), Counter(e["chunk"] for e in done)


@pytest.mark.ray_driver
def test_replicas_answer_into_the_store_and_invalid_answers_are_re_asked_in_the_next_pass(
    tiny_rlds, replicas, ray_cluster, tmp_path, capsys
):
    uri = tiny_rlds(5)
    replicas.scripts = {1: ["invalid", "ok"], 2: ["invalid", "invalid", "invalid"], 3: ["error"]}
    out = tmp_path / "out"
    # one episode failed in the engine: a rerun asks it again
    assert annotate(uri, out, ray_cluster, progress="plain") == 1
    prompts, chunks = prepared(tmp_path / "tasks")
    assert prompts == 5 and set(chunks.values()) == {1}  # each request prepared once, for asking and writing
    (config,) = replicas.built
    assert config.concurrency == 2 and config.engine_kwargs["tensor_parallel_size"] == 1  # 2 GPUs, TP 1

    asked = Counter(s["seed"] for s in replicas.seen)
    assert asked == {0: 1, 1: 2, 2: 3, 3: 1, 4: 1}
    for s in replicas.seen:
        assert s["images"] >= 6 and s["data_urls"]  # the keyframes, as image_url parts
        assert s["schema"]["properties"]["task_plan"]  # the request's own schema, as structured output
    reask = next(s for s in replicas.seen if s["seed"] == 1 and s["attempt"] == 2)
    first = next(s for s in replicas.seen if s["seed"] == 1 and s["attempt"] == 1)
    assert reask["turns"] == first["turns"] + 2 and re.search(r"required|task_plan", reask["last"])  # with the errors

    manifest = json.loads((out / "refinevla.json").read_text())
    assert (
        manifest["counts"]["episodes"] == 3
        and manifest["counts"]["rejected"] == 1
        and manifest["counts"]["failed"] == 1
    )
    assert manifest["backend"]["vllm"]["passes"] == 3
    assert manifest["backend"]["vllm"]["errors"] == {"RuntimeError: prompt too long for max_model_len": 1}
    assert manifest["tokens"]["requests"] == 7  # every answer stored, invalid ones included
    assert manifest["this_run"]["requests"] == 7 and manifest["counts"]["annotated_this_run"] == 3
    episodes = pl.read_parquet(out / "episodes")
    assert episodes.height == 3
    progress = capsys.readouterr().err
    assert "vllm replicas, pass 3: episodes 5/5 | answers 3, invalid 4, rejected 1, engine errors 1" in progress

    replicas.seen.clear()
    assert annotate(uri, out, ray_cluster) == 0  # the rerun asks the failed episode only
    assert [s["seed"] for s in replicas.seen] == [3]
    assert pl.read_parquet(out / "episodes").height == 4
    assert prepared(tmp_path / "tasks")[0] == 1  # the settled four skipped before their prompts were built

    replicas.seen.clear()
    assert annotate(uri, out, ray_cluster) == 0  # nothing left to ask: no prompt built, no replica started
    assert replicas.seen == [] and len(replicas.built) == 2 and prepared(tmp_path / "tasks")[0] == 0
    assert pl.read_parquet(out / "episodes").height == 4


def busy_rlds(directory: Path, steps: int = 44) -> str:
    """Three episodes; the one with seed 1 opens or closes its gripper every other step (21 events)."""
    examples = []
    for seed in range(3):
        t = np.arange(steps)
        state = np.zeros((steps, 7), np.float32)
        state[:, 0] = np.linspace(0.2, 0.35, steps)
        state[:, 2] = np.linspace(0.05, 0.2, steps)
        state[:, 6] = ((t // 2) % 2) if seed == 1 else (t < steps // 2)
        action = np.zeros((steps, 7), np.float32)
        action[:-1, :6] = state[1:, :6] - state[:-1, :6]
        action[:, 6] = state[:, 6]
        frames = [np.full((64, 64, 3), (seed * 40 + i) % 256, np.uint8) for i in range(steps)]
        examples.append(
            specs.bridge_example(
                seed,
                state,
                action,
                {"image_0": frames},
                instruction=f"put the spoon {seed} on the towel",
                file_path=f"/data/raw/busy{seed}.pkl",
            )
        )
    features = specs.bridge_features(cameras=1, image_size=(64, 64))
    return f"rlds:{write_rlds(directory, features, examples, name='bridge_orig')}"


@pytest.mark.ray_driver
def test_the_replicas_admit_exactly_as_many_images_as_the_largest_prompt_has(replicas, ray_cluster, tmp_path):
    out = tmp_path / "out"
    assert annotate(busy_rlds(tmp_path / "src"), out, ray_cluster) == 0  # the busy episode fits: no engine error
    (config,) = replicas.built
    images = {s["seed"]: s["images"] for s in replicas.seen}
    assert images[1] > 6 + 8  # more than `--frames` + 8, the old guess, which failed it in the engine
    assert config.engine_kwargs["limit_mm_per_prompt"] == {"image": max(images.values())} == {"image": images[1]}
    assert pl.read_parquet(out / "episodes").height == 3

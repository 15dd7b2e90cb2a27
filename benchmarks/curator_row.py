"""The `--curator` row of `engine_throughput.py`: bespokelabs-curator asking the same server the same prompts.

Runs in curator's own environment (its dependencies are not the project's: `python -m venv /work/curator-venv
&& /work/curator-venv/bin/pip install bespokelabs-curator==0.1.31`), so it imports nothing from refinevla.
The benchmark writes what refinevla would send, compactly: per episode the system and user texts and the
keyframes as indices into a pool of base64 JPEGs (the same 256x256 frames); this builds each request's
messages from them in curator's `prompt`, parses each answer's JSON in `parse` (curator caches requests and
responses on disk and writes an Arrow dataset of the parsed rows, as refinevla commits and writes its own),
and prints one JSON line: requests, seconds from the start of the run to the last row.

    CURATOR_CACHE_DIR=/tmp/c OPENAI_API_KEY=EMPTY python curator_row.py ROWS.jsonl POOL.json URL CONCURRENCY
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def offline_tokenizer() -> None:
    """Curator counts tokens with tiktoken's cl100k_base, which tiktoken downloads on first use; litellm (a
    curator dependency) ships that file under the name tiktoken caches it by: point tiktoken there, so the
    row runs on a machine without network and counts tokens as it would with one."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("litellm")
    if spec is not None and spec.origin is not None:
        tokenizers = Path(spec.origin).parent / "litellm_core_utils" / "tokenizers"
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(tokenizers))


def main() -> None:
    rows_path, pool_path, url, concurrency = sys.argv[1:5]
    offline_tokenizer()
    from bespokelabs import curator

    pool = json.loads(Path(pool_path).read_text())
    rows = [json.loads(line) for line in Path(rows_path).read_text().splitlines()]

    class Rationale(curator.LLM):  # type: ignore[misc,name-defined]
        def prompt(self, row: dict[str, Any]) -> list[dict[str, Any]]:
            images = [{"type": "image_url", "image_url": {"url": pool[i]}} for i in row["images"]]
            user = [{"type": "text", "text": row["user"]}, *images]
            return [{"role": "system", "content": row["system"]}, {"role": "user", "content": user}]

        def parse(self, row: dict[str, Any], response: Any) -> dict[str, Any]:
            answer = json.loads(response) if isinstance(response, str) else response
            return {"episode": row["episode"], **{k: json.dumps(v) for k, v in answer.items()}}

    llm = Rationale(
        model_name="bench-model",
        backend="openai",
        generation_params={"temperature": 0.2, "max_tokens": 4096},
        backend_params={
            "base_url": url,
            "max_concurrent_requests": int(concurrency),
            "max_requests_per_minute": 10_000_000,
            "max_tokens_per_minute": 10_000_000_000,
            "max_retries": 1,
            "require_all_responses": True,
        },
    )
    t0 = time.perf_counter()
    out = llm(rows)
    seconds = time.perf_counter() - t0
    dataset = out.dataset if hasattr(out, "dataset") else out
    print(json.dumps({"requests": len(dataset), "seconds": seconds}))


if __name__ == "__main__":
    main()

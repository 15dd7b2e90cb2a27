"""Local emulators of the OpenAI and Gemini Batch APIs (Files + Batches), on 127.0.0.1.

The Batch APIs cannot be reached from CI or a benchmark machine without paying, so batch mode is
exercised against these: real HTTP servers that speak the wire protocol the real `openai` and
`google-genai` clients use, with the production code path unchanged (only `--base-url` differs).
They record every request, persist their state (a server killed with -9 and restarted carries on),
can be steered from another process, and inject faults (lost, cut or refused requests, expired or
failed batches). Used by the tests and by `benchmarks/batch_mode.py`; a user can rehearse a batch run
offline with one (`python -m refinevla.annotate.batch.emulator.openai_api --port 0 --state-dir D
--answer refinevla.annotate.batch.emulator.openai_api:rationale_answer`).

`common` is what both share, `openai_api` and `gemini_api` the two APIs, `answers` the correct
rationale they answer with.
"""

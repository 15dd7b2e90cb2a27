"""Token prices per model, for cost accounting and `--max-cost`.

The table ships in the package (`prices.json`, USD per million tokens). Prices change
more often than releases, so a user's file (`--prices FILE`, or `$REFINEVLA_PRICES`)
overrides or extends it, model by model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import RefineError

PRICES_ENV = "REFINEVLA_PRICES"


BATCH_DISCOUNT = 0.5  # OpenAI's and Gemini's Batch APIs both charge half; used where a table gives no batch price


@dataclass(frozen=True)
class ModelPrice:
    input: float  # USD per million prompt tokens
    output: float  # USD per million completion tokens
    batch_input: float | None = None  # through the provider's Batch API (None: input * BATCH_DISCOUNT)
    batch_output: float | None = None

    def rates(self, batch: bool) -> tuple[float, float]:
        """(input, output) USD per million tokens, live or batch."""
        if not batch:
            return self.input, self.output
        return (
            self.input * BATCH_DISCOUNT if self.batch_input is None else self.batch_input,
            self.output * BATCH_DISCOUNT if self.batch_output is None else self.batch_output,
        )


class PriceTable:
    """Model id -> price. Lookup tolerates provider prefixes ("models/gemini-2.5-flash")."""

    def __init__(self, prices: dict[str, ModelPrice]) -> None:
        self.prices = prices

    @classmethod
    def load(cls, override: str | Path | None = None) -> PriceTable:
        """The packaged table, updated by `override` (or `$REFINEVLA_PRICES`) when given."""
        text = resources.files("refinevla.annotate").joinpath("prices.json").read_text(encoding="utf-8")
        table = _parse(json.loads(text), "the packaged price table")
        path = override or os.environ.get(PRICES_ENV)
        if path:
            try:
                data = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise RefineError(f"cannot read the price table {path}: {exc}") from None
            table.update(_parse(data, str(path)))
        return cls(table)

    def get(self, model: str) -> ModelPrice | None:
        if model in self.prices:
            return self.prices[model]
        short = model.rsplit("/", 1)[-1]
        return self.prices.get(short)

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int, batch: bool = False) -> float:
        """USD for one answer (at batch prices with `batch`); 0.0 for a model with no price (see `get`)."""
        price = self.get(model)
        if price is None:
            return 0.0
        rate_in, rate_out = price.rates(batch)
        return (prompt_tokens * rate_in + completion_tokens * rate_out) / 1e6


def _parse(data: object, where: str) -> dict[str, ModelPrice]:
    if not isinstance(data, dict):
        raise RefineError(f"{where}: expected an object of model -> {{input, output}}")
    out = {}
    for model, entry in data.items():
        if model.startswith("_"):
            continue
        try:
            batch_in, batch_out = entry.get("batch_input"), entry.get("batch_output")
            out[model] = ModelPrice(
                float(entry["input"]),
                float(entry["output"]),
                None if batch_in is None else float(batch_in),
                None if batch_out is None else float(batch_out),
            )
        except (TypeError, KeyError, ValueError, AttributeError):
            raise RefineError(
                f"{where}: model {model!r} needs numeric 'input' and 'output' (USD per 1M tokens; "
                "optionally 'batch_input' and 'batch_output')"
            ) from None
    return out

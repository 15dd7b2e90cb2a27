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


@dataclass(frozen=True)
class ModelPrice:
    input: float  # USD per million prompt tokens
    output: float  # USD per million completion tokens


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

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for one answer; 0.0 for a model with no price (see `get` to tell the two apart)."""
        price = self.get(model)
        if price is None:
            return 0.0
        return (prompt_tokens * price.input + completion_tokens * price.output) / 1e6


def _parse(data: object, where: str) -> dict[str, ModelPrice]:
    if not isinstance(data, dict):
        raise RefineError(f"{where}: expected an object of model -> {{input, output}}")
    out = {}
    for model, entry in data.items():
        if model.startswith("_"):
            continue
        try:
            out[model] = ModelPrice(float(entry["input"]), float(entry["output"]))
        except (TypeError, KeyError, ValueError):
            raise RefineError(
                f"{where}: model {model!r} needs numeric 'input' and 'output' (USD per 1M tokens)"
            ) from None
    return out

"""Validation of a model under training: teacher-forced loss, action-token accuracy and the L1 error
of the decoded actions on the held-out episodes.

Teacher-forced on purpose (one forward pass per batch, every rank its share, summed across ranks):
it measures what the model would write at each action position given the right prefix. The free-running
decoder a policy is run with is `refinevla.train.policy.generate`.
"""

from __future__ import annotations

from typing import Any

import torch

from .actions import ActionTokenizer
from .adapters import ModelAdapter
from .data import to_device
from .loss import joint_loss


@torch.no_grad()
def validation_metrics(
    model: Any,
    adapter: ModelAdapter,
    loader: Any,
    actions: ActionTokenizer,
    reasoning_weight: float,
    device: Any,
    accelerator: Any = None,
) -> dict[str, float]:
    """Validation loss, action-token accuracy (teacher-forced argmax) and L1 of the decoded actions."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # loss*n, n batches, correct, action tokens, |err| sum
    for batch in loader:
        logits = adapter.logits(model, to_device(batch["model_inputs"], device))
        jl = joint_loss(logits, batch["labels"].to(device), batch["kinds"].to(device), reasoning_weight)
        pos = batch["action_positions"].to(device)
        pred = logits.gather(1, (pos - 1)[..., None].expand(-1, -1, logits.shape[-1])).argmax(-1).cpu()
        truth = batch["action_ids"]
        decoded = torch.from_numpy(actions.decode(pred.numpy()))
        sums += torch.tensor(
            [
                float(jl.loss),
                1.0,
                float((pred == truth).sum()),
                float(truth.numel()),
                float((decoded - batch["actions"].double()).abs().sum()),
            ],
            dtype=torch.float64,
        )
    if accelerator is not None and accelerator.num_processes > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    model.train(was_training)
    n_tok = max(float(sums[3]), 1.0)
    return {
        "val_loss": float(sums[0] / max(float(sums[1]), 1.0)),
        "action_token_accuracy": float(sums[2]) / n_tok,
        "action_l1": float(sums[4]) / n_tok,
    }


def predict_action_ids(model: Any, adapter: ModelAdapter, batch: dict[str, Any]) -> torch.Tensor:
    """Teacher-forced argmax at the action positions (what the model would write there)."""
    with torch.no_grad():
        logits = adapter.logits(model, batch["model_inputs"])
    pos = batch["action_positions"] - 1
    ids: torch.Tensor = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])).argmax(-1)
    return ids

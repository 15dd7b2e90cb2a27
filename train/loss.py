"""The joint loss: CE(action tokens) + λ · CE(rationale tokens), prompt masked out.

Each term is a mean over its own tokens, so λ means the same whatever the rationale's length
(a rationale is ~100 tokens, the action 9: a single mean over all target tokens would let the
rationale drown the action). λ = 0 is exactly the plain action objective: rationale positions
get no gradient at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .targets import ACTION, IGNORE_INDEX, RATIONALE


@dataclass
class JointLoss:
    loss: torch.Tensor  # what is back-propagated
    action: torch.Tensor  # mean CE over action-kind tokens (detached)
    rationale: torch.Tensor  # mean CE over rationale tokens (detached; 0 when there are none)
    n_action: int
    n_rationale: int


def joint_loss(logits: torch.Tensor, labels: torch.Tensor, kinds: torch.Tensor, reasoning_weight: float) -> JointLoss:
    """Logits (B, T, V) predict labels (B, T) shifted by one, as a causal LM does."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    kinds = kinds[:, 1:]
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(labels)
    valid = labels != IGNORE_INDEX
    a_mask = valid & (kinds == ACTION)
    r_mask = valid & (kinds == RATIONALE)
    n_a, n_r = int(a_mask.sum()), int(r_mask.sum())
    action = (ce * a_mask).sum() / max(n_a, 1)
    rationale = (ce * r_mask).sum() / max(n_r, 1)
    loss = action + reasoning_weight * rationale if reasoning_weight else action
    return JointLoss(loss, action.detach(), rationale.detach(), n_a, n_r)

"""Speckle2Self loss: reconstruction of each view plus consistency between outputs.

Default (the paper's): sum_k MSE(out_k, view_k) + sum_{k<l} L1(out_k, out_l), weights 1.
The other pairings exist so the paper's ablation can be rerun; only MSE + L1 despeckles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F

RECONSTRUCTION = ("mse", "l1")
CONSISTENCY = ("l1", "mse", "none")
_FN = {"mse": F.mse_loss, "l1": F.l1_loss}


@dataclass(frozen=True)
class LossConfig:
    reconstruction: str = "mse"
    consistency: str = "l1"
    reconstruction_weight: float = 1.0
    consistency_weight: float = 1.0

    def __post_init__(self):
        if self.reconstruction not in RECONSTRUCTION:
            raise ValueError(f"reconstruction loss must be one of {RECONSTRUCTION}")
        if self.consistency not in CONSISTENCY:
            raise ValueError(f"consistency loss must be one of {CONSISTENCY}")


def speckle2self_loss(outputs: List[torch.Tensor], views: List[torch.Tensor],
                      config: LossConfig = LossConfig()) -> Dict[str, torch.Tensor]:
    """Return {'total', 'reconstruction', 'consistency'} for one batch."""
    if len(outputs) != len(views):
        raise ValueError("one output per view is required")
    rec_fn = _FN[config.reconstruction]
    rec = sum(rec_fn(o, v) for o, v in zip(outputs, views))
    cons = outputs[0].new_zeros(())
    if config.consistency != "none":
        con_fn = _FN[config.consistency]
        for k in range(len(outputs)):
            for m in range(k + 1, len(outputs)):
                cons = cons + con_fn(outputs[k], outputs[m])
    total = config.reconstruction_weight * rec + config.consistency_weight * cons
    return {"total": total, "reconstruction": rec.detach(), "consistency": cons.detach()}

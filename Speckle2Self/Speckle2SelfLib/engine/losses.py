"""Speckle2Self loss: reconstruction of each view plus consistency between outputs.

Default (the paper's): sum_k MSE(out_k, view_k) + sum_{k<l} L1(out_k, out_l), weights 1.
The other pairings exist so the paper's ablation can be rerun; only MSE + L1 despeckles.

``consistency_weight`` (not in the paper, which weighs both terms 1) below 1 lets each output
follow its own view more: less smoothing. Fine-tuning the carotid model with 0.5 / 0.25 raised the
network output's lumen-wall CNR and lowered its homogeneity (benchmarks/model_selection.py; docs/methodology.md).

Optional edge-aware consistency (``edge_sigma``, not in the paper): the consistency term pulls
the full-resolution output towards the blurred coarse outputs everywhere, walls included. With
``edge_sigma`` set, each pixel's consistency is weighted by exp(-(|grad v| / edge_sigma)^2),
v the coarsest view, so the outputs need not agree across an edge that survives even the
coarsest view (speckle does not), while flat tissue keeps the full pull. ``edge_power`` (below 1)
takes the gradient of v ** edge_power instead: on B-mode the lumen and its faint walls lie at the
bottom of the grey scale, where a power stretches steps (0.03 -> 0.06 counts 2.4x more with 0.5)
and bright tissue's steps shrink, so faint dark boundaries keep their own output and bright
tissue is smoothed more (the refinement's ``refine_range_power`` weighs guide levels the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from .refine import REFINE_RANGE_POWER_LIMITS, compressed_levels

RECONSTRUCTION = ("mse", "l1")
CONSISTENCY = ("l1", "mse", "none")
_FN = {"mse": F.mse_loss, "l1": F.l1_loss}
#: Powers the edge weight may take grey levels to (1: the levels themselves): the refinement's.
EDGE_POWER_LIMITS = REFINE_RANGE_POWER_LIMITS


@dataclass(frozen=True)
class LossConfig:
    reconstruction: str = "mse"
    consistency: str = "l1"
    reconstruction_weight: float = 1.0
    consistency_weight: float = 1.0
    edge_sigma: Optional[float] = None   # None: the paper's unweighted consistency
    edge_power: float = 1.0              # the edge weight's gradient is taken of view ** edge_power

    def __post_init__(self):
        if self.reconstruction not in RECONSTRUCTION:
            raise ValueError(f"reconstruction loss must be one of {RECONSTRUCTION}")
        if self.consistency not in CONSISTENCY:
            raise ValueError(f"consistency loss must be one of {CONSISTENCY}")
        for name in ("reconstruction_weight", "consistency_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not 0 < float(value) < float("inf"):
                raise ValueError(f"{name} must be a finite positive number, got {value!r}")
        if self.edge_sigma is not None and not (0 < float(self.edge_sigma) < float("inf")):
            raise ValueError(f"edge_sigma must be a finite positive number, got {self.edge_sigma!r}")
        if not EDGE_POWER_LIMITS[0] <= float(self.edge_power) <= EDGE_POWER_LIMITS[1]:
            raise ValueError(f"edge_power must lie in {list(EDGE_POWER_LIMITS)}, got {self.edge_power!r}")
        if float(self.edge_power) != 1.0 and self.edge_sigma is None:
            raise ValueError("edge_power changes the edge-aware consistency: give edge_sigma (e.g. 0.0075) with it")
        unused = [name for name, given in (("consistency_weight", float(self.consistency_weight) != 1.0),
                                           ("edge_sigma", self.edge_sigma is not None)) if given]
        if self.consistency == "none" and unused:
            raise ValueError(f"{' and '.join(unused)} only weigh the consistency term, which consistency 'none' "
                             "drops: leave them out or keep the term")


def edge_weight(view: torch.Tensor, sigma: float, power: float = 1.0) -> torch.Tensor:
    """Per-pixel weight exp(-(|grad view ** power| / sigma)^2): 1 on flat tissue, near 0 across edges.

    Forward differences, the last row/column repeated, so the weight has the view's shape.
    """
    view = compressed_levels(view, power)
    dx = F.pad(view[..., :, 1:] - view[..., :, :-1], (0, 1, 0, 0), mode="replicate")
    dy = F.pad(view[..., 1:, :] - view[..., :-1, :], (0, 0, 0, 1), mode="replicate")
    magnitude_sq = dx * dx + dy * dy
    return torch.exp(-magnitude_sq / float(sigma) ** 2).detach()


def _weighted(diff: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    return diff.mean() if weight is None else (diff * weight).mean()


def speckle2self_loss(outputs: List[torch.Tensor], views: List[torch.Tensor],
                      config: LossConfig = LossConfig(), coarsest: int = -1) -> Dict[str, torch.Tensor]:
    """Return {'total', 'reconstruction', 'consistency'} for one batch.

    ``coarsest`` indexes the most perturbed view, the one the edge weight is taken from.
    """
    if len(outputs) != len(views):
        raise ValueError("one output per view is required")
    rec_fn = _FN[config.reconstruction]
    rec = sum(rec_fn(o, v) for o, v in zip(outputs, views))
    cons = outputs[0].new_zeros(())
    if config.consistency != "none":
        weight = None if config.edge_sigma is None else edge_weight(views[coarsest].float(), config.edge_sigma,
                                                                        config.edge_power)
        for k in range(len(outputs)):
            for m in range(k + 1, len(outputs)):
                diff = outputs[k] - outputs[m]
                diff = diff.abs() if config.consistency == "l1" else diff * diff
                cons = cons + _weighted(diff, weight)
    total = config.reconstruction_weight * rec + config.consistency_weight * cons
    return {"total": total, "reconstruction": rec.detach(), "consistency": cons.detach()}

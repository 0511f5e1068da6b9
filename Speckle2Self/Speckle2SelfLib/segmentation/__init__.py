"""Carotid lumen segmentation from one seed point (numpy, scipy and VTK; no MRML).

* :mod:`.radial` -- the default method: a star-shaped boundary around the seed that bridges
  gaps in the wall instead of leaking through them;
* :mod:`.editor_effects` -- 3D Slicer's Segment Editor "Flood filling" and "Grow from seeds",
  so that a result here is what a user gets by clicking in Slicer;
* :mod:`.lumen` -- one frame or a cine loop with any method: masks, measurements, quality flags;
* :mod:`.masks` -- measurements, seed and image checks, plausibility (leaks, seeds on a wall).

The names below are the package's API (``from Speckle2SelfLib import segmentation as seg;
seg.segment(image, (row, col))``). The ``speckle2self segment`` command is
:mod:`Speckle2SelfLib.cli.segment`; the scene side (segmentation node, table, plot) is
:mod:`Speckle2SelfLib.scene.lumen`.
"""

from .editor_effects import (DEFAULT_TOLERANCE, DESPECKLED_TOLERANCE, NEIGHBORHOOD_FRACTION, automatic_background_seeds,
                             flood_fill, grow_from_seeds)
from .lumen import (DEFAULT_METHOD, MAX_AREA_CHANGE, METHODS, LumenFrame, SequenceResult, boundary_uncertainty,
                    contrast_reason, segment, segment_frame, segment_sequence, uncertain_boundary_share)
from .masks import (LEAK_AREA_FRACTION, Measurement, RowCol, SegmentationWarning, check_seed, leak_reason, measure,
                    seed_from_mask, seed_looks_like_wall)
from .radial import RadialContour, SeedNotInLumenError, radial_boundary, radial_reason, radial_segment

__all__ = ["DEFAULT_METHOD", "DEFAULT_TOLERANCE", "DESPECKLED_TOLERANCE", "LEAK_AREA_FRACTION", "MAX_AREA_CHANGE",
           "METHODS", "NEIGHBORHOOD_FRACTION", "LumenFrame", "Measurement", "RadialContour", "RowCol",
           "SeedNotInLumenError", "SegmentationWarning", "SequenceResult", "automatic_background_seeds",
           "boundary_uncertainty", "check_seed",
           "contrast_reason",
           "flood_fill", "grow_from_seeds", "leak_reason", "measure", "radial_boundary", "radial_reason",
           "radial_segment", "seed_from_mask", "seed_looks_like_wall", "segment", "segment_frame", "segment_sequence",
           "uncertain_boundary_share"]

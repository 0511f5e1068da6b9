"""Ultrasound B-mode speckle simulator with a clean ground truth (numpy and scipy only).

* :mod:`.bmode` -- the simulator: PSF designed to MUST's speckle grain, plane-wave compounding,
  envelope, log compression; the speckle-free reference an ideal despeckler would give;
* :mod:`.phantoms` -- clean phantoms (carotid, thyroid, layers, points, random) and quick
  simulated training and test sets.

The names below are the package's API (``from Speckle2SelfLib import simulation as sim;
phantom, result = sim.simulate_phantom("carotid")``); ``speckle2self simulate`` is
:mod:`Speckle2SelfLib.cli.simulate`.
"""

from .bmode import (FC_LIMITS_HZ, LATERAL_SCALINGS, PAPER_FREQUENCIES_HZ, PLANE_WAVE_TILTS_DEG, REFERENCE_FC_HZ, SimulationResult,
                    check_fc, grain_fwhm_mm, log_compress, must_receive_fnumber, simulate_bmode, speckle_contrast)
from .phantoms import PHANTOM_KINDS, PhantomResult, make_phantom, simulate_phantom, simulated_set

__all__ = ["FC_LIMITS_HZ", "LATERAL_SCALINGS", "PAPER_FREQUENCIES_HZ", "PHANTOM_KINDS", "PLANE_WAVE_TILTS_DEG", "REFERENCE_FC_HZ",
           "PhantomResult", "SimulationResult", "check_fc", "grain_fwhm_mm", "log_compress", "make_phantom",
           "must_receive_fnumber", "simulate_bmode", "simulate_phantom", "simulated_set", "speckle_contrast"]

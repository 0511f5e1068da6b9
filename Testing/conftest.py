"""Shared pytest fixtures: import path, ../shared data, and small models made on the fly.

No test downloads anything: models are trained here on simulated speckle, and real data
comes from ../shared when it is present (tests that need it skip with the reason).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Speckle2Self"))
sys.path.insert(0, str(REPO / "benchmarks"))      # benchlib: code only the benchmarks (and these tests) use

SHARED = REPO.parent / "shared" / "data"
requires_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"real data not available ({SHARED} is absent; it ships beside the checkout)")


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    """CI has 2 cores: one torch thread keeps runs steady and leaves room for the rest."""
    import torch
    torch.set_num_threads(1)


def simulated_frames(n: int = 6, size: int = 128, seed: int = 0):
    """Speckled B-mode frames (float32 [0, 1]) with their clean targets, from the simulator."""
    from Speckle2SelfLib.simulation import simulated_set

    return simulated_set(n, size, seed, kinds=("layers", "thyroid", "carotid", "random"))


@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory) -> Path:
    """A valid but untrained width-4 model: for shape, dtype and API tests only."""
    import torch
    from Speckle2SelfLib.engine.models import export_model
    from Speckle2SelfLib.engine.network import Speckle2SelfNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "untrained.pt"
    export_model(Speckle2SelfNet(width=4), path, scales=(1.0, 0.5, 0.25), interpolation="bilinear",
                 name="untrained-test")
    return path


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> Path:
    """A small model trained self-supervised on simulated speckle (about a minute on one core).

    Depth 2 (a 1/4-resolution bottleneck) learns in a few hundred steps what the paper's
    depth-4 net needs thousands for, which is what a test can afford.
    """
    from Speckle2SelfLib.engine.training import FramePool, TrainConfig, train

    noisy, _clean = simulated_frames(n=8, size=128)
    path = tmp_path_factory.mktemp("models") / "trained.pt"
    cfg = TrainConfig(width=8, depth=2, crop=64, batch=8, steps=300, lr=2e-3, upsample="resize",
                      checkpoint_every=10_000, preview_every=0, name="trained-test", device="cpu")
    train(cfg, FramePool(noisy, {"files": 0, "frames": len(noisy), "source": "simulated"}), path,
          progress=False)
    return path


@pytest.fixture
def scene():
    """A headless MRML scene set up as a Slicer app sets one up: application, colour,
    Sequences and Segmentations logics attached (real slicer-core nodes, nothing mocked).
    The Sequences logic is reachable as ``scene.sequences_logic``."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (MRML Python bindings) is not installed")
    mrml_scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(mrml_scene)
    colour_logic = slicer.vtkMRMLColorLogic()
    colour_logic.SetMRMLScene(mrml_scene)
    sequences_logic = slicer.vtkSlicerSequencesLogic()
    sequences_logic.SetMRMLApplicationLogic(app_logic)
    sequences_logic.SetMRMLScene(mrml_scene)
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(mrml_scene)
    mrml_scene.sequences_logic = sequences_logic
    yield mrml_scene
    mrml_scene.Clear(True)      # the logics go with the fixture (unsetting their scene only logs warnings)
    del segmentations_logic, sequences_logic, colour_logic, app_logic

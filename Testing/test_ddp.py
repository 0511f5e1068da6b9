"""Training in several processes: DistributedDataParallel over gloo on the CPU, started by torchrun.

One real 2-process run of ``speckle2self train --nproc 2`` (torchrun underneath; a
sitecustomize hook records each rank's loss and final weights around the library's own
``train``), then a resume of its checkpoint in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: sitecustomize.py for the ranks: records each rank's losses and final weights around the
#: library's own ``train`` (the training itself is untouched).
RECORDER = textwrap.dedent("""
    import hashlib, json, os
    if os.environ.get("RANK") is not None and os.environ.get("S2S_TEST_REPORT"):
        import Speckle2SelfLib.engine.training as training

        real_train, losses = training.train, []

        def recording_train(*args, **kwargs):
            kwargs["on_step"] = lambda state: losses.append(state.last_loss["total"])
            net, state = real_train(*args, **kwargs)
            digest = hashlib.sha256()
            for key, value in sorted(net.state_dict().items()):
                digest.update(key.encode() + value.detach().cpu().contiguous().numpy().tobytes())
            path = os.path.join(os.environ["S2S_TEST_REPORT"], "rank" + os.environ["RANK"] + ".json")
            with open(path, "w") as fh:
                json.dump({"weights": digest.hexdigest(), "losses": losses, "step": state.step}, fh)
            return net, state

        training.train = recording_train
""")


def _speckle_pngs(folder: Path, n: int = 4, size: int = 64) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for k in range(n):
        rows = np.linspace(0, 1, size)[:, None]
        band = 60 + 140 * ((rows * (3 + k)) % 1.0 > 0.5) * np.ones((1, size))
        Image.fromarray(np.clip(band * rng.rayleigh(0.8, (size, size)), 0, 255).astype(np.uint8)).save(
            folder / f"scan{k}.png")


def _env(hook: Path, report: Path) -> dict:
    (hook / "sitecustomize.py").write_text(RECORDER)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), str(REPO / "Speckle2Self")]),
                OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", S2S_TEST_REPORT=str(report))


TRAIN = ["--device", "cpu", "--crop", "32", "--batch", "4", "--width", "4", "--depth", "2", "--upsample", "resize",
         "--lr", "0.003", "--checkpoint-every", "10", "--preview-every", "0", "--threads", "1", "--no-amp"]


def test_two_process_gloo_training_resume_and_export(tmp_path):
    from Speckle2SelfLib.cli.main import main
    from Speckle2SelfLib.engine.inference import Despeckler
    from Speckle2SelfLib.engine.models import read_metadata

    import torch

    data, out = tmp_path / "data", tmp_path / "run" / "model.pt"
    _speckle_pngs(data)
    out.parent.mkdir()
    report, hook = tmp_path / "report", tmp_path / "hook"
    report.mkdir()
    hook.mkdir()
    cmd = [sys.executable, "-m", "Speckle2SelfLib.cli", "train", str(data), "--out", str(out), "--steps", "30",
           "--nproc", "2", *TRAIN]
    run = subprocess.run(cmd, env=_env(hook, report), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1                     # rank 0 reports, rank 1 does not
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]          # DDP: the same weights on every rank
    assert ranks[0]["step"] == ranks[1]["step"] == 30
    loss = np.array(ranks[0]["losses"])
    assert np.array_equal(loss, ranks[1]["losses"])            # the ranks' mean, the same on both
    assert loss[-8:].mean() < loss[:8].mean()                  # it learns
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.ckpt", "model.pt"]   # rank 0 alone wrote
    meta = read_metadata(out)
    assert meta["training"]["processes"] == 2 and meta["training"]["global_batch"] == 8
    ckpt = torch.load(out.with_suffix(".ckpt"), map_location="cpu", weights_only=True)
    assert ckpt["step"] == 30

    engine = Despeckler.from_file(str(out), "cpu", "fp32")     # the exported model loads and runs
    frame = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(data / "scan0.png"))
    result = engine.denoise(frame, working_scale=None)
    assert result.shape == frame.shape and result.dtype == frame.dtype
    # Resume with another number of processes (one, in this process): it goes on from step 30.
    assert main(["train", str(data), "--out", str(out), "--resume", str(out.with_suffix(".ckpt")), "--steps", "33",
                 "--threads", "1"]) == 0
    assert torch.load(out.with_suffix(".ckpt"), map_location="cpu", weights_only=True)["step"] == 33
    assert "processes" not in read_metadata(out)["training"]
    Despeckler.from_file(str(out), "cpu", "fp32")


def test_nproc_is_dropped_from_the_processes_command():
    from Speckle2SelfLib.engine.distributed import without_nproc

    assert without_nproc(["train", "d", "--nproc", "2", "--out", "m.pt", "--nproc=3"]) == ["train", "d", "--out", "m.pt"]

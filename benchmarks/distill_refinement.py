"""Distil the default output into the network: a student that gives the refined output itself.

    python benchmarks/distill_refinement.py [--minutes 40] [--threads 1] [--out DIR] [--loss l1|mse]
        [--lr 1e-4] [--crop 128] [--batch 8] [--working-scale auto|off] [--model TEACHER.pt]
        [--tuning-limit 0] [--eval-limit 0] [--timing-frames 4] [--timing-rounds 5] [--seed 0]

The default output is the network's output steering a joint bilateral filter of the input (the
guided refinement, ``Despeckler.denoise(refine="auto")`` of the bundled default model). This
script measures the route of issue #33 that needs no refinement at all:

* teacher: the bundled default (``--model``, default v4) on the CPU in fp32; its default output
  of every TUNING-subject image (benchlib/carotid_data.py: the 7 tuning subjects; the test
  subjects are never trained on) is computed once and kept in memory as float32 in [0, 1]
  (the frame's own min-max range, as ``normalise_frame`` maps the input);
* student: the teacher's own architecture, warm-started from its weights, so it costs exactly
  the network's time; trained with Adam on random crops (horizontal flips) of
  (input -> teacher output) pairs for ``--minutes`` wall minutes (the training loop alone) with
  ``--threads`` torch threads. What the loss compares is what ``denoise(refine="none")`` returns
  for the student: the network at the working scale, resized back, clamped, given the input's
  grey levels by the least-squares fit (heads ending in an InstanceNorm) and clipped to [0, 1];
  on a crop the InstanceNorms and the fit see the crop, at inference the whole frame.
* working scale: ``auto`` (default) runs the teacher as the product does, at the grain-matched
  working scale it picks for each frame, and the student's network at that same scale; the
  student keeps the teacher's grain metadata, so ``working_scale="auto"`` picks it again.
  ``off`` runs both at the frames' own resolution and the student records no grain target.
* the student is saved as a product model (TorchScript with metadata, ``export_model``) named
  ``<teacher>-distilled`` with ``refine`` = "none", so ``refine="auto"`` does not refine it again,
  into ``--out`` (default ``distilled/`` under the repository root; nothing is added to git).

Prints a markdown table: training steps, minutes, the training loss on a fixed sample of tuning
crops before and after; on the TEST subjects (``--eval-limit`` images, 0: all 135) the mean
|output - teacher output| in grey levels of 255 and the flood-fill IoU at the tolerance tuned on
the tuning subjects (benchmarks/carotid.py's ``evaluate``) of the teacher, of its network output
(the student's start) and of the student; ms per 512x512 frame of each in the same run (test
frames, one frame per call, fp32, each model's own default working scale). Then the command that
gives the student's full carotid figures.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Speckle2Self"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import carotid as bench  # noqa: E402  (benchmarks/carotid.py: evenly, evaluate)
from benchlib import carotid_data as carotid  # noqa: E402

#: The teacher's network output, the student's starting point: the row that shows what distilling gains.
START_ROW = "teacher's network output (the student's start)"
TOLERANCES = np.arange(0, 81, 1.0)      # benchmarks/carotid.py's sweep for the tuned tolerance
PROBE_BATCHES = 4                       # the fixed sample of tuning crops the loss is reported on


class Sample(NamedTuple):
    x: np.ndarray          # the frame, min-max normalised (float32 [0, 1])
    target: np.ndarray     # the teacher's default output in the same units
    scale: float           # the working scale the teacher's network ran this frame at


def image_key(image: np.ndarray) -> str:
    """Outputs are kept by image content: benchmarks/carotid.py's methods see only the image."""
    return hashlib.sha1(image.tobytes()).hexdigest()


class Memo:
    """A method whose outputs are computed once per image (the teacher's are already known from
    the targets; the evaluation asks for tuning and test images again)."""

    def __init__(self, fn: Callable):
        self.fn, self.outputs = fn, {}

    def __call__(self, image: np.ndarray) -> np.ndarray:
        key = image_key(image)
        if key not in self.outputs:
            self.outputs[key] = self.fn(image)
        return self.outputs[key]


def unit(image: np.ndarray, like: np.ndarray) -> np.ndarray:
    """``image`` (an output of the frame ``like``) in the [0, 1] units ``normalise_frame`` gives ``like``."""
    lo, hi = float(like.min()), float(like.max())
    return np.clip((image.astype(np.float64) - lo) / max(hi - lo, 1e-12), 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- teacher and crops

def teacher_samples(teacher, cases, working_scale, outputs: Memo) -> List[Sample]:
    """Every case as (input, teacher's default output, the working scale its network ran at)."""
    from Speckle2SelfLib.engine.inference import normalise_frame

    samples = []
    for k, case in enumerate(cases):
        image, _ = case.load()
        x = np.empty(image.shape, np.float32)
        normalise_frame(image, x)
        scale = teacher.resolve_working_scale(image[None], working_scale)   # what denoise picks for it
        samples.append(Sample(x, unit(outputs(image), image), scale))
        if (k + 1) % 50 == 0:
            print(f"  teacher outputs: {k + 1} of {len(cases)}", file=sys.stderr)
    return samples


def draw_crop(rng: np.random.Generator, sample: Sample, crop: int, tries: int = 20):
    """A random (input, target) crop whose input spans training.MIN_CROP_CONTRAST of the range (these
    frames are mostly black background, which teaches nothing), flipped left-right half the time
    (as the product's training: a vertical flip would put depth upside down)."""
    from Speckle2SelfLib.engine.training import MIN_CROP_CONTRAST

    h, w = sample.x.shape
    for _ in range(tries):
        r, c = rng.integers(h - crop + 1), rng.integers(w - crop + 1)
        x = sample.x[r:r + crop, c:c + crop]
        if float(x.max() - x.min()) >= MIN_CROP_CONTRAST:
            break
    target = sample.target[r:r + crop, c:c + crop]
    return (x[:, ::-1], target[:, ::-1]) if rng.random() < 0.5 else (x, target)


def draw_batch(rng: np.random.Generator, samples: List[Sample], batch: int, crop: int):
    """``batch`` crops as [(working scale, inputs (n, 1, crop, crop), targets)], grouped by scale:
    each group runs through the network at its frames' own scale."""
    import torch

    groups: Dict[float, list] = {}
    for k in rng.integers(len(samples), size=batch):
        groups.setdefault(samples[k].scale, []).append(draw_crop(rng, samples[k], crop))
    return [(scale, torch.from_numpy(np.stack([x for x, _ in pairs]))[:, None],
             torch.from_numpy(np.stack([t for _, t in pairs]))[:, None]) for scale, pairs in groups.items()]


# ----------------------------------------------------------------------------- student

def student_output(module, x, scale: float, fits: bool):
    """What ``Despeckler.denoise(refine="none")`` gives for (N, 1, h, w) normalised frames, in [0, 1]
    units before the mapping to the frame's range: ``_apply_module``'s resampling to the working
    scale, resize back and clamp, then ``_restore``'s least-squares grey-level fit (heads ending in
    an InstanceNorm; ``fit_to`` is the function ``fit_grey_levels`` runs) and clip."""
    import torch.nn.functional as F

    from Speckle2SelfLib.engine.perturbation import resample_to_working_scale
    from Speckle2SelfLib.engine.refine import fit_to

    h, w = x.shape[-2:]
    y = module(resample_to_working_scale(x, scale))
    if y.shape[-2:] != (h, w):
        y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
    y = y.clamp(0.0, 1.0)
    return fit_to(y, x).clamp(0.0, 1.0) if fits else y


def batch_loss(module, groups, loss: str, fits: bool):
    """The per-pixel loss over every crop of the batch (groups of :func:`draw_batch`)."""
    import torch.nn.functional as F

    fn = F.l1_loss if loss == "l1" else F.mse_loss
    total, pixels = 0.0, 0
    for scale, x, target in groups:
        total = total + fn(student_output(module, x, scale, fits), target, reduction="sum")
        pixels += target.numel()
    return total / pixels


def probe_loss(module, probe, loss: str, fits: bool) -> float:
    import torch

    with torch.no_grad():
        return float(np.mean([float(batch_loss(module, groups, loss, fits)) for groups in probe]))


def student_net(teacher_path: Path, args):
    """The teacher's architecture with its weights (every encoder from its full-resolution one)."""
    from Speckle2SelfLib.engine.training import build_net, config_from_model, init_from_model

    cfg = config_from_model(teacher_path, minutes=args.minutes, crop=args.crop, batch=args.batch, lr=args.lr,
                            seed=args.seed)
    net = build_net(cfg)
    if init_from_model(net, teacher_path):
        raise SystemExit(f"{teacher_path}: its head does not match the rebuilt network")
    return net, cfg


def train(module, samples: List[Sample], args, fits: bool) -> Dict:
    """Adam on random crops for ``args.minutes`` of wall time (at least one step: a model file
    records steps_done >= 1). Returns steps, minutes and the loss on a fixed crop sample before and after."""
    import torch

    rng = np.random.default_rng(args.seed)
    probe_rng = np.random.default_rng([args.seed, 1])      # the same crops before and after
    probe = [draw_batch(probe_rng, samples, args.batch, args.crop) for _ in range(PROBE_BATCHES)]
    start_loss = probe_loss(module, probe, args.loss, fits)
    opt = torch.optim.Adam(module.parameters(), lr=args.lr)
    steps, t0 = 0, time.perf_counter()
    while steps == 0 or time.perf_counter() - t0 < 60 * args.minutes:
        value = batch_loss(module, draw_batch(rng, samples, args.batch, args.crop), args.loss, fits)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        steps += 1
        if steps % 200 == 0:
            print(f"  step {steps}, {(time.perf_counter() - t0) / 60:.1f} min, loss {float(value):.5f}",
                  file=sys.stderr)
    minutes = (time.perf_counter() - t0) / 60
    return {"steps": steps, "minutes": minutes, "loss_start": start_loss,
            "loss_end": probe_loss(module, probe, args.loss, fits)}


def save_student(net, cfg, teacher_path: Path, result: Dict, args, data: Dict) -> Path:
    """The student as a product model: refine "none" (its output is the refined one already) and,
    with --working-scale auto, the teacher's grain target (auto picks the scale it was trained at)."""
    from Speckle2SelfLib.engine.models import export_model, read_metadata
    from Speckle2SelfLib.engine.training import model_record

    meta = read_metadata(teacher_path)
    name = f"{meta['name']}-distilled"
    grain = {"working_scale": float(meta.get("working_scale", 1.0))}
    if args.working_scale == "auto" and meta.get("working_view_difference"):
        grain["working_view_difference"] = meta["working_view_difference"]
    training = {key: getattr(cfg, key) for key in ("width", "depth", "head", "upsample", "interpolation")}
    training.update(
        scales=list(cfg.scales), method="distilled from the teacher's default output (benchmarks/distill_refinement.py)",
        loss=args.loss, crop=args.crop, batch=args.batch, lr=args.lr, seed=args.seed, working_scale_mode=args.working_scale,
        steps_done=result["steps"], minutes_done=round(result["minutes"], 2), device_used="cpu",
        final_loss=round(result["loss_end"], 6), started_from=model_record(teacher_path),
        data=data,
        command="python benchmarks/distill_refinement.py " + " ".join(sys.argv[1:]))
    path = Path(args.out) / f"{name}.pt"
    export_model(net, path, scales=cfg.scales, interpolation=cfg.interpolation, name=name, training=training,
                 extra={**grain, "refine": "none"})
    return path


def data_summary(cases) -> Dict:
    """What the student's metadata says it was trained on."""
    return {"frames": len(cases), "subjects": len({case.subject for case in cases}), "masks_used": False,
            "source": "real in-vivo transverse carotid B-mode, the tuning subjects of benchmarks/benchlib/"
                      "carotid_data.py (test subjects never used); targets: the teacher's default output"}


# ----------------------------------------------------------------------------- evaluation

def evaluate(methods: Dict[str, Memo], args):
    """benchmarks/carotid.py's rows (tolerance tuned on tuning subjects, IoU on test subjects) and
    each method's mean |output - teacher output| on the test images (the first method is the teacher)."""
    tuning = bench.evenly(carotid.cases("tuning", with_mask=True), args.tuning_limit)
    test = bench.evenly(carotid.cases("test", with_mask=True), args.eval_limit)
    rows, _ = bench.evaluate(methods, tuning, test, None, {}, TOLERANCES, None)
    teacher = next(iter(methods.values()))
    images = [case.load()[0] for case in test]
    for row in rows:
        fn = methods[row["method"]]
        row["difference"] = float(np.mean([np.abs(fn(img).astype(np.float64) - teacher(img)).mean() for img in images]))
    return rows, len(tuning), len(test)


def ms_per_frame(methods: Dict[str, Callable], frames: List[np.ndarray], rounds: int = 5) -> Dict[str, float]:
    """Median over rounds of ms per frame, one frame per call (as a stream); the methods run back
    to back in each round, so they compare under the same load."""
    for fn in methods.values():
        fn(frames[0])                       # warm-up: allocations, TorchScript's profiling runs
    times: Dict[str, List[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            for frame in frames:
                fn(frame)
            times[name].append((time.perf_counter() - start) / len(frames))
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def timing_frames(count: int, size: int = 512) -> List[np.ndarray]:
    """Centre crops of test-subject images (their speckle, so the grain match picks as it does there)."""
    frames = []
    for case in bench.evenly(carotid.cases("test"), count):
        image, _ = case.load()
        r, c = max(0, (image.shape[0] - size) // 2), max(0, (image.shape[1] - size) // 2)
        frames.append(np.ascontiguousarray(image[r:r + size, c:c + size]))
    return frames


def report(rows: List[Dict], ms: Dict[str, float], result: Dict, args, counts) -> str:
    frames, n_tuning, n_test = counts
    lines = [f"{frames} tuning-subject frames for training; tolerance tuned on {n_tuning} tuning-subject images; "
             f"metrics on {n_test} test-subject images; CPU, {args.threads} torch thread(s), fp32; working scale "
             f"{args.working_scale}; {args.loss.upper()} loss on {PROBE_BATCHES * args.batch} fixed tuning crops "
             f"of {args.crop} px (grey levels / 255).", "",
             "| output | steps | minutes | training loss | mean abs diff to teacher (of 255) | tolerance | "
             "flood-fill IoU | AUC | ms / 512x512 frame |", "|---|---|---|---|---|---|---|---|---|"]
    training = {START_ROW: ("0", "0", f"{result['loss_start']:.5f}"),
                rows[-1]["method"]: (str(result["steps"]), f"{result['minutes']:.1f}", f"{result['loss_end']:.5f}")}
    for r in rows:
        steps, minutes, loss = training.get(r["method"], ("-", "-", "-"))
        lines.append(f"| {r['method']} | {steps} | {minutes} | {loss} | {r['difference']:.2f} | {r['tolerance']:.0f} | "
                     f"{r['iou']:.3f} ± {r['iou_sd']:.3f} | {r['auc']:.3f} | {ms[r['method']]:.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=40.0, help="wall minutes of the training loop")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (training, evaluation, timing)")
    parser.add_argument("--out", default=str(ROOT / "distilled"), help="folder for the student model")
    parser.add_argument("--model", help="teacher model file or bundled name (default: the bundled default)")
    parser.add_argument("--loss", choices=("l1", "mse"), default="l1")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--crop", type=int, default=128, help="crop side in px (a multiple of 16)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--working-scale", choices=("auto", "off"), default="auto",
                        help="auto: the teacher's grain-matched scale per frame, the student's network at the same; "
                             "off: both at the frames' own resolution")
    parser.add_argument("--tuning-limit", type=int, default=0,
                        help="tuning images for training and for the tolerance (0: all 269 / 260 with masks)")
    parser.add_argument("--eval-limit", type=int, default=0, help="test images scored (0: all 135)")
    parser.add_argument("--timing-frames", type=int, default=4, help="512x512 test crops timed")
    parser.add_argument("--timing-rounds", type=int, default=5, help="rounds timed (the median is printed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.lr <= 0 or min(args.batch, args.threads, args.timing_frames, args.timing_rounds) < 1:
        parser.error("--minutes, --lr, --batch, --threads and --timing-* must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if carotid.carotid_dir() is None:
        print("carotid data not found (../shared/data/carotid, or $SPECKLE2SELF_SHARED); nothing to distil",
              file=sys.stderr)
        return 1
    import torch

    from Speckle2SelfLib.engine.inference import Despeckler
    from Speckle2SelfLib.engine.models import resolve_model_path

    torch.set_num_threads(args.threads)
    teacher_path = resolve_model_path(args.model)
    teacher = Despeckler.from_file(str(teacher_path), "cpu", backend="fp32")
    scale = "auto" if args.working_scale == "auto" else None
    teacher_out = Memo(lambda img: teacher.denoise(img, working_scale=scale))
    start_out = Memo(lambda img: teacher.denoise(img, refine="none", working_scale=scale))
    cases = bench.evenly(carotid.cases("tuning"), args.tuning_limit)
    samples = teacher_samples(teacher, cases, scale, teacher_out)
    if args.crop > min(min(s.x.shape) for s in samples):
        raise SystemExit(f"--crop {args.crop} is larger than the smallest frame")
    net, cfg = student_net(teacher_path, args)
    result = train(net.inference_module(), samples, args, teacher.fits_grey_levels())
    path = save_student(net, cfg, teacher_path, result, args, data_summary(cases))
    student = Despeckler.from_file(str(path), "cpu", backend="fp32")     # the file as the product loads it
    assert student.resolve_refine("auto") == "none"
    methods = {f"teacher: {teacher.metadata['name']}, default output ({teacher.resolve_refine()})": teacher_out,
               START_ROW: start_out,
               f"student: {student.metadata['name']}, default output": Memo(student.denoise)}
    rows, n_tuning, n_test = evaluate(methods, args)
    ms = ms_per_frame({name: memo.fn for name, memo in methods.items()}, timing_frames(args.timing_frames),
                      args.timing_rounds)
    print(report(rows, ms, result, args, (len(samples), n_tuning, n_test)))
    print(f"\nstudent: {path}\nfull carotid figures: python benchmarks/carotid.py --methods raw --model {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

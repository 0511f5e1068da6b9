"""Archive-scale runs on Dask (``dask.distributed``): one task per input file, resumable.

``speckle2self denoise IN_DIR OUT_DIR --workers N`` starts a ``LocalCluster`` of N worker
processes; ``--scheduler ADDRESS`` (or a scheduler file) uses a running cluster (``dask
scheduler`` + ``dask worker``, dask-jobqueue, Kubernetes). Dask schedules; this module only
says what one file's task is and keeps the books:

* one task per input file (a long sequence or multi-frame DICOM: one task per range of
  ``frames_per_task`` frames, then one that writes the file); each worker process loads the model once and keeps it
  (:func:`_worker_engine`); the workers read the inputs and write the outputs themselves (the
  paths must be reachable from them: a shared file system on a real cluster);
* a manifest in the output folder (:data:`MANIFEST_NAME`, one JSON line per finished input:
  path, size, mtime, output, model checksum, options, status, seconds, frames, reason),
  appended and flushed as results arrive. A rerun skips an input whose latest line is for the
  same file (size and mtime), model checksum and options and says ``done`` (its output is
  there) or ``failed`` (the file itself is bad: it is listed again, not reread); everything
  else (never finished, lost with a killed worker, a changed input or model) is redone;
* outputs are written under a temporary name in their folder and renamed into place
  (:func:`Speckle2SelfLib.fileio.safeio.atomic_output`): a worker or a whole run killed with
  SIGKILL leaves no partial output under an output's name, and the temporaries of dead
  processes are removed by the next run;
* a bad file is a ``failed`` line with its one-line reason; the run goes on.

Without dask installed nothing here is imported: ``--workers`` then fails with one line that
names the install command (:func:`require_distributed`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

MANIFEST_NAME = "speckle2self-manifest.jsonl"
INSTALL_HINT = 'pip install "speckle2self[archive]"   (or: pip install "dask[distributed]")'


class ArchiveUnavailable(ValueError):
    """dask.distributed is not installed (a bad option for this environment: exit 2)."""


def require_distributed():
    """The ``distributed`` module, or a one-line :class:`ArchiveUnavailable` naming the install."""
    try:
        import distributed
    except ImportError as err:
        raise ArchiveUnavailable(f"--workers / --scheduler run on Dask, which is not installed ({err}); "
                                 f"install it with: {INSTALL_HINT}") from err
    return distributed


# ----------------------------------------------------------------------------- the books

def fingerprint(path) -> Dict:
    """What tells that an input changed: its size and modification time (nanoseconds)."""
    st = os.stat(path)
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


class Manifest:
    """One JSON line per finished input, appended and flushed as results arrive.

    The latest line of an input wins. A line cut short by a killed run is ignored (and the
    next append starts on a new line), so the file is always readable.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.entries: Dict[str, Dict] = {}
        if self.path.is_file():
            with open(self.path, "r", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(entry, dict) and isinstance(entry.get("input"), str):
                        self.entries[entry["input"]] = entry
        self._lock = threading.Lock()

    def settled(self, key: str, expected: Dict) -> Optional[Dict]:
        """``key``'s latest line when it needs no new work: every field of ``expected`` equal,
        and status "done" with its output(s) present, or "failed" (a bad file; a worker lost
        on the way is status "lost" and is redone). None otherwise."""
        entry = self.entries.get(key)
        if not entry or entry.get("status") not in ("done", "failed"):
            return None
        if any(entry.get(k) != v for k, v in expected.items()):
            return None
        outputs = entry["outputs"] if "outputs" in entry else [entry.get("output")]
        if entry["status"] == "done" and not all(o and Path(o).is_file() for o in outputs):
            return None
        return entry

    def append(self, record: Dict) -> None:
        line = json.dumps(record, sort_keys=True, default=str)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as fh:
                fh.seek(0, os.SEEK_END)
                if fh.tell():
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":        # a line cut short by a killed run
                        fh.write(b"\n")
                fh.write(line.encode("utf-8") + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            self.entries[record["input"]] = record


# ----------------------------------------------------------------------------- the cluster

@contextmanager
def dask_client(workers: Optional[int] = None, scheduler: Optional[str] = None,
                threads_per_worker: int = 1) -> Iterator:
    """A ``distributed.Client``: on a new ``LocalCluster`` of ``workers`` processes (loopback
    only, no dashboard), or on the cluster whose scheduler is ``scheduler`` (an address such as
    ``tcp://10.0.0.5:8786`` or a scheduler file written by ``dask scheduler --scheduler-file``)."""
    import logging

    distributed = require_distributed()
    if workers and scheduler:
        raise ValueError("give --workers (a new cluster on this machine) or --scheduler (a running cluster), not both")
    if scheduler:
        target = dict(scheduler_file=scheduler) if Path(scheduler).is_file() else dict(address=scheduler)
        try:
            if "address" in target:
                _probe(scheduler)
            client = distributed.Client(**target, timeout="20s")
        except (OSError, TimeoutError, ValueError) as err:
            raise ValueError(f"--scheduler {scheduler}: cannot reach the Dask scheduler ({' '.join(str(err).split())[:160]}); "
                             "start it with `dask scheduler` (and workers with `dask worker ADDRESS`) or check "
                             "the address / scheduler file") from err
        try:
            yield client
        finally:
            client.close()
        return
    import dask

    # Dask's nannies start workers with MALLOC_TRIM_THRESHOLD_=65536, which also turns off glibc's
    # dynamic mmap threshold: every large torch tensor is then a fresh mmap, and a frame took twice
    # the CPU time of the same call in a plain process (measured). Workers here keep glibc's defaults.
    environ = {k: v for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {}).items()
               if k != "MALLOC_TRIM_THRESHOLD_"}
    # Each worker gets its next file before it finishes the current one (saturation 2; Dask's default
    # 1.1 makes a worker with one thread wait a scheduler round trip per file).
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ,
                          "distributed.scheduler.worker-saturation": 2.0}):
        cluster = distributed.LocalCluster(n_workers=int(workers or 1), threads_per_worker=int(threads_per_worker),
                                           processes=True, host="127.0.0.1", dashboard_address=None,
                                           worker_dashboard_address=None, silence_logs=logging.ERROR)
    try:
        client = distributed.Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


def _probe(address: str) -> None:
    """A refused TCP connection fails at once (the client would retry until its timeout)."""
    import socket
    from urllib.parse import urlsplit

    if "://" in address and not address.startswith("tcp://"):
        return                                  # tls://, ws://, ...: left to the client
    parts = urlsplit(address if "://" in address else "tcp://" + address)
    if parts.hostname is None or parts.port is None:
        raise ValueError("not an address of the form tcp://HOST:PORT nor an existing scheduler file")
    socket.create_connection((parts.hostname, parts.port), timeout=10).close()


# ----------------------------------------------------------------------------- running tasks

@dataclass
class Task:
    """One input file: where its result goes and what must match for it to count as done."""

    input: str
    outputs: List[str]
    expected: Dict                      # fields the manifest line must hold (fingerprint, model, options)
    params: Dict = field(default_factory=dict)   # anything else the worker function needs


@dataclass
class Summary:
    files: int = 0
    done: int = 0
    skipped: int = 0                    # settled by an earlier run (done, or a bad file listed again)
    submitted: int = 0                  # tasks this run gave to Dask
    failed: List[str] = field(default_factory=list)
    frames: int = 0
    seconds: float = 0.0
    results: List[Dict] = field(default_factory=list)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"{self.files} file(s): {self.done} done now, {self.skipped} settled by an earlier run, "
                f"{len(self.failed)} failed; {self.frames} frames in {self.seconds:.1f} s "
                f"({self.frames_per_s:.1f} frames/s)")


def run_tasks(client_factory, tasks: List[Task], function: Callable[[Dict, Dict], Dict], setup: Dict,
              manifest: Manifest, progress: bool = True, on_result: Optional[Callable[[Dict], None]] = None,
              split: Optional[tuple] = None) -> Summary:
    """Submit the tasks not done yet (one Dask task each), record each result as it arrives.

    ``client_factory()`` is a context manager yielding a ``distributed.Client`` (:func:`dask_client`);
    it is entered only when some task needs work (a finished archive starts no cluster). With
    ``client_factory=None`` the tasks run here, one after the other (no Dask needed).
    ``split``: (chunk function, assemble function) for tasks whose params hold "chunks", frame
    ranges: one Dask task per range, then one that takes their results and writes the file.

    ``function(task_dict, setup)`` runs on a worker and returns a dict with ``status``
    ("done" or "failed"), ``frames``, ``seconds`` and ``reason``; it never raises for a bad
    file. A task whose worker died more often than Dask allows (``KilledWorker``) is recorded
    as "lost" with that reason; the next run redoes it.
    """
    from ..fileio.safeio import remove_stale_partials

    summary = Summary(files=len(tasks))
    pending = []
    for task in tasks:
        entry = manifest.settled(task.input, task.expected)
        if entry is None:
            pending.append(task)
            continue
        for out in task.outputs:            # a run killed after the rename, before cleaning up
            remove_stale_partials(Path(out))
        summary.skipped += 1
        if entry["status"] == "failed":
            summary.failed.append(f"{entry.get('reason')} (unchanged since an earlier run)")
        if on_result is not None:
            on_result(entry)
    summary.submitted = len(pending)
    if pending and client_factory is None:
        _run_here(pending, function, setup, manifest, summary, progress, len(tasks), on_result)
    elif pending:
        distributed = require_distributed()
        with client_factory() as client:
            _submit_and_record(client, distributed, pending, function, setup, manifest, summary, progress,
                               len(tasks), on_result, split)
    for task in tasks:
        for out in task.outputs:
            remove_stale_partials(Path(out))
    return summary


def _record(task: Task, result: Dict, manifest: Manifest, summary: Summary, on_result) -> None:
    record = {"input": task.input, "output": task.outputs[0] if task.outputs else None, "outputs": task.outputs,
              **task.expected, **result}
    manifest.append(record)
    summary.results.append(record)
    if record["status"] == "done":
        summary.done += 1
        summary.frames += int(record.get("frames") or 0)
    else:
        summary.failed.append(str(record.get("reason")) if record["status"] == "failed"
                              else f"{task.input}: {record.get('reason')} (rerun to redo it)")
    if on_result is not None:
        on_result(record)


def _run_here(pending: List[Task], function, setup: Dict, manifest: Manifest, summary: Summary, progress: bool,
              total: int, on_result) -> None:
    bar = _bar(progress, total, total - len(pending))
    t0 = time.perf_counter()
    try:
        for task in pending:
            _record(task, function({"input": task.input, "outputs": task.outputs, **task.params}, setup),
                    manifest, summary, on_result)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        summary.seconds = time.perf_counter() - t0


def _submit_and_record(client, distributed, pending: List[Task], function, setup: Dict, manifest: Manifest,
                       summary: Summary, progress: bool, total: int, on_result, split=None) -> None:
    from ..fileio.safeio import one_line

    import uuid

    bar = _bar(progress, total, total - len(pending))
    t0 = time.perf_counter()
    futures = {}
    run = uuid.uuid4().hex[:8]          # this run's keys: never those of a run a cluster still remembers
    for task in pending:
        payload = {"input": task.input, "outputs": task.outputs, **task.params}
        key = f"speckle2self-{_key(task.input)}-{run}"
        if split is not None and task.params.get("chunks"):
            parts = [client.submit(split[0], payload, setup, a, b, key=f"{key}-frames-{a}-{b}", pure=False)
                     for a, b in task.params["chunks"]]
            future = client.submit(split[1], payload, setup, *parts, key=key, pure=False)
        else:
            future = client.submit(function, payload, setup, key=key, pure=False)
        futures[future] = task
    try:
        for future in distributed.as_completed(list(futures)):
            task = futures.pop(future)
            try:
                result = future.result()
            except Exception as err:      # KilledWorker, lost data, ...: recorded, the run goes on  # noqa: BLE001
                result = {"status": "lost", "frames": 0, "seconds": 0.0,
                          "reason": f"{type(err).__name__}: {one_line(err, 200)}"}
            _record(task, result, manifest, summary, on_result)
            if bar is not None:
                bar.update(1)
    finally:
        for future in futures:
            future.cancel()
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - t0


def _key(text: str) -> str:
    import hashlib
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="file", dynamic_ncols=True, file=sys.stderr, disable=None)


# ----------------------------------------------------------------------------- on the workers

_ENGINES: Dict = {}
_ENGINES_LOCK = threading.Lock()
LOADS = {"count": 0}          # models this process has loaded (once per worker process and model)


def model_loads() -> int:
    """How many models this process has loaded (``client.run(model_loads)`` asks every worker)."""
    return LOADS["count"]


def _worker_engine(setup: Dict):
    """The worker process's Despeckler for ``setup`` (loaded once per process, then kept)."""
    key = (setup["model"], setup["model_sha256"], setup["device"], setup["backend"])
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            from .inference import Despeckler

            if setup.get("threads"):
                import torch
                torch.set_num_threads(int(setup["threads"]))
            _reuse_heap()
            engine = Despeckler.from_file(setup["model"], setup["device"], setup["backend"])
            LOADS["count"] += 1
            _ENGINES.clear()                # one model per worker process at a time
            _ENGINES[key] = engine
        return engine


def _reuse_heap() -> None:
    """On a worker started by a Dask nanny with its default MALLOC_TRIM_THRESHOLD_ (e.g. ``dask
    worker`` of a running cluster), let glibc reuse freed heap for torch's large tensors again
    instead of mapping fresh pages for each (twice the CPU time per frame, measured): mmap only
    above 32 MiB, trim above 256 MiB. Nothing elsewhere (no such variable, or not glibc)."""
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2 ** 20)         # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 * 2 ** 20)        # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _failure(err: BaseException, src: str, t0: float) -> Dict:
    from ..fileio.safeio import name_file, one_line
    return {"status": "failed", "frames": 0, "seconds": round(time.perf_counter() - t0, 3),
            "reason": name_file(src, one_line(err))}


def read_checked(src, out: Path):
    """Check the output path, read the input and check that it can be written there and despeckled
    (the single-process CLI and every archive task alike); errors name the file."""
    from ..fileio.imageio import WRITABLE_SUFFIXES, check_output_format, read_frames
    from ..fileio.safeio import check_output_path
    from .inference import check_frames

    check_output_path(out, [src], suffixes=WRITABLE_SUFFIXES)
    data = read_frames(src)
    check_output_format(out, data)
    try:
        check_frames(data.frames)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{src}: {err}") from err
    return data


def despeckle_file(task: Dict, setup: Dict) -> Dict:
    """One input file on a worker: read, check, despeckle, write atomically. Never raises for a
    bad file: the result's ``status`` is "failed" with the one-line reason."""
    from ..fileio.imageio import write_like

    t0 = time.perf_counter()
    src, out = task["input"], Path(task["outputs"][0])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        data = read_checked(src, out)
        engine = _worker_engine(setup)
        with engine_lock(engine):           # as the single-process run: volumes in their acquisition plane
            result = _despeckle(engine, data, setup["options"])
        write_like(out, result, data, derivation=setup.get("derivation"))
        return {"status": "done", "frames": int(len(result)), "seconds": round(time.perf_counter() - t0, 3),
                "reason": None}
    except (Exception, MemoryError) as err:  # noqa: B014 - one bad file must not end the run
        return _failure(err, src, t0)


def _despeckle(engine, data, options: Dict):
    """What ``speckle2self denoise`` does with one file's frames (cli.denoise._denoise_file)."""
    try:
        from .volume_axes import despeckle_frames
    except ImportError:                     # a library without volume plane choice: frame by frame
        return engine.denoise(data.frames, **{k: v for k, v in options.items() if k != "slice_axis"})
    return despeckle_frames(engine, data, report=None, **options)


def frame_ranges(path, frames_per_task: Optional[int], slice_axis: str = "auto") -> Optional[List[tuple]]:
    """Frame ranges for a file worth splitting: a sequence (PLUS ``Seq_Frame`` fields) or a
    multi-frame DICOM with more than ``frames_per_task`` frames, found from its header alone
    (cheap, on the client). None: one task for the file (3D volumes too: their slicing plane is
    chosen from the whole volume)."""
    if not frames_per_task or slice_axis not in ("auto", "k"):
        return None
    from ..fileio.formats import DICOM_SUFFIXES, SITK_SUFFIXES, is_unnamed_dicom, suffix_of

    path = Path(path)
    count = 0
    try:
        if suffix_of(path) in SITK_SUFFIXES:
            import SimpleITK as sitk
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            if reader.GetDimension() == 3 and any(k.startswith("Seq_Frame") for k in reader.GetMetaDataKeys()):
                count = int(reader.GetSize()[2])
        elif suffix_of(path) in DICOM_SUFFIXES or is_unnamed_dicom(path):
            import pydicom
            count = int(pydicom.dcmread(str(path), stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
    except Exception:            # noqa: BLE001 - an unreadable header: the file's one task says why
        return None
    if count <= frames_per_task:
        return None
    return [(a, min(a + frames_per_task, count)) for a in range(0, count, frames_per_task)]


def despeckle_frames_range(task: Dict, setup: Dict, start: int, stop: int):
    """Frames ``start:stop`` of a sequence or multi-frame DICOM, despeckled at the working scale
    the whole stack resolves to (what the one-task run uses): an array, or {"reason": ...}."""
    from ..fileio.imageio import read_frames

    t0 = time.perf_counter()
    src = task["input"]
    try:
        data = read_frames(src)
        if data.kind not in ("sequence", "dicom"):
            raise ValueError(f"{src}: a {data.kind} is despeckled whole, not by frame ranges")
        engine = _worker_engine(setup)
        options = {k: v for k, v in setup["options"].items() if k != "slice_axis"}
        with engine_lock(engine):
            from .inference import check_frames
            options["working_scale"] = engine.resolve_working_scale(check_frames(data.frames),
                                                                    options.get("working_scale", "auto"))
            return engine.denoise(data.frames[start:stop], **options)
    except (Exception, MemoryError) as err:  # noqa: B014 - reported by the task that writes the file
        return _failure(err, src, t0)


class _Replay:
    """Stands in for the Despeckler when a split file is written: hands back the frames the range
    tasks despeckled, so the one-task path (volume_axes.despeckle_frames) writes the same header."""

    def __init__(self, result, metadata):
        self.result, self.metadata = result, metadata

    def denoise(self, frames, **_options):
        if frames.shape != self.result.shape:
            raise ValueError(f"frames of shape {frames.shape}, despeckled ranges of shape {self.result.shape}")
        return self.result


def write_from_ranges(task: Dict, setup: Dict, *parts) -> Dict:
    """The file of a split task, from its ranges' results: read the input (geometry, header),
    join the frames, write atomically. A failed range makes the file failed, with its reason."""
    import numpy as np

    from ..fileio.imageio import check_output_format, read_frames, write_like
    from ..fileio.safeio import check_output_path
    from ..fileio.formats import WRITABLE_SUFFIXES

    t0 = time.perf_counter()
    src, out = task["input"], Path(task["outputs"][0])
    for part in parts:
        if isinstance(part, dict):
            return {**part, "seconds": round(time.perf_counter() - t0, 3)}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        check_output_path(out, [src], suffixes=WRITABLE_SUFFIXES)
        data = read_frames(src)
        check_output_format(out, data)
        joined = np.concatenate(parts, axis=0)
        result = _despeckle(_Replay(joined, _worker_engine(setup).metadata), data, setup["options"])
        write_like(out, result, data, derivation=setup.get("derivation"))
        return {"status": "done", "frames": int(len(result)), "seconds": round(time.perf_counter() - t0, 3),
                "reason": None, "tasks": len(parts) + 1}
    except (Exception, MemoryError) as err:  # noqa: B014 - one bad file must not end the run
        return _failure(err, src, t0)


_LOCKS: Dict[int, threading.Lock] = {}


def engine_lock(engine) -> threading.Lock:
    """A Despeckler runs one call at a time: workers with several Dask threads take turns on it."""
    with _ENGINES_LOCK:
        return _LOCKS.setdefault(id(engine), threading.Lock())


# ----------------------------------------------------------------------------- DICOM derivation

def derivation_for(model_path, metadata: Dict, options: Dict, model_sha256: Optional[str] = None) -> Dict:
    """What derived DICOM outputs record about how they were made, and the key their new UIDs
    are derived from (model checksum + output options): every worker and every rerun gives the
    outputs of one input series the same new SeriesInstanceUID (fileio.imageio._write_dicom)."""
    from .models import file_sha256

    sha = model_sha256 or file_sha256(model_path)
    name = str(metadata.get("name") or Path(model_path).stem)
    chosen = {k: v for k, v in sorted(options.items()) if v is not None and k != "batch_size"}
    return {"key": sha + json.dumps(chosen, sort_keys=True, default=str),
            "model": name,
            "description": f"Despeckled by Speckle2Self, model {name} (sha256 {sha[:12]})"}


def denoise_setup(model: Optional[str], device: str, backend: str, options: Dict, threads: Optional[int]) -> Dict:
    """Everything a worker needs for :func:`despeckle_file`, checked on the client first: the
    model is loaded here once, so a bad model or option is one line before any task runs."""
    from .inference import Despeckler
    from .models import file_sha256, resolve_model_path

    path = resolve_model_path(model)
    engine = Despeckler.from_file(str(path), "cpu", "fp32")
    engine.check_output_options(options.get("grey_levels", "auto"), options.get("refine", "auto"))
    sha = file_sha256(path)
    return {"model": str(Path(path).resolve()), "model_sha256": sha, "device": device, "backend": backend,
            "threads": threads, "options": options, "derivation": derivation_for(path, engine.metadata, options, sha)}


def options_record(options: Dict) -> Dict:
    """The options as the manifest stores them (JSON round trip, so reruns compare equal)."""
    return json.loads(json.dumps({k: options[k] for k in sorted(options) if k != "batch_size"}, default=str))


#: Frames per task of a long sequence or multi-frame DICOM (``--frames-per-task``).
FRAMES_PER_TASK = 200


def run_denoise_archive(pairs, out_dir, model: Optional[str], device: str, backend: str, options: Dict,
                        workers: Optional[int] = None, scheduler: Optional[str] = None,
                        threads: Optional[int] = None, progress: bool = True,
                        frames_per_task: Optional[int] = FRAMES_PER_TASK) -> Summary:
    """Despeckle ``pairs`` of (input, output) paths on Dask; the manifest lives in ``out_dir``."""
    require_distributed()
    if workers and threads is None:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
    setup = denoise_setup(model, device, backend, options, threads)
    manifest = Manifest(Path(out_dir) / MANIFEST_NAME)
    opts = options_record(options)
    tasks = []
    for src, out in pairs:
        src = str(Path(src).resolve())
        chunks = frame_ranges(src, frames_per_task, options.get("slice_axis", "auto"))
        tasks.append(Task(src, [str(Path(out).resolve())],
                          {**fingerprint(src), "model_sha256": setup["model_sha256"], "options": opts},
                          {"chunks": chunks} if chunks else {}))
    return run_tasks(lambda: dask_client(workers, scheduler), tasks, despeckle_file, setup, manifest, progress,
                     split=(despeckle_frames_range, write_from_ranges))


def print_summary(summary: Summary, what: str = "despeckled") -> None:
    for reason in summary.failed:
        print(f"error: {reason}", file=sys.stderr)
    print(summary.line(), file=sys.stderr if summary.failed else sys.stdout)


_SHA_CACHE: Dict = {}


def dicom_derivation(engine, options: Dict, out) -> Optional[Dict]:
    """:func:`derivation_for` a loaded Despeckler, for a DICOM output (None for other formats);
    the model's checksum is computed once per file version."""
    from ..fileio.imageio import DICOM_SUFFIXES

    if not str(out).lower().endswith(DICOM_SUFFIXES):
        return None
    path = Path(engine.loaded.path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        from .models import file_sha256
        _SHA_CACHE[key] = file_sha256(path)
    return derivation_for(path, engine.metadata, options, _SHA_CACHE[key])


def check_archive_options(args, folder_run: bool) -> None:
    """``--workers`` / ``--scheduler``: a one-line error, before anything is read or computed."""
    require_distributed()
    if args.workers and args.scheduler:
        raise ValueError("give --workers (a new Dask cluster on this machine) or --scheduler (a running one), not both")
    if not folder_run:
        raise ValueError(f"--workers / --scheduler despeckle a folder; {args.input} is a file (leave them out "
                         "to despeckle one file)")
    if getattr(args, "skip_existing", False):
        raise ValueError("--skip-existing is implied on Dask: the manifest in the output folder says what is done "
                         "(a changed input or model is redone); leave it out")

"""Archive runs on Dask (``speckle2self denoise IN OUT --workers N | --scheduler ADDR``).

Real clusters only: a ``LocalCluster`` of worker processes started by the command, and a
``dask scheduler`` + ``dask worker`` started here as separate processes (loopback addresses).
The archive mixes PNGs, NRRD/MHA sequences, a multi-frame DICOM, a two-file single-frame DICOM
series and bad files; every run is compared with the single-process folder run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("distributed", reason="dask.distributed is not installed (pip install \"speckle2self[archive]\")")

from Speckle2SelfLib.cli.main import main  # noqa: E402
from Speckle2SelfLib.engine.archive import MANIFEST_NAME, Manifest, model_loads  # noqa: E402
from Speckle2SelfLib.fileio.imageio import read_frames  # noqa: E402
from Speckle2SelfLib.fileio.safeio import PARTIAL_MARK  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BAD = ("bad_truncated.png", "bad_text.nrrd", "bad_empty.dcm")
SERIES_UID = "1.2.826.0.1.3680043.8.498.1111"


def _speckle(rng, n, size=48):
    base = np.linspace(40, 200, size)[None, None, :] * np.ones((n, size, 1))
    return np.clip(base * rng.rayleigh(0.8, (n, size, size)), 0, 255).astype(np.uint8)


def _dicom(path: Path, frames: np.ndarray, series_uid: str, sop_uid: str, number: int) -> None:
    """An uncompressed ultrasound DICOM (US Multi-frame Image or US Image Storage)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1" if len(frames) > 1 else "1.2.840.10008.5.1.4.1.1.6.1"
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, sop_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Archive", "S2S-1", "", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1", series_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "120000", "1", "", ""
    ds.Modality, ds.ConversionType, ds.SeriesNumber, ds.InstanceNumber = "US", "WSD", 1, number
    ds.PatientOrientation = ""
    ds.SeriesDescription = "carotid"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = frames.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.PixelData = frames.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def make_archive(root: Path) -> Path:
    """A mixed archive with sub-folders; returns its folder."""
    import SimpleITK as sitk
    from PIL import Image

    rng = np.random.default_rng(0)
    src = root / "archive"
    (src / "pictures").mkdir(parents=True)
    (src / "cine").mkdir()
    (src / "dicom" / "series").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(_speckle(rng, 1)[0]).save(src / "pictures" / f"scan{k}.png")
    seq = sitk.GetImageFromArray(_speckle(rng, 4))
    seq.SetSpacing((0.2, 0.2, 1.0))
    sitk.WriteImage(seq, str(src / "cine" / "loop.nrrd"), useCompression=True)
    sitk.WriteImage(sitk.GetImageFromArray(_speckle(rng, 3)), str(src / "cine" / "loop.mha"))
    plus = sitk.GetImageFromArray(_speckle(rng, 5))     # a PLUS sequence: split by frame ranges on Dask
    for k in range(5):
        plus.SetMetaData(f"Seq_Frame{k:04d}_Timestamp", f"{0.05 * k:.3f}")
    plus.SetMetaData("UltrasoundImageOrientation", "MF")
    sitk.WriteImage(plus, str(src / "cine" / "probe.igs.mha"))
    _dicom(src / "dicom" / "multi.dcm", _speckle(rng, 3), "1.2.826.0.1.3680043.8.498.2222",
           "1.2.826.0.1.3680043.8.498.2222.1", 1)
    for k in range(2):      # one series, one file per frame (IM000k without an extension, as exports name them)
        _dicom(src / "dicom" / "series" / f"IM000{k}", _speckle(rng, 1), SERIES_UID, f"{SERIES_UID}.{k + 1}", k + 1)
    png = (src / "pictures" / "scan0.png").read_bytes()
    (src / "pictures" / BAD[0]).write_bytes(png[: len(png) // 2])
    (src / "cine" / BAD[1]).write_text("not an image\n")
    (src / "dicom" / BAD[2]).write_bytes(b"")
    return src


GOOD = 9     # readable files in the archive (3 PNG, NRRD, MHA, PLUS sequence, multi-frame DICOM, 2 series files)


@pytest.fixture(scope="module")
def archive(tmp_path_factory, untrained_model):
    """The archive, and the single-process folder run's outputs (the reference)."""
    root = tmp_path_factory.mktemp("archive")
    src = make_archive(root)
    ref = root / "reference"
    code = main(["denoise", str(src), str(ref), "--model", str(untrained_model), "--working-scale", "off"])
    assert code == 1                           # the bad files fail, the rest is written
    return src, ref, untrained_model


def _outputs(folder: Path) -> dict:
    return {p.relative_to(folder): p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME}


def _leftovers(folder: Path) -> list:
    return [p for p in folder.rglob("*") if PARTIAL_MARK in p.name]


def _assert_same_as_reference(out: Path, ref: Path) -> None:
    expected, got = _outputs(ref), _outputs(out)
    assert sorted(got) == sorted(expected) and len(got) == GOOD
    for rel, path in expected.items():
        a, b = read_frames(path).frames.astype(int), read_frames(got[rel]).frames.astype(int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1, rel
    assert not _leftovers(out)


def _manifest(out: Path) -> dict:
    return Manifest(out / MANIFEST_NAME).entries


def _run(args, **kw):
    """The command line in its own process (its own session: a SIGKILL of the group kills the run)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "Speckle2Self"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "Speckle2SelfLib.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _wait_for_lines(manifest: Path, count: int, proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if manifest.is_file() and len(manifest.read_text().splitlines()) >= count:
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended before {count} results: {proc.communicate()}")
        time.sleep(0.01)
    raise AssertionError(f"no {count} results within {timeout} s")


def test_local_cluster_matches_single_process_and_resumes(archive, tmp_path, capsys):
    src, ref, model = archive
    out = tmp_path / "out"
    args = ["denoise", str(src), str(out), "--model", str(model), "--working-scale", "off", "--workers", "2",
            "--frames-per-task", "2"]
    assert main(args) == 1                      # bad files listed, the run went on
    text = capsys.readouterr()
    _assert_same_as_reference(out, ref)
    entries = _manifest(out)
    failed = {Path(k).name: e for k, e in entries.items() if e["status"] == "failed"}
    assert sorted(failed) == sorted(BAD)
    assert all(e["reason"] and "\n" not in e["reason"] and Path(k).name in e["reason"] for k, e in failed.items())
    for name in BAD:
        assert name in text.err
    assert "12 file(s): 9 done now" in text.out + text.err and "frames/s" in text.out + text.err
    done = [e for e in entries.values() if e["status"] == "done"]
    assert len(done) == GOOD and sum(e["frames"] for e in done) == 3 + 4 + 3 + 5 + 3 + 2
    split = {Path(e["input"]).name: e.get("tasks") for e in done if e.get("tasks")}
    assert split == {"probe.igs.mha": 3 + 1, "multi.dcm": 2 + 1}     # frame ranges, then the file written
    import SimpleITK as sitk
    mine, theirs = (sitk.ReadImage(str(f / "cine" / "probe.igs.mha")) for f in (out, ref))
    assert {k: mine.GetMetaData(k) for k in mine.GetMetaDataKeys()} == \
        {k: theirs.GetMetaData(k) for k in theirs.GetMetaDataKeys()}          # the same header, Seq_Frame fields kept
    assert mine.HasMetaDataKey("Seq_Frame0004_Timestamp")
    assert all({"size", "mtime_ns", "model_sha256", "seconds", "output"} <= set(e) for e in done)

    # A rerun does no work; a changed input is redone, and only it.
    assert main(args) == 1
    assert "0 done now, 12 settled" in capsys.readouterr().err
    changed = src / "pictures" / "scan1.png"
    before = changed.read_bytes()
    try:
        from PIL import Image
        Image.fromarray(_speckle(np.random.default_rng(5), 1)[0]).save(changed)
        assert main(args) == 1
        assert "1 done now, 11 settled" in capsys.readouterr().err
    finally:
        changed.write_bytes(before)
        os.utime(changed, ns=(time.time_ns(), time.time_ns()))
    # Another model, or other output options, and a done file is work again.
    manifest = Manifest(out / MANIFEST_NAME)
    key, entry = next((k, e) for k, e in manifest.entries.items() if e["status"] == "done")
    expected = {f: entry[f] for f in ("size", "mtime_ns", "model_sha256", "options")}
    assert manifest.settled(key, expected) is not None
    assert manifest.settled(key, {**expected, "model_sha256": "0" * 64}) is None
    assert manifest.settled(key, {**expected, "options": {**entry["options"], "blend": 0.5}}) is None
    # The DICOM outputs of one input series share one new series UID, the same as the single-process run's.
    _check_dicom_series(out, ref)


def _check_dicom_series(out: Path, ref: Path) -> None:
    import pydicom

    series = [pydicom.dcmread(out / "dicom" / "series" / f"IM000{k}.dcm") for k in range(2)]
    again = [pydicom.dcmread(ref / "dicom" / "series" / f"IM000{k}.dcm") for k in range(2)]
    uids = {ds.SeriesInstanceUID for ds in series + again}
    assert len(uids) == 1 and SERIES_UID not in uids          # one new series, the same from every run
    assert [ds.SOPInstanceUID for ds in series] == [ds.SOPInstanceUID for ds in again]
    assert len({ds.SOPInstanceUID for ds in series}) == 2
    multi = pydicom.dcmread(out / "dicom" / "multi.dcm")
    assert multi.SeriesInstanceUID not in uids and int(multi.NumberOfFrames) == 3
    for ds in series + [multi]:
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "untrained-test" in ds.DerivationDescription and "untrained-test" in ds.SeriesDescription
        assert ds.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.1"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (Debian package dicom3tools) is not installed: apt-get install dicom3tools")
def test_derived_dicom_passes_dciodvfy(archive):
    """The validator finds no error in a written file that it does not find in its input."""
    src, ref, _model = archive

    def errors(path):
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        return {line.split(" - ", 1)[-1] for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")}

    for rel in ("dicom/multi.dcm", "dicom/series/IM0000"):
        written = ref / (rel if rel.endswith(".dcm") else rel + ".dcm")
        new = errors(written) - errors(src / rel)
        assert not new, (rel, new)


def test_real_ultrasound_dicom_passes_dciodvfy(tmp_path, untrained_model):
    """A scanner's RGB ultrasound file (pydicom-data), despeckled to grey: no new validator error."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed: apt-get install dicom3tools")
    data = pytest.importorskip("pydicom.data")
    try:
        src = Path(data.get_testdata_file("US1_UNCR.dcm", download=False) or "")
    except Exception:                           # noqa: BLE001 - the data package is absent
        src = Path("")
    if not src.is_file():
        pytest.skip("pydicom-data's US1_UNCR.dcm is not installed (pip install pydicom-data)")
    out = tmp_path / "out.dcm"
    assert main(["denoise", str(src), str(out), "--model", str(untrained_model), "--working-scale", "off"]) == 0

    def errors(path):
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        return {line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")}

    assert not errors(out) - errors(src)


def test_separate_scheduler_and_workers_survive_a_killed_worker(archive, tmp_path):
    """``dask scheduler`` and two ``dask worker`` processes; one worker is SIGKILLed mid-archive."""
    from distributed import Client

    src, ref, model = archive
    big = tmp_path / "big"
    shutil.copytree(src, big)
    for k in range(3, 11):       # more files, so that the kill lands mid-archive
        shutil.copy(src / "pictures" / "scan0.png", big / "pictures" / f"copy{k}.png")
    scheduler_file = tmp_path / "scheduler.json"
    env = dict(os.environ, PYTHONPATH=str(REPO / "Speckle2Self"), OMP_NUM_THREADS="1")
    dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
    procs = [subprocess.Popen(dask + ["--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                      "--scheduler-file", str(scheduler_file)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 30
        while not scheduler_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(2):
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                           str(scheduler_file), "--nthreads", "1", "--host", "127.0.0.1",
                                           "--no-dashboard"], env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with Client(scheduler_file=str(scheduler_file), timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            out = tmp_path / "out"
            run = _run(["denoise", big, out, "--model", model, "--working-scale", "off",
                        "--scheduler", scheduler_file])
            _wait_for_lines(out / MANIFEST_NAME, 6, run)
            pids = client.run(os.getpid)
            os.kill(next(iter(pids.values())), signal.SIGKILL)
            stdout, stderr = run.communicate(timeout=120)
            loads = client.run(model_loads)
        assert loads and all(n <= 1 for n in loads.values()), loads      # the model once per worker process
        assert run.returncode == 1, stderr
        entries = _manifest(out)
        assert sum(e["status"] == "done" for e in entries.values()) == GOOD + 8, stderr
        assert not _leftovers(out)
        assert sorted(Path(k).name for k, e in entries.items() if e["status"] == "failed") == sorted(BAD)
        for rel, path in _outputs(ref).items():         # the single-process run's outputs, within 1 grey level
            a, b = read_frames(path).frames.astype(int), read_frames(out / rel).frames.astype(int)
            assert a.shape == b.shape and np.abs(a - b).max() <= 1, rel
        copies = sorted((out / "pictures").glob("copy*.png"))
        assert len(copies) == 8
        for path in copies:
            assert read_frames(path).frames.shape == (1, 48, 48)
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_whole_run_killed_then_rerun_finishes(archive, tmp_path):
    """SIGKILL of the command and its LocalCluster mid-archive; the rerun finishes; one more does nothing."""
    src, ref, model = archive
    big = tmp_path / "big"
    shutil.copytree(src, big)
    for k in range(3, 11):
        shutil.copy(src / "pictures" / "scan1.png", big / "pictures" / f"copy{k}.png")
    out = tmp_path / "out"
    args = ["denoise", big, out, "--model", model, "--working-scale", "off", "--workers", "2"]
    run = _run(args, start_new_session=True)
    try:
        _wait_for_lines(out / MANIFEST_NAME, 5, run)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.communicate(timeout=30)
    before = len(_manifest(out))
    assert 5 <= before < GOOD + 8 + len(BAD)
    for path in _outputs(out).values():
        if PARTIAL_MARK not in str(path):
            read_frames(path)                   # whatever is there under an output's name is whole
    assert main([str(a) for a in args]) == 1
    entries = _manifest(out)
    assert sum(e["status"] == "done" for e in entries.values()) == GOOD + 8
    assert not _leftovers(out)
    for rel, path in _outputs(ref).items():
        a, b = read_frames(path).frames.astype(int), read_frames(out / rel).frames.astype(int)
        assert np.abs(a - b).max() <= 1
    lines = len((out / MANIFEST_NAME).read_text().splitlines())
    assert main([str(a) for a in args]) == 1     # no work: nothing submitted, nothing appended
    assert len((out / MANIFEST_NAME).read_text().splitlines()) == lines


def test_without_dask_one_line_names_the_install(monkeypatch, tmp_path, capsys, archive):
    src, _ref, model = archive
    monkeypatch.setitem(sys.modules, "distributed", None)
    out = tmp_path / "out"
    assert main(["denoise", str(src), str(out), "--model", str(model), "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install "speckle2self[archive]"' in err[0]
    assert not out.exists()


def test_archive_option_errors_before_any_work(tmp_path, capsys, archive):
    src, _ref, model = archive
    one = src / "pictures" / "scan0.png"
    assert main(["denoise", str(one), str(tmp_path / "o.png"), "--workers", "2"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["denoise", str(src), str(tmp_path / "o"), "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["denoise", str(src), str(tmp_path / "o"), "--scheduler", "tcp://127.0.0.1:9", "--model",
                 str(model)]) == 2
    assert "cannot reach the Dask scheduler" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _lumen_frames(n: int, size: int = 96, seed: int = 0) -> np.ndarray:
    """Bright speckled tissue around a dark disk of radius 20 px (the lumen), moving 1 px a frame."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    frames = []
    for k in range(n):
        disk = (rows - size / 2) ** 2 + (cols - size / 2 - k) ** 2 < 20 ** 2
        tissue = 150 * rng.rayleigh(0.8, (size, size)) / 1.0
        frames.append(np.clip(np.where(disk, 8 + 4 * rng.random((size, size)), tissue), 0, 255).astype(np.uint8))
    return np.stack(frames)


def test_batch_lumen_measurement_on_dask_and_resume(tmp_path, capsys):
    import csv

    import SimpleITK as sitk
    from PIL import Image

    src = tmp_path / "scans"
    src.mkdir()
    Image.fromarray(_lumen_frames(1)[0]).save(src / "one.png")
    sitk.WriteImage(sitk.GetImageFromArray(_lumen_frames(3, seed=1)), str(src / "cine.nrrd"))
    (src / "bad.png").write_bytes((src / "one.png").read_bytes()[:200])
    seeds = tmp_path / "seeds.csv"
    seeds.write_text("file,x,y,frame\none.png,48,48,\ncine.nrrd,48,48,\nbad.png,48,48,\nmissing.png,5,5,\n")
    table, here = tmp_path / "lumen.csv", tmp_path / "lumen_here.csv"
    common = ["--seeds", str(seeds), "--no-despeckle"]
    assert main(["segment", str(src), *common, "--table", str(here)]) == 1         # in this process
    assert main(["segment", str(src), *common, "--table", str(table), "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert "bad.png" in err and "missing.png" in err
    rows = list(csv.DictReader(open(table)))
    assert rows == list(csv.DictReader(open(here)))         # Dask or not, the same table
    assert [(r["file"], r["frame"]) for r in rows] == [("cine.nrrd", "0"), ("cine.nrrd", "1"), ("cine.nrrd", "2"),
                                                       ("one.png", "0")]
    for row in rows:
        assert abs(float(row["area"]) - np.pi * 400) < 0.25 * np.pi * 400, row     # the boundary sits on the wall
        assert abs(float(row["equivalent_diameter"]) - 40) < 5 and row["flagged"] == "False"
    assert rows[-1]["area_unit"] == "px2" and rows[0]["area_unit"] == "mm2"    # NRRD has a spacing, PNG none
    manifest = tmp_path / "lumen.csv.manifest.jsonl"
    lines = manifest.read_text()
    assert main(["segment", str(src), *common, "--table", str(table), "--workers", "2"]) == 1
    assert manifest.read_text() == lines and "0 done now, 4 settled" in capsys.readouterr().err   # no work
    seeds.write_text("file,x,y,frame\none.png,48,48,\ncine.nrrd,50,48,1\nbad.png,48,48,\nmissing.png,5,5,\n")
    assert main(["segment", str(src), *common, "--table", str(table), "--workers", "1"]) == 1
    assert "1 done now, 3 settled" in capsys.readouterr().err     # only the file whose seed changed
    rows = list(csv.DictReader(open(table)))
    assert [(r["file"], r["frame"]) for r in rows] == [("cine.nrrd", "1"), ("one.png", "0")]


def test_batch_lumen_bad_seeds_file_is_one_line_before_any_work(tmp_path, capsys):
    src = tmp_path / "scans"
    src.mkdir()
    seeds = tmp_path / "seeds.csv"
    seeds.write_text("file,x,y\na.png,1,oops\n")
    assert main(["segment", str(src), "--seeds", str(seeds), "--table", str(tmp_path / "t.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2" in err[0] and not (tmp_path / "t.csv").exists()

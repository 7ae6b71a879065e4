"""DICOM network ingestion: how fast the C-STORE SCP takes radiographs in, against the
disk it writes to, and how soon a received image is segmented.

1. **Storage.** ``chexmask listen --dicom-port --dicom-processes N`` runs as its
   own processes (the scaled-out listener: embedded broker, no worker running, so
   this is storage and queueing only; ``--processes``, default 2, one a core).
   N synthetic CR instances of 6-10 MB (uint16 MONOCHROME2, explicit VR little
   endian, each different) are sent over loopback, in one association and then
   in several in parallel, and timed from the first C-STORE to the last
   acknowledgement. The senders are dcmtk's ``storescu``, one process per
   association, where it is installed (a C sender, as PACS and modalities are:
   the machine's cores go to the SCP, not to the sender), else pynetdicom SCUs,
   also one process each (``--sender``). Every instance is written to the store
   (and fsynced) before its acknowledgement. In the same run the disk's own
   sequential write speed is measured: one file of the same total size written
   and fsynced in 8 MiB chunks in the same folder. The SCP's MB/s is reported as
   a share of it.
2. **Latency.** ``chexmask serve --dicom-port`` (embedded: the model loaded, CPU,
   nothing else queued) receives real chest radiographs one at a time; for each,
   the seconds from the C-STORE acknowledgement until its segmentation is in the
   index, and until its DICOM SEG is, where segmentations carry one
   (``object_keys["seg"]``). The first image pays torch's warm-up; the median is
   over the others.

Usage: ``python -m benchmarks.bench_dicom [--instances N] [--processes N] [--sender storescu|pynetdicom]
[--latency-images N] [--weights FILE]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

SHARED_SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "samples"
CHUNK = 8 << 20
SEG_WAIT_S = 10.0


def synthetic_cr(index: int, rng: np.random.Generator) -> Dataset:
    """A CR instance of 1800-2240 px a side (6.5-10 MB of 16-bit pixels), unique content."""
    side = 1800 + (index * 37) % 440
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName = f"BENCH{index:04d}", "Bench^Synthetic"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.integers(0, 4096, (side, side), dtype=np.uint16).tobytes()
    return ds


def scu(port: int, *contexts: tuple[str, str]) -> Association:
    ae = AE(ae_title="BENCH_SCU")
    ae.maximum_pdu_size = 0  # no limit of our own: the SCP's decides
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="CHEXMASK")
    if not assoc.is_established:
        raise SystemExit(f"no association with the SCP on port {port}")
    return assoc


def start(args: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, int]:
    """A chexmask command in its own process; its DICOM port once it says it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "chexmask.app.cli", *args], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    wait(lambda: "receiving DICOM on port" in log.read_text() or process.poll() is not None, 600)
    match = re.search(r"receiving DICOM on port (\d+)", log.read_text())
    if not match:
        raise SystemExit(f"{args[0]} did not start:\n{log.read_text()[-3000:]}")
    return process, int(match[1])


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(60)


def wait(predicate: Callable[[], object], timeout: float, tick: float = 0.02) -> object:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError("timed out")
        time.sleep(tick)
    return value


def disk_write_mb_s(folder: Path, total: int) -> float:
    """Sequential write of ``total`` bytes in 8 MiB chunks, fsynced, as MB/s."""
    block = np.random.default_rng(1).integers(0, 255, CHUNK, dtype=np.uint8).tobytes()
    path = folder / "disk-speed.bin"
    started = time.perf_counter()
    with path.open("wb") as f:
        for offset in range(0, total, CHUNK):
            f.write(block[: min(CHUNK, total - offset)])
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return total / seconds / 1e6


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) of a running process and its child
    processes (the other listener processes), from /proc."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid_and_name, fields = stat.read_text().rsplit(")", 1)
        except OSError:  # ended meanwhile
            continue
        values = fields.split()
        if int(pid_and_name.split(" (")[0]) == pid or int(values[1]) == pid:  # itself, or its parent is
            total += (int(values[11]) + int(values[12])) / os.sysconf("SC_CLK_TCK")
    return total


# What the sending processes send: set before they are forked, so each inherits the
# datasets instead of receiving a pickled copy.
_TO_SEND: list[list[Dataset]] = []


def _send_part(port: int, part: int) -> list[int]:
    assoc = scu(port, (ComputedRadiographyImageStorage, ExplicitVRLittleEndian))
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in _TO_SEND[part]]
    finally:
        assoc.release()


def send_with_storescu(port: int, paths: list[Path], associations: int) -> tuple[list[int], float]:
    """dcmtk's storescu, one process per association; a failed store fails the process
    (status 1 for each of its files)."""
    started = time.perf_counter()
    senders = [
        subprocess.Popen(
            ["storescu", "-aec", "CHEXMASK", "127.0.0.1", str(port), *map(str, paths[i::associations])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for i in range(associations)
    ]
    codes = [sender.wait() for sender in senders]
    seconds = time.perf_counter() - started
    return [int(code != 0) for i, code in enumerate(codes) for _ in paths[i::associations]], seconds


def send_all(port: int, datasets: list[Dataset], associations: int) -> tuple[list[int], float]:
    """C-STORE the datasets over ``associations`` parallel associations (a PACS sends
    over several), each from its own process as separate senders are (threads of one
    process would share its interpreter lock, and the sender would pace the SCP);
    their statuses and the seconds from the first association to the last release."""
    global _TO_SEND
    _TO_SEND = [datasets[i::associations] for i in range(associations)]
    with multiprocessing.get_context("fork").Pool(associations) as pool:
        started = time.perf_counter()
        parts = pool.starmap(_send_part, [(port, i) for i in range(associations)])
        seconds = time.perf_counter() - started
    return [status for part in parts for status in part], seconds


def bench_storage(
    instances: int, associations: int, sender: str, processes: int, work: Path, env: dict[str, str]
) -> dict[str, float]:
    rng = np.random.default_rng(associations)
    datasets = [synthetic_cr(i, rng) for i in range(instances)]
    total = sum(len(ds.PixelData) for ds in datasets)
    paths = []
    if sender == "storescu":
        for i, ds in enumerate(datasets):
            paths.append(work / f"send-{associations}-{i:04d}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
    command = ["listen", "--dicom-port", "0", "--dicom-processes", str(processes)]
    listener, port = start(command, env, work / f"listen-{associations}.log")
    try:
        cpu = cpu_seconds(listener.pid)
        if sender == "storescu":
            statuses, seconds = send_with_storescu(port, paths, associations)
        else:
            statuses, seconds = send_all(port, datasets, associations)
        cpu = cpu_seconds(listener.pid) - cpu
    finally:
        stop(listener)
    if any(statuses):
        log = (work / f"listen-{associations}.log").read_text()
        first_error = log[max(log.find(" ERROR "), 0) :]
        raise SystemExit(f"C-STORE failed: statuses {sorted(set(statuses))}; the listener's log:\n{first_error[:4000]}")
    return {
        "associations": associations,
        "instances": instances,
        "mb": total / 1e6,
        "per_s": instances / seconds,
        "mb_s": total / seconds / 1e6,
        "scp_cpu_ms": cpu / instances * 1e3,
        "disk_mb_s": disk_write_mb_s(work, total),
    }


def latency_images(count: int) -> list[Path]:
    """Real chest radiographs to push: ../shared samples, else pydicom-data's CR."""
    names = ["sitk_cxr_JPEGLS.dcm", "siim_cr_jpeg_baseline_mono2.dcm", "sitk_cxr_RLE.dcm", "sitk_cxr_ExplicitLE.dcm"]
    found = [SHARED_SAMPLES / n for n in names if (SHARED_SAMPLES / n).is_file()]
    if len(found) < count:
        from pydicom.data import get_testdata_file

        found += [Path(p) for n in ("RG1_UNCR.dcm", "RG1_J2KR.dcm") if (p := get_testdata_file(n, download=False))]
    return found[:count]


def bench_latency(count: int, work: Path, env: dict[str, str]) -> list[tuple[str, float, float | None]]:
    """(image, seconds to the segmentation in the index, seconds to the SEG or None)."""
    import pydicom

    from chexmask.storage.index import MaskIndex
    from chexmask.storage.models import Segmentation

    home = Path(env["CHEXMASK_HOME"])
    log = work / "serve.log"
    server, port = start(["serve", "--inbox", str(work / "inbox"), "--dicom-port", "0"], env, log)
    results = []
    makes_seg: bool | None = None
    index = MaskIndex(f"sqlite:///{home / 'index.db'}")
    try:
        model = re.search(r"^model (\S+);", log.read_text(), re.M)
        assert model, log.read_text()
        for path in latency_images(count):
            ds = pydicom.dcmread(path)
            assoc = scu(port, (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID))
            try:
                status = int(assoc.send_c_store(ds).Status)
                acknowledged = time.perf_counter()
            finally:
                assoc.release()
            if status:
                raise SystemExit(f"C-STORE of {path.name} failed: 0x{status:04X}")

            def segmentation(uid: str = ds.SOPInstanceUID, model_version: str = model[1]) -> Segmentation | None:
                images = [i for i in index.images(limit=1000) if i.dataset_image_id == uid and i.sha256]
                return index.segmentation_for(images[0].sha256, model_version) if images else None

            wait(segmentation, 300)
            to_index = time.perf_counter() - acknowledged
            # The SEG, where this build makes one: with the other artefacts or soon after.
            # Once an image has none after SEG_WAIT_S, none is expected for the others.
            to_seg = None
            if makes_seg is not False:
                try:
                    wait(lambda: "seg" in getattr(segmentation(), "object_keys", {}), SEG_WAIT_S)
                    to_seg, makes_seg = time.perf_counter() - acknowledged, True
                except TimeoutError:
                    makes_seg = makes_seg or False
            results.append((path.name, to_index, to_seg))
    finally:
        index.close()
        stop(server)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=24)
    parser.add_argument("--associations", type=int, default=4, help="parallel associations of the second run")
    parser.add_argument("--latency-images", type=int, default=4)
    parser.add_argument("--weights", help="checkpoint for the latency run (default: the bundled model)")
    parser.add_argument(
        "--sender",
        choices=("storescu", "pynetdicom"),
        default="storescu" if shutil.which("storescu") else "pynetdicom",
        help="what sends: dcmtk's storescu (default where installed) or pynetdicom SCUs",
    )
    parser.add_argument("--processes", type=int, default=2, help="listener processes sharing the port")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-dicom-", dir=".") as tmp:
        work = Path(tmp)
        base = {k: v for k, v in os.environ.items() if not k.startswith("CHEXMASK_")}
        storage = [
            bench_storage(
                args.instances,
                n,
                args.sender,
                args.processes,
                work,
                {**base, "CHEXMASK_HOME": str(work / f"listen-{n}"), "PYTHONUNBUFFERED": "1"},
            )
            for n in (1, args.associations)
        ]
        serve_env = {**base, "CHEXMASK_HOME": str(work / "serve-home"), "PYTHONUNBUFFERED": "1"}
        if args.weights:
            serve_env["CHEXMASK_WEIGHTS"] = args.weights
        latency = bench_latency(args.latency_images, work, serve_env)

    print(
        f"\nSCP storage: {args.instances} synthetic CR instances of 6-10 MB ({storage[0]['mb']:.0f} MB), loopback, "
        f"sent by {args.sender}, {args.processes} listener process(es)"
    )
    print(f"{'associations':>12}{'instances/s':>13}{'MB/s':>8}{'disk MB/s':>11}{'SCP/disk':>10}{'SCP CPU ms/inst':>17}")
    for run in storage:
        print(
            f"{run['associations']:>12}{run['per_s']:13.1f}{run['mb_s']:8.0f}{run['disk_mb_s']:11.0f}"
            f"{run['mb_s'] / run['disk_mb_s']:10.2f}{run['scp_cpu_ms']:17.0f}"
        )
    print("(disk: sequential write + fsync of the same total size, same folder, same run)")
    print("\nC-STORE acknowledgement to ... (embedded serve, idle CPU worker)")
    print(f"{'image':36}{'segmentation (s)':>18}{'SEG (s)':>10}")
    for name, to_index, to_seg in latency:
        print(f"{name:36}{to_index:18.2f}{'n/a' if to_seg is None else f'{to_seg:.2f}':>10}")
    warm = [t for _, t, _ in latency[1:]] or [latency[0][1]]
    print(f"{'median after the first':36}{statistics.median(warm):18.2f}")


if __name__ == "__main__":
    main()

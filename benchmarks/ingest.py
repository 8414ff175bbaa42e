"""Ingest speed: a real CT series (>= 200 slices) sent by DCMTK storescu to (a) DCMTK storescp writing files
and (b) radai's storage SCP writing its durable spool (fsync + atomic rename per instance), alternating, in
the same run; with 1 sender and with 4 concurrent senders. A third receiver row, "spool only", writes the
same files through radai's durable spool with no network at all: the floor under any receiver on this disk
that acknowledges an instance only once it is durable.

    python -m benchmarks.ingest [--repeats 3] [--slices 205] [--senders 1,4]

The series is made from the real CRLM-CT-1004 slices (../shared, CC BY 4.0) repeated along z under new UIDs
and positions until it has --slices instances. Both DCMTK peers are tuned as DESIGN.md asks (TCP_NODELAY=1,
--max-pdu 131072); storescp runs with --fork so that concurrent senders are served concurrently, as an
administrator would run it. radai's SCP runs in its own process (`python -m benchmarks.ingest --serve`).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid

from benchmarks.common import RESULTS, machine_basics, write_results
from tests.dicom_router.peers import DCMTK_ENV, MAX_PDU, dcmtk_storescp, echoscu, free_port, stop_process
from tests.e2e.peers import CRLM, wait_for

SOURCE = CRLM / "CRLM-CT-1004" / "image"


def make_series(dst: Path, slices: int) -> int:
    """`slices` instances of one new study/series from the real slices; returns the total bytes."""
    dst.mkdir(parents=True)
    sources = sorted(SOURCE.glob("*.dcm"))
    study, series = generate_uid(), generate_uid()
    total = 0
    for i in range(slices):
        ds = pydicom.dcmread(sources[i % len(sources)])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        z = float(ds.ImagePositionPatient[2])
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], z - 5.0 * i]
        path = dst / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def send(port: int, folder: Path, senders: int) -> float:
    """Split the folder's files over `senders` concurrent storescu processes; return the wall time."""
    files = sorted(folder.glob("*.dcm"))
    parts = [files[i::senders] for i in range(senders)]
    codes: list[int] = []

    def one(part: list[Path]) -> None:
        args = ["storescu", "-aec", "RADAI", "--max-pdu", MAX_PDU, "127.0.0.1", str(port), *map(str, part)]
        codes.append(subprocess.run(args, env=DCMTK_ENV, capture_output=True, timeout=600).returncode)

    threads = [threading.Thread(target=one, args=(p,)) for p in parts]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if any(codes):
        raise RuntimeError(f"storescu failed: exit codes {codes}")
    return elapsed


def serve(port: int, spool: Path) -> None:
    """radai's storage SCP and durable spool, nothing else (the --serve mode of this script)."""
    from dicom_router.scp import StoreSCP
    from dicom_router.spool import Spool

    scp = StoreSCP("RADAI", "127.0.0.1", port, Spool(spool), on_instance=lambda _h: None)
    scp.start()
    try:
        threading.Event().wait()
    finally:
        scp.stop()


def spool_floor(folder: Path, spool_dir: Path) -> float:
    """The same files written through radai's durable spool alone, in one thread, no network: the floor
    under any single-association receiver that acknowledges only durable instances on this disk."""
    from dicom_router.spool import Spool

    payloads = [(p.name, p.read_bytes()) for p in sorted(folder.glob("*.dcm"))]
    spool = Spool(spool_dir)
    t0 = time.perf_counter()
    for i, (_name, data) in enumerate(payloads):
        spool.store(f"1.2.3.{i + 1}", data)
    return time.perf_counter() - t0


def spool_count(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*.dcm") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=205)
    parser.add_argument("--senders", default="1,4")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "SPOOL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), Path(args.serve[1]))
        return 0
    if not SOURCE.is_dir():
        print(f"needs the shared test data: {SOURCE}", file=sys.stderr)
        return 1
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        nbytes = make_series(tmp / "series", args.slices)
        for senders in [int(s) for s in args.senders.split(",")]:
            times: dict[str, list[float]] = {"storescp": [], "radai": [], "spool only": []}
            for r in range(args.repeats):
                times["spool only"].append(spool_floor(tmp / "series", tmp / f"floor-{senders}-{r}"))
                with dcmtk_storescp(tmp / f"dcmtk-{senders}-{r}", "--fork") as peer:
                    times["storescp"].append(send(peer.port, tmp / "series", senders))
                    wait_for(lambda p=peer: len(p.files()) >= args.slices, 60, "storescp files")
                port, spool = free_port(), tmp / f"radai-{senders}-{r}"
                proc = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.ingest", "--serve", str(port), str(spool)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                try:
                    wait_for(lambda p=port: echoscu(p).returncode == 0, 60, "radai SCP")
                    times["radai"].append(send(port, tmp / "series", senders))
                    if spool_count(spool) != args.slices:
                        raise RuntimeError(f"radai spooled {spool_count(spool)} of {args.slices}")
                finally:
                    stop_process(proc)
            for who, ts in times.items():
                med = statistics.median(ts)
                rows.append(
                    {
                        "senders": senders,
                        "receiver": who,
                        "seconds": ts,
                        "median_s": med,
                        "mb_per_s": nbytes / med / 1e6,
                    }
                )
    by = {(r["senders"], r["receiver"]): r for r in rows}
    lines = [
        f"Ingest of a {args.slices}-slice CT ({nbytes / 1e6:.0f} MB), median of {args.repeats}, "
        f"{machine_basics()['cpus_usable']} CPUs",
        "",
        "| senders | receiver | median s | MB/s | radai / storescp |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        base = by[(r["senders"], "storescp")]["mb_per_s"]
        lines.append(
            f"| {r['senders']} | {r['receiver']} | {r['median_s']:.3f} | {r['mb_per_s']:.0f} "
            f"| {r['mb_per_s'] / base:.2f} |"
        )
    table = "\n".join(lines)
    data = {"machine": machine_basics(), "bytes": nbytes, "slices": args.slices, "rows": rows}
    js, md = write_results(args.out, "ingest", data, table)
    print(table)
    print(f"\nwrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

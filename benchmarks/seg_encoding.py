"""SEG encoding speed and size: a 500-slice 512x512 CT with 20 segments, encoded by radai's encoder as BINARY
and as LABELMAP, against the baseline of highdicom used the plain way (one boolean mask per segment, BINARY) in
the same run. Each figure is the time to build the data set and write it as a DICOM file.

    python -m benchmarks.seg_encoding [--slices 500] [--segments 20] [--repeats 3]

The source series is made from the real CRLM-CT-1004 slices (../shared, CC BY 4.0) repeated along z under new
UIDs and positions. The label map holds `--segments` ellipsoids spread over the volume (each spans about a
fifth of the slices), a stand-in for a multi-organ model's output.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom import Dataset
from pydicom.uid import generate_uid

from benchmarks.common import RESULTS, machine_basics, write_results
from radai.results.seg import Algorithm, CodedConcept, SegmentSpec, SegRequest, build_seg
from tests.e2e.peers import CRLM

SOURCE = CRLM / "CRLM-CT-1004" / "image"
ALGORITHM = Algorithm(model_id="bench-multi-organ", version="1.0.0", name="Benchmark multi-organ")


def make_source(slices: int) -> list[Dataset]:
    """`slices` CT images of one new series, in slice order (pixel data shared with the real slices)."""
    real = [pydicom.dcmread(p) for p in sorted(SOURCE.glob("*.dcm"))]
    real.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for i in range(slices):
        template = real[i % len(real)]
        pixels = template["PixelData"]
        del template.PixelData
        ds = copy.deepcopy(template)
        template["PixelData"] = ds["PixelData"] = pixels  # the pixel data element is shared, not copied
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        x, y, _ = (float(v) for v in real[0].ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, -1.25 * i]
        out.append(ds)
    return out


def make_labels(shape: tuple[int, int, int], segments: int, seed: int = 7) -> NDArray[np.uint8]:
    """(X, Y, Z) label map with `segments` ellipsoids (label values 1..segments)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint8)
    nx, ny, nz = shape
    for value in range(1, segments + 1):
        cx, cy, cz = rng.uniform(0.2, 0.8) * nx, rng.uniform(0.2, 0.8) * ny, rng.uniform(0.15, 0.85) * nz
        rx, ry, rz = rng.uniform(0.04, 0.1) * nx, rng.uniform(0.04, 0.1) * ny, 0.1 * nz
        z0, z1 = max(0, int(cz - rz)), min(nz, int(cz + rz) + 1)
        x = (np.arange(nx)[:, None] - cx) / rx
        y = (np.arange(ny)[None, :] - cy) / ry
        for z in range(z0, z1):
            inside = x**2 + y**2 + ((z - cz) / rz) ** 2 <= 1.0
            labels[:, :, z][inside] = value
    return labels


def specs(segments: int) -> list[SegmentSpec]:
    tissue = CodedConcept("SCT", "85756007", "Tissue")
    return [
        SegmentSpec(
            value=v,
            name=f"Structure {v}",
            category=tissue,
            type=CodedConcept("SCT", "85756007", "Tissue"),
            color=(int(40 + 10 * v) % 256, int(200 - 7 * v) % 256, int(90 + 13 * v) % 256),
        )
        for v in range(1, segments + 1)
    ]


def baseline(source: list[Dataset], labels: NDArray[np.uint8], segs: list[SegmentSpec]) -> Dataset:
    """highdicom the plain way: a (frames, rows, columns, segments) boolean array, BINARY."""
    one_hot = np.stack([(labels == s.value).transpose(2, 1, 0) for s in segs], axis=-1)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=s.name,
            segmented_property_category=s.category.to_code(),
            segmented_property_type=s.type.to_code(),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=ALGORITHM.model_id,
                family=hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence"),
                version=ALGORITHM.version,
            ),
        )
        for n, s in enumerate(segs, start=1)
    ]
    return hd.seg.Segmentation(
        source_images=source,
        pixel_array=one_hot,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=901,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="baseline",
        manufacturer_model_name="baseline",
        software_versions="1",
        device_serial_number="1",
    )


def timed(build: Callable[[], Dataset]) -> tuple[float, int, int]:
    """Seconds to build and write, the file size in bytes and the number of frames."""
    t0 = time.perf_counter()
    ds = build()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return time.perf_counter() - t0, len(buffer.getvalue()), int(ds.NumberOfFrames)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--segments", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not SOURCE.is_dir():
        print(f"needs the shared test data: {SOURCE}", file=sys.stderr)
        return 1
    source = make_source(args.slices)
    shape = (int(source[0].Columns), int(source[0].Rows), len(source))
    labels = make_labels(shape, args.segments)
    segs = specs(args.segments)

    def request(**kw: Any) -> SegRequest:
        return SegRequest(source=source, labels=labels, segments=segs, algorithm=ALGORITHM, **kw)

    cases: dict[str, Callable[[], Dataset]] = {
        "highdicom plain (baseline)": lambda: baseline(source, labels, segs),
        "radai BINARY": lambda: build_seg(request()),
        "radai LABELMAP": lambda: build_seg(request(labelmap=True, uid_parts=("labelmap",))),
    }
    rows: list[dict[str, Any]] = []
    runs: dict[str, list[tuple[float, int, int]]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, build in cases.items():  # alternating, in the same run
            runs[name].append(timed(build))
    base = statistics.median(t for t, _, _ in runs["highdicom plain (baseline)"])
    for name, results in runs.items():
        seconds = [t for t, _, _ in results]
        med = statistics.median(seconds)
        rows.append(
            {
                "encoder": name,
                "seconds": seconds,
                "median_s": med,
                "mb": results[0][1] / 1e6,
                "frames": results[0][2],
                "speedup_vs_baseline": base / med,
            }
        )
    lines = [
        f"SEG encoding of a {args.slices}-slice {shape[0]}x{shape[1]} CT with {args.segments} segments, "
        f"median of {args.repeats}, {machine_basics()['cpus_usable']} CPUs",
        "",
        "| encoder | median s | frames | MB | speed-up vs baseline |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['encoder']} | {r['median_s']:.2f} | {r['frames']} | {r['mb']:.1f} | {r['speedup_vs_baseline']:.2f} |"
        )
    table = "\n".join(lines)
    data = {"machine": machine_basics(), "slices": args.slices, "segments": args.segments, "rows": rows}
    js, md = write_results(args.out, "seg_encoding", data, table)
    print(table)
    print(f"\nwrote {js} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Untrusted model-package uploads: safe extraction of zip/tar archives and the "nothing that unpickles" scan."""

from __future__ import annotations

import collections
import gzip
import io
import os
import pickle
import re
import shutil
import stat
import struct
import subprocess
import tarfile
import warnings
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from onnx import TensorProto, helper

from radai.errors import ModelPackageError
from radai.models.archive import ArchiveLimits, extract_package, find_unsafe_files, scan_package

ROOT = Path(__file__).resolve().parents[2]
CARD = b"id: demo\nversion: 1.0.0\ntask: segmentation\n"


def package_files() -> dict[str, bytes]:
    buf = io.BytesIO()
    np.save(buf, np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    return {
        "model.yaml": CARD,
        "model.onnx": onnx_bytes(),
        "reference/input.npy": buf.getvalue(),
        "README.md": b"# Demo\n",
        "LICENSE": b"Apache License 2.0\n",
    }


def onnx_bytes() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def make_zip(path: Path, members: list[tuple[str, bytes]] | dict[str, bytes]) -> Path:
    items = members.items() if isinstance(members, dict) else members
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names some tests write on purpose
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in items:
                zf.writestr(name, data)
    return path


def tar_member(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    return info


def make_tar(
    path: Path, members: list[tuple[tarfile.TarInfo, bytes]], mode: Literal["w:gz", "w"] = "w:gz"
) -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def files_of(tree: dict[str, bytes], prefix: str = "") -> list[tuple[tarfile.TarInfo, bytes]]:
    return [(tar_member(prefix + name, data), data) for name, data in tree.items()]


DEFAULT_LIMITS = ArchiveLimits()


def refused(archive: Path, target: Path, reason: str, limits: ArchiveLimits = DEFAULT_LIMITS) -> None:
    with pytest.raises(ModelPackageError, match=re.escape(reason)):
        extract_package(archive, target, limits)
    assert not target.exists()


def assert_package(folder: Path) -> None:
    for name, data in package_files().items():
        assert (folder / name).read_bytes() == data


# --- good archives ---------------------------------------------------------------------------------------


def test_zip_with_card_at_top_level_extracts_into_target(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "pkg.zip", package_files())
    assert extract_package(archive, tmp_path / "out") == tmp_path / "out"
    assert_package(tmp_path / "out")


def test_tar_gz_with_package_in_one_folder_returns_that_folder(tmp_path: Path) -> None:
    folder = (tar_member("demo", kind=tarfile.DIRTYPE), b"")
    archive = make_tar(tmp_path / "pkg.tar.gz", [folder, *files_of(package_files(), "demo/")])
    assert extract_package(archive, tmp_path / "out") == tmp_path / "out" / "demo"
    assert_package(tmp_path / "out" / "demo")


def test_archives_made_by_the_zip_and_tar_tools_extract(tmp_path: Path) -> None:
    source = tmp_path / "src" / "demo"
    for name, data in package_files().items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    subprocess.run(["zip", "-qr", str(tmp_path / "a.zip"), "demo"], cwd=source.parent, check=True)
    subprocess.run(["tar", "-czf", str(tmp_path / "b.tgz"), "-C", str(source), "."], check=True)
    subprocess.run(["tar", "-cJf", str(tmp_path / "c.tar.xz"), "demo"], cwd=source.parent, check=True)
    assert_package(extract_package(tmp_path / "a.zip", tmp_path / "a"))
    assert extract_package(tmp_path / "b.tgz", tmp_path / "b") == tmp_path / "b"  # "./model.yaml" names
    assert_package(tmp_path / "b")
    assert_package(extract_package(tmp_path / "c.tar.xz", tmp_path / "c"))


def test_bundled_package_round_trips_through_a_tar_gz_upload(tmp_path: Path) -> None:
    source = ROOT / "model_zoo" / "brain_tissue"
    archive = Path(shutil.make_archive(str(tmp_path / "upload"), "gztar", source.parent, source.name))
    folder = extract_package(archive, tmp_path / "out")
    assert folder == tmp_path / "out" / "brain_tissue"
    originals = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    assert originals and sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file()) == originals
    assert all((folder / p).read_bytes() == (source / p).read_bytes() for p in originals)
    assert find_unsafe_files(folder) == []


def test_macos_resource_fork_folder_is_not_extracted(tmp_path: Path) -> None:
    members = {f"demo/{name}": data for name, data in package_files().items()}
    members["__MACOSX/demo/._model.yaml"] = b"\x00\x05\x16\x07"
    archive = make_zip(tmp_path / "pkg.zip", members)
    assert extract_package(archive, tmp_path / "out") == tmp_path / "out" / "demo"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["demo"]


# --- hostile names and member types ----------------------------------------------------------------------

ESCAPES = [
    ("../evil", "'..'"),
    ("/abs/path", "absolute"),
    ("a/../../evil", "'..'"),
    ("C:/evil", "drive letter"),
    ("..\\evil", "backslash"),
    ("demo/\x1b[31mred", "unprintable"),
]


@pytest.mark.parametrize(("name", "reason"), ESCAPES)
def test_zip_member_escaping_the_target_is_refused(tmp_path: Path, name: str, reason: str) -> None:
    archive = make_zip(tmp_path / "pkg.zip", [*package_files().items(), (name, b"x")])
    refused(archive, tmp_path / "out", reason)
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize(("name", "reason"), ESCAPES)
def test_tar_member_escaping_the_target_is_refused(tmp_path: Path, name: str, reason: str) -> None:
    archive = make_tar(tmp_path / "pkg.tgz", [*files_of(package_files()), (tar_member(name, b"x"), b"x")])
    refused(archive, tmp_path / "out", reason)
    assert not (tmp_path / "evil").exists()


def test_zip_symlink_member_is_refused(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("demo/weights.onnx")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = make_zip(tmp_path / "pkg.zip", package_files())
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(link, "/etc/passwd")
    refused(archive, tmp_path / "out", "symbolic link")


@pytest.mark.parametrize(
    ("kind", "link", "reason"),
    [
        (tarfile.SYMTYPE, "/etc/passwd", "is a link"),
        (tarfile.SYMTYPE, "../../outside", "is a link"),
        (tarfile.LNKTYPE, "model.yaml", "is a link"),
        (tarfile.CHRTYPE, "", "device or FIFO"),
        (tarfile.BLKTYPE, "", "device or FIFO"),
        (tarfile.FIFOTYPE, "", "device or FIFO"),
    ],
)
def test_tar_link_device_and_fifo_members_are_refused(
    tmp_path: Path, kind: bytes, link: str, reason: str
) -> None:
    special = tar_member("extra", kind=kind, link=link)
    archive = make_tar(tmp_path / "pkg.tgz", [*files_of(package_files()), (special, b"")])
    refused(archive, tmp_path / "out", reason)


def test_duplicate_member_names_are_refused(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "a.zip", [*package_files().items(), ("model.yaml", b"id: other\n")])
    refused(archive, tmp_path / "a", "duplicate member 'model.yaml'")
    archive = make_zip(tmp_path / "b.zip", [*package_files().items(), ("./readme.md", b"x")])
    refused(archive, tmp_path / "b", "duplicate member")  # differs only in case and "./"
    nfd = [*package_files().items(), ("caf\u00e9.txt", b"x"), ("cafe\u0301.txt", b"y")]
    refused(make_zip(tmp_path / "d.zip", nfd), tmp_path / "d", "duplicate member")  # Unicode forms
    extra = tar_member("model.yaml", b"id: other\n")
    archive = make_tar(tmp_path / "c.tgz", [*files_of(package_files()), (extra, b"id: other\n")])
    refused(archive, tmp_path / "c", "duplicate member")


def test_member_that_is_both_file_and_folder_is_refused(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "pkg.zip", [*package_files().items(), ("LICENSE/inner", b"x")])
    refused(archive, tmp_path / "out", "both a file and a folder")


def test_too_many_members_are_refused(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "pkg.zip", package_files())  # 5 files
    refused(archive, tmp_path / "out", "more than 4 members", ArchiveLimits(max_members=4))
    assert extract_package(archive, tmp_path / "ok", ArchiveLimits(max_members=5)) == tmp_path / "ok"


def test_encrypted_zip_member_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.yaml").write_bytes(CARD)
    subprocess.run(["zip", "-q", "-P", "secret", "pkg.zip", "model.yaml"], cwd=tmp_path, check=True)
    refused(tmp_path / "pkg.zip", tmp_path / "out", "encrypted")


# --- bombs and lying headers ------------------------------------------------------------------------------

ZEROS = 50 * 1024 * 1024


@pytest.fixture(scope="module")
def zip_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model.yaml", CARD)
        with zf.open("zeros.bin", "w") as out:
            chunk = bytes(1024 * 1024)
            for _ in range(ZEROS // len(chunk)):
                out.write(chunk)
    return path


def test_zip_bomb_over_the_size_limit_is_refused(tmp_path: Path, zip_bomb: Path) -> None:
    limits = ArchiveLimits(max_total_bytes=10 * 1024 * 1024, max_ratio=1e9)
    refused(zip_bomb, tmp_path / "out", "limit of 10485760 bytes", limits)


def test_zip_bomb_over_the_ratio_limit_is_refused(tmp_path: Path, zip_bomb: Path) -> None:
    assert zip_bomb.stat().st_size * 200 < ZEROS
    refused(zip_bomb, tmp_path / "out", "decompression bomb")
    limits = ArchiveLimits(max_ratio=10_000)  # the same archive passes when the ratio is allowed
    assert extract_package(zip_bomb, tmp_path / "ok", limits) == tmp_path / "ok"
    assert (tmp_path / "ok" / "zeros.bin").stat().st_size == ZEROS


def test_zip_whose_headers_understate_the_size_is_refused(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "pkg.zip", [*package_files().items(), ("big.bin", bytes(1_000_000))])
    data = bytearray(archive.read_bytes())
    # Rewrite big.bin's uncompressed size to 10 bytes in both its local header and the central directory.
    local = data.index(b"PK\x03\x04" + data[4:8], data.index(b"big.bin") - 40)
    struct.pack_into("<I", data, local + 22, 10)
    central = data.rindex(b"big.bin") - 46
    struct.pack_into("<I", data, central + 24, 10)
    archive.write_bytes(bytes(data))
    refused(archive, tmp_path / "out", "corrupt")


def test_tar_whose_header_overstates_the_size_is_refused(tmp_path: Path) -> None:
    lying = tar_member("big.bin", bytes(1_000_000)).tobuf(format=tarfile.USTAR_FORMAT)
    archive = tmp_path / "pkg.tar"
    archive.write_bytes(_tar_prefix(package_files()) + lying + b"only a few bytes follow")
    refused(archive, tmp_path / "out", "corrupt")


def _tar_prefix(tree: dict[str, bytes]) -> bytes:
    """A tar stream of ``tree`` without its end-of-archive blocks, so more members can be appended."""
    out = b""
    for info, data in files_of(tree):
        out += info.tobuf(format=tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512)
    return out


@pytest.mark.parametrize(
    ("kind", "size", "reason"),
    [(tarfile.REGTYPE, -1024, "negative size"), (tarfile.GNUTYPE_SPARSE, 0, "sparse file")],
)
def test_tar_member_with_negative_size_or_sparse_layout_is_refused(
    tmp_path: Path, kind: bytes, size: int, reason: str
) -> None:
    info = tar_member("model.yaml", kind=kind)
    info.size = size  # GNU base-256 numbers can be negative; sparse maps expand beyond the stored data
    archive = tmp_path / "pkg.tar"
    archive.write_bytes(info.tobuf(format=tarfile.GNU_FORMAT) + bytes(2048))
    refused(archive, tmp_path / "out", reason)


def test_tar_gz_expanding_beyond_its_member_sizes_is_refused(tmp_path: Path) -> None:
    # Every member header declares a few bytes, but a 5 MB pax header makes the stream itself a bomb.
    padded = tar_member("model.yaml", CARD)
    padded.pax_headers = {"comment": "a" * 5_000_000}
    archive = make_tar(tmp_path / "pkg.tgz", [(padded, CARD)])
    limits = ArchiveLimits(max_total_bytes=1024 * 1024, max_members=10, max_ratio=1e9)
    refused(archive, tmp_path / "out", "archive stream expands", limits)
    assert extract_package(archive, tmp_path / "ok", ArchiveLimits(max_ratio=1e9)) == tmp_path / "ok"


def test_tar_member_over_the_size_limit_is_refused_from_its_header(tmp_path: Path) -> None:
    archive = make_tar(
        tmp_path / "pkg.tgz", [*files_of(package_files()), (tar_member("z", bytes(4096)), bytes(4096))]
    )
    refused(archive, tmp_path / "out", "declare more than the limit", ArchiveLimits(max_total_bytes=2048))


# --- corrupt, empty, incomplete ---------------------------------------------------------------------------


def test_corrupt_archives_are_refused(tmp_path: Path) -> None:
    good_zip = make_zip(tmp_path / "good.zip", package_files()).read_bytes()
    good_tgz = make_tar(tmp_path / "good.tgz", files_of(package_files())).read_bytes()
    flipped = bytearray(good_zip)
    at = good_zip.index(b"model.yaml") + 20  # inside model.yaml's compressed data
    flipped[at] ^= 0xFF
    cases = {
        "random.zip": (os.urandom(4096), "not a zip or tar"),
        "cut.zip": (good_zip[: len(good_zip) // 2], "corrupt"),
        "flipped.zip": (bytes(flipped), "corrupt"),
        "cut.tgz": (good_tgz[: len(good_tgz) // 2], "corrupt"),
        "garbage.tgz": (gzip.compress(os.urandom(4096)), "corrupt"),
        "notgzip.tgz": (b"\x1f\x8b" + os.urandom(4096), "corrupt"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        refused(tmp_path / name, tmp_path / f"out-{name}", reason)


def test_empty_archives_are_refused(tmp_path: Path) -> None:
    (tmp_path / "zero.zip").write_bytes(b"")
    refused(tmp_path / "zero.zip", tmp_path / "a", "empty")
    refused(make_zip(tmp_path / "empty.zip", {}), tmp_path / "b", "empty")
    refused(make_tar(tmp_path / "empty.tgz", []), tmp_path / "c", "empty")


def test_archive_without_a_card_is_refused(tmp_path: Path) -> None:
    files = {k: v for k, v in package_files().items() if k != "model.yaml"}
    refused(make_zip(tmp_path / "a.zip", files), tmp_path / "a", "no model.yaml")
    two = {f"{top}/{name}": data for top in ("x", "y") for name, data in package_files().items()}
    refused(make_zip(tmp_path / "b.zip", two), tmp_path / "b", "no model.yaml")  # two top-level folders
    deep = {f"x/y/{name}": data for name, data in package_files().items()}
    refused(make_zip(tmp_path / "c.zip", deep), tmp_path / "c", "no model.yaml")


def test_existing_target_must_be_empty_and_is_emptied_on_failure(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "pkg.zip", [*package_files().items(), ("../evil", b"x")])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep").write_bytes(b"mine")
    with pytest.raises(ModelPackageError, match="not a new, empty folder"):
        extract_package(archive, busy)
    assert (busy / "keep").read_bytes() == b"mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelPackageError, match=re.escape("'..'")):
        extract_package(archive, empty)
    assert empty.is_dir() and not any(empty.iterdir())


def test_failure_late_in_the_archive_removes_what_was_written(tmp_path: Path) -> None:
    members = [*files_of(package_files()), (tar_member("zz", kind=tarfile.FIFOTYPE), b"")]
    archive = make_tar(tmp_path / "pkg.tgz", members)  # the FIFO comes after every good file
    refused(archive, tmp_path / "out", "FIFO")


# --- find_unsafe_files ------------------------------------------------------------------------------------


def write_clean_package(folder: Path) -> None:
    for name, data in package_files().items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    np.save(folder / "reference" / "output.npy", np.zeros((2, 3, 4), dtype=np.float32))
    np.savez_compressed(folder / "reference" / "extra.npz", a=np.ones(3, dtype=np.float32))
    (folder / "reference" / "input.nii.gz").write_bytes(gzip.compress(b"\x5c\x01" + bytes(346)))
    (folder / "notes.txt").write_bytes(b"cos\nsystem\n.")  # looks like a pickle, but is a text file
    (folder / "NOTICE").write_bytes(b"copyright 2024 someone\nall rights reserved\n")  # 'c' is GLOBAL


def test_clean_onnx_package_has_no_unsafe_files(tmp_path: Path) -> None:
    write_clean_package(tmp_path)
    assert find_unsafe_files(tmp_path) == []


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_pickles_torch_files_object_arrays_and_code_are_found(tmp_path: Path) -> None:
    import torch

    write_clean_package(tmp_path)
    (tmp_path / "weights.bin").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    (tmp_path / "old.dat").write_bytes(pickle.dumps(collections.OrderedDict(a=1), protocol=0))
    (tmp_path / "packed.gz").write_bytes(gzip.compress(pickle.dumps([1, 2, 3], protocol=4)))
    (tmp_path / "cut.gz").write_bytes(
        gzip.compress(pickle.dumps(collections.OrderedDict(), protocol=0))[:-12]
    )
    (tmp_path / "boot.cfg").write_bytes(b"cos\nsystem\n(S'echo hi'\ntR")  # runs before any STOP is seen
    torch.save({"w": torch.zeros(2)}, tmp_path / "checkpoint.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "renamed.onnx.data")
    torch.save(torch.zeros(2), tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    torch.jit.save(torch.jit.script(torch.nn.ReLU()), str(tmp_path / "scripted.zip"))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "objects.npz", a=np.array([None], dtype=object))
    (tmp_path / "reference" / "hook.py").write_text("import os\n")
    (tmp_path / "link.onnx").symlink_to(tmp_path / "model.onnx")
    found = {u.path: u.reason for u in scan_package(tmp_path)}
    assert sorted(found) == [
        "boot.cfg",
        "checkpoint.pt",
        "cut.gz",
        "legacy.bin",
        "link.onnx",
        "objects.npy",
        "objects.npz",
        "old.dat",
        "packed.gz",
        "reference/hook.py",
        "renamed.onnx.data",
        "scripted.zip",
        "weights.bin",
    ]
    assert found["weights.bin"] == "pickle (protocol 4)"
    assert found["old.dat"] == "pickle (protocol 0/1)"
    assert found["packed.gz"].startswith("compressed pickle") and found["cut.gz"].startswith(
        "compressed pickle"
    )
    assert found["boot.cfg"] == "pickle (protocol 0/1)"
    assert "PyTorch" in found["renamed.onnx.data"] and "PyTorch" in found["scripted.zip"]
    assert "object dtype" in found["objects.npy"] and "object dtype" in found["objects.npz"]
    assert found["link.onnx"] == "symbolic link"
    assert find_unsafe_files(tmp_path) == sorted(found)


def test_pickle_inside_a_plain_zip_is_found(tmp_path: Path) -> None:
    make_zip(tmp_path / "bundle.zip", {"weights.bin": pickle.dumps([1]), "README.md": b"x"})
    make_zip(tmp_path / "docs.zip", {"README.md": b"# docs\n"})
    inner = make_zip(tmp_path / "inner.zip", {"README.md": b"x"}).read_bytes()
    make_zip(tmp_path / "nested.zip", {"inner.zip": inner})
    (tmp_path / "inner.zip").unlink()
    assert find_unsafe_files(tmp_path) == ["bundle.zip", "nested.zip"]


def test_random_binary_weights_are_not_mistaken_for_pickles(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(20):
        data = rng.bytes(256 * 1024)
        (tmp_path / f"part{i}.bin").write_bytes(data)
        (tmp_path / f"part{i}.bin.gz").write_bytes(gzip.compress(data, compresslevel=1))
    np.save(tmp_path / "big.npy", np.zeros((64, 128, 128), dtype=np.float32))
    assert find_unsafe_files(tmp_path) == []

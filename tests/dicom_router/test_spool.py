"""The durable spool: atomic, idempotent writes named by validated UIDs."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_router.spool import Spool


def test_store_writes_the_bytes_under_the_uid(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")

    path = spool.store("1.2.3.4", b"payload")

    assert path == tmp_path / "spool" / "1.2.3.4.dcm"
    assert path.read_bytes() == b"payload"
    assert spool.pending() == [path]


def test_store_is_idempotent_per_uid_and_last_write_wins(tmp_path: Path) -> None:
    spool = Spool(tmp_path)

    first = spool.store("1.2.3.4", b"first")
    second = spool.store("1.2.3.4", b"second")

    assert first == second
    assert second.read_bytes() == b"second"
    assert spool.pending() == [second]


@pytest.mark.parametrize("uid", ["../../evil", "1.2/../../x", "", "1.2\n", "/etc/passwd", "1..2"])
def test_store_rejects_uids_that_are_not_valid_or_would_escape(tmp_path: Path, uid: str) -> None:
    spool = Spool(tmp_path / "spool")

    with pytest.raises(ValueError):
        spool.store(uid, b"x")

    assert list(tmp_path.rglob("*")) == [tmp_path / "spool"]


def test_failed_write_raises_oserror_and_leaves_no_partial_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    (tmp_path / "spool" / "1.2.3.dcm").mkdir()  # the final name is occupied by a directory

    with pytest.raises(OSError):
        spool.store("1.2.3", b"data")

    assert [p.name for p in (tmp_path / "spool").iterdir()] == ["1.2.3.dcm"]


def test_pending_ignores_temporary_and_foreign_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    kept = spool.store("1.2.3", b"a")
    (tmp_path / ".incoming-abc.part").write_bytes(b"interrupted")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "not-a-uid.dcm").write_bytes(b"x")

    assert spool.pending() == [kept]
    assert spool.discard_partial() == 1
    assert not (tmp_path / ".incoming-abc.part").exists()


def test_remove_deletes_and_tolerates_missing_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    path = spool.store("1.2.3", b"a")

    spool.remove(path)
    spool.remove(path)

    assert spool.pending() == []


def test_remove_refuses_paths_outside_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    outside = tmp_path / "keep.dcm"
    outside.write_bytes(b"x")

    with pytest.raises(ValueError):
        spool.remove(outside)

    assert outside.exists()


def test_a_new_spool_on_the_same_directory_sees_earlier_files(tmp_path: Path) -> None:
    Spool(tmp_path).store("1.2.3", b"a")

    assert [p.name for p in Spool(tmp_path).pending()] == ["1.2.3.dcm"]

"""Atomic publication: a crash at any point leaves the previous version serving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shared.artifacts import ArtifactFamily, CorruptArtifact
from shared.errors import ErrorCode


def publish(family: ArtifactFamily, content: str) -> str:
    with family.lock(), family.build({"kind": "test"}) as scratch:
        (scratch / "data.txt").write_text(content)
    version = family.current_version()
    assert version is not None
    return version


def test_build_publishes_a_sealed_version(tmp_path: Path) -> None:
    family = ArtifactFamily(tmp_path / "fam")
    version = publish(family, "one")
    manifest = family.read_manifest()
    assert manifest["version"] == version and manifest["kind"] == "test"
    assert manifest["files"]["data.txt"]["bytes"] == 3
    family.verify()
    (family.versions_dir / version / "data.txt").write_text("tampered")
    with pytest.raises(CorruptArtifact, match="checksum"):
        family.verify()


PUBLISH_ELSEWHERE = """
import sys
from pathlib import Path
from shared.artifacts import ArtifactFamily
family = ArtifactFamily(Path(sys.argv[1]))
with family.lock(), family.build({}) as scratch:
    (scratch / "data.txt").write_text(sys.argv[2])
"""


def test_a_reader_refuses_a_version_whose_files_changed(tmp_path: Path) -> None:
    """A version published by another process is checked when first loaded here: a changed or
    lost file is refused (503 unavailable, no absolute path in the message), a sound one loads."""
    family = ArtifactFamily(tmp_path / "fam")
    for content in ("sound", "to be tampered"):
        subprocess.run(
            [sys.executable, "-c", PUBLISH_ELSEWHERE, str(family.root), content], check=True
        )
    sound, tampered = sorted(p.name for p in family.versions_dir.iterdir())
    assert (family.loadable(sound) / "data.txt").read_text() == "sound"
    (family.versions_dir / tampered / "data.txt").write_text("to be tampered!")
    with pytest.raises(CorruptArtifact) as refused:
        family.loadable(tampered)
    assert refused.value.code is ErrorCode.unavailable
    assert str(tmp_path) not in refused.value.message and "data.txt" in refused.value.message
    (family.versions_dir / tampered / "data.txt").unlink()
    with pytest.raises(CorruptArtifact):
        family.loadable(tampered)


def test_a_version_this_process_sealed_is_not_hashed_again(tmp_path: Path) -> None:
    family = ArtifactFamily(tmp_path / "fam")
    version = publish(family, "one")
    (family.versions_dir / version / "data.txt").write_text("two")  # not re-read: sealed here
    assert (family.loadable(version) / "data.txt").read_text() == "two"


def publish_linked(family: ArtifactFamily, new_content: str) -> str:
    """A version that hard-links the serving version's ``big.bin`` and writes a new file."""
    base = family.current_path()
    assert base is not None
    with family.lock(), family.build({"kind": "test"}) as scratch:
        os.link(base / "big.bin", scratch / "big.bin")
        (scratch / "data.txt").write_text(new_content)
    version = family.current_version()
    assert version is not None
    return version


def test_a_hard_linked_file_keeps_its_checksum_without_a_re_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an index upsert does: link the unchanged files of the serving version. Sealing
    hashes only the new files; the linked one's entry is the verified version's, and a reader
    in another process still checks every byte of it."""
    import shared.artifacts as artifacts

    family = ArtifactFamily(tmp_path / "fam")
    with family.lock(), family.build({"kind": "test"}) as scratch:
        (scratch / "big.bin").write_bytes(os.urandom(1 << 16))
        (scratch / "data.txt").write_text("one")
    first = family.read_manifest()["files"]
    hashed: list[str] = []
    real = artifacts.sha256_of
    monkeypatch.setattr(artifacts, "sha256_of", lambda path: hashed.append(path.name) or real(path))
    version = publish_linked(family, "two")
    assert hashed == ["data.txt"]
    files = family.read_manifest(version)["files"]
    assert files["big.bin"] == first["big.bin"] and files["data.txt"] != first["data.txt"]
    monkeypatch.undo()
    check = "from shared.artifacts import ArtifactFamily; import sys; from pathlib import Path; "
    check += "ArtifactFamily(Path(sys.argv[1])).verify()"
    subprocess.run([sys.executable, "-c", check, str(family.root)], check=True)


def test_a_link_into_a_version_not_checked_here_is_hashed(tmp_path: Path) -> None:
    """A serving version published by another process and not loaded here: its recorded
    checksums are not trusted, so a corrupted linked file is not sealed as sound."""
    family = ArtifactFamily(tmp_path / "fam")
    publish_big = PUBLISH_ELSEWHERE.replace('"data.txt"', '"big.bin"')
    subprocess.run([sys.executable, "-c", publish_big, str(family.root), "sound"], check=True)
    base = family.current_path()
    assert base is not None
    (base / "big.bin").write_text("bent!")  # same size, other bytes
    version = publish_linked(family, "two")
    assert (
        family.read_manifest(version)["files"]["big.bin"]["sha256"]
        != (family.read_manifest(base.name)["files"]["big.bin"]["sha256"])
    )


def test_failed_build_keeps_the_previous_version(tmp_path: Path) -> None:
    family = ArtifactFamily(tmp_path / "fam")
    first = publish(family, "one")
    with pytest.raises(RuntimeError), family.lock(), family.build({}) as scratch:
        (scratch / "data.txt").write_text("half")
        raise RuntimeError("build failed")
    assert family.current_version() == first
    assert not list(family.versions_dir.glob("*.tmp"))


CRASHING_BUILD = """
import os, signal, sys
from pathlib import Path
from shared.artifacts import ArtifactFamily
family = ArtifactFamily(Path(sys.argv[1]))
with family.lock(), family.build({}) as scratch:
    (scratch / "data.txt").write_text("half written")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_killed_build_process_leaves_previous_version_and_next_build_succeeds(
    tmp_path: Path,
) -> None:
    family = ArtifactFamily(tmp_path / "fam")
    first = publish(family, "one")
    result = subprocess.run(
        [sys.executable, "-c", CRASHING_BUILD, str(family.root)],
        cwd=Path(__file__).parents[2],
        check=False,
    )
    assert result.returncode == -signal.SIGKILL
    assert family.current_version() == first
    assert (family.versions_dir / first / "data.txt").read_text() == "one"
    assert list(family.versions_dir.glob("*.tmp")), (
        "the crashed build's scratch directory is left behind"
    )
    second = publish(family, "two")  # the lock died with the process; the stale scratch is cleaned
    assert second != first and not list(family.versions_dir.glob("*.tmp"))
    assert (family.versions_dir / second / "data.txt").read_text() == "two"


def test_prune_keeps_the_current_version(tmp_path: Path) -> None:
    family = ArtifactFamily(tmp_path / "fam")
    versions = [publish(family, str(i)) for i in range(4)]
    family.prune(keep=2)
    remaining = sorted(p.name for p in family.versions_dir.iterdir())
    assert remaining == versions[-2:]
    assert (
        json.loads((family.versions_dir / versions[-1] / "manifest.json").read_text())["version"]
        == versions[-1]
    )
    assert os.path.exists(family.root / "CURRENT")


def test_version_names_sort_in_creation_order_across_a_second_boundary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from shared import artifacts

    # 0.999999999 s into a second, then the next second: the names must keep that order.
    clock = iter([1_700_000_000_999_999_999, 1_700_000_001_000_000_001])
    monkeypatch.setattr(artifacts.time, "time_ns", lambda: next(clock))
    first, second = artifacts.new_version_name(), artifacts.new_version_name()
    assert first == "20231114T221320-999999999"
    assert second == "20231114T221321-000000001"
    assert first < second


def _publish_in_a_forked_child(root: str) -> None:
    publish(ArtifactFamily(Path(root)), "from the child")


def test_a_forked_child_seals_on_its_own_fsync_threads(tmp_path: Path) -> None:
    """A seal fsyncs on a pool of threads started once per process; a forked child (a Celery
    prefork worker) gets none of its parent's threads, and must not wait on them."""
    import multiprocessing

    family = ArtifactFamily(tmp_path / "fam")
    publish(family, "parent")  # the parent's pool is running
    child = multiprocessing.get_context("fork").Process(
        target=_publish_in_a_forked_child, args=(str(family.root),)
    )
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child's seal hung")
    assert child.exitcode == 0
    assert (family.current_path() / "data.txt").read_text() == "from the child"  # type: ignore[operator]
    publish(family, "parent again")

"""The firmware's sources come from the pins in the repository: the shared copy matches them, and a fetch with git
(from local repositories here: the network reaches only package registries) reproduces them or keeps nothing."""

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import DeviceError
from pipeline.tflm.build import TREES, sources_root
from pipeline.tflm.third_party import check, fetch, load_pins, tree_digest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "third_party"
PATCH = "tensorflow/lite/micro/tools/make/flatbuffers.patch"
PINS = {pin.name: pin for pin in load_pins()}

pytestmark = pytest.mark.skipif(not (SHARED / "gemmlowp").is_dir(), reason=f"no pinned sources at {SHARED}")


def git(*args, cwd: Path) -> str:
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def repository(folder: Path, files: Path, *, tag: str | None = None) -> str:
    """A git repository holding a copy of `files`, as the upstream one would; returns its commit."""
    shutil.copytree(files, folder)
    git("init", "-q", cwd=folder)
    git("add", "-A", cwd=folder)
    git("commit", "-qm", "upstream", cwd=folder)
    if tag:
        git("tag", tag, cwd=folder)
    return git("rev-parse", "HEAD", cwd=folder)


def test_the_pins_name_every_tree_the_firmware_build_reads():
    assert set(TREES) == set(PINS) == {"tflite-micro", "cmsis-nn", "cmsis", "flatbuffers", "gemmlowp", "mlperf-tiny-api",
                                       "cmsis-device-l4", "cmsis-device-h7"}
    for pin in PINS.values():
        assert pin.repository.startswith("https://github.com/") and pin.licence == "Apache-2.0"
        assert len(pin.sha256) == 64 and (len(pin.commit) == 40 or pin.commit.startswith("v"))


def test_the_shared_copy_matches_the_pins(capsys):
    assert check(SHARED) == dict.fromkeys(PINS)
    assert main(["third-party", "--check", str(SHARED)]) == 0
    assert capsys.readouterr().out.count("| yes") == len(PINS)


def test_a_changed_tree_is_named(tmp_path, capsys):
    copy = tmp_path / "sources"
    shutil.copytree(SHARED / "gemmlowp", copy / "gemmlowp")
    (copy / "gemmlowp" / "fixedpoint" / "fixedpoint.h").write_text("// edited\n")
    found = check(copy, (PINS["gemmlowp"],))
    assert found["gemmlowp"].startswith("SHA-256 ") and found["gemmlowp"].endswith(PINS["gemmlowp"].sha256)
    assert main(["third-party", "--check", str(copy)]) == 1
    assert "missing" in capsys.readouterr().out  # the trees not copied are named too


@pytest.fixture
def upstream(tmp_path) -> dict:
    """Local stand-ins for gemmlowp at a commit, TFLM (its flatbuffers patch) at a commit, and flatbuffers at a
    tag before TFLM's patch: the real trees, so the real pinned digests must come out."""
    tflm_files = tmp_path / "tflm-files"
    (tflm_files / PATCH).parent.mkdir(parents=True)
    shutil.copy(SHARED / "tflite-micro" / PATCH, tflm_files / PATCH)
    flatbuffers_files = tmp_path / "flatbuffers-files"
    shutil.copytree(SHARED / "flatbuffers", flatbuffers_files)
    git("init", "-q", cwd=flatbuffers_files)  # undo TFLM's patch: upstream flatbuffers as the tag holds it
    git("apply", "-R", str(tflm_files / PATCH), cwd=flatbuffers_files)
    shutil.rmtree(flatbuffers_files / ".git")
    repos = tmp_path / "repos"
    return {"gemmlowp": repository(repos / "gemmlowp", SHARED / "gemmlowp"),
            "tflite-micro": repository(repos / "tflite-micro", tflm_files),
            "flatbuffers": repository(repos / "flatbuffers", flatbuffers_files, tag="v25.9.23"), "root": repos}


def local_pins(upstream: dict, **changes) -> tuple:
    tflm = dataclasses.replace(PINS["tflite-micro"], keep=(PATCH,), drop=())  # TFLM's patch alone
    tflm = dataclasses.replace(tflm, sha256=tree_digest(SHARED / "tflite-micro", tflm))
    pins = [dataclasses.replace(p, repository=(upstream["root"] / p.name).as_uri(),
                                commit=upstream[p.name] if len(p.commit) == 40 else p.commit)
            for p in (tflm, PINS["flatbuffers"], PINS["gemmlowp"])]
    return tuple(dataclasses.replace(p, **changes.get(p.name, {})) for p in pins)


def test_a_fetch_reproduces_the_pinned_trees(tmp_path, upstream):
    pins = local_pins(upstream)
    dest = fetch(pins=pins, dest=tmp_path / "cache" / "third-party", log=lambda *_: None)
    assert check(dest, pins) == dict.fromkeys(p.name for p in pins)
    assert (dest / "flatbuffers" / "include" / "flatbuffers" / "base.h").read_bytes() == \
        (SHARED / "flatbuffers" / "include" / "flatbuffers" / "base.h").read_bytes()  # TFLM's patch applied
    assert not (dest / "gemmlowp" / ".git").exists() and (dest / "verified").is_file()
    assert fetch(pins=pins, dest=dest, log=print) == dest  # the second time from the cache: nothing fetched


def test_a_fetch_that_does_not_match_keeps_nothing(tmp_path, upstream):
    (upstream["root"] / "gemmlowp" / "LICENSE").write_text("changed upstream\n")
    git("commit", "-qam", "changed", cwd=upstream["root"] / "gemmlowp")
    moved = git("rev-parse", "HEAD", cwd=upstream["root"] / "gemmlowp")
    dest = tmp_path / "cache" / "third-party"
    with pytest.raises(DeviceError, match="gemmlowp: SHA-256 .* pinned " + PINS["gemmlowp"].sha256):
        fetch(pins=local_pins(upstream, gemmlowp={"commit": moved}), dest=dest, log=lambda *_: None)
    with pytest.raises(DeviceError, match="git fetch"):  # a commit the repository does not have
        fetch(pins=local_pins(upstream, gemmlowp={"commit": "0" * 40}), dest=dest, log=lambda *_: None)
    assert not dest.exists() and [p.name for p in dest.parent.iterdir() if not p.name.endswith(".lock")] == []


def test_tflm_sources_names_the_trees_to_build_from(tmp_path, monkeypatch):
    monkeypatch.setenv("TFLM_SOURCES", str(SHARED))
    assert sources_root() == SHARED.resolve()
    monkeypatch.setenv("TFLM_SOURCES", str(tmp_path))
    with pytest.raises(DeviceError, match="run `make third-party`"):
        sources_root()

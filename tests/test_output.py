"""Output folders: a run writes only where this tool wrote before, and refuses everything else before any work,
leaving the user's files byte-identical; two runs never write one folder at once."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import NO_BUDGET, SEEDNET

from pipeline.cli import main
from pipeline.errors import ConfigError, InputError
from pipeline.output import MARK, build_folder, check_output, kind_of, writing
from targets import TARGETS_DIR

REPO = Path(__file__).resolve().parents[1]


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and link under `root` (itself included) by its bytes: the user's files, before and after."""
    if root.is_symlink() or root.is_file():
        return {".": os.readlink(root) if root.is_symlink() else hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


def project(folder: Path) -> Path:
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    (folder / "Makefile").write_text("all:\n\tcc src/main.c\n")
    return folder


def refused(argv: list[str], capsys, *words: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words), err
    return err


def deploy_argv(out, *extra) -> list[str]:
    return ["deploy", *SEEDNET, *NO_BUDGET, "--eval-samples", "20", "--quiet", *(["--out", str(out)] if out else []),
            *extra]


def test_a_deploy_refuses_a_folder_holding_a_users_files(tmp_path, capsys):
    folder = project(tmp_path / "firmware-project")
    before = tree_digest(tmp_path)
    err = refused(deploy_argv(folder), capsys, "holds files this tool did not make (Makefile, src)", "Nothing was changed")
    assert tree_digest(tmp_path) == before
    print(err)


def test_a_file_a_symlink_and_the_current_folder_are_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / "target-folder").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target-folder")
    before = tree_digest(tmp_path)
    refused(deploy_argv(tmp_path / "notes.txt"), capsys, "is a file, not a folder")
    refused(deploy_argv(tmp_path / "link"), capsys, "is a symbolic link")
    monkeypatch.chdir(tmp_path / "target-folder")
    refused(deploy_argv("."), capsys, "is the folder you are in")
    refused(deploy_argv(tmp_path), capsys, "is the folder you are in")
    assert tree_digest(tmp_path) == before


def test_out_naming_the_profile_or_the_data_is_refused(tmp_path, capsys, cifar_dir):
    profile = tmp_path / "boards" / "mine.toml"
    profile.parent.mkdir()
    shutil.copy(TARGETS_DIR / "rpi4.toml", profile)
    data = tmp_path / "data"
    shutil.copytree(cifar_dir, data)
    before = tree_digest(tmp_path)
    refused(deploy_argv(profile, "--target", str(profile)), capsys, "is a file")
    refused(deploy_argv(profile.parent, "--target", str(profile)), capsys, "which this run reads")
    refused(deploy_argv(data, "--data", str(data)), capsys, "which this run reads")
    refused(deploy_argv(tmp_path, "--data", str(data)), capsys, "which this run reads")
    assert tree_digest(tmp_path) == before


def test_bench_firmware_and_regress_refuse_what_is_not_theirs(tmp_path, capsys):
    folder = project(tmp_path / "mine")
    before = tree_digest(tmp_path)
    refused(["bench", "--models", "seednet", "--out", str(folder)], capsys, "`bench` writes only")
    refused(["firmware", "--out", str(folder)], capsys, "is not a build of this tool")
    refused(["regress", "--out", str(folder)], capsys, "is not a build of this tool")
    refused(["mlperf-tiny", "--out", str(folder)], capsys, "`mlperf-tiny` writes only")
    assert tree_digest(tmp_path) == before


def test_a_folder_of_another_kind_is_not_replaced(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / MARK).write_text(json.dumps({"kind": "bench"}))
    with pytest.raises(InputError, match="is a benchmark folder, not a deploy build"):
        check_output(bench, kind="deploy")
    assert check_output(bench, kind="bench") == bench
    # bench/ holding only an MLPerf Tiny run (the default bench/mlperf-tiny) may become a bench folder
    holder = tmp_path / "holder"
    (holder / "mlperf-tiny").mkdir(parents=True)
    (holder / "mlperf-tiny" / MARK).write_text(json.dumps({"kind": "mlperf-tiny"}))
    assert check_output(holder, kind="bench") == holder
    with pytest.raises(InputError, match="did not make"):
        check_output(holder, kind="deploy")  # a deploy replaces its folder whole: never one holding others' output


def test_the_default_folder_comes_from_the_profile_name_not_its_path():
    assert build_folder("rpi4") == Path("build/rpi4")
    assert build_folder("mine", "elsewhere") == Path("elsewhere")
    for bad in ("../up", "a/b", ".", ""):
        with pytest.raises(ConfigError, match="cannot name a build folder"):
            build_folder(bad)


@pytest.mark.slow
def test_a_profile_given_by_path_survives_two_deploys(tmp_path, monkeypatch, cifar_dir):
    """The issue's case: TARGET=/abs/mine.toml without OUT, run where the profile lies, twice."""
    boards = tmp_path / "boards"
    boards.mkdir()
    profile = boards / "mine.toml"
    profile.write_text((TARGETS_DIR / "rpi4.toml").read_text().replace('name = "rpi4"', 'name = "mine"'))
    monkeypatch.chdir(boards)
    before = tree_digest(profile)
    for _ in range(2):
        assert main(deploy_argv(None, "--target", str(profile), "--data", str(cifar_dir))) in (0, 1)
        assert tree_digest(profile) == before and kind_of(boards / "build" / "mine") == "deploy"
    assert sorted(p.name for p in boards.iterdir()) == ["build", "mine.toml"]
    assert sorted(p.name for p in (boards / "build").iterdir()) == ["mine"]  # no staging or .old left behind


def test_a_second_run_writing_the_same_folder_is_refused_at_once(tmp_path):
    out = tmp_path / "build"
    script = ("import sys, time; from pipeline.output import writing\n"
              "with writing(sys.argv[1]):\n    print('held', flush=True); time.sleep(30)\n")
    holder = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(InputError, match=f"Another cnn-deploy run is writing {out}"), writing(out):
            pass
        assert time.monotonic() - started < 20  # refused, not queued behind the 30 s holder
    finally:
        holder.kill()
        holder.wait()
    with writing(out):  # free again once the holder is gone, even killed
        pass


@pytest.mark.slow
@pytest.mark.device
def test_two_deploys_at_once_share_the_caches_and_refuse_a_shared_out(tmp_path, cifar_small):
    """Real processes: two deploys of one model at one budget into two folders sweep sensitivity once (the
    second waits for the first's table); a third into a folder one of them is writing is refused. A board without
    a core (host latency), so the cache shared is the sensitivity table's, not minutes of emulated-Pi timings."""
    env = {**os.environ, "CNN_DEPLOY_CACHE": str(tmp_path / "cache")}
    profile = tmp_path / "host.toml"
    profile.write_text('name = "host"\ndescription = "this host, no board core"\nruntime = "onnxruntime"\n')

    def start(out: Path) -> subprocess.Popen:
        argv = [sys.executable, "-m", "pipeline.cli", "deploy", *SEEDNET, "--target", str(profile), "--budget", "0.97",
                "--eval-samples", "20", "--quiet", "--data", str(cifar_small), "--out", str(out)]
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first, second = start(tmp_path / "a"), start(tmp_path / "b")
    time.sleep(3)
    third = start(tmp_path / "a")
    third_err = third.communicate(timeout=600)[1]
    results = [p.communicate(timeout=900) for p in (first, second)]
    assert third.returncode == 2 and f"Another cnn-deploy run is writing {tmp_path / 'a'}" in third_err, third_err
    assert [p.returncode for p in (first, second)] in ([0, 0], [0, 1], [1, 0], [1, 1]), results
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("a", "b")]
    cached = sorted(r["decomposition"]["allocation"]["sensitivity"]["cached"] for r in reports)
    assert cached == [False, True]  # one swept, the other waited and reused the table
    plans = [r["decomposition"]["layers"] for r in reports]
    assert plans[0] == plans[1]
    assert not list((tmp_path / "cache").rglob("*.tmp")) and not list(tmp_path.glob(".*staging*"))


def test_outputs_from_before_the_mark_are_recognised_by_what_they_always_wrote(tmp_path):
    build, bench = tmp_path / "old-build", tmp_path / "old-bench"
    build.mkdir()
    bench.mkdir()
    (build / "manifest.json").write_text(json.dumps({"target_profile": {}, "artefacts": {}}))
    (bench / "results.json").write_text(json.dumps({"models": []}))
    assert (kind_of(build), kind_of(bench)) == ("deploy", "bench")
    assert check_output(build, kind="deploy") == build and check_output(bench, kind="bench") == bench
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"name": "my web app"}')  # someone else's manifest
    assert kind_of(tmp_path / "other") is None
    with pytest.raises(InputError, match="did not make"):
        check_output(tmp_path / "other", kind="deploy")

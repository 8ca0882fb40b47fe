"""Output folders are somebody's data: refuse what we didn't write, survive signals and full disks.

Each case asserts the exit code, one error line (no traceback), that files outside the
output were not touched and that no ``.NAME.*.partial`` folder is left behind.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.adversarial_helpers import one_line, tree_state
from tests.conftest import REPO
from tome_export.bundle import BundleWriter
from tome_export.bundle.writer import PARTIAL_MARKER
from tome_export.cli import run as cli_run
from tome_export.errors import UserError

pytest_plugins = ["tests.adversarial_fixtures"]

TINY = ["samples.reference_vit:vit_tiny_test", "--r", "4", "--input-shape", "1,3,64,64", "--seeds", "1", "-q"]


def partials(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.endswith(".partial") or ".old-" in p.name]


def write_bundle(out: Path, files: dict[str, bytes], force: bool = False) -> BundleWriter:
    writer = BundleWriter(out, force=force)
    with writer as bundle:
        for name, data in files.items():
            (bundle.path / name).parent.mkdir(parents=True, exist_ok=True)
            (bundle.path / name).write_bytes(data)
        bundle.write_manifest({"tome_export_version": "test"})
    return writer


# -- what an existing -o folder may be --------------------------------------------------------


def _web_extension(folder: Path) -> None:
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"manifest_version": 3, "name": "ext"}))
    (folder / "README.txt").write_text("mine")
    (folder / "src").mkdir()
    (folder / "src" / "main.js").write_text("console.log(1)")


def _plain_folder(folder: Path) -> None:
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")


def _empty_folder(folder: Path) -> None:
    folder.mkdir()


def _bundle_with_notes(folder: Path) -> None:
    write_bundle(folder, {"model.onnx": b"graph"})
    (folder / "NOTES.txt").write_text("my notes")


def _bundle_with_subfolder(folder: Path) -> None:
    write_bundle(folder, {"model.onnx": b"graph"})
    (folder / "mine").mkdir()
    (folder / "mine" / "a.txt").write_text("x")


def _bundle_with_edited_artifact(folder: Path) -> None:
    write_bundle(folder, {"model.onnx": b"graph"})
    (folder / "model.onnx").write_bytes(b"my edited graph")


def _bundle_with_symlink(folder: Path) -> None:
    write_bundle(folder, {"model.onnx": b"graph"})
    (folder / "link").symlink_to("/etc")


def _manifest_of_another_tool(folder: Path) -> None:
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 1, "tool": "other", "artifacts": {}}))


def _garbage_manifest(folder: Path) -> None:
    folder.mkdir()
    (folder / "manifest.json").write_bytes(os.urandom(64))


def _a_file(folder: Path) -> None:
    folder.write_text("not a folder")


FOREIGN = {
    "web-extension": (_web_extension, "not a tome-export bundle"),
    "plain-folder": (_plain_folder, "not a tome-export bundle"),
    "empty-folder": (_empty_folder, "not a tome-export bundle"),
    "bundle-plus-notes": (_bundle_with_notes, "NOTES.txt"),
    "bundle-plus-subfolder": (_bundle_with_subfolder, "mine/"),
    "bundle-edited-artifact": (_bundle_with_edited_artifact, "model.onnx"),
    "bundle-plus-symlink": (_bundle_with_symlink, "link"),
    "other-tool-manifest": (_manifest_of_another_tool, "not a tome-export bundle"),
    "garbage-manifest": (_garbage_manifest, "not a tome-export bundle"),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_foreign_output_folder_is_refused_and_untouched(tmp_path, case):
    make, message = FOREIGN[case]
    out = tmp_path / "out"
    make(out)
    before = tree_state(tmp_path)
    with pytest.raises(UserError, match="use a new folder or --force") as info:
        write_bundle(out, {"model.onnx": b"new"})
    assert message in str(info.value) and "\n" not in str(info.value)
    assert tree_state(tmp_path) == before and not partials(tmp_path)


@pytest.mark.parametrize("case", list(FOREIGN))
def test_force_keeps_the_foreign_folder_aside(tmp_path, case):
    make, _ = FOREIGN[case]
    out = tmp_path / "out"
    make(out)
    before = {p.relative_to(out).as_posix() for p in out.rglob("*")}
    writer = write_bundle(out, {"model.onnx": b"new"}, force=True)
    assert (out / "model.onnx").read_bytes() == b"new"
    assert writer.aside is not None and writer.aside.name.startswith("out.replaced-")
    assert {p.relative_to(writer.aside).as_posix() for p in writer.aside.rglob("*")} == before
    assert not partials(tmp_path)


def test_existing_file_as_output_is_refused_even_with_force(tmp_path):
    _a_file(tmp_path / "out")
    with pytest.raises(UserError, match="not a folder"):
        write_bundle(tmp_path / "out", {"model.onnx": b"new"}, force=True)
    assert (tmp_path / "out").read_text() == "not a folder"


def test_our_own_bundle_is_replaced_without_leftovers(tmp_path):
    out = tmp_path / "out"
    write_bundle(out, {"model.onnx": b"old", "blocks/b.weights": b"w"})
    writer = write_bundle(out, {"model.onnx": b"new"})
    assert writer.aside is None and (out / "model.onnx").read_bytes() == b"new"
    assert not (out / "blocks").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_symlink_output_is_refused_and_force_keeps_the_link(tmp_path):
    target = tmp_path / "real"
    write_bundle(target, {"model.onnx": b"old"})
    link = tmp_path / "out"
    link.symlink_to(target)
    before = tree_state(tmp_path)
    with pytest.raises(UserError, match="symbolic link"):
        write_bundle(link, {"model.onnx": b"new"})
    assert tree_state(tmp_path) == before
    writer = write_bundle(link, {"model.onnx": b"new"}, force=True)
    assert writer.aside.is_symlink() and (target / "model.onnx").read_bytes() == b"old"
    assert not link.is_symlink() and (link / "model.onnx").read_bytes() == b"new"


@pytest.mark.parametrize(
    ("out", "message"),
    [("", "names no folder"), ("   ", "names no folder"), (".", "current folder"), ("/", "filesystem root")],
)
def test_unusable_output_names(tmp_path, monkeypatch, out, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message):
        BundleWriter(out)


def test_cwd_parent_as_output_is_refused(tmp_path, monkeypatch):
    write_bundle(tmp_path / "b", {"model.onnx": b"x"})
    (tmp_path / "b" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "b" / "sub")
    with pytest.raises(UserError, match="current folder or one holding it"):
        BundleWriter("..")


# -- the CLI, end to end ---------------------------------------------------------------------


@pytest.mark.parametrize("case", ["web-extension", "bundle-plus-notes"])
def test_cli_refuses_foreign_output_exit_2(tmp_path, capsys, case):
    out = tmp_path / "out"
    FOREIGN[case][0](out)
    before = tree_state(tmp_path)
    assert cli_run([*TINY, "-o", str(out)]) == 2
    assert "use a new folder or --force" in one_line(capsys.readouterr().err)
    assert tree_state(tmp_path) == before and not partials(tmp_path)


@pytest.mark.parametrize("out", ["", ".", "/"])
def test_cli_unusable_output_exit_2(tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)
    assert cli_run([*TINY, "-o", out]) == 2
    assert one_line(capsys.readouterr().err).startswith("error: -o")
    assert list(tmp_path.iterdir()) == []


def test_cli_dot_inside_a_bundle_exit_2(adv_tiny, copy_of, capsys, monkeypatch):
    bundle = copy_of(adv_tiny)
    monkeypatch.chdir(bundle)
    before = tree_state(bundle.parent)
    assert cli_run([*TINY, "-o", "."]) == 2
    assert "current folder" in one_line(capsys.readouterr().err)
    assert tree_state(bundle.parent) == before and not partials(bundle.parent)


def test_cli_force_over_user_files_keeps_them(tmp_path, capsys):
    out = tmp_path / "out"
    _bundle_with_notes(out)
    assert cli_run([*TINY, "-o", str(out), "--force"]) == 0
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.replaced-")]
    assert len(kept) == 1 and (kept[0] / "NOTES.txt").read_text() == "my notes"
    assert (out / "model.onnx").is_file() and not partials(tmp_path)


# -- stale partials, umask, disk errors -------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _partial(parent: Path, name: str, marker: dict | None) -> Path:
    path = parent / name
    path.mkdir()
    (path / "model.onnx").write_bytes(b"x" * 100)
    if marker is not None:
        (path / PARTIAL_MARKER).write_text(json.dumps(marker))
    return path


@pytest.mark.parametrize(
    ("marker", "removed"),
    [
        ({"tool": "tome-export", "out": "out", "pid": "DEAD"}, True),
        ({"tool": "tome-export", "out": "out", "pid": "ALIVE"}, False),
        ({"tool": "tome-export", "out": "other", "pid": "DEAD"}, False),
        ({"tool": "someone-else", "out": "out", "pid": "DEAD"}, False),
        (None, False),
        ({"tool": "tome-export", "out": "out", "pid": "not-a-pid"}, False),
    ],
)
def test_stale_partials_only_ours_are_cleaned(tmp_path, marker, removed):
    if marker is not None:
        marker = {**marker, "pid": {"DEAD": _dead_pid(), "ALIVE": os.getpid()}.get(marker["pid"], marker["pid"])}
    stale = _partial(tmp_path, ".out.0badc0de.partial", marker)
    write_bundle(tmp_path / "out", {"model.onnx": b"new"})
    assert stale.exists() is not removed


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o027, 0o750), (0o002, 0o775), (0o077, 0o700)])
def test_new_bundle_folder_respects_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_bundle(tmp_path / "out", {"model.onnx": b"x"})
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS])
def test_write_errors_become_one_line_and_leave_nothing(tmp_path, code):
    write_bundle(tmp_path / "out", {"model.onnx": b"old"})
    with pytest.raises(UserError) as info:
        with BundleWriter(tmp_path / "out") as bundle:
            (bundle.path / "model.onnx").write_bytes(b"half")
            raise OSError(code, os.strerror(code), str(bundle.path / "model.onnx"))
    assert "nothing was written" in str(info.value) and "\n" not in str(info.value)
    assert (tmp_path / "out" / "model.onnx").read_bytes() == b"old" and not partials(tmp_path)


def _mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


@pytest.fixture
def small_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        _mount_tmpfs(path, options)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def test_full_disk_is_one_line_exit_2(small_tmpfs, cli):
    disk = small_tmpfs("full", "size=256k")
    result = cli(*TINY, "-o", str(disk / "out"), cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert "no space left" in one_line(result.stderr)
    assert list(disk.iterdir()) == []


def test_read_only_disk_is_one_line_exit_2(small_tmpfs, cli):
    disk = small_tmpfs("ro", "size=1m,ro")
    result = cli(*TINY, "-o", str(disk / "out"), cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert "not writable" in one_line(result.stderr) or "read-only" in result.stderr
    assert list(disk.iterdir()) == []


# -- signals mid-export ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "existing"),
    [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGHUP, False), (signal.SIGTERM, True)],
    ids=["SIGINT", "SIGTERM", "SIGHUP", "SIGTERM-over-old-bundle"],
)
def test_signal_mid_export_cleans_up(tmp_path, signum, existing):
    out = tmp_path / "out"
    if existing:
        write_bundle(out, {"model.onnx": b"old"})
    before = tree_state(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-m", "tome_export", *TINY, "-o", str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)  # inside the export now
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    assert "interrupted" in one_line(err)
    assert not partials(tmp_path)
    assert tree_state(tmp_path) == before


def test_sigterm_mid_profile_sweep_removes_its_temporary_exports(tmp_path):
    """SIGTERM while ``profile --sweep`` re-exports: its temporary folder goes, exit 143, one line
    (Python's default SIGTERM would kill it without running any cleanup)."""
    bundle, scratch = tmp_path / "bundle", tmp_path / "scratch"
    scratch.mkdir()
    assert cli_run([*TINY, "-o", str(bundle)]) == 0
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "TMPDIR": str(scratch),
    }
    command = [sys.executable, "-m", "tome_export", "profile", str(bundle), "--sweep", "r=0,2,4", "--trust-source"]
    command += ["--runs", "2", "--warmup", "0", "--no-fidelity", "--db", str(tmp_path / "results.sqlite"), "-q"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(scratch.glob("tome-profile-exports-*")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)  # re-exporting now
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in one_line(err)
    assert list(scratch.iterdir()) == []

"""Writing an export's output folder without ever destroying what tome-export didn't write.

An export writes into a hidden sibling ``.NAME.<random>.partial`` (marked as ours) and
renames it into place only when everything succeeded. The folder it replaces must be one
tome-export wrote: a manifest with our schema version and tool name, and no file besides
the ones it lists (same sizes). Anything else — a foreign folder, a bundle a user added
files to, a symlink — is refused (exit 2) unless ``force``; with ``force`` the old folder
is renamed aside to ``NAME.replaced-<UTC time>`` and kept, never deleted.
SIGTERM and SIGHUP are handled like SIGINT (``interrupts``: the partial folder is removed,
exit 128+N);
stale partials of the same output left by a killed process are removed when we can tell
they are ours and their process is gone; a full disk or a read-only / forbidden folder is
one line, exit 2. New folders respect the umask.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import secrets
import shutil
from pathlib import Path

from tome_export.bundle.integrity import sha256_file
from tome_export.bundle.manifest import MANIFEST, SCHEMA_VERSION, TOOL, is_tool_manifest
from tome_export.errors import UserError
from tome_export.interrupts import blocked, raising

PARTIAL_MARKER = ".tome-export-partial"
DISK_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}


def disk_error(exc: OSError, out: Path) -> UserError | None:
    """One line for an OSError that is the machine's state, not a bug (full disk, permissions)."""
    reason = DISK_ERRORS.get(exc.errno)
    if reason is None:
        return None
    return UserError(f"cannot write {out}: {reason}; nothing was written (free space or choose another -o)")


def check_output_path(out: str | os.PathLike | None) -> None:
    """Reject an ``-o`` value that can't name a new folder, before any work."""
    if out is None:
        return
    text = os.fspath(out)
    if not text.strip():
        raise UserError("-o '' names no folder; give an output folder like -o my_bundle")
    if "\x00" in text:
        raise UserError("-o contains a NUL character; give an ordinary folder name")
    absolute = Path(os.path.abspath(text))
    if absolute == absolute.parent:
        raise UserError(f"-o {text!r} is a filesystem root; give a folder for the bundle")
    cwd = Path(os.getcwd())
    if absolute == cwd or absolute in cwd.parents:
        raise UserError(f"-o {text!r} is the current folder or one holding it; run from outside it or use a new folder")


def foreign_entries(folder: Path) -> list[str] | None:
    """Paths in ``folder`` tome-export did not write (None: no tome-export manifest at all)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if (folder / MANIFEST).is_symlink() or not is_tool_manifest(manifest):
        return None
    listed = manifest["artifacts"]
    foreign = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_symlink():
            foreign.append(relative)
        elif path.is_dir():
            if not any(name.startswith(f"{relative}/") for name in listed):
                foreign.append(relative + "/")
        elif relative != MANIFEST:
            entry = listed.get(relative)
            if not isinstance(entry, dict) or entry.get("bytes") != path.stat().st_size:
                foreign.append(relative)
    return foreign


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_partials(out: Path) -> list[Path]:
    """Remove ``.NAME.*.partial`` folders of this output whose marker says a dead process of ours wrote them."""
    removed = []
    for candidate in out.parent.glob(f".{out.name}.*.partial"):
        marker = candidate / PARTIAL_MARKER
        try:
            if candidate.is_symlink() or not candidate.is_dir() or marker.is_symlink():
                continue
            info = json.loads(marker.read_text())
            if info.get("tool") != TOOL or info.get("out") != out.name or _pid_alive(int(info["pid"])):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not recognisably ours: leave it alone
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed


class BundleWriter:
    """``with BundleWriter(out, force=False) as bundle:`` write into ``bundle.path``; commit on exit."""

    def __init__(self, out: str | Path, force: bool = False) -> None:
        check_output_path(out)
        self.given = Path(out)
        self.out = Path(os.path.abspath(out))
        self.force = force
        self.path: Path | None = None
        self.aside: Path | None = None  # where a replaced foreign folder was kept
        self._signals = contextlib.ExitStack()  # the signal handlers while the folder is partial
        self._replace_ours = False  # the existing folder is entirely ours: replace it, delete the old
        self._check_destination()
        parent = self.out.parent
        if not parent.is_dir():
            raise UserError(f"cannot write {self.given}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"cannot write {self.given}: folder {parent} is not writable")

    def _check_destination(self) -> None:
        out, shown = self.out, self.given
        if out.is_symlink():
            if not self.force:
                raise UserError(
                    f"-o {shown} is a symbolic link; tome-export does not replace links: use a new folder or --force"
                )
            return
        if not out.exists():
            return
        if not out.is_dir():
            raise UserError(f"-o {shown} exists and is not a folder; use a new folder")
        foreign = foreign_entries(out)
        if foreign is None and not self.force:
            raise UserError(
                f"-o {shown} exists and is not a tome-export bundle; use a new folder or --force "
                "(--force keeps the old folder as NAME.replaced-TIME)"
            )
        if foreign and not self.force:
            listed = ", ".join(foreign[:3]) + (" …" if len(foreign) > 3 else "")
            raise UserError(
                f"-o {shown} is a tome-export bundle holding files it did not write ({listed}); "
                "use a new folder or --force (--force keeps the old folder as NAME.replaced-TIME)"
            )
        self._replace_ours = foreign == []

    def __enter__(self) -> BundleWriter:
        clean_stale_partials(self.out)
        name = f".{self.out.name}.{secrets.token_hex(4)}.partial"
        self.path = self.out.parent / name
        try:
            os.mkdir(self.path, 0o777)  # the umask applies, as for any folder the user makes
            marker = {"tool": TOOL, "pid": os.getpid(), "out": self.out.name}
            (self.path / PARTIAL_MARKER).write_text(json.dumps(marker))
        except OSError as exc:
            shutil.rmtree(self.path, ignore_errors=True)
            raise (disk_error(exc, self.given) or exc) from None
        self._signals.enter_context(raising())
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        with blocked():  # a second signal must not stop the cleanup half-way
            try:
                if exc_type is None:
                    try:
                        self._commit()
                        return
                    except OSError as error:
                        problem = disk_error(error, self.given)
                        if problem is None:
                            raise
                        raise problem from None
                if isinstance(exc, OSError) and disk_error(exc, self.given) is not None:
                    raise disk_error(exc, self.given) from None
            finally:
                self._signals.close()
                if self.path is not None and self.path.exists():
                    shutil.rmtree(self.path, ignore_errors=True)

    # -- the manifest and the rename --------------------------------------------------
    def write_manifest(self, manifest: dict) -> dict:
        """Adds schema version, tool name and the sha256 of every artifact; writes manifest.json."""
        artifacts = {
            p.relative_to(self.path).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(self.path.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST, PARTIAL_MARKER)
        }
        full = {"schema_version": SCHEMA_VERSION, "tool": TOOL, **manifest, "artifacts": artifacts}
        (self.path / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
        return full

    def _commit(self) -> None:
        """Rename the partial folder into place (signals are blocked by the caller)."""
        (self.path / PARTIAL_MARKER).unlink(missing_ok=True)
        old = None
        if os.path.lexists(self.out):
            # Checked again: files may have been added to it while we exported.
            if self._replace_ours and not self.out.is_symlink() and foreign_entries(self.out) == []:
                old = self.out.parent / f".{self.out.name}.old-{os.getpid()}-{secrets.token_hex(2)}"
            else:  # --force over something not ours: keep it, visibly
                stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
                self.aside = self.out.parent / f"{self.out.name}.replaced-{stamp}"
                if os.path.lexists(self.aside):
                    self.aside = self.aside.with_name(f"{self.aside.name}-{secrets.token_hex(2)}")
                os.replace(self.out, self.aside)
        if old is not None:
            os.replace(self.out, old)
        try:
            os.replace(self.path, self.out)
        except OSError:
            if old is not None:
                os.replace(old, self.out)
            if self.aside is not None:
                os.replace(self.aside, self.out)
                self.aside = None
            raise
        self.path = None
        if old is not None:  # every file in it was ours (checked before exporting)
            shutil.rmtree(old, ignore_errors=True)

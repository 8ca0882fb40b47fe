"""Reading files of an untrusted bundle: inside the folder, checksummed, from the bytes used.

Every file is opened component by component from the bundle folder with ``O_NOFOLLOW``
(no symlink anywhere below the bundle folder, so nothing outside it can be reached, even
if a folder is swapped for a link while we read), must be a regular file of the size the
manifest lists, and is hashed from the very bytes that are then handed to the runtime:
:func:`read_verified` returns those bytes, so a file replaced after ``load`` (or between
two runs, mtime restored or not) is caught when it is used. Pure Python.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from tome_export.bundle.manifest import BundleError, check_relative_path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """sha256 of a file we wrote ourselves (export side; untrusted files use read_verified)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def open_inside(root: Path, relative: str) -> int:
    """A read-only fd of ``root/relative``; BundleError if any part is a symlink, missing,
    or not a regular file. ``relative`` is checked as a plain relative path first."""
    check_relative_path(relative, str(root))
    parts = relative.split("/")
    try:
        fd = os.open(root, os.O_RDONLY | _DIRECTORY)
    except OSError as exc:
        raise BundleError(f"cannot open bundle folder {root}: {exc.strerror}") from None
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            # O_NONBLOCK: a FIFO swapped in after the lstat must not hang the open.
            flags = os.O_RDONLY | _NOFOLLOW | (getattr(os, "O_NONBLOCK", 0) if last else _DIRECTORY)
            try:
                info = os.lstat(part, dir_fd=fd)
            except FileNotFoundError:
                raise BundleError(
                    f"bundle {root} is incomplete: artifact {relative} is missing; export it again"
                ) from None
            if stat.S_ISLNK(info.st_mode):
                raise BundleError(
                    f"bundle {root}: {'/'.join(parts[: index + 1])} is a symbolic link; a bundle holds only "
                    "regular files inside its folder"
                )
            if last and not stat.S_ISREG(info.st_mode):
                raise BundleError(f"bundle {root}: {relative} is not a regular file")
            try:
                child = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                raise BundleError(f"bundle {root}: cannot open {relative}: {exc.strerror}") from None
            os.close(fd)
            fd = child
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleError(f"bundle {root}: {relative} is not a regular file")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _check_size(root: Path, relative: str, size: int, entry: dict) -> None:
    if size != entry["bytes"]:
        raise BundleError(
            f"bundle {root}: {relative} has {size} bytes, the manifest says {entry['bytes']}; "
            "the file was altered or truncated, export it again"
        )


def _check_digest(root: Path, relative: str, digest: str, entry: dict) -> None:
    if digest != entry["sha256"]:
        raise BundleError(f"bundle {root}: {relative} fails its sha256 check; the file was altered, export it again")


def _entry(root: Path, manifest: dict, relative: str) -> dict:
    entry = manifest["artifacts"].get(relative)
    if entry is None:
        raise BundleError(
            f"bundle {root}: {relative!r} is not listed under 'artifacts' (every file a bundle uses must be "
            "checksummed); refusing to read it"
        )
    return entry


def read_verified(root: str | Path, manifest: dict, relative: str) -> bytes:
    """The bytes of artifact ``relative``, checked against its manifest size and sha256.

    Hash and use the same bytes: callers hand the returned object to the runtime."""
    root = Path(root)
    entry = _entry(root, manifest, relative)
    fd = open_inside(root, relative)
    with os.fdopen(fd, "rb") as handle:
        _check_size(root, relative, os.fstat(handle.fileno()).st_size, entry)
        data = handle.read(entry["bytes"] + 1)
    _check_size(root, relative, len(data), entry)
    _check_digest(root, relative, hashlib.sha256(data).hexdigest(), entry)
    return data


def check_artifact(root: str | Path, manifest: dict, relative: str) -> None:
    """Stream-hash one artifact (no copy kept) against the manifest."""
    root = Path(root)
    entry = _entry(root, manifest, relative)
    fd = open_inside(root, relative)
    digest = hashlib.sha256()
    with os.fdopen(fd, "rb") as handle:
        _check_size(root, relative, os.fstat(handle.fileno()).st_size, entry)
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    _check_digest(root, relative, digest.hexdigest(), entry)


def external_files(manifest: dict, artifact: str, graph: bytes) -> list[tuple[str, str]]:
    """Artifacts an ONNX graph may reference as external data: (name relative to the graph's
    folder, name in the bundle) for every listed file under the graph's folder whose
    relative name occurs in the graph bytes. The runtime loads only these, verified, from
    memory; any other external reference fails inside ONNX Runtime."""
    folder = artifact.rpartition("/")[0]
    prefix = f"{folder}/" if folder else ""
    found = []
    for name in manifest["artifacts"]:
        if name == artifact or not name.startswith(prefix) or name.endswith(".onnx"):
            continue
        local = name[len(prefix) :]
        if local.encode() in graph:
            found.append((local, name))
    return found

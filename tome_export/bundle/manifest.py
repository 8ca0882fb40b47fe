"""Reading a bundle's ``manifest.json`` as untrusted input: parse, then check every field used.

A bundle may come from someone else. Everything the runtime, the profiler or the output
folder policy reads from a manifest is checked here first — types, dtypes, sha256 digests,
and every path the manifest names (``artifacts`` keys, ``artifact``, variants, dynamic
loading blocks) must be a plain relative path listed in ``artifacts`` — so a malformed or
hostile manifest fails with one :class:`BundleError` line before any other file is read.
Pure Python: no torch, onnx or onnxruntime.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path, PurePosixPath

from tome_export.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TOOL = "tome-export"
MAX_MANIFEST_BYTES = 64 * 2**20
MAX_PATH_CHARS = 1024
# dtypes an input or output may declare (numpy names, as the exporter writes them).
DTYPES = frozenset("float16 float32 float64 bfloat16 int8 int16 int32 int64 uint8 uint16 uint32 uint64 bool".split())
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BundleError(UserError):
    """A bundle is malformed, incomplete, altered or names a file outside itself. Exit status 2."""


def _fail(where: str, what: str) -> BundleError:
    return BundleError(f"{where}: {what}; the bundle is not usable (export it again or ask its author)")


def check_relative_path(text: object, where: str) -> str:
    """``text`` must be a plain relative path inside the bundle: no absolute path, no ``..``,
    no empty or ``.`` parts, no backslashes or NUL. Returns it unchanged. Touches no file."""
    if not isinstance(text, str) or not text:
        raise _fail(where, f"path {text!r} is not a non-empty string")
    if len(text) > MAX_PATH_CHARS or "\x00" in text or "\\" in text:
        raise _fail(where, f"path {text[:80]!r} is not a plain relative path")
    parts = text.split("/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text) or any(p in ("", ".", "..") for p in parts):
        raise _fail(where, f"path {text[:80]!r} points outside the bundle folder (only relative paths inside it)")
    if PurePosixPath(text).name == MANIFEST and len(parts) == 1:
        raise _fail(where, f"{MANIFEST} cannot be an artifact")
    return text


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_artifacts(artifacts: object, where: str) -> None:
    if not isinstance(artifacts, dict):
        raise _fail(where, '"artifacts" is not an object of {path: {sha256, bytes}}')
    for name, entry in artifacts.items():
        check_relative_path(name, f"{where} artifacts")
        if not isinstance(entry, dict):
            raise _fail(where, f"artifact {name!r} has no {{sha256, bytes}} entry")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            raise _fail(where, f"artifact {name!r} has a malformed sha256 (need 64 lowercase hex digits)")
        if not _is_int(entry.get("bytes")) or entry["bytes"] < 0:
            raise _fail(where, f"artifact {name!r} has a malformed size (need a non-negative integer 'bytes')")


def _check_listed(path: object, artifacts: dict, where: str) -> str:
    check_relative_path(path, where)
    if path not in artifacts:
        raise _fail(where, f"{path!r} is not listed under 'artifacts' (every file a bundle uses must be checksummed)")
    return path


def _check_specs(specs: object, key: str, where: str) -> None:
    if specs is None:
        return
    if not isinstance(specs, list):
        raise _fail(where, f'"{key}" is not a list')
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _fail(where, f'an entry of "{key}" has no string name')
        shape = spec.get("shape")
        if shape is not None and (
            not isinstance(shape, list) or not all(_is_int(d) and d >= 0 or isinstance(d, str) for d in shape)
        ):
            raise _fail(where, f"{key[:-1]} {spec['name']!r} has a malformed shape {str(shape)[:60]}")
        if "dtype" in spec and (not isinstance(spec["dtype"], str) or spec["dtype"] not in DTYPES):
            raise _fail(where, f"{key[:-1]} {spec['name']!r} has unknown dtype {str(spec['dtype'])[:40]!r}")


def _check_str_list(value: object, what: str, where: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(where, f"{what} is not a list of names")


def _check_dynamic(section: object, artifacts: dict, where: str) -> None:
    if not isinstance(section, dict):
        raise _fail(where, '"dynamic_loading" is not an object')
    if not _is_int(section.get("budget_bytes")) or section["budget_bytes"] <= 0:
        raise _fail(where, "dynamic_loading.budget_bytes is not a positive integer")
    _check_str_list(section.get("outputs"), "dynamic_loading.outputs", where)
    blocks = section.get("blocks")
    if not isinstance(blocks, list) or not blocks:
        raise _fail(where, "dynamic_loading.blocks is not a non-empty list")
    for index, block in enumerate(blocks):
        here = f"{where} dynamic_loading block {index}"
        if not isinstance(block, dict):
            raise _fail(here, "is not an object")
        _check_str_list(block.get("inputs"), "its inputs", here)
        _check_str_list(block.get("outputs"), "its outputs", here)
        for key in ("bytes", "activation_bytes"):
            if key in block and (not _is_int(block[key]) or block[key] < 0):
                raise _fail(here, f"{key} is not a non-negative integer")
        files = block.get("sha256")
        if not isinstance(files, dict) or not files:
            raise _fail(here, "has no sha256 table of its files")
        for name, digest in files.items():
            _check_listed(name, artifacts, here)
            if not isinstance(digest, str) or digest != artifacts[name]["sha256"]:
                raise _fail(here, f"sha256 of {name!r} disagrees with the 'artifacts' table")
        for key in ("artifact", "weights"):
            if key in block or key == "artifact":
                if block.get(key) not in files:
                    raise _fail(here, f"its {key} {str(block.get(key))[:80]!r} is not hashed in its sha256 table")


def validate_manifest(manifest: object, where: str) -> dict:
    """Check every field a reader relies on; returns the manifest. Raises BundleError."""
    if not isinstance(manifest, dict):
        raise _fail(where, "is not a JSON object")
    version = manifest.get("schema_version")
    if not _is_int(version) or version < 1:
        raise _fail(where, "has no positive integer schema_version; it is not a tome-export manifest")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{where} has schema version {version}, newer than this tome-export reads ({SCHEMA_VERSION}); "
            "upgrade tome-export"
        )
    artifacts = manifest.get("artifacts")
    _check_artifacts(artifacts, where)
    for key in ("target", "device", "lowering", "precision"):
        if key in manifest and manifest[key] is not None and not isinstance(manifest[key], str):
            raise _fail(where, f'"{key}" is not a string')
    if "custom_domains" in manifest:
        _check_str_list(manifest["custom_domains"], "custom_domains", where)
    if manifest.get("artifact") is not None:
        _check_listed(manifest["artifact"], artifacts, f"{where} artifact")
    _check_specs(manifest.get("inputs"), "inputs", where)
    _check_specs(manifest.get("outputs"), "outputs", where)
    variants = manifest.get("variants")
    if variants is not None:
        if not isinstance(variants, dict):
            raise _fail(where, '"variants" is not an object')
        for name, spec in variants.items():
            here = f"{where} variant {str(name)[:40]!r}"
            if not isinstance(spec, dict):
                raise _fail(here, "is not an object")
            _check_listed(spec.get("artifact"), artifacts, here)
            steps = spec.get("steps")
            if (
                not isinstance(steps, list)
                or len(steps) != 2
                or not _is_int(steps[0])
                or not (steps[1] is None or _is_int(steps[1]))
            ):
                raise _fail(here, "steps is not [start, stop] (integers; stop may be null)")
            if spec.get("dynamic_loading") is not None:
                _check_dynamic(spec["dynamic_loading"], artifacts, here)
    if manifest.get("dynamic_loading") is not None:
        _check_dynamic(manifest["dynamic_loading"], artifacts, where)
    for key in ("source", "merge"):
        if key in manifest and manifest[key] is not None and not isinstance(manifest[key], dict):
            raise _fail(where, f'"{key}" is not an object')
    return manifest


def parse_manifest_bytes(data: bytes, where: str) -> dict:
    """JSON bytes → validated manifest (one BundleError line for anything malformed)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(where, "is not UTF-8 text") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(where, f"is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise _fail(where, "is nested too deeply to be a manifest") from None
    return validate_manifest(manifest, where)


def read_manifest(bundle: str | Path) -> dict:
    """The validated manifest of a bundle folder (``manifest.json`` must be a regular file)."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(
            f"{bundle} is not a tome-export bundle: not a folder (export one with `tome-export MODEL -o DIR`)"
        )
    path = bundle / MANIFEST
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise BundleError(f"{bundle} is not a tome-export bundle: {MANIFEST} is missing") from None
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode):
        raise _fail(str(path), "is a symbolic link or not a regular file")
    if info.st_size > MAX_MANIFEST_BYTES:
        raise _fail(str(path), f"is {info.st_size} bytes, too large for a manifest")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror}") from None
    return parse_manifest_bytes(data, str(path))


def is_tool_manifest(manifest: object) -> bool:
    """Whether a parsed manifest was written by tome-export (schema version and tool name)."""
    return (
        isinstance(manifest, dict)
        and _is_int(manifest.get("schema_version"))
        and (manifest.get("tool") == TOOL or isinstance(manifest.get("tome_export_version"), str))
        and isinstance(manifest.get("artifacts"), dict)
    )

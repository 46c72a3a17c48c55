"""Files, safely: atomic writes (a file has its full new content or its old one, never half),
crash-consistent multi-file commits (``commit_dir``), JSON that refuses duplicate keys, size +
SHA-256 records checked on read, paths from files kept inside their folder (``contained``),
and outputs that never touch an input (``check_output``, ``check_existing``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str = "file") -> Any:
    """Read JSON; a missing, unreadable or malformed file (also: a key given twice in one object)
    is a CtpruneError naming the path."""
    return parse_json(read_text(path, what), f"{what} {path}")

class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def parse_json(text: str, source: str) -> Any:
    """JSON text -> object; malformed JSON or a key given twice in one object is a CtpruneError."""
    from ctprune.errors import CtpruneError

    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise CtpruneError(f"{source}: key {e.args[0]!r} appears twice in one object") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise CtpruneError(f"{source} is not valid JSON: {e}") from None


def read_text(path: Path, what: str = "file") -> str:
    """A UTF-8 text file; missing, unreadable or not UTF-8 is a CtpruneError naming the path."""
    from ctprune.errors import CtpruneError

    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CtpruneError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise CtpruneError(f"{what} {path} is a folder, not a file") from None
    except UnicodeDecodeError as e:
        raise CtpruneError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise CtpruneError(f"{what} {path} cannot be read: {e.strerror}") from None


# ---------------------------------------------------------------------------------------------
# Integrity: a recorded file carries its size and SHA-256, checked when it is read.


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a file, for an index or manifest."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def verify_file(path: Path, record: Any, what: str, recorded_in: str) -> None:
    """Refuse a file whose size or SHA-256 differs from ``record`` (swapped, altered, truncated)."""
    from ctprune.errors import CtpruneError

    if not isinstance(record, dict) or not isinstance(record.get("bytes"), int) \
            or not isinstance(record.get("sha256"), str):
        raise CtpruneError(f"{recorded_in}: the size/sha256 record of {what} is malformed")
    if not Path(path).is_file():
        raise CtpruneError(f"{what} {path} is missing (recorded in {recorded_in})")
    size = Path(path).stat().st_size
    if size != record["bytes"]:
        raise CtpruneError(f"{what} {path} has {size} bytes, {recorded_in} recorded {record['bytes']}: "
                           "it was truncated, altered or swapped")
    if sha256_file(path) != record["sha256"]:
        raise CtpruneError(f"{what} {path} does not match the SHA-256 recorded in {recorded_in}: "
                           "it was altered or swapped")


# ---------------------------------------------------------------------------------------------
# Paths: a path read from a file stays inside its folder; an output never touches an input.


def contained(root: Path, rel: Any, what: str) -> Path:
    """``root / rel`` for a relative path ``rel`` read from a file; refused when it is absolute,
    climbs with ``..``, or resolves (through symlinks) outside ``root``."""
    from ctprune.errors import CtpruneError

    if not isinstance(rel, str) or not rel.strip():
        raise CtpruneError(f"{what}: path must be a non-empty string, got {rel!r}")
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if PurePosixPath(rel).is_absolute() or rel.startswith(("\\", "~")) or ".." in parts \
            or (len(rel) > 1 and rel[1] == ":"):
        raise CtpruneError(f"{what}: path {rel!r} leaves its folder {root} (absolute or '..' not allowed)")
    full = Path(root) / rel
    if not full.resolve().is_relative_to(Path(root).resolve()):
        raise CtpruneError(f"{what}: path {rel!r} leaves its folder {root} through a symlink")
    return full


def _relation(out: Path, inp: Path) -> str | None:
    o, i = out.resolve(), inp.resolve()
    if o == i:
        return "is"
    if o.is_relative_to(i):
        return "is inside"
    if i.is_relative_to(o):
        return "contains"
    return None


def check_output(output: Path, inputs: dict[str, Any], may_be_inside: tuple[str, ...] = ()) -> Path:
    """Refuse an output path that is, contains, or is inside one of the command's ``inputs``
    (``{"model folder": path, ...}``; None values are skipped). Inputs named in
    ``may_be_inside`` may hold the output (evaluate writes MODEL/eval by default)."""
    from ctprune.errors import CtpruneError

    output = Path(output)
    for name, path in inputs.items():
        if path is None:
            continue
        rel = _relation(output, Path(path))
        if rel is None or (rel == "is inside" and name in may_be_inside):
            continue
        raise CtpruneError(f"output {output} {rel} the {name} {path}; an input is never overwritten, "
                           "choose another -o")
    return output


def check_existing(output: Path, is_own: Callable[[Path], bool], kind: str) -> None:
    """Refuse an existing ``output`` that is not ``kind`` (this command's own, possibly partial, work)."""
    from ctprune.errors import CtpruneError

    output = Path(output)
    if (output.exists() or output.is_symlink()) and not is_own(output):
        raise CtpruneError(f"{output} already exists and is not {kind}; choose another -o or remove it")


# ---------------------------------------------------------------------------------------------
# Crash-consistent folders: a multi-file checkpoint is written whole, then made current by one
# rename of a symlink, so a kill at any instruction leaves either the old or the new checkpoint.


def commit_dir(link: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(folder)`` on a fresh hidden folder beside ``link``, then atomically point
    the symlink ``link`` at it (one ``os.replace``) and remove the folder it pointed at before.
    ``link`` reads like an ordinary folder (``last/trainer_state.pt``)."""
    link = Path(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{link.name}-", dir=link.parent))
    tmp_link = link.parent / f".{link.name}.link{new.name}"
    try:
        write(new)
        if link.exists() and not link.is_symlink():  # a folder from before commits were links
            os.replace(link, Path(tempfile.mkdtemp(prefix=f".{link.name}-", dir=link.parent)) / "old")
        os.symlink(new.name, tmp_link)
        os.replace(tmp_link, link)
    except BaseException:
        tmp_link.unlink(missing_ok=True)
        shutil.rmtree(new, ignore_errors=True)
        raise
    sweep_commits(link)


def sweep_commits(link: Path) -> None:
    """Remove what an interrupted ``commit_dir`` left beside ``link``: folders it does not point at."""
    link = Path(link)
    if not link.parent.is_dir():
        return
    current = os.readlink(link) if link.is_symlink() else None
    for p in link.parent.iterdir():
        if p.name.startswith(f".{link.name}.link"):
            p.unlink(missing_ok=True)
        elif p.name.startswith(f".{link.name}-") and p.name != current and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)

"""Files, safely: atomic writes (a file has its full new content or its old one, never half),
crash-consistent multi-file commits (``commit_dir``), JSON that refuses duplicate keys, size +
SHA-256 records checked on read, paths from files kept inside their folder (``contained``),
outputs that never touch an input (``check_output``, ``check_existing``) nor go through a
symlink, and one writer per output (``locked``). Every metadata read (JSON, TOML, text) is bounded
in size (``MAX_METADATA_BYTES``) and nesting (``MAX_NESTING``) before it is parsed or walked."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from ctprune.errors import CtpruneError, first_line

# Metadata (indexes, configs, plans, records, histories, experiment files) is small: the largest a
# Multi30k run writes is a grid bank's index.json at well under 1 MB. A file past this is refused
# before it is read (a sparse 1 GB index.json once cost 2.3 GB of memory).
MAX_METADATA_BYTES = 16 * 2**20
# Metadata nests a few levels (index -> variants -> entry -> provenance); deeper is refused before
# any code walks it (100k levels ended in RecursionError tracebacks).
MAX_NESTING = 32


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make every output private
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":  # disk full, quota, read-only
            raise CtpruneError(f"cannot write {path}: {_os_reason(e)}; nothing was written there") from None
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (os.umask sets it too,
    for a moment, for every thread)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_dir_beside(path: Path) -> Path:
    """A new hidden folder beside ``path`` (same file system: renamed into place when complete),
    with the permissions of an ordinary new folder (mkdtemp's are 0700)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def _os_reason(e: BaseException) -> str:
    """The reason of a failed write in a few words (safetensors wraps the OS error in its message)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    for code, reason in ((errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded"),
                         (errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")):
        if f"code: {code}," in text or reason in text:
            return reason
    return shorten(first_line(e), 200)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, what: str = "file", limit: int = MAX_METADATA_BYTES) -> Any:
    """Read JSON; a missing, unreadable, oversized (past ``limit`` bytes), too deeply nested or
    malformed file (also: a key given twice in one object) is a CtpruneError naming the path."""
    return parse_json(read_text(path, what, limit), f"{what} {path}")


def read_toml(path: Path, what: str = "file") -> dict[str, Any]:
    """Read TOML with the same bounds and one-line errors as ``read_json``."""

    source = f"{what} {path}"
    try:
        obj = tomllib.loads(read_text(path, what))
    except tomllib.TOMLDecodeError as e:
        raise CtpruneError(f"{source} is not valid TOML: {e}") from None
    except RecursionError:
        raise CtpruneError(f"{source} nests deeper than {MAX_NESTING} levels") from None
    check_nesting(obj, source)
    return obj


def check_nesting(obj: Any, source: str) -> None:
    """Refuse an object nested deeper than ``MAX_NESTING`` lists/tables (walked without recursion)."""

    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > MAX_NESTING:
                    raise CtpruneError(f"{source} nests deeper than {MAX_NESTING} levels")
                stack.append((child, depth + 1))

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

    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise CtpruneError(f"{source}: key {brief(e.args[0])} appears twice in one object") from None
    except json.JSONDecodeError as e:
        raise CtpruneError(f"{source} is not valid JSON: {e}") from None
    except RecursionError:
        raise CtpruneError(f"{source} nests deeper than {MAX_NESTING} levels") from None
    check_nesting(obj, source)
    return obj


def brief(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters, for a message that must stay one short line."""
    return shorten(repr(value), limit)


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters (a 10 MB value echoed into a message stays one short
    line), with how much was left out."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def read_text(path: Path, what: str = "file", limit: int = MAX_METADATA_BYTES) -> str:
    """A UTF-8 text file of at most ``limit`` bytes; missing, unreadable, larger or not UTF-8 is a
    CtpruneError naming the path. The size is checked before reading."""

    try:
        if Path(path).exists() and not Path(path).is_dir() and not Path(path).is_file():
            # a FIFO would block the read forever, a device never end
            raise CtpruneError(f"{what} {path} is not a regular file")
        with Path(path).open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(limit + 1) if size <= limit else b""
        if size > limit or len(data) > limit:
            raise CtpruneError(f"{what} {path} is larger than {limit / 2**20:g} MB, the most ctprune reads "
                               "of a metadata file")
        return data.decode("utf-8")
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

    if not isinstance(rel, str) or not rel.strip():
        raise CtpruneError(f"{what}: path must be a non-empty string, got {brief(rel)}")
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if PurePosixPath(rel).is_absolute() or rel.startswith(("\\", "~")) or ".." in parts \
            or (len(rel) > 1 and rel[1] == ":"):
        raise CtpruneError(f"{what}: path {brief(rel)} leaves its folder {root} (absolute or '..' not allowed)")
    full = Path(root) / rel
    if not full.resolve().is_relative_to(Path(root).resolve()):
        raise CtpruneError(f"{what}: path {brief(rel)} leaves its folder {root} through a symlink")
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

    output = Path(output)
    for name, path in inputs.items():
        if path is None:
            continue
        rel = _relation(output, Path(path))
        if rel is None or (rel == "is inside" and name in may_be_inside):
            continue
        raise CtpruneError(f"output {output} {rel} the {name} {path}; an input is never overwritten, "
                           "choose another -o")
    if output.is_symlink():
        raise CtpruneError(f"output {output} is a symlink; ctprune never writes through one, choose another -o")
    return output


def refuse_symlinks(folder: Path, what: str, own_links: tuple[str, ...] = ()) -> None:
    """Refuse a folder that holds a symlink anywhere inside (a copy would follow it: a link to /
    would copy the filesystem; a write into a linked subfolder would land outside). ``own_links``:
    names of top-level links the command itself made (``commit_dir``'s)."""

    for root, dirs, files in os.walk(folder):  # never descends into linked folders
        for name in dirs + files:
            own = Path(root) == Path(folder) and name.startswith(own_links) if own_links else False
            entry = Path(root) / name
            if entry.is_symlink() and not own:
                raise CtpruneError(f"{what} {folder} holds a symlink {entry.relative_to(folder)}; "
                                   "it may hold only plain files and folders")
            if not entry.is_symlink() and not entry.is_file() and not entry.is_dir():  # a FIFO blocks a copy
                raise CtpruneError(f"{what} {folder} holds {entry.relative_to(folder)}, which is not a plain file "
                                   "(a pipe, socket or device); it may hold only plain files and folders")


@contextlib.contextmanager
def locked(output: Path, command: str) -> Iterator[None]:
    """One writer per output: an exclusive lock on the file ``.NAME.lock`` beside ``output`` (beside,
    so that the output itself can still be renamed into place whole), held for the block. A second
    ``command`` on the same output is refused at once."""

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    lock = output.parent / f".{output.name}.lock"
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise CtpruneError(f"cannot take the lock {lock} ({e.strerror}); it must be a plain file") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CtpruneError(f"another `ctprune {command}` is writing {output}; wait for it or stop it") from None
        yield
    finally:
        os.close(fd)


def check_existing(output: Path, is_own: Callable[[Path], bool], kind: str) -> None:
    """Refuse an existing ``output`` that is not ``kind`` (this command's own, possibly partial, work)."""

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

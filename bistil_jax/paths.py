"""One path layer: every user-given path goes through here (STYLE.md 16).

A path is a local filename or a URL (`gs://bucket/dir`, also `s3://`,
`az://`); `path()` turns either into an `etils.epath.Path`, the type orbax
uses, so the same code reads and writes a local disk and Cloud Storage. The
helpers below add what epath lacks (atomic writes, atomic directories,
copies, recursive listing) and keep the differences between the two kinds of
filesystem in one place:

- Cloud Storage has no directories, only object names with slashes: `mkdir`
  does nothing and an empty "directory" does not exist. Code must never rely
  on an empty directory (write a marker file instead) and must list with
  `list_files`, never `rglob` (epath refuses `**` on remote paths).
- An object upload is atomic (the object appears whole or not at all), so a
  remote file is written in place; a rename is a server-side copy plus a
  delete per object, so a remote directory "rename" is not atomic (see
  `atomic_dir`).
- Libraries that insist on a local filename get one from `local_copy`.

A remote path is checked once per bucket, in a background thread with a
deadline (`BISTIL_REMOTE_TIMEOUT`, seconds): without network or credentials
the user gets one `BistilError` line naming the path within seconds instead
of a minute of retries, and a URL is never turned into a local `gs:`
directory.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import shutil
import socket
import tempfile
import threading
import uuid
from collections.abc import Iterator
from typing import IO

from etils import epath

from bistil_jax.errors import BistilError

Path = epath.Path
PathLike = str | os.PathLike

_REMOTE_PREFIXES = ("gs://", "s3://", "az://")
_DEFAULT_TIMEOUT = 20.0
_checked: dict[str, BaseException | None] = {}
_checked_lock = threading.Lock()


def is_remote(p: PathLike) -> bool:
  """Whether `p` names a remote object store (gs://, s3://, az://)."""
  return os.fspath(p).startswith(_REMOTE_PREFIXES)


def is_url(p: PathLike) -> bool:
  """Whether `p` has a URL scheme (`x://`), one `path()` takes or not."""
  return "://" in os.fspath(p)


def is_path(p: PathLike) -> bool:
  """Whether `path()` takes `p`: a local path or a remote URL.

  For strings that may be a path or something else, such as a corpus or
  task spec (`json:gs://b/f.json:text`, `hf:name:split`): test this before
  asking whether the path exists.
  """
  return is_remote(p) or not is_url(p)


def path(p: PathLike) -> epath.Path:
  """The `epath.Path` of a user-given path; `~` expanded on local paths.

  Args:
    p: a local filename or a `gs://`/`s3://`/`az://` URL.

  Returns:
    The path. A remote one's bucket has answered (checked once per bucket).

  Raises:
    BistilError: on a mangled URL (`gs:/bucket`, a URL that went through
      `os.path`), or when the bucket cannot be reached in time.
  """
  if isinstance(p, epath.Path) and not is_remote(p):
    return p
  s = os.fspath(p)
  if is_remote(s):
    result = epath.Path(s)
    _check_remote(result)
    return result
  if s.startswith(tuple(x.replace("://", ":/") for x in _REMOTE_PREFIXES)):
    # NOTE: `os.path.normpath("gs://b/x")` is "gs:/b/x"; treating that as a
    # local path would create a directory named `gs:` in the working dir.
    raise BistilError(f"{s}: looks like a URL that lost a slash (gs://...)")
  if is_url(s):
    raise BistilError(
      f"{s}: unsupported URL; use a local path or gs://, s3://, az://"
    )
  return epath.Path(os.path.expanduser(s))


def _remote_timeout() -> float:
  try:
    return float(os.environ.get("BISTIL_REMOTE_TIMEOUT", _DEFAULT_TIMEOUT))
  except ValueError:
    return _DEFAULT_TIMEOUT


def _bucket(p: epath.Path) -> str:
  s = os.fspath(p)
  scheme, rest = s.split("://", 1)
  return f"{scheme}://{rest.split('/', 1)[0]}"


def _probe(bucket: str) -> None:
  """Raises unless the bucket answers; run in a thread with a deadline."""
  if bucket.startswith("gs://") and not os.environ.get("STORAGE_EMULATOR_HOST"):
    # Without network the first request is retried for ~50 s; a failed name
    # lookup says the same at once.
    socket.getaddrinfo("storage.googleapis.com", 443)
  # NOTE: not `exists()`: gcsfs turns every error into False there. `stat`
  # of a bucket falls back to a listing when the caller may read objects
  # but not the bucket's metadata.
  try:
    epath.Path(bucket).stat()
  except FileNotFoundError:
    raise FileNotFoundError(f"bucket {bucket} not found") from None


def _check_remote(p: epath.Path) -> None:
  """Checks once per bucket that it answers, within the deadline."""
  # gcsfs logs a traceback for every failed request; the error itself
  # reaches the user as one BistilError line, so keep its log quiet.
  gcs_log = logging.getLogger("gcsfs")
  if gcs_log.level == logging.NOTSET:
    gcs_log.setLevel(logging.CRITICAL)
  bucket = _bucket(p)
  with _checked_lock:
    if bucket in _checked:
      err = _checked[bucket]
      if err is not None:
        raise BistilError(_explain(p, err))
      return
  box: list[BaseException | None] = []

  def run() -> None:
    try:
      _probe(bucket)
      box.append(None)
    except BaseException as e:  # noqa: BLE001 (reported to the caller)
      box.append(e)

  timeout = _remote_timeout()
  # A daemon thread: a hung request must not keep the process alive.
  t = threading.Thread(target=run, daemon=True, name="bistil-remote-check")
  t.start()
  t.join(timeout)
  err = box[0] if box else TimeoutError(f"no answer within {timeout:g} s")
  with _checked_lock:
    _checked[bucket] = err
  if err is not None:
    raise BistilError(_explain(p, err))


def _explain(p: epath.Path, err: BaseException) -> str:
  first = (str(err).strip().splitlines() or [type(err).__name__])[0]
  if isinstance(err, ImportError):  # e.g. s3:// without s3fs installed
    return f"{p}: this filesystem needs a package that is missing: {first}"
  cause, advice = remote_cause(err)
  return (
    f"{p}: cannot reach {_bucket(p)}: {cause} "
    f"({type(err).__name__}: {first[:200]}); {advice}"
  )


_LOGIN = "gcloud auth application-default login, or a VM service account"


def _kinds(err: BaseException) -> set[str]:
  """`module.Class` of the error's type and its bases (no client imports)."""
  return {f"{c.__module__}.{c.__qualname__}" for c in type(err).__mro__}


def remote_cause(err: BaseException) -> tuple[str, str]:
  """(cause, what to do) of a failed request to an object store.

  Classified by type, without importing the storage clients: a deadline or
  a failed connection is "no network", a google.auth error or HTTP 401
  "no credentials", HTTP 403 "permission denied", a 404 on the bucket "no
  such bucket".

  Args:
    err: the exception the client raised (or our TimeoutError).

  Returns:
    Two short phrases for an error line.
  """
  kinds = _kinds(err)
  code = getattr(err, "code", None)
  text = str(err)
  if any(k.startswith("google.auth.") for k in kinds) or code == 401:
    return "no credentials", f"check the credentials ({_LOGIN})"
  if isinstance(err, PermissionError) or code == 403 or "Forbidden" in text:
    return "permission denied", (
      f"grant this account access to the bucket, or use another ({_LOGIN})"
    )
  if isinstance(err, FileNotFoundError):
    return "no such bucket", "check the bucket name"
  if isinstance(err, (TimeoutError, ConnectionError, socket.gaierror)) or any(
    k.startswith("aiohttp.client_exceptions.Client") for k in kinds
  ):
    return "no network", (
      "check the network connection (and BISTIL_REMOTE_TIMEOUT, seconds, "
      "on a slow link)"
    )
  return "request failed", f"check the network and the credentials ({_LOGIN})"


# Error types of the storage clients (gcsfs over aiohttp, google.auth) that
# mean the store could not be reached or would not let us in.
_CLIENT_FAILURES = (
  "aiohttp.client_exceptions.ClientError",
  "google.auth.exceptions.GoogleAuthError",
  "gcsfs.retry.HttpError",
)


def remote_failure(err: BaseException) -> BaseException | None:
  """The storage client's network or credentials error behind `err`.

  Follows the `__cause__`/`__context__` chain; for a last-resort handler
  (the CLI's), where a request outside `path()`'s check failed.

  Returns:
    The first such error in the chain, or None.
  """
  seen: set[int] = set()
  e: BaseException | None = err
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if _kinds(e) & set(_CLIENT_FAILURES):
      return e
    e = e.__cause__ or e.__context__
  return None


# ---------------------------------------------------------------- disk full
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# How tensorstore (orbax's array writer) reports ENOSPC: a ValueError whose
# text ends "No space left on device [os_error_code='28']".
_NO_SPACE_TEXT = ("No space left on device", "Disk quota exceeded")


def is_disk_full(err: BaseException) -> bool:
  """Whether `err`, or an error in its cause chain, is a full disk."""
  seen: set[int] = set()
  e: BaseException | None = err
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, DiskFullError):
      return True
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
      return True
    if any(t in str(e) for t in _NO_SPACE_TEXT):
      return True
    e = e.__cause__ or e.__context__
  return False


def free_bytes(p: PathLike) -> int | None:
  """Bytes free on the local filesystem of `p` (None on object stores)."""
  if is_remote(p):
    return None
  d = os.path.abspath(os.fspath(p))
  while not os.path.exists(d) and os.path.dirname(d) != d:
    d = os.path.dirname(d)
  try:
    return shutil.disk_usage(d).free
  except OSError:
    return None


class DiskFullError(BistilError):
  """No space left on the filesystem where `path` is written.

  One line naming the path, what was being written, the bytes it needed
  (where known) and the bytes free.
  """

  def __init__(
    self,
    path: PathLike,
    needed: int | None = None,
    *,
    what: str = "",
    advice: str = "free some space or write elsewhere",
  ):
    self.path = os.fspath(path)
    self.needed = needed
    self.what = what
    free = free_bytes(path)
    facts = [what] if what else []
    if needed:
      facts.append(f"{needed:,} bytes needed")
    if free is not None:
      facts.append(f"{free:,} bytes free")
    said = f" ({', '.join(facts)})" if facts else ""
    super().__init__(f"{self.path}: the disk is full{said}; {advice}")


@contextlib.contextmanager
def disk_full_as_error(
  p: PathLike, needed: int | None = None
) -> Iterator[None]:
  """Turns an OSError of a full disk in the body into `DiskFullError(p)`;
  other errors pass unchanged."""
  try:
    yield
  except OSError as e:
    if not is_disk_full(e):
      raise
    raise DiskFullError(p, needed) from None


def mkdirs(p: PathLike) -> epath.Path:
  """Creates a directory and its parents (a no-op on object stores)."""
  p = path(p)
  p.mkdir(parents=True, exist_ok=True)
  return p


def _sibling(p: epath.Path, tag: str) -> epath.Path:
  return p.parent / f".{p.name}.{tag}-{uuid.uuid4().hex[:8]}"


def write_bytes(p: PathLike, data: bytes) -> epath.Path:
  """Writes a file atomically: readers see the old or the new file.

  Locally: a sibling temporary file renamed over the target. Remotely an
  upload is atomic already, so the object is written in place.

  Args:
    p: the file.
    data: its new contents.

  Returns:
    The path written.
  """
  p = path(p)
  mkdirs(p.parent)
  if is_remote(p):
    p.write_bytes(data)
    return p
  tmp = _sibling(p, "tmp")
  try:
    with disk_full_as_error(p, len(data)):
      tmp.write_bytes(data)
      tmp.replace(p)
  finally:
    tmp.unlink(missing_ok=True)
  return p


def write_text(p: PathLike, text: str) -> epath.Path:
  """`write_bytes` of UTF-8 text."""
  return write_bytes(p, text.encode("utf-8"))


def create_exclusive(p: PathLike, data: str) -> bool:
  """Creates the file `p` holding `data` unless it exists; True if we made it.

  Local and NFSv3+ paths: O_CREAT | O_EXCL, atomic. gs://: an upload with
  the generation precondition ifGenerationMatch=0 (gcsfs "create" mode),
  atomic on the server. Other remote filesystems: check, then write (a
  race window between two starts in the same instant).
  """
  p = path(p)
  s = os.fspath(p)
  if not is_remote(s):
    try:
      fd = os.open(s, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(data)
    return True
  if s.startswith("gs://"):
    from etils.epath import backend  # noqa: PLC0415 - only for gs:// paths

    # NOTE: epath's own gcsfs instance, whose listings this write then
    # invalidates; another instance's write left them stale (a lock made
    # again after a delete read as missing).
    fs = backend.fsspec_backend.fs(s)
    try:
      fs.pipe_file(s, data.encode(), mode="create")
    except FileExistsError:
      return False
    return True
  if p.exists():
    return False
  p.write_text(data)
  return True


def read_text(p: PathLike, encoding: str = "utf-8") -> str:
  """The text of a file (any encoding Python knows, e.g. `utf-8-sig`)."""
  return path(p).read_bytes().decode(encoding)


def open_text(p: PathLike, encoding: str = "utf-8") -> IO[str]:
  """A text stream over a file with universal newlines, read in chunks.

  epath's own text mode takes UTF-8 only and no `newline=`; this wraps the
  binary stream so local and remote files decode alike.
  """
  return io.TextIOWrapper(path(p).open("rb"), encoding=encoding, newline=None)


def rmtree(p: PathLike, missing_ok: bool = True) -> None:
  """Removes a file or a directory tree."""
  p = path(p)
  if not is_remote(p) and os.path.islink(p):
    os.unlink(p)  # the link, never what it points to
  elif p.is_dir():
    p.rmtree(missing_ok=missing_ok)
  elif p.exists():
    p.unlink(missing_ok=missing_ok)
  elif not missing_ok:
    raise FileNotFoundError(os.fspath(p))


def list_files(p: PathLike) -> list[epath.Path]:
  """Every file under a directory, recursively, sorted (no `rglob`)."""
  p = path(p)
  out: list[epath.Path] = []
  pending = [p]
  while pending:
    d = pending.pop()
    for child in d.iterdir():
      if child.is_dir():
        pending.append(child)
      else:
        out.append(child)
  return sorted(out, key=os.fspath)


def glob(pattern: PathLike) -> list[epath.Path]:
  """The paths matching a glob (`*`, `?`, `[...]`; no `**`), sorted."""
  s = os.fspath(pattern)
  parts = s.split("/")
  magic = [i for i, part in enumerate(parts) if any(c in part for c in "*?[")]
  if not magic:
    p = path(s)
    return [p] if p.exists() else []
  i = magic[0]
  base = "/".join(parts[:i]) or ("/" if s.startswith("/") else ".")
  if is_remote(s) and i <= 2:
    raise BistilError(f"{s}: a pattern needs a bucket name before it")
  rest = "/".join(parts[i:])
  if "**" in rest:
    raise BistilError(f"{s}: recursive ** patterns are not supported")
  return sorted(path(base).glob(rest), key=os.fspath)


def copy_file(src: PathLike, dst: PathLike) -> epath.Path:
  """Copies one file, between any two filesystems; overwrites `dst`."""
  src, dst = path(src), path(dst)
  mkdirs(dst.parent)
  src_scheme = os.fspath(src).split("://")[0] if is_remote(src) else ""
  dst_scheme = os.fspath(dst).split("://")[0] if is_remote(dst) else ""
  if src_scheme == dst_scheme:
    # One filesystem: a local copy or a server-side one.
    src.copy(dst, overwrite=True)
    return dst
  with src.open("rb") as r, dst.open("wb") as w:
    shutil.copyfileobj(r, w, 1 << 22)
  return dst


def copy_tree(src: PathLike, dst: PathLike) -> epath.Path:
  """Copies every file under `src` to the same place under `dst`."""
  src, dst = path(src), path(dst)
  if not src.is_dir():
    return copy_file(src, dst)
  mkdirs(dst)
  for f in list_files(src):
    copy_file(f, dst / os.fspath(f)[len(os.fspath(src)) :].lstrip("/"))
  return dst


def _move(src: epath.Path, dst: epath.Path) -> None:
  if not is_remote(src):
    src.rename(dst)
    return
  # NOTE: GCS has no rename: copy every object, then delete the source. Done
  # here rather than by gcsfs, whose `mv` first tries an API the emulator
  # lacks and logs a traceback for it.
  copy_tree(src, dst)
  rmtree(src)


@contextlib.contextmanager
def atomic_dir(dst: PathLike, overwrite: bool = True) -> Iterator[epath.Path]:
  """Builds a directory in a sibling temporary dir, then moves it into place.

  On success an existing `dst` is moved aside, the new directory takes its
  place and the old one is removed; on an exception the temporary dir is
  removed and `dst` is untouched. Locally both moves are renames, so a
  reader sees the old or the new directory. On an object store a "rename"
  is a copy and a delete of every object: a reader may see a partial
  directory during the move, but an error never leaves a half-written `dst`
  in place of a good one before the copy starts.

  The directory gets the permissions `umask` gives (0755 by default), not
  the 0700 of `tempfile.mkdtemp`.

  Args:
    dst: the directory to write.
    overwrite: replace an existing `dst`; if False, an existing non-empty
      `dst` raises.

  Yields:
    The temporary directory to write into.

  Raises:
    BistilError: if `dst` exists and is not empty and `overwrite` is False,
      or if `dst` is a file.
  """
  dst = path(dst)
  if dst.exists() and not dst.is_dir():
    raise BistilError(f"{dst} exists and is not a directory")
  if not overwrite and dst.is_dir() and any(dst.iterdir()):
    raise BistilError(f"{dst} exists and is not empty")
  mkdirs(dst.parent)
  tmp = _sibling(dst, "tmp")
  # Plain mkdir: the umask applies (tempfile.mkdtemp would force 0700).
  tmp.mkdir()
  try:
    yield tmp
    old = None
    if dst.exists():
      old = _sibling(dst, "old")
      _move(dst, old)
    _move(tmp, dst)
    if old is not None:
      rmtree(old)
  except Exception as e:
    if not is_disk_full(e):
      raise
    # Name the directory the user asked for, not our temporary sibling.
    what = ""
    if isinstance(e, DiskFullError) and e.path.startswith(os.fspath(tmp)):
      what = "writing " + e.path[len(os.fspath(tmp)) :].lstrip("/")
    needed = e.needed if isinstance(e, DiskFullError) else None
    raise DiskFullError(dst, needed, what=what) from None
  finally:
    rmtree(tmp)


@contextlib.contextmanager
def local_copy(p: PathLike) -> Iterator[str]:
  """A local filename with the contents of `p`, for libraries that need one.

  A local file is yielded as it is; a remote file is downloaded into a
  temporary directory that is removed afterwards.
  """
  p = path(p)
  if not is_remote(p):
    yield os.fspath(p)
    return
  with tempfile.TemporaryDirectory(prefix="bistil-") as tmp:
    local = os.path.join(tmp, p.name)
    copy_file(p, local)
    yield local


def same_path(a: PathLike, b: PathLike) -> bool:
  """Whether two existing paths name the same file or directory."""
  a, b = path(a), path(b)
  if is_remote(a) or is_remote(b):
    return os.fspath(a).rstrip("/") == os.fspath(b).rstrip("/")
  try:
    return os.path.samefile(a, b)
  except OSError:
    return False

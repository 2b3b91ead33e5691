"""Every path the project reads or writes: a local path or a gs:// URL, through `etils.epath` (which orbax uses).

Without TensorFlow installed, epath reaches gs:// through fsspec's `gcsfs`; orbax's checkpoints go through
tensorstore's own GCS driver. The two honour different switches, so the one standard switch,
`STORAGE_EMULATOR_HOST` (a Cloud Storage emulator such as the one the tests start), is translated here, once, at
import, before either library makes its first request:
- gcsfs reads STORAGE_EMULATOR_HOST itself (and then sends no credentials);
- tensorstore ignores it but reads `TENSORSTORE_GCS_HTTP_URL` when its first GCS context is created;
- gcsfs's zonal-bucket probe talks gRPC to the storage control API, which an emulator does not serve (every call
  would log a warning and fall back), so it is switched off with `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`.
Variables already set by the user win.

Cloud Storage has no rename and no append, but creating an object is atomic: it appears whole or not at all. So
`write_atomic` writes straight to the final name there, and to a synced temporary name + rename on a local disk.
Libraries that can only write local files (ArrayRecord, np.savez into a zip, PIL) write through `local_target`;
libraries that can only read local files read through `local_copy`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

from etils import epath

from sfd_jax.errors import MissingInputError


def configure_emulator(environ=os.environ) -> None:
    host = environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    url = host if "://" in host else f"http://{host}"
    environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


configure_emulator()


def _no_listing_cache() -> None:
    # gcsfs caches directory listings, object sizes included, for the life of the process by default. Here other
    # processes and hosts keep writing the same objects (metrics segments, checkpoints, shards), and a read sized
    # from a stale listing returns a truncated object, so every listing and size is asked for afresh.
    import fsspec.config

    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_no_listing_cache()


def is_remote(path: Any) -> bool:
    """gs://, s3://, ...: no rename, no append, no local-file libraries."""
    return "://" in os.fspath(path)


def path(p: Any) -> epath.Path:
    return epath.Path(os.fspath(p))


def absolute(p: Any) -> str:
    """The absolute form recorded in metadata (a URL stays as it is; pathlib would turn gs:// into gs:/)."""
    p = os.fspath(p)
    return p if is_remote(p) else os.path.abspath(p)


def join(*parts: Any) -> str:
    return os.fspath(path(parts[0]).joinpath(*map(os.fspath, parts[1:])))


def exists(p: Any) -> bool:
    return path(p).exists()


def isdir(p: Any) -> bool:
    return path(p).is_dir()


def makedirs(p: Any) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: Any) -> list[str]:
    return sorted(child.name for child in path(p).iterdir())


def remove(p: Any) -> None:
    path(p).unlink(missing_ok=True)


def read_bytes(p: Any) -> bytes:
    return path(p).read_bytes()


def read_text(p: Any) -> str:
    return path(p).read_text()


def write_atomic(p: Any, data: bytes | str) -> None:
    """A reader, or a rerun after a crash, sees the old content or the new one, never half of it."""
    data = data.encode() if isinstance(data, str) else data
    p = os.fspath(p)
    if is_remote(p):
        path(p).write_bytes(data)  # one object upload: atomic
        return
    os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    tmp = f"{p}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def write_json_atomic(p: Any, obj: Any, *, indent: int = 1, default=None) -> None:
    write_atomic(p, json.dumps(obj, indent=indent, sort_keys=True, default=default))


def read_json(p: Any, what: str) -> dict:
    if not exists(p):
        raise MissingInputError(f"{what} not found: {os.fspath(p)}")
    try:
        return json.loads(read_text(p))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {os.fspath(p)} is not valid JSON: {e}") from e


def upload(local: str, p: Any) -> None:
    """Copies a finished local file to `p` (atomic: one object upload, or copy to a temporary name + rename)."""
    p = os.fspath(p)
    if is_remote(p):
        _stream(local, p)
        return
    tmp = f"{p}.tmp-{os.getpid()}"
    shutil.copyfile(local, tmp)
    os.replace(tmp, p)


@contextlib.contextmanager
def local_target(p: Any, suffix: str = "") -> Iterator[str]:
    """Yields a local file name to write `p` through; on a clean exit it becomes `p` atomically, on an exception
    nothing is left behind. Locally that is `p.tmp-<pid><suffix>` renamed; for a URL a temporary local file uploaded
    as one object. `suffix`: for writers that append an extension themselves (np.savez adds .npz)."""
    p = os.fspath(p)
    if is_remote(p):
        fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="sfd_jax_upload_")
        os.close(fd)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
        tmp = f"{p}.tmp-{os.getpid()}{suffix}"
    try:
        yield tmp
        if is_remote(p):
            upload(tmp, p)
        else:
            os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _stream(src: str, dst: str) -> None:
    with path(src).open("rb") as fin, path(dst).open("wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 24)


def staging_dir() -> str:
    """Where remote files are copied for libraries that read only local files (`SFD_JAX_STAGING`, default under the
    system temporary directory). It needs room for the dataset on every host: see docs/data.md."""
    return os.environ.get("SFD_JAX_STAGING") or os.path.join(tempfile.gettempdir(), "sfd_jax_staging")


def _remote_md5(p: str) -> str | None:
    """The object's MD5 as hex when the backend reports one (gcsfs: base64 `md5Hash`)."""
    try:
        import base64

        import fsspec

        info = fsspec.filesystem(p.split("://", 1)[0]).info(p)
    except Exception:  # noqa: BLE001 - no fsspec backend for this scheme: size is checked alone
        return None
    value = info.get("md5Hash")
    return base64.b64decode(value).hex() if value else None


def _md5(local: str) -> str:
    h = hashlib.md5()
    with open(local, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def local_copy(p: Any, cache: str | None = None) -> str:
    """A local path holding `p`'s bytes (a file, or a directory recursively): `p` itself when local, else a verified
    copy under `cache` (default `staging_dir()`, keyed by the URL). A copy already there with the object's size (and
    MD5 where the store reports one) is reused, so a restarted job downloads only what it lacks; a download goes to a
    temporary name first."""
    p = os.fspath(p)
    if not is_remote(p):
        return p
    scheme, rest = p.split("://", 1)
    local = os.path.join(cache or staging_dir(), scheme, rest.rstrip("/"))
    if path(p).is_dir():  # a weights directory for a reader of local files (safetensors, torch)
        for child in path(p).iterdir():
            local_copy(os.fspath(child), cache)
        return local
    size = path(p).stat().length
    md5 = None
    if os.path.exists(local) and os.path.getsize(local) == size:
        md5 = _remote_md5(p)
        if md5 is None or _md5(local) == md5:
            return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    tmp = f"{local}.tmp-{os.getpid()}"
    try:
        _stream(p, tmp)
        got = os.path.getsize(tmp)
        if got != size:
            raise OSError(f"download of {p} is {got} bytes, the object has {size}")
        md5 = md5 or _remote_md5(p)
        if md5 is not None and _md5(tmp) != md5:
            raise OSError(f"download of {p} does not match the object's MD5 {md5}")
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return local

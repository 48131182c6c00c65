"""Stores by path or URL: a local folder, or object storage (``s3://``, ``gs://``, ``az://``,
``https://``...) through obstore, opened as zarr groups.

Credentials come from ``storage_options`` or, where absent, from the environment and the
provider's usual configuration chain (obstore reads ``AWS_*``, ``GOOGLE_*``, ``AZURE_*``).
They are never part of an error message: errors name the URL only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import zarr

from annbatch.errors import InvalidArgumentError, StoreReadError, UnsupportedDatasetError

if TYPE_CHECKING:
    import os

# Timeouts and retries are object_store's defaults unless storage_options sets them: a request
# that sends nothing for 30 s fails (so a stalled server never hangs the training loop), and
# transient failures (5xx, throttling, reset connections, timeouts) are retried up to 10 times
# with exponential backoff (100 ms to 15 s), for at most 3 min in all.


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL of object storage (``scheme://...``, not ``file://``)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def is_object_store(store: object) -> bool:
    """Whether ``store`` is zarr's ``ObjectStore`` over one of obstore's stores (S3, GCS,
    Azure, HTTP, local, memory); a zarr without ``ObjectStore`` has none."""
    cls = getattr(zarr.storage, "ObjectStore", None)
    inner = getattr(store, "store", None)
    return (
        cls is not None
        and isinstance(store, cls)
        and type(inner).__module__.split(".")[0] == "obstore"
    )


def object_url(store: object, path: str = "") -> str:
    """The URL of ``path`` in an obstore ``store``, for messages: ``s3://bucket/prefix/path``,
    ``gs://...``, ``az://container/...``, an HTTP store's URL, ``file:///...``. Built from the
    bucket, container and prefix only: never from credentials or other configuration."""
    name = type(store).__name__
    config = getattr(store, "config", None) or {}
    prefix = str(getattr(store, "prefix", None) or "")
    if name == "HTTPStore":
        base = str(getattr(store, "url", "http://?"))
    elif name == "LocalStore":
        base = "file://" + (prefix if prefix.startswith("/") else "/" + prefix)
    elif name == "MemoryStore":
        base = "memory://"
    else:
        scheme, where = {
            "S3Store": ("s3", "bucket"),
            "GCSStore": ("gs", "bucket"),
            "AzureStore": ("az", "container_name"),
        }.get(name, ("", ""))
        if not scheme or where not in config:
            return f"{name} store, at {path.strip('/') or '/'}"
        base = f"{scheme}://{config[where]}"
        if prefix:
            base += "/" + prefix.strip("/")
    path = path.strip("/")
    if not path:
        return base
    return (base if base.endswith("://") else base.rstrip("/") + "/") + path


def object_store(url: str, storage_options: dict[str, Any] | None = None) -> Any:
    """An obstore store rooted at ``url`` (bucket and prefix); ``storage_options`` are
    obstore's (``client_options`` and ``retry_config`` included)."""
    try:
        from obstore.store import from_url
    except ImportError as e:
        msg = (
            "reading object storage needs obstore: pip install obstore, or this package with "
            "its 'remote' extra from its checkout: pip install -e '.[remote]'"
        )
        raise ImportError(msg) from e
    from annbatch._core.fork_guard import note_remote_use

    try:
        store = from_url(url, **(storage_options or {}))
    except Exception as e:
        # obstore names the unknown option or the bad URL; the values are not repeated.
        msg = f"cannot open {url} with the given storage_options ({type(e).__name__}: {_first_line(e)})"
        raise InvalidArgumentError(msg) from None
    note_remote_use()  # zarr reads through it next: obstore's runtime starts in this process
    return store


def zarr_object_store(
    url: str, storage_options: dict[str, Any] | None = None, *, read_only: bool = True
) -> Any:
    """zarr's ``ObjectStore`` over :func:`object_store` (``url``'s bucket and prefix)."""
    from zarr.storage import ObjectStore

    return ObjectStore(object_store(url, storage_options), read_only=read_only)


def open_zarr(
    location: str | os.PathLike[str] | zarr.Group,
    *,
    storage_options: dict[str, Any] | None = None,
    mode: str = "r",
) -> zarr.Group:
    """The zarr group at a local path, at a URL (through obstore), or ``location`` itself."""
    if isinstance(location, zarr.Group):
        return location
    if is_url(location):
        store = zarr_object_store(str(location), storage_options, read_only=mode == "r")
        try:
            return zarr.open_group(store, mode=mode)  # type: ignore[arg-type]
        except Exception as e:
            msg = f"cannot open the zarr group at {location} ({type(e).__name__}: {_first_line(e)})"
            raise StoreReadError(msg) from None
    if storage_options:
        msg = f"storage_options are for URLs of object storage; {location} is a local path"
        raise InvalidArgumentError(msg)
    try:
        return zarr.open_group(location, mode=mode)  # type: ignore[arg-type]
    except FileNotFoundError as e:  # zarr's GroupNotFoundError subclasses it
        msg = (
            f"{location} is not a zarr group (expected the root of an AnnData zarr store, "
            f"an .h5ad file, or an open zarr.Group / h5py.Group): {_first_line(e)}"
        )
        raise UnsupportedDatasetError(msg) from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:300] if str(e).strip() else ""

"""Where a collection lives and its manifest: the folder or object-storage prefix, the open
modes, the state recorded in the root group's attributes (read, written, kept for a rollback),
and the datasets found there.

An h5ad collection keeps its manifest in a JSON file instead
(:class:`annbatch.collection._h5ad.H5adStore`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import zarr

from annbatch._stores import is_object_store, is_url, zarr_object_store
from annbatch.collection._build import checkpoint
from annbatch.collection._disk import full_disk_cause, naming
from annbatch.collection._encoding import foreign_state, has_encoding, with_encoding
from annbatch.collection._layout import describe_x
from annbatch.errors import (
    ArgumentTypeError,
    CollectionPathError,
    FeatureNotAvailableError,
    IncompleteCollectionError,
    InvalidArgumentError,
    StoreReadError,
)

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Self

MODES = ("r", "r+", "a", "w", "w-")
REMOTE_MODES = ("r", "r+", "a", "w-")
"""Modes for a collection in object storage (``"w"`` would delete a prefix of a bucket)."""
ATTR = "annbatch-collection"
"""Root attribute holding the collection's state."""
SCRATCH = "_annbatch_build"
"""Folder inside the collection for the buckets of a build in progress."""
BEFORE_APPEND = "manifest-before-append.json"
"""In the scratch folder while an append runs: the root's metadata as it was before the
append (a hard link: zarr >= 3.1.3 replaces the file at every write, so the link keeps the old
bytes), which a failed append renames back."""
FORMAT_VERSION = 1


class CollectionStore:
    """A zarr collection's place (a local folder, or a prefix in object storage) and manifest.

    Parameters
    ----------
    path
        The collection's folder (for object storage: the URL without its scheme, for messages).
    store
        zarr's ``ObjectStore`` of a collection in object storage; None for a local folder.
    store_path
        The collection's path in ``store``.
    url
        The collection's URL (object storage only).
    scratch
        For object storage: the local folder of a build's buckets.
    """

    h5ad = False
    """Whether the datasets are h5ad files (:class:`annbatch.collection._h5ad.H5adStore`)."""

    def __init__(
        self,
        path: Path,
        *,
        store: Any = None,
        store_path: str = "",
        url: str = "",
        scratch: Path | None = None,
    ) -> None:
        self.path = path
        self.store = store
        self.store_path = store_path
        self.url = url
        self._scratch = scratch

    @classmethod
    def open(
        cls,
        group: zarr.Group | str | os.PathLike[str],
        mode: str,
        *,
        is_collection_h5ad: bool,
        storage_options: dict[str, Any] | None,
        scratch_dir: str | os.PathLike[str] | None,
    ) -> Self:
        """The place ``group`` names, its arguments checked (the mode is applied by
        :meth:`apply_mode`, once the caller knows whether it holds h5ad files)."""
        remote_group = isinstance(group, zarr.Group) and is_object_store(group.store)
        if is_url(group) or remote_group:
            return cls._remote(
                group,
                mode,
                is_collection_h5ad=is_collection_h5ad,
                storage_options=storage_options,
                scratch_dir=scratch_dir,
            )
        if storage_options:
            msg = "storage_options are for a collection's URL in object storage"
            raise InvalidArgumentError(msg)
        if scratch_dir is not None:
            msg = "scratch_dir is for a collection in object storage (a local build's scratch is in its folder)"
            raise InvalidArgumentError(msg)
        if not isinstance(is_collection_h5ad, bool):
            msg = f"is_collection_h5ad must be a bool, got {is_collection_h5ad!r}"
            raise InvalidArgumentError(msg)
        if mode not in MODES:
            msg = f"mode must be one of {MODES}, got {mode!r}"
            raise InvalidArgumentError(msg)
        if isinstance(group, zarr.Group):
            if is_collection_h5ad:
                msg = "is_collection_h5ad=True cannot be combined with a zarr.Group; pass the folder's path"
                raise InvalidArgumentError(msg)
            return cls(_local_path(group))
        if isinstance(group, str | os.PathLike):
            return cls(Path(group))
        msg = f"group must be a zarr.Group or a path, got {type(group).__name__}"
        raise ArgumentTypeError(msg)

    @classmethod
    def _remote(
        cls,
        group: zarr.Group | str | os.PathLike[str],
        mode: str,
        *,
        is_collection_h5ad: bool,
        storage_options: dict[str, Any] | None,
        scratch_dir: str | os.PathLike[str] | None,
    ) -> Self:
        """A collection in object storage: a URL, or a zarr group on an ObjectStore."""
        if is_collection_h5ad or mode not in REMOTE_MODES:
            msg = (
                f"a collection in object storage is a zarr collection opened with mode in "
                f"{REMOTE_MODES}; got mode={mode!r}, is_collection_h5ad={is_collection_h5ad}"
            )
            raise InvalidArgumentError(msg)
        if isinstance(group, zarr.Group):
            if storage_options:
                msg = "storage_options are for a URL; this group's store is open already"
                raise InvalidArgumentError(msg)
            store, store_path = group.store, group.path
            url = f"{type(group.store).__name__}({group.store})/{group.path}".rstrip("/")
        else:
            url = str(group).rstrip("/")
            store, store_path = zarr_object_store(url, storage_options, read_only=mode == "r"), ""
        # A build's scratch (the rows distributed to datasets, pass 1) is local; a build
        # interrupted and run again on this machine finds it there.
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        scratch = (
            Path(scratch_dir)
            if scratch_dir is not None
            else Path(tempfile.gettempdir()) / "annbatch-scratch" / digest
        )
        path = Path(url.split("://", 1)[-1])  # for messages only
        return cls(path, store=store, store_path=store_path, url=url, scratch=scratch)

    def apply_mode(self, mode: str) -> None:
        """Refuse what ``mode`` refuses here; for ``"w"``, delete what the folder holds."""
        if self.store is not None:
            state = self.state()
            if mode in ("r", "r+") and state is None:
                msg = f"{self.url} holds no annbatch collection"
                raise IncompleteCollectionError(msg)
            if mode == "w-" and state is not None:
                msg = f"mode='w-' refuses to overwrite the collection at {self.url}"
                raise CollectionPathError(msg)
            return
        if mode == "r+" and self.state() is None:
            msg = f"mode='r+' needs an existing collection, and {self.where} holds none"
            raise IncompleteCollectionError(msg)
        if mode == "w-" and self.state() is not None:
            msg = f"mode='w-' refuses to overwrite the collection at {self.where}"
            raise CollectionPathError(msg)
        if mode == "w" and self.path.exists():
            self.state()  # raises unless the path holds a collection (or nothing)
            checkpoint("delete the collection (mode='w')")
            shutil.rmtree(self.path)

    @property
    def where(self) -> str:
        """The collection's location for messages: its folder or its URL."""
        return self.url if self.store is not None else str(self.path)

    @property
    def scratch_folder(self) -> Path:
        """Where a build keeps its buckets: in the collection's folder, or (object storage)
        in a local folder."""
        return self._scratch if self._scratch is not None else self.path / SCRATCH

    def root(self, mode: Literal["r", "r+"] = "r") -> zarr.Group:
        """The collection's root group, opened anew (so that its attributes are current)."""
        if self.store is None:
            return zarr.open_group(self.path, mode=mode, zarr_format=3)
        try:
            return zarr.open_group(self.store, path=self.store_path, mode=mode, zarr_format=3)
        except FileNotFoundError:
            raise
        except Exception as e:
            msg = f"cannot open the collection at {self.url} ({type(e).__name__}: {e})"
            raise StoreReadError(msg) from None

    def open_datasets(self, names: Sequence[str], mode: str) -> list[Any]:
        """The datasets ``names``, zarr groups opened read-only for ``mode="r"``, else
        writable."""
        if mode == "r" and self.store is None:  # metadata read directly (see _snapshot)
            from zarr.storage import LocalStore

            from annbatch.collection._snapshot import open_snapshot

            local = LocalStore(self.path, read_only=True)
            found = [open_snapshot(local, self.path, name) for name in names]
            if all(g is not None for g in found):
                return found
            root = self.root("r")
            return [g if g is not None else root[n] for g, n in zip(found, names, strict=True)]
        root = self.root("r" if mode == "r" else "r+")
        return [root[name] for name in names]

    def describe(self, names: Sequence[str], mode: str) -> list[dict[str, Any]]:
        """Each dataset's X as :func:`~annbatch.collection._layout.describe_x` gives it, and
        its bytes."""
        return [
            {"name": group.basename, **describe_x(group), "bytes": self._size(group)}
            for group in self.open_datasets(names, mode)
        ]

    def _size(self, group: zarr.Group) -> int:
        """Bytes of the dataset ``group`` on disk or in its object store."""
        if self.store is None:
            return sum(
                f.stat().st_size for f in (self.path / group.basename).rglob("*") if f.is_file()
            )
        import obstore

        store: Any = group.store
        prefix = group.path.strip("/") + "/"
        listed = obstore.list(store.store, prefix=prefix)
        return sum(item["size"] for batch in listed for item in batch)

    # ---------------------------------------------------------------------------- manifest
    def state(self) -> dict[str, Any] | None:
        """The collection's recorded state; None if the path holds nothing yet."""
        if self.store is not None:
            try:
                root = self.root("r")
            except FileNotFoundError:  # nothing at the prefix yet
                return None
        elif not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir())):
            return None
        else:
            try:
                root = zarr.open_group(self.path, mode="r")
            except Exception as e:
                msg = (
                    f"{self.where} exists and is not a collection; choose another path or delete it"
                )
                raise CollectionPathError(msg) from e
        state = root.attrs.get(ATTR)
        if state is None and has_encoding(root.attrs):
            return foreign_state(root, FORMAT_VERSION)  # built by the reference library
        if state is None and not dict(root.attrs) and next(iter(root.keys()), None) is None:
            return None  # an empty group (made with zarr.open_group(path, mode="w"))
        if not isinstance(state, dict) or state.get("version") != FORMAT_VERSION:
            msg = f"{self.where} holds a zarr group that is not an annbatch collection; choose another path"
            raise CollectionPathError(msg)
        return state

    def complete_state(self) -> dict[str, Any]:
        """The state of a finished collection; an error if there is none or a build is
        unfinished."""
        state = self.state()
        if state is None:
            msg = f"{self.where} holds no collection yet; build one with add_adatas"
            raise IncompleteCollectionError(msg)
        if state["state"] != "complete":
            msg = (
                f"the build of {self.where} did not finish; run the same add_adatas call (or "
                "`annbatch build`) again to resume it, or delete the folder"
            )
            raise IncompleteCollectionError(msg)
        return state

    def create(self, record: dict[str, Any]) -> zarr.Group:
        """The root group, made with the first state ``record`` of a build."""
        checkpoint("manifest: begin")
        with naming(self.where):
            # overwrite: the path holds nothing, or an empty group (see state)
            return zarr.create_group(
                self.store if self.store is not None else self.path,
                path=self.store_path or None,
                zarr_format=3,
                attributes={ATTR: record},
                overwrite=True,
            )

    def save(
        self, root: zarr.Group, record: dict[str, Any], step: str, *, keep_previous: bool = False
    ) -> None:
        """Write the collection's state (one atomic write of the root's metadata); with
        ``keep_previous``, keep the state it replaces for a rollback (:meth:`restore`)."""
        checkpoint(f"manifest: {step}")
        if keep_previous:
            self._keep_manifest()
        with naming(self.path / "zarr.json" if self.store is None else self.where):
            put_state(root, record)

    def _keep_manifest(self) -> None:
        """Keep the root's metadata as it is (the finished collection's manifest) in the scratch
        folder, as a hard link (no space needed; a copy where the file system has none), for
        :meth:`restore` to rename back. Object storage: nothing (its rollback rewrites)."""
        if self.store is not None:
            return
        kept, current = self.scratch_folder / BEFORE_APPEND, self.path / "zarr.json"
        with naming(kept):
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.unlink(missing_ok=True)
            try:
                os.link(current, kept)
            except OSError as e:
                if full_disk_cause(e) is not None:
                    raise
                partial = kept.with_suffix(".partial")  # whole under its name, or not there
                shutil.copyfile(current, partial)
                os.replace(partial, kept)

    def restore(self, root: zarr.Group, restored: dict[str, Any]) -> None:
        """Put back the finished state ``restored``: the manifest kept when the append began
        is renamed back (a rename takes no space: this works on a full disk), or, in object
        storage (or for an append begun by an older annbatch), rewritten."""
        kept = self.scratch_folder / BEFORE_APPEND
        if self.store is None and _kept_datasets(kept) == restored["datasets"]:
            os.replace(kept, self.path / "zarr.json")
        else:
            put_state(root, restored)


def put_state(root: zarr.Group, record: dict[str, Any]) -> None:
    """Write the collection's state to the root's attributes (one write), with the reference's
    encoding (:data:`~annbatch.collection._encoding.V1_ENCODING`) exactly when the state is
    complete."""
    attributes = {**root.attrs.asdict(), ATTR: record}
    root.attrs.put(with_encoding(attributes, complete=record["state"] == "complete"))


def _kept_datasets(kept: Path) -> list[dict[str, Any]] | None:
    """The datasets of the manifest kept for a rollback (None if there is none to read)."""
    try:
        state = json.loads(kept.read_text())["attributes"][ATTR]
        return list(state["datasets"]) if state["state"] == "complete" else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _local_path(group: zarr.Group) -> Path:
    """The folder of a zarr group on a local store."""
    from zarr.storage import LocalStore

    store = group.store
    if not isinstance(store, LocalStore):
        msg = (
            f"DatasetCollection needs a group on the local file system (a zarr LocalStore), got "
            f"one on a {type(store).__name__}; for object storage give its URL or a group on "
            "zarr's ObjectStore"
        )
        raise FeatureNotAvailableError(msg)
    return Path(store.root) / group.path

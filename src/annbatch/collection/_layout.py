"""How a collection's datasets are laid out on disk: chunking, sharding and codec.

The numbers below were chosen by measurement (``benchmarks/layout.py`` and
``benchmarks/collection_vs_reference.py``; tables in ``benchmarks/RESULTS.md``, "collection
layout"). With a codec, decoding is what bounds the Loader, and a loader chunk smaller than an
on-disk chunk decodes data it then drops: on-disk chunks are kept small and the codec is one
that decodes fast (LZ4). Without one (the default), the Loader reads exactly the bytes of the
rows it wants, straight into its buffers: nothing is decoded or dropped, at the price of a
store several times larger than a compressed one.

Every array of a collection (X's, and obs' and var's columns) carries a CRC32C checksum per
chunk (zarr v3's ``crc32c`` codec, last in the chain): the Loader verifies it whenever it reads
a chunk whole, zarr-python whenever it reads one, and ``annbatch verify`` scrubs them all.
Every chunk of every array is written (one of all fill values too) and each array records so
(:data:`annbatch._core.chunks.COMPLETE_ATTR`): a chunk missing later is damage, never zeros
or another row's label (obs and var are read through :mod:`annbatch._core.frames`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

from annbatch._anndata_io import DTYPE_ATTR
from annbatch._args import parse_int
from annbatch._core.chunks import COMPLETE_ATTR
from annbatch._core.obs import WINDOW_CHUNK_ROWS
from annbatch._narrow import VALUES_DTYPE_ATTR, declared_dtype, narrow_values
from annbatch.collection._obs import prepare_for_write
from annbatch.errors import InvalidArgumentError

if TYPE_CHECKING:
    from collections.abc import Callable

SPARSE_CHUNK = 32_768
"""Elements per on-disk chunk of a compressed sparse dataset's data and indices."""
SPARSE_CHUNK_UNCOMPRESSED = 131_072
"""The same, uncompressed: only the wanted rows are read, so larger chunks waste nothing and
cost less per chunk (chunk 32: 1.05-1.3x, chunk 1: 1.4x the rows/s of 32,768; same at 256)."""
SPARSE_SHARD = 2**22
"""Elements per shard file of data and indices."""
DENSE_CHUNK_BYTES = 2**20
"""Target bytes per on-disk chunk of a dense dataset (whole rows per chunk)."""
DENSE_SHARD_CHUNKS = 64
"""Chunks per shard file of a dense dataset."""


Compression = Literal["packed-lz4", "packed", "none", "lz4", "zstd"]
COMPRESSIONS: tuple[str, ...] = get_args(Compression)
PACKED: tuple[str, ...] = ("packed", "packed-lz4")
"""Layouts that store integer-valued arrays in the narrowest integer type that holds them
exactly, and CSR column indices in uint16 for up to 65,536 genes (:mod:`annbatch._narrow`).
``packed`` has no codec: rows are still read in part, and widening them costs less than
reading twice the bytes. ``packed-lz4`` compresses the values (not the indices) with LZ4
after a bit shuffle."""
DEFAULT_COMPRESSION: Compression = "packed-lz4"
"""On UMI-like counts: 2.5 bytes per nonzero (1.14x zstd's, 0.31x ``none``'s) at 0.9-1.04x the
rows/s of ``none`` (benchmarks/RESULTS.md, "packed layouts")."""
PACKED_LZ4_CHUNK = 262_144
"""Most values per on-disk chunk of ``packed-lz4``'s compressed CSR values (about 80 rows of UMI
counts). Measured on UMI-like counts: 262,144 read at 1.04x / 0.90x the rows/s of ``none`` at
loader chunks 256 / 32, 65,536 at 0.80x / 0.84x, 32,768 lower still; the size is the same."""
PACKED_LZ4_CHUNK_ROWS = 2_048
"""Rows (on average) a chunk of ``packed-lz4``'s values holds at most: a chunk is decoded whole
for any of its rows, so on data with few nonzeros per row (8 per cell: 262,144 values are 32,000
rows) a loader chunk of 256 rows decoded 128 times what it kept. Measured on a 20-million-cell
collection of 8 nonzeros per cell: 16,384 values read at 1.0-1.23x the rows/s of 262,144 and
2.0 against 2.3-3.0 us of CPU per row (benchmarks/RESULTS.md, "atlas scale"). Rows of UMI
counts (1,500+ nonzeros) fill :data:`PACKED_LZ4_CHUNK` long before."""
PACKED_LZ4_MIN_CHUNK = 16_384
"""Fewest values per chunk of ``packed-lz4``'s values (a smaller chunk costs more per value to
locate, read and decode than it saves)."""


def packed_lz4_chunk(nnz: int, n_obs: int) -> int:
    """Values per chunk of ``packed-lz4``'s CSR values: about :data:`PACKED_LZ4_CHUNK_ROWS`
    rows, within :data:`PACKED_LZ4_MIN_CHUNK` and :data:`PACKED_LZ4_CHUNK` (and never more
    than ``nnz``)."""
    rows = nnz * PACKED_LZ4_CHUNK_ROWS // max(1, n_obs)
    chunk = min(PACKED_LZ4_CHUNK, max(PACKED_LZ4_MIN_CHUNK, rows))
    return max(1, min(chunk, nnz))


def parse_compression(value: object) -> Compression:
    """Check a user's ``compression`` argument."""
    if value not in COMPRESSIONS:
        msg = f"compression must be one of {COMPRESSIONS}, got {value!r}"
        raise InvalidArgumentError(msg)
    return value  # type: ignore[return-value]


def compressors(compression: Compression) -> list[Any]:
    """The zarr bytes-to-bytes codecs for ``compression``, then a CRC32C checksum: none; LZ4
    inside blosc with byte shuffle (decodes about twice as fast as zstd); or zstd (smallest,
    slowest to decode)."""
    if compression == "lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]
    if compression == "packed-lz4":  # narrow integers: a bit shuffle packs their zero bits
        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), Crc32cCodec()]
    if compression == "zstd":
        return [ZstdCodec(level=3), Crc32cCodec()]
    return [Crc32cCodec()]


OBS_CODECS = {"compressors": [ZstdCodec(level=3), Crc32cCodec()]}
"""Codecs of var's arrays (and obs', with :func:`obs_kwargs`): small is what counts."""


def obs_kwargs(n_obs: int) -> dict[str, Any]:
    """zarr arguments of a dataset's obs arrays: the Loader reads each window's rows of them
    (:mod:`annbatch._core.obs`), so they are chunked in :data:`WINDOW_CHUNK_ROWS` rows (a
    window's range decodes little more than it wants), one shard per column."""
    rows = WINDOW_CHUNK_ROWS
    return {
        "compressors": [Crc32cCodec()],
        "chunks": (rows,),
        "shards": (max(1, -(-n_obs // rows)) * rows,),
    }


@dataclass(frozen=True)
class XLayout:
    """X's layout as :func:`annbatch.write_sharded` chooses it (the reference library's
    collection arguments ``n_obs_per_chunk``, ``shard_size``, ``zarr_compressor``)."""

    n_obs_per_chunk: int = 64
    shard_size: int | str = "1GB"
    compressors: tuple[Any, ...] = ()

    def describe(self) -> dict[str, Any]:
        """A JSON description, recorded in the collection's manifest."""
        return {
            "n_obs_per_chunk": self.n_obs_per_chunk,
            "shard_size": self.shard_size,
            "compressors": [
                c.to_dict() if hasattr(c, "to_dict") else repr(c) for c in self.compressors
            ],
        }

    def kwargs(self, x: Any) -> dict[str, Any]:
        """zarr ``create_array`` arguments for X (CRC32C checksums added)."""
        from annbatch.io._sharded import layout_kwargs, parse_shard_size

        kwargs = layout_kwargs(
            x, self.n_obs_per_chunk, parse_shard_size(self.shard_size), self.compressors, x.shape[0]
        )
        kwargs["compressors"] = [*kwargs["compressors"], Crc32cCodec()]
        return kwargs


def parse_layout(n_obs_per_chunk: object, shard_size: object, compressor: object) -> XLayout | None:
    """The layout from the reference's arguments; None when none is given."""
    if n_obs_per_chunk is None and shard_size is None and compressor is None:
        return None
    from annbatch.io._sharded import default_compressors, parse_shard_size

    chunk = (
        64 if n_obs_per_chunk is None else parse_int(n_obs_per_chunk, "n_obs_per_chunk", minimum=1)
    )
    shard: Any = "1GB" if shard_size is None else shard_size
    parse_shard_size(shard)
    codecs = default_compressors() if compressor is None else _codecs(compressor)
    return XLayout(chunk, shard, codecs)


def _codecs(compressor: object) -> tuple[Any, ...]:
    """zarr v3 bytes-to-bytes codecs from one codec or a sequence of them."""
    from zarr.abc.codec import BytesBytesCodec

    codecs = tuple(compressor) if isinstance(compressor, list | tuple) else (compressor,)
    for codec in codecs:
        if not isinstance(codec, BytesBytesCodec):
            msg = f"zarr_compressor must be a zarr v3 compressor (e.g. zarr.codecs.BloscCodec()), got {codec!r}"
            raise InvalidArgumentError(msg)
    return codecs


def dense_chunk_rows(n_var: int, itemsize: int) -> int:
    """Rows per on-disk chunk of a dense dataset with ``n_var`` columns."""
    return int(max(1, min(4096, DENSE_CHUNK_BYTES // max(1, n_var * itemsize))))


_RAW = ("none", "packed")
"""Layouts without a codec: rows are read in part."""


def array_kwargs(x: Any, compression: Compression, layout: XLayout | None = None) -> dict[str, Any]:
    """zarr ``create_array`` arguments for a row-indexed array of a dataset (X, a layer, an
    obsm entry; dense of any rank, or CSR): ``layout`` if given, else annbatch's layout for
    ``compression``."""
    if layout is not None and x.shape[0]:
        return {**layout.kwargs(x), "config": {"write_empty_chunks": True}}
    if sp.issparse(x):
        n = max(1, int(x.nnz))
        per_chunk = SPARSE_CHUNK_UNCOMPRESSED if compression in _RAW else SPARSE_CHUNK
        chunk = min(per_chunk, n)
        return {
            "chunks": (chunk,),
            "shards": (chunk * min(SPARSE_SHARD // per_chunk, -(-n // chunk)),),
            "compressors": compressors(compression),
            "config": {"write_empty_chunks": True},
        }
    tail = tuple(x.shape[1:])
    width = int(np.prod(tail, dtype=np.int64))
    rows = min(dense_chunk_rows(width, x.dtype.itemsize), max(1, x.shape[0]))
    return {
        "chunks": (rows, *tail),
        "shards": (rows * min(DENSE_SHARD_CHUNKS, -(-max(1, x.shape[0]) // rows)), *tail),
        "compressors": compressors(compression),
        "config": {"write_empty_chunks": True},
    }


def write_dataset(
    group: zarr.Group,
    x: Any,
    obs: pd.DataFrame,
    var_names: pd.Index,
    compression: Compression = DEFAULT_COMPRESSION,
    checkpoint: Callable[[str], None] | None = None,
    layout: XLayout | None = None,
    elements: dict[str, Any] | None = None,
    var: pd.DataFrame | None = None,
) -> None:
    """Write one AnnData (X, obs, var, and ``elements``: layers and obsm arrays by path) into
    ``group`` (a new, empty zarr v3 group). ``var``: the var frame (index ``var_names``);
    default: no columns.

    obs columns anndata cannot write (datetimes) are stored as ISO 8601 strings marked with
    the ``annbatch-dtype`` attribute (see :func:`annbatch.load_x_and_obs`); ``checkpoint`` is
    called between the elements (see :func:`annbatch.collection._build.checkpoint`).
    """
    obs, restore = prepare_for_write(obs)
    # Every chunk is written, one of only fill values too, so that a missing one is damage.
    # zarr's default, not the arrays' own config: anndata writes through the array reopened
    # from its metadata, which does not keep the config it was created with. zarr-python's
    # own codec pipeline: others set process-wide (zarrs, which scvi-tools sets) skip chunks
    # of only fill values whatever the config says.
    with (
        zarr.config.set(
            {"array.write_empty_chunks": True, "codec_pipeline.path": WRITING_PIPELINE}
        ),
        warnings.catch_warnings(),
        ad.settings.override(allow_write_nullable_strings=True),
    ):
        warnings.simplefilter("ignore")  # anndata's notes about zarr v3 and string arrays
        if x is not None:  # None: an AnnData without X (its rows are in layers / obsm)
            _write_values(group, "X", x, compression, layout)
        for key in ("layers", "obsm"):
            mine = {
                p.split("/", 1)[1]: v
                for p, v in (elements or {}).items()
                if p.startswith(f"{key}/")
            }
            if not mine:
                continue
            if checkpoint is not None:
                checkpoint(f"write {key} of {group.basename}")
            ad.io.write_elem(group, key, {})  # an empty mapping: anndata's dict encoding
            sub: Any = group[key]
            for name, array in mine.items():
                _write_values(sub, name, array, compression, layout)
        if checkpoint is not None:
            checkpoint(f"write obs and var of {group.basename}")
        ad.io.write_elem(group, "obs", obs, dataset_kwargs=obs_kwargs(len(obs)))
        obs_group: Any = group["obs"]
        for column, dtype in restore.items():
            obs_group[column].attrs[DTYPE_ATTR] = dtype
        var = pd.DataFrame(index=var_names) if var is None else var
        ad.io.write_elem(group, "var", var, dataset_kwargs=OBS_CODECS)
    for key in ("obs", "var"):  # every chunk was written: a missing one is damage (as for X)
        _mark_complete(group[key])  # type: ignore[arg-type]
    group.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})


WRITING_PIPELINE = "zarr.core.codec_pipeline.BatchedCodecPipeline"
"""zarr-python's default codec pipeline, with which collections are written (see
:func:`write_dataset`)."""


def _write_values(
    group: zarr.Group, name: str, x: Any, compression: Compression, layout: XLayout | None
) -> None:
    """Write one row-indexed array (X, a layer, an obsm entry) of a dataset; in a packed
    layout with its values narrowed and the dtype they had recorded."""
    narrowed_from = None
    if layout is None and compression in PACKED:
        x, narrowed_from = narrow_values(x)
    if layout is None and compression == "packed-lz4" and sp.issparse(x):
        # Only the values are compressed: the column indices (uint16, raw) are read in part
        # as in ``packed``, and decoding stays at half of the bytes.
        ad.io.write_elem(group, name, x, dataset_kwargs=array_kwargs(x, "packed"))
        csr: Any = group[name]
        del csr["data"]
        n = int(x.nnz)
        chunk = packed_lz4_chunk(n, x.shape[0])
        values = csr.create_array(
            "data",
            shape=(n,),
            dtype=x.data.dtype,
            chunks=(chunk,),
            shards=(chunk * max(1, min(SPARSE_SHARD // chunk, -(-max(1, n) // chunk))),),
            compressors=compressors("packed-lz4"),
            config={"write_empty_chunks": True},
        )
        values[...] = x.data
    else:
        ad.io.write_elem(group, name, x, dataset_kwargs=array_kwargs(x, compression, layout))
    element: Any = group[name]
    if narrowed_from is not None:
        element.attrs[VALUES_DTYPE_ATTR] = narrowed_from.name
    # Every chunk was written (write_empty_chunks): the reader treats a missing one as damage.
    for array in [element] if isinstance(element, zarr.Array) else element.array_values():
        array.attrs[COMPLETE_ATTR] = True


def _mark_complete(group: zarr.Group) -> None:
    """Record on every array under ``group`` that all its chunks were written."""
    for _, array in group.arrays():
        array.attrs[COMPLETE_ATTR] = True
    for _, member in group.groups():
        _mark_complete(member)


def describe_x(group: zarr.Group) -> dict[str, Any]:
    """Rows, columns, dtype (the values' own: what the Loader yields), the stored types, stored
    entries (``nnz``; CSR only), codec and on-disk layout of a dataset's X (a dataset without
    X: its rows and genes, and ``encoding`` ``"none"``)."""
    if "X" not in group:
        obs: Any = group["obs"]
        var: Any = group["var"]
        n_var = var[var.attrs["_index"]].shape[0]
        return {
            "n_obs": int(obs[obs.attrs["_index"]].shape[0]),
            "n_var": int(n_var),
            "dtype": None,
            "stored": "-",
            "nnz": None,
            "encoding": "none",
            "chunks": (),
            "shards": None,
            "codec": "-",
            "checksum": False,
        }
    x: Any = group["X"]
    encoding = x.attrs.get("encoding-type", "array")
    array: Any = x["data"] if encoding == "csr_matrix" else x
    shape: Any = x.attrs["shape"] if encoding == "csr_matrix" else x.shape
    codecs = list(getattr(array.metadata, "codecs", ()))
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
        codecs = list(codecs[0].codecs)
    names = [_codec_name(c) for c in codecs if not isinstance(c, BytesCodec | Crc32cCodec)]
    stored = np.dtype(array.dtype)
    declared = declared_dtype(x.attrs, stored, f"X of {group.basename}")
    stored_types = str(stored)
    if encoding == "csr_matrix":
        indices: Any = x["indices"]
        stored_types += f" + {np.dtype(indices.dtype)} indices"
    return {
        "n_obs": int(shape[0]),
        "n_var": int(shape[1]),
        "dtype": str(stored if declared is None else declared),
        "stored": stored_types,
        "nnz": int(array.shape[0]) if encoding == "csr_matrix" else None,
        "encoding": encoding,
        "chunks": tuple(array.chunks),
        "shards": tuple(array.shards) if array.shards else None,
        "codec": " + ".join(names) or "none",
        "checksum": any(isinstance(c, Crc32cCodec) for c in codecs),
    }


def _codec_name(codec: Any) -> str:
    if isinstance(codec, BloscCodec):
        return f"blosc({getattr(codec.cname, 'value', codec.cname)})"
    return type(codec).__name__.removesuffix("Codec").lower()

"""Direct chunk reads give exactly what zarr reads, for every layout they accept."""

from __future__ import annotations

import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import google_crc32c
import numcodecs
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.codecs import BloscCodec, GzipCodec, TransposeCodec, ZstdCodec

from annbatch._core.chunks import direct_array
from annbatch.errors import CorruptChunkError

# (zarr_format, shards, compressor, trailing shape, chunk rows, chunk trailing, dtype)
LAYOUTS = {
    "v3-sharded-zstd": (3, 4, "zstd", (5,), 3, (5,), "float32"),
    "v3-sharded-none-1d": (3, 4, None, (), 7, (), "int64"),
    "v3-sharded-blosc-3d": (3, 2, "blosc", (3, 2), 4, (3, 2), "uint16"),
    "v3-zstd-padded-columns": (3, None, "zstd", (5,), 3, (8,), "float32"),
    "v3-gzip": (3, None, "gzip", (4,), 5, (4,), "int32"),
    "v3-sharded-padded-columns": (3, 2, "zstd", (5,), 3, (6,), "float64"),
    "v2-blosc": (2, None, "blosc", (6,), 4, (6,), "float32"),
    "v2-none-1d": (2, None, None, (), 9, (), "int32"),
    # Uncompressed chunks of whole rows are read row range by row range, not chunk by chunk.
    "v3-sharded-none-2d": (3, 3, None, (4,), 5, (4,), "float32"),
    "v3-none-2d": (3, None, None, (3,), 4, (3,), "uint8"),
    "v3-none-padded-columns": (3, None, None, (5,), 3, (7,), "float32"),
}
N_ROWS = 53


def _compressors(fmt: int, name: str | None) -> object:
    if name is None:
        return None
    if fmt == 2:
        return {"zstd": numcodecs.Zstd(), "blosc": numcodecs.Blosc(), "gzip": numcodecs.GZip()}[
            name
        ]
    return {"zstd": ZstdCodec(), "blosc": BloscCodec(), "gzip": GzipCodec()}[name]


def _write(path: str, layout: str, *, holes: bool = False) -> tuple[zarr.Array, np.ndarray]:
    fmt, shards, compressor, trailing, rows, chunk_trailing, dtype = LAYOUTS[layout]
    rng = np.random.default_rng(abs(hash(layout)) % 2**32)
    values = rng.integers(1, 1000, size=(N_ROWS, *trailing)).astype(dtype)
    if holes:  # rows that hold only the fill value: their chunks are never written
        values[10:30] = 0
    kwargs: dict = {"compressors": _compressors(fmt, compressor)}
    if compressor is None:
        kwargs["compressors"] = None
    if shards is not None:
        kwargs["shards"] = (rows * shards, *chunk_trailing)
    array = zarr.create_array(
        store=path,
        shape=values.shape,
        chunks=(rows, *chunk_trailing),
        dtype=dtype,
        zarr_format=fmt,
        fill_value=0,
        config={"write_empty_chunks": False},
        **kwargs,
    )
    array[:] = values
    return zarr.open_array(path, mode="r"), values


@st.composite
def ranges(draw, n_rows: int = N_ROWS):
    cuts = sorted(draw(st.lists(st.integers(0, n_rows), min_size=0, max_size=16, unique=True)))
    pairs = list(zip(cuts[0::2], cuts[1::2], strict=False))
    return np.array([p[0] for p in pairs], dtype=np.int64), np.array(
        [p[1] for p in pairs], dtype=np.int64
    )


def _read(direct, starts, stops, n_tasks=3, executor=None):
    out = np.empty((int(np.sum(stops - starts)), *direct.shape[1:]), dtype=direct.dtype)
    tasks = direct.tasks(starts, stops, out, n_tasks)
    if executor is None:
        for task in tasks:
            task()
    else:
        for f in [executor.submit(t) for t in tasks]:
            f.result()
    return out


def _expected(values, starts, stops):
    if len(starts) == 0:
        return values[:0]
    return np.concatenate([values[a:b] for a, b in zip(starts, stops, strict=True)])


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def written(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("direct")
    holes = request.param.startswith("v3-sharded") or request.param in ("v2-blosc", "v3-none-2d")
    array, values = _write(str(root / f"{request.param}.zarr"), request.param, holes=holes)
    return array, values


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=ranges(), n_tasks=st.integers(1, 5))
def test_reads_equal_zarr(written, case, n_tasks):
    array, values = written
    direct = direct_array(array)
    assert direct is not None
    starts, stops = case
    assert np.array_equal(_read(direct, starts, stops, n_tasks), _expected(values, starts, stops))
    assert np.array_equal(values, array[:])  # the fixture is what zarr reads too


def test_threads_and_pickling(written):
    array, values = written
    direct = pickle.loads(pickle.dumps(direct_array(array)))
    starts, stops = np.array([0, 11, 40]), np.array([7, 33, N_ROWS])
    with ThreadPoolExecutor(3) as executor:
        out = _read(direct, starts, stops, n_tasks=6, executor=executor)
    assert np.array_equal(out, _expected(values, starts, stops))


def test_missing_chunks_read_as_fill_value(tmp_path):
    array, values = _write(str(tmp_path / "a.zarr"), "v3-sharded-zstd", holes=True)
    direct = direct_array(array)
    out = _read(direct, np.array([0]), np.array([N_ROWS]))
    assert np.array_equal(out, values)
    assert not out[12:27].any()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda p: zarr.create_array(store={}, shape=(10, 4), chunks=(2, 4), dtype="f4"),
            id="memory-store",
        ),
        pytest.param(
            lambda p: zarr.create_array(store=p, shape=(10, 4), chunks=(2, 2), dtype="f4"),
            id="chunk-splits-columns",
        ),
        pytest.param(
            lambda p: zarr.create_array(
                store=p,
                shape=(10, 4),
                chunks=(2, 4),
                dtype="f4",
                serializer="auto",
                filters=[TransposeCodec(order=(1, 0))],
            ),
            id="transpose-codec",
        ),
        pytest.param(
            lambda p: zarr.create_array(store=p, shape=(10, 4), chunks=(2, 4), dtype=">f4"),
            id="big-endian",
        ),
        pytest.param(
            lambda p: zarr.create_array(
                store=p,
                shape=(10, 4),
                chunks=(2, 4),
                dtype="f4",
                zarr_format=2,
                filters=[numcodecs.Delta("f4")],
            ),
            id="v2-filters",
        ),
        pytest.param(lambda p: np.zeros((3, 3)), id="numpy"),
    ],
)
def test_unsupported_layouts_fall_back(tmp_path, make):
    assert direct_array(make(str(tmp_path / "a.zarr"))) is None


def test_damaged_chunk_raises_a_clear_error(tmp_path):
    array, _ = _write(str(tmp_path / "a.zarr"), "v3-gzip")
    chunk_file = tmp_path / "a.zarr" / "c" / "2" / "0"
    raw = chunk_file.read_bytes()
    chunk_file.write_bytes(raw[: len(raw) // 2])
    direct = direct_array(array)
    with pytest.raises(CorruptChunkError, match=r"chunk c/2/0 .* damaged or truncated"):
        _read(direct, np.array([0]), np.array([N_ROWS]))


def test_no_file_descriptor_leaks(written):
    array, _ = written
    before = len(os.listdir("/proc/self/fd"))
    _read(direct_array(array), np.array([0]), np.array([N_ROWS]))
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("gaps", [True, False], ids=["gaps", "adjacent"])
@pytest.mark.parametrize("trailing", [(), (3,)], ids=["1d", "2d"])
@pytest.mark.parametrize("compressors", ["auto", None], ids=["zstd", "uncompressed"])
@pytest.mark.parametrize("piece_rows", [1, 2, 40, 150])
def test_many_pieces_scattered_to_any_destination(
    tmp_path, piece_rows, compressors, trailing, gaps
):
    # Pieces short and long, landing in a shuffled order: every copy strategy is exercised
    # (single rows, consecutive or not; uncompressed, reads of single pieces, of pieces that
    # join up in the file, and of a chunk's span).
    width = int(np.prod(trailing))
    values = np.arange(4000 * width, dtype=np.float32).reshape(4000, *trailing)
    array = zarr.create_array(
        tmp_path / "a.zarr",
        shape=values.shape,
        chunks=(400, *trailing),
        shards=(1200, *trailing),
        dtype="f4",
        compressors=compressors,
    )
    array[:] = values
    direct = direct_array(zarr.open_array(tmp_path / "a.zarr", mode="r"))
    starts = np.arange(0, 4000 - piece_rows, (2 * piece_rows + 1) if gaps else piece_rows)
    stops = starts + piece_rows
    rng = np.random.default_rng(piece_rows)
    order = rng.permutation(starts.size)
    dest = np.empty(starts.size, dtype=np.int64)
    dest[order] = np.arange(starts.size) * piece_rows  # range order[k] lands k-th
    out = np.full((starts.size * piece_rows, *trailing), -1, dtype=np.float32)
    for task in direct.tasks(starts, stops, out, 3, dst=dest):
        task()
    expected = np.concatenate([values[starts[k] : stops[k]] for k in order])
    np.testing.assert_array_equal(out, expected)
    contiguous = _read(direct, starts, stops)
    np.testing.assert_array_equal(contiguous, _expected(values, starts, stops))


@pytest.mark.parametrize("layout", ["v3-none-2d", "v2-none-1d", "v3-sharded-none-2d"])
def test_truncated_uncompressed_chunk_raises_a_clear_error(tmp_path, layout):
    array, _ = _write(str(tmp_path / "a.zarr"), layout)
    files = sorted(
        (p for p in (tmp_path / "a.zarr").rglob("*") if p.is_file() and "zarr" not in p.name),
        key=lambda p: p.stat().st_size,
    )
    victim = files[-1]  # a full chunk (or shard) file
    raw = victim.read_bytes()
    if layout.startswith("v3-sharded"):  # keep the index, shrink a chunk's recorded size
        index = np.frombuffer(raw[-4 - 16 * 3 :][:-4], dtype="<u8").reshape(-1, 2).copy()
        index[0, 1] -= 4
        crc = int(google_crc32c.value(index.tobytes())).to_bytes(4, "little")  # still valid
        victim.write_bytes(raw[: -4 - 16 * 3] + index.tobytes() + crc)
        match = "not the .* of an uncompressed chunk"
    else:
        victim.write_bytes(raw[: len(raw) // 2])
        match = "truncated"
    with pytest.raises(CorruptChunkError, match=match):
        _read(direct_array(array), np.array([0]), np.array([N_ROWS]))


def test_truncated_shard_raises_a_clear_error(tmp_path):
    array, _ = _write(str(tmp_path / "a.zarr"), "v3-sharded-zstd")
    shard = tmp_path / "a.zarr" / "c" / "1" / "0"
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(CorruptChunkError, match="too short for its index"):
        _read(direct_array(array), np.array([0]), np.array([N_ROWS]))

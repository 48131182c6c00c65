"""The Loader's machinery: one pipeline stage per module.

One epoch (``epoch``: the sampler's load requests, this worker's share of them (``workers``),
where a resumed epoch stands (``resume``)) reads window after window, ahead of the consumer
(``prefetch``). One window (``window``):

sources (what can be read, one :class:`~annbatch._core.sources.RowSource` per dataset)
-> planner (which rows, from which dataset, in how few reads) -> reader (run the reads on
threads; zarr arrays it understands through ``chunks``, annbatch's own chunk reader)
-> assembler (cut the window into batches) -> gpu (optional: the window to the device)
-> convert (numpy / scipy to torch, jax, cupy).

Shared by the stages: ``types`` (blocks, read jobs, where windows go), ``cancel`` (abandoning
a read), ``failures`` (library errors to annbatch's), ``validate`` (checks of stored
structure), ``ranges`` (row ranges as index arrays), ``fork_guard`` (object storage in forked
processes), ``frames`` (obs and var read with the chunk reader's checks) and ``obs`` (a
collection's obs read window by window, next to X).
"""

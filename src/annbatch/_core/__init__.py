"""The Loader's machinery: one pipeline stage per module.

datasets (what can be read) -> planner (which rows, from which dataset) -> reader (read them)
-> assembler (concatenate, shuffle, split into batches) -> convert (numpy/scipy -> torch).
"""

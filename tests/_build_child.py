"""Test helper: a collection build in a child process that SIGKILLs itself at a checkpoint."""

from __future__ import annotations

import os
import signal
from typing import Any


def build(out: str, inputs: list[str], kwargs: dict[str, Any], kill_at: int | None) -> None:
    """Run ``add_adatas``; with ``kill_at``, die by SIGKILL at that checkpoint (1-based)."""
    from annbatch import DatasetCollection
    from annbatch.collection import _build

    seen = 0

    def hook(step: str) -> None:
        nonlocal seen
        seen += 1
        if seen == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    _build.crash_hook = hook
    opening = {
        key: kwargs.pop(key)
        for key in ("is_collection_h5ad", "storage_options", "scratch_dir")
        if key in kwargs
    }
    DatasetCollection(out, **opening).add_adatas(inputs, progress=False, **kwargs)

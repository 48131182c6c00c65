"""Warnings attributed to the user's line, however deep in annbatch they are raised."""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(__file__) + os.sep


def _importlib_frame(filename: str) -> bool:
    """Frames of the import machinery, which ``warnings.warn`` skips when counting levels."""
    return "importlib" in filename and "_bootstrap" in filename


def warn(message: str, category: type[Warning]) -> None:
    """Warn with ``message``, attributed to the first frame outside annbatch (the line of user
    code that called into it; the outermost frame when there is none, in a reader thread)."""
    frame = sys._getframe(1)
    level = 2
    while frame.f_back is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE) or _importlib_frame(frame.f_code.co_filename)
    ):
        frame = frame.f_back
        level += not _importlib_frame(frame.f_code.co_filename)
    warnings.warn(message, category, stacklevel=level)

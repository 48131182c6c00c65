"""How a read in progress is abandoned: the consumer sets an event, and threads that wait on
the read (the reader on its tasks, the read-ahead producer on a free slot) look at it every
:data:`POLL_S` seconds."""

from __future__ import annotations

POLL_S = 0.05
"""How often a thread waiting on a read checks whether it was asked to stop."""


class ReadCancelled(Exception):
    """The read was abandoned because its cancel event was set (the consumer stopped
    iterating)."""

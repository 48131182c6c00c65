"""``python -m annbatch``: the same as the ``annbatch`` command."""

from __future__ import annotations

from annbatch._cli import main

raise SystemExit(main())

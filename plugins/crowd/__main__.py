"""``python -m crowd ...``: see :mod:`crowd.cli`."""

from __future__ import annotations

from crowd.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""Text output shared by the commands and ``sparta.cli``."""
from __future__ import annotations

from typing import Any


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A plain-text table; ``columns`` is [(key, header)]; floats get one decimal, a missing value "-"."""
    from tabulate import tabulate  # noqa: PLC0415 (CLI start-up: sparta.cli imports this module; tabulate takes ~20 ms)

    cells = [[f"{v:.1f}" if isinstance(v, float) else v for v in (r.get(k) for k, _ in columns)] for r in rows]
    return tabulate(cells, headers=[h for _, h in columns], missingval="-", disable_numparse=True)

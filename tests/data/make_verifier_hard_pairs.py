"""Writes the hard verifier pair table: ``verifier_hard_dev.jsonl`` and ``verifier_hard_heldout.jsonl``.

The rows live in :mod:`verifier_hard_dev` and :mod:`verifier_hard_heldout` (hand-labelled, each with a one-line
``why``). The held-out part was written before any verifier change it measures and is never used while fixing.
Rerun from the repository root::

    python tests/data/make_verifier_hard_pairs.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from verifier_hard_dev import DEV  # noqa: E402
from verifier_hard_heldout import HELDOUT  # noqa: E402

FIELDS = ("category", "gold", "candidate", "equivalent", "why", "source")
EXTRAS = ("problem",)  # optional seventh element: a dict with the problem text (read by the percent policy)


def write(rows: list[tuple], path: Path) -> None:
    """Writes rows as JSON lines, refusing duplicates and malformed rows."""
    seen = set()
    with path.open("w") as handle:
        for row in rows:
            extras = row[6] if len(row) == len(FIELDS) + 1 else {}
            if len(row) - len(extras and [1]) != len(FIELDS) or not isinstance(row[3], bool) or not row[4]:
                raise ValueError(f"malformed row {row!r}: need {FIELDS} with a bool label and a why")
            if set(extras) - set(EXTRAS):
                raise ValueError(f"row {row!r}: extras may only be {EXTRAS}")
            if (row[1], row[2]) in seen:
                raise ValueError(f"duplicate pair {row[1]!r} / {row[2]!r}")
            seen.add((row[1], row[2]))
            handle.write(json.dumps({**dict(zip(FIELDS, row[:6])), **extras}) + "\n")


def main() -> None:
    overlap = {(r[1], r[2]) for r in DEV} & {(r[1], r[2]) for r in HELDOUT}
    if overlap:
        raise ValueError(f"dev and held-out share pairs: {sorted(overlap)[:5]}")
    write(DEV, HERE / "verifier_hard_dev.jsonl")
    write(HELDOUT, HERE / "verifier_hard_heldout.jsonl")
    print(f"dev {len(DEV)} pairs, held-out {len(HELDOUT)} pairs")


if __name__ == "__main__":
    main()

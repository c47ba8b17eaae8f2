"""Writes the answer-forms pair table (issue 26): ``verifier_forms_dev.jsonl`` and ``verifier_forms_heldout.jsonl``.

The rows live in :mod:`verifier_forms_dev` and :mod:`verifier_forms_heldout` (hand-labelled, each with a one-line
``why``): named values, inequalities, sets, units/currency/words, other forms (answer letters with their option text,
sentences, times of day, matrix arithmetic, trigonometric identities) and the policies that read the problem text or
the whole completion (several boxes, rounding, list order, percent). A row may carry ``problem`` (the question text)
and ``completion`` (a whole response used instead of the boxed candidate). The held-out part was written and
committed before any verifier change it measures and was not looked at while fixing. Rerun from the repository
root::

    python tests/data/make_verifier_forms_pairs.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from verifier_forms_dev import DEV  # noqa: E402
from verifier_forms_heldout import HELDOUT  # noqa: E402

FIELDS = ("category", "gold", "candidate", "equivalent", "why", "source")
EXTRAS = ("problem", "completion")


def _key(row: tuple) -> tuple:
    extras = row[6] if len(row) == 7 else {}
    return (row[1], row[2], extras.get("problem", ""), extras.get("completion", ""))


def write(rows: list[tuple], path: Path) -> None:
    """Writes rows as JSON lines, refusing duplicates and malformed rows."""
    seen = set()
    with path.open("w") as handle:
        for row in rows:
            extras = row[6] if len(row) == 7 else {}
            if len(row) not in (6, 7) or not isinstance(row[3], bool) or not row[4] or set(extras) - set(EXTRAS):
                raise ValueError(f"malformed row {row!r}: need {FIELDS} (+ extras {EXTRAS}), a bool label and a why")
            if _key(row) in seen:
                raise ValueError(f"duplicate pair {row[1]!r} / {row[2]!r}")
            seen.add(_key(row))
            handle.write(json.dumps({**dict(zip(FIELDS, row[:6])), **extras}) + "\n")


def main() -> None:
    overlap = {_key(r) for r in DEV} & {_key(r) for r in HELDOUT}
    if overlap:
        raise ValueError(f"dev and held-out share pairs: {sorted(overlap)[:5]}")
    write(DEV, HERE / "verifier_forms_dev.jsonl")
    write(HELDOUT, HERE / "verifier_forms_heldout.jsonl")
    print(f"dev {len(DEV)} pairs, held-out {len(HELDOUT)} pairs")


if __name__ == "__main__":
    main()

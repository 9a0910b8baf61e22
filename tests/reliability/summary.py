"""Counters the reliability tests fill in, printed as one block at the end of the run."""

from __future__ import annotations

from collections import Counter

COUNTS: Counter[str] = Counter()
LOST: list[str] = []

# Printed in this order, with these labels.
LABELS = (
    ("inputs", "XML inputs tried"),
    ("engine_inputs", "  of them through the engine"),
    ("lenient", "  accepted, not schema-valid"),
    ("kills", "kills survived"),
    ("kills_mid_op", "  landing mid-operation"),
    ("ops", "operations raced"),
    ("listings", "  listings taken meanwhile"),
    ("faults", "faults injected"),
)


def add(key: str, n: int = 1) -> None:
    COUNTS[key] += n


def lost(what: str) -> None:
    """Record something that should have survived and did not (the suite must end at 0)."""
    LOST.append(what)


def lines() -> list[str]:
    out = [f"{label:<32} {COUNTS[key]}" for key, label in LABELS]
    out.append(f"{'anything lost':<32} {len(LOST)}")
    out.extend(f"  lost: {what}" for what in LOST[:20])
    return out


def touched() -> bool:
    return bool(COUNTS) or bool(LOST)

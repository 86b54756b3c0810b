"""A benchmark's results table is rewritten by its run; the "## Notes" section below it is
written by hand about that run and kept when the script redraws the table."""

from pathlib import Path

NOTES = "\n## Notes"


def write_keeping_notes(md: Path, table: str) -> None:
    """Write `table` to `md`, followed by the notes section `md` already holds (if any)."""
    old = md.read_text() if md.exists() else ""
    notes = old[old.index(NOTES):] if NOTES in old else ""
    md.write_text(table.rstrip("\n") + "\n" + notes)

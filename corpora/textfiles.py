"""Read corpus index files (txt, csv, tsv) of any common encoding, line by line.

Public copies of text corpora are UTF-8, UTF-8 with a byte-order mark, UTF-16, or
Windows-1252 with a stray non-UTF-8 line; each line is decoded on its own (UTF-8, else
cp1252, else Latin-1, which never fails) and every fallback is counted, so one bad line
neither stops an import nor turns the whole file into mojibake.
"""

from __future__ import annotations

import codecs
import csv
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

__all__ = ["clean_text", "iter_lines", "open_csv", "sniff_dialect"]

# C1 control characters never occur in real text; in corpus dumps (MELD) they are cp1252
# punctuation (’ “ ” … —) decoded as Latin-1 somewhere upstream.
_C1 = {chr(code): bytes([code]).decode("cp1252", errors="ignore") for code in range(0x80, 0xA0)}
_C1_TABLE = str.maketrans(_C1)


def iter_lines(path: Path, notes: Counter[str]) -> Iterator[str]:
    """Yield the lines of a text file, decoded, without line endings.

    Parameters
    ----------
    path : Path
        The file.
    notes : Counter[str]
        Receives one count per line that was not UTF-8.

    Raises
    ------
    OSError
        If the file cannot be opened.
    """
    with open(path, "rb") as handle:
        head = handle.read(4)
        if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            # UTF-16 cannot be split on b"\n"; such files are small (hand-exported CSVs).
            notes["text: UTF-16 file"] += 1
            text = (head + handle.read()).decode("utf-16", errors="replace")
            yield from text.splitlines()
            return
        handle.seek(3 if head.startswith(codecs.BOM_UTF8) else 0)
        for raw in handle:
            raw = raw.rstrip(b"\r\n")
            try:
                yield raw.decode("utf-8")
                continue
            except UnicodeDecodeError:
                pass
            try:
                line = raw.decode("cp1252")
                notes["text: line not UTF-8, read as cp1252"] += 1
            except UnicodeDecodeError:
                line = raw.decode("latin-1")
                notes["text: line not UTF-8, read as Latin-1"] += 1
            yield line


def clean_text(text: str, notes: Counter[str]) -> str:
    """Collapse whitespace and repair C1 control characters (counted) in a corpus text."""
    if any("\x80" <= ch <= "\x9f" for ch in text):
        text = text.translate(_C1_TABLE)
        notes["text: C1 control characters repaired as cp1252 punctuation"] += 1
    return " ".join(text.split())


def sniff_dialect(header: str) -> tuple[str, str]:
    """Delimiter and quote character of a CSV file from its header line.

    Public copies of ISEAR and MELD use ``,``, ``;``, ``|`` or tabs as delimiter and
    ``"`` or ``|`` as quote (``|ID|,|Field1|``). The delimiter is the candidate that
    occurs most often outside double quotes.
    """
    stripped = header.strip()
    if stripped.startswith("|"):
        for delimiter in (",", ";", "\t"):
            if f"|{delimiter}|" in stripped:
                return delimiter, "|"
    counts = {c: _count_outside_quotes(stripped, c) for c in (",", ";", "\t", "|")}
    return max(counts, key=lambda c: counts[c]), '"'


def _count_outside_quotes(line: str, char: str) -> int:
    count, quoted = 0, False
    for ch in line:
        if ch == '"':
            quoted = not quoted
        elif ch == char and not quoted:
            count += 1
    return count


def open_csv(path: Path, notes: Counter[str]) -> Iterator[list[str]]:
    """Yield the rows of a CSV file of any delimiter, quote and encoding, header first.

    Rows are stripped of surrounding whitespace per field; empty rows are passed over.

    Raises
    ------
    OSError
        If the file cannot be opened.
    """
    lines = iter_lines(path, notes)
    first = next(lines, None)
    if first is None:
        return
    delimiter, quote = sniff_dialect(first)

    def chained() -> Iterator[str]:
        yield first
        yield from lines

    reader = csv.reader(chained(), delimiter=delimiter, quotechar=quote, skipinitialspace=True)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:
            # An over-long field or a stray quote: the reader resumes at the next line.
            notes["text: malformed CSV line passed over"] += 1
            continue
        if row and any(field.strip() for field in row):
            yield [field.strip() for field in row]

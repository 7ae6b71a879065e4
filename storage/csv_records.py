"""The records of a CSV text, as the csv module reads them, several times faster for
the CheXmask layout.

Why not the csv module alone: it moves one character at a time through a state
machine, about 90 MB/s here, and a published CheXmask row is 20-200 kB of RLE
text. This splitter finds each field's end with ``str.find`` (memchr) over large
blocks and slices it out, so a field costs a few C scans instead of a Python-visible
loop; an import spent most of its time in csv before.

It reads the default dialect (comma, double quote, quotes doubled inside quoted
fields; lines ended by ``\\n``, ``\\r\\n`` or ``\\r``) and gives the same records and
line numbers as ``csv.reader`` over the same text opened with ``newline=""``. What
it does not read the same way, a quote inside an unquoted field, text after a
closing quote, a quote left open at the end, hands the file over at that record
to the csv module itself, which reads the rest: such a file is slower, never read
differently.
"""

from __future__ import annotations

import csv
import io
import itertools
import sys
from collections.abc import Iterator
from typing import IO

BLOCK_CHARS = 1 << 20  # text read at a time; a longer record grows the buffer to fit


class _Unusual(Exception):
    """The record at hand needs the csv module."""


class _Incomplete(Exception):
    """The record runs past the text read so far."""


def csv_records(handle: IO[str], block_chars: int = BLOCK_CHARS) -> Iterator[tuple[int, list[str]]]:
    """Each record of ``handle`` (opened with ``newline=""``) with the line it starts on
    (the first is 1); blank lines are left out, as ``csv.reader`` gives them
    as empty records."""
    text, pos, line, ended = "", 0, 1, False
    while True:
        try:
            start = pos
            fields, pos, lines = _record(text, pos, ended)
        except _Incomplete:
            if ended:
                return
            # Keep the record begun, read on; a record longer than a block doubles the read.
            block = handle.read(max(block_chars, len(text) - pos))
            text, pos, ended = text[pos:] + block, 0, not block
            continue
        except _Unusual:
            yield from _csv_module_records(text[pos:], handle, line)
            return
        if text[start] not in "\r\n":  # a blank line is no record
            yield line, fields
        line += lines


def _record(text: str, pos: int, ended: bool) -> tuple[list[str], int, int]:
    """The record starting at ``pos``: its fields, where the next one starts and how many
    lines it spans. ``ended``: ``text`` holds the rest of the file."""
    if pos == len(text):
        raise _Incomplete
    fields: list[str] = []
    lines = 1
    line_end = -1  # where the line the unquoted fields are on ends (found once a line)
    while True:
        if text.startswith('"', pos):
            field, pos = _quoted_field(text, pos, ended)
            if "\n" in field or "\r" in field:
                lines += field.count("\n") + field.count("\r") - field.count("\r\n")
        else:
            if pos > line_end:
                line_end = _line_end(text, pos)
            comma = text.find(",", pos, line_end)
            end = line_end if comma == -1 else comma
            if end == len(text) and not ended:
                raise _Incomplete
            field = text[pos:end]
            if '"' in field:
                raise _Unusual
            pos = end
        fields.append(field)
        if pos == len(text):
            if not ended:
                raise _Incomplete
            return fields, pos, lines
        separator = text[pos]
        if separator == ",":
            pos += 1
        elif separator == "\n":
            return fields, pos + 1, lines
        elif separator == "\r":
            if pos + 1 == len(text) and not ended:
                raise _Incomplete  # "\r" then, perhaps, "\n" in the next block
            return fields, pos + (2 if text.startswith("\n", pos + 1) else 1), lines
        else:
            raise _Unusual  # text after a closing quote


def _quoted_field(text: str, pos: int, ended: bool) -> tuple[str, int]:
    """The quoted field whose opening quote is at ``pos``, and where it ends."""
    end = text.find('"', pos + 1)
    while end != -1 and text.startswith('"', end + 1):  # a doubled quote is one quote
        end = text.find('"', end + 2)
    if end == -1:
        raise _Unusual if ended else _Incomplete
    field = text[pos + 1 : end]
    return (field.replace('""', '"') if '""' in field else field), end + 1


def _line_end(text: str, pos: int) -> int:
    """Where the line at ``pos`` ends: its "\n" or "\r", or the end of the text."""
    end = text.find("\n", pos)
    if end == -1:
        end = len(text)
    found = text.find("\r", pos, end)
    return end if found == -1 else found


def _csv_module_records(rest: str, handle: IO[str], line: int) -> Iterator[tuple[int, list[str]]]:
    """The records of ``rest`` (the text read, from a record's start) and of the rest of
    ``handle``, read by the csv module, with their lines counted on from ``line``."""
    if rest and not rest.endswith("\n"):
        rest += handle.readline()  # the csv module takes whole lines: finish the last one
    csv.field_size_limit(sys.maxsize)
    reader = csv.reader(itertools.chain(io.StringIO(rest, newline=""), handle))
    start = line
    for record in reader:
        if record:
            yield start, record
        start = line + reader.line_num

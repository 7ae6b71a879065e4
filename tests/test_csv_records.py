"""The fast CSV splitter gives exactly the csv module's records and line numbers."""

from __future__ import annotations

import csv
import io
import random

import pytest

from chexmask.storage.csv_records import csv_records

# Field texts that stress quoting: separators, quotes, every line end, long runs.
PIECES = ["", "a", "12 5", ",", '"', '""', "\n", "\r", "\r\n", " ", "é", "[[1 2]\n [3 4]]", "9" * 300]


def reference(text: str) -> list[tuple[int, list[str]]]:
    """csv.reader's records with the line each starts on, blank lines left out."""
    reader = csv.reader(io.StringIO(text, newline=""))
    records, start = [], 1
    for record in reader:
        if record:
            records.append((start, record))
        start = 1 + reader.line_num
    return records


def split(text: str, block_chars: int) -> list[tuple[int, list[str]]]:
    return list(csv_records(io.StringIO(text, newline=""), block_chars=block_chars))


def written(rng: random.Random) -> str:
    """A well-formed file as csv.writer makes it, with blank lines and mixed line ends."""
    out = io.StringIO(newline="")
    for _ in range(rng.randrange(1, 8)):
        terminator = rng.choice(["\n", "\r\n", "\r"])
        writer = csv.writer(out, lineterminator=terminator)
        if rng.random() < 0.2:
            out.write(terminator)  # a blank line
        fields = ["".join(rng.choices(PIECES, k=rng.randrange(0, 4))) for _ in range(rng.randrange(1, 6))]
        if fields == [""]:
            fields = ['"']  # one empty field is written as a blank line, which reads back as none
        writer.writerow(fields)
    text = out.getvalue()
    return text[:-1] if rng.random() < 0.3 and text.endswith("\n") and not text.endswith("\r\n") else text


def mangled(rng: random.Random) -> str:
    """Any text of CSV characters, quoting broken where it falls: the csv module's own
    reading must come out of the hand-over."""
    return "".join(rng.choices(['"', ",", "\n", "\r", "a", "1", " ", '""'], k=rng.randrange(0, 40)))


@pytest.mark.parametrize("make", [written, mangled])
@pytest.mark.parametrize("block_chars", [1, 3, 16, 1 << 20])
def test_records_and_lines_equal_the_csv_modules(make, block_chars):
    rng = random.Random(f"{make.__name__}{block_chars}")
    for _ in range(400):
        text = make(rng)
        assert split(text, block_chars) == reference(text), repr(text)


def test_a_chexmask_row_with_a_quoted_landmark_text():
    landmarks = "[[1 2]\n [3 4]]"
    text = f'Image Index,Landmarks,Heart\r\na.png,"{landmarks}",5 3\r\n\r\nb.png,"{landmarks}",7 1\r\n'
    assert split(text, 1 << 20) == [
        (1, ["Image Index", "Landmarks", "Heart"]),
        (2, ["a.png", landmarks, "5 3"]),
        (5, ["b.png", landmarks, "7 1"]),
    ]


def test_a_quote_inside_a_field_hands_over_to_the_csv_module_from_that_record_on():
    text = 'a,b\nc,d"e\n"f\ng",h\n'
    assert split(text, 4) == reference(text) == [(1, ["a", "b"]), (2, ["c", 'd"e']), (3, ["f\ng", "h"])]

"""The import benchmark runs end to end on a tiny load (its numbers are not checked
here, its counts are)."""

import pytest

from benchmarks.bench_import import REFERENCE, main


def test_bench_import_on_sqlite(tmp_path, capsys):
    args = ["--rows", "200", "--published-rows", "12", "--objects", "1000", "--backends", "sqlite"]
    main([*args, "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "small rows: 200 rows of" in out
    assert "taken 200, unchanged 0, skipped 0" in out and "taken 0, unchanged 200, skipped 0" in out
    assert "queued 10: exactly the new ones" in out
    if REFERENCE.is_dir():
        assert "taken 12, unchanged 0, skipped 0" in out and "the published set's 657,566 rows in" in out
    else:
        assert "published rows: skipped" in out


@pytest.mark.services
def test_bench_import_on_postgresql(pg_database, tmp_path, capsys):
    args = ["--rows", "200", "--published-rows", "0", "--objects", "0", "--backends", "postgresql"]
    main([*args, "--pg-url", pg_database, "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "taken 200, unchanged 0, skipped 0" in out and "taken 0, unchanged 200, skipped 0" in out

"""The benchmark runs end to end on a tiny load (its numbers are not checked here)."""

import pytest

from benchmarks.bench_storage import main


def test_bench_on_sqlite(tmp_path, capsys):
    main(["--rows", "300", "--repeats", "3", "--backends", "sqlite", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "sqlite: 300 segmentations" in out
    assert "dataset + dice>=0.7, by dice desc" in out and "export 60 rows" in out


@pytest.mark.services
def test_bench_on_postgresql(pg_database, tmp_path, capsys):
    main(
        [
            "--rows",
            "300",
            "--repeats",
            "3",
            "--backends",
            "postgresql",
            "--pg-url",
            pg_database,
            "--workdir",
            str(tmp_path),
        ]
    )
    assert "postgresql: 300 segmentations" in capsys.readouterr().out

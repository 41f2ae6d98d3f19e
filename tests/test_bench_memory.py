"""bench.memory at a tiny size: a row per size and mode, each measured in its own process."""

from __future__ import annotations

from bench import memory


def test_memory_bench_runs_at_a_tiny_size(capsys) -> None:
    assert memory.main(["--sizes", "32", "--tile", "16"]) == 0  # one size: two fresh processes, not four
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| 32x32")]
    assert [row[2] for row in rows] == ["16 px", "untiled"]
    tiled, untiled = rows
    assert float(tiled[3]) > 100 and float(untiled[3]) > 100  # peak RSS in MB: torch alone is more
    assert 0 < float(tiled[5]) < float(untiled[5])  # a tile moved to the device is smaller than the image
    assert "untiled runs out: not estimated (needs untiled runs at two sizes or more)" in out


def test_fit_line_is_least_squares() -> None:
    assert memory.fit_line([(1.0, 3.0), (2.0, 5.0), (3.0, 7.0)]) == (1.0, 2.0)
    assert memory.fit_line([(1.0, 3.0)]) is None

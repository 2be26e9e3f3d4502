"""The built-in demo, end to end, twice (a re-run reuses the models and the cache, trains afresh)."""

import pytest
from kava_demo.__main__ import main


@pytest.mark.slow
def test_demo_runs_and_reruns(tmp_path, capsys):
    args = ["--root", str(tmp_path / "demo"), "--samples", "48", "--steps", "4"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "(verified)" in first and "curves" in first
    run = tmp_path / "demo" / "run"
    assert (run / "final" / "student" / "config.json").is_file() and (run / "curves.png").is_file()
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "cache complete, nothing to do" in again
    assert [l.split('"step": ')[1].split(",")[0] for l in (run / "metrics.jsonl").read_text().splitlines()] == ["4"]
    assert all(ord(c) < 128 for c in first + again)

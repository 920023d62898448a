"""albef.atomic: files and folders appear whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from albef import atomic


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    atomic.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic.writing(target) as fh:
        fh.write(b"half of it")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_publish_dir_refuses_or_replaces_an_existing_folder(tmp_path: Path) -> None:
    final = tmp_path / "out"
    for content in ("one", "two"):
        tmp = tmp_path / f"tmp-{content}"
        tmp.mkdir()
        (tmp / "x.txt").write_text(content)
        if content == "two":
            with pytest.raises(FileExistsError):
                atomic.publish_dir(tmp, final)
        atomic.publish_dir(tmp, final, replace_existing=True)
    assert (final / "x.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old folder is gone too

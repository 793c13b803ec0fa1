import os
import stat
from pathlib import Path

import pytest

from regproxy_cli.errors import RegproxyError
from regproxy_cli.files import read_json, write_atomic, write_text_atomic


def test_atomic_write_has_the_permissions_of_a_plain_write(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.bin", lambda tmp: Path(tmp).write_bytes(b"x"))
        (tmp_path / "plain.bin").write_bytes(b"x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "a.bin").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.bin").stat().st_mode) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def broken(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, broken)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["keep.txt"]


def test_read_json_reads_a_document_or_names_the_file_in_one_line(tmp_path):
    (tmp_path / "a.json").write_text('{"é": [1, 2]}', encoding="utf-8")
    assert read_json(tmp_path / "a.json") == {"é": [1, 2]}
    (tmp_path / "bad.json").write_text('{"a":\n', encoding="utf-8")
    for name, reason in (("bad.json", "Expecting value: line 2"), ("none.json", "No such file")):
        with pytest.raises(RegproxyError) as error:
            read_json(tmp_path / name)
        message = str(error.value)
        assert message.startswith(f"{tmp_path / name}: cannot read the JSON (") and reason in message
        assert "\n" not in message


def test_write_text_atomic_writes_utf8_over_the_old_file(tmp_path):
    path = tmp_path / "card.md"
    path.write_text("old")
    write_text_atomic(path, "h×w = 4×4\n")
    assert path.read_bytes() == "h×w = 4×4\n".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["card.md"]  # no temporary file left behind


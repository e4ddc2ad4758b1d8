"""Files users trust us with (issue 11, item 1): atomic writes never replace a device or a
FIFO, follow symlinks, keep modes, name the user's path in errors, clean a killed run's
temporary files; a closed pipe ends the command quietly (item 7)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading

import pytest

from rnnc.cli import main
from rnnc.errors import RnncError
from rnnc.files import atomic_write

SPECS = os.path.join(os.path.dirname(__file__), "..", "specs")
ELMAN = os.path.join(SPECS, "elman.rnn")


def test_a_fifo_is_written_through_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))  # noqa: SIM115
    reader.start()
    atomic_write(str(fifo), b"hello")
    reader.join(5)
    assert got == [b"hello"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]  # no temporary file left


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_a_full_device_is_an_error_and_stays_a_device(capsys):
    assert main(["compile", ELMAN, "-o", "/dev/full"]) == 1
    assert "cannot write '/dev/full': No space left on device" in capsys.readouterr().err
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_symlink_keeps_pointing_at_its_target_which_is_replaced(tmp_path):
    target = tmp_path / "real.rnn"
    with open(ELMAN) as f:
        target.write_text(f.read().replace("  s = tanh(", "  s  =  tanh("))
    link = tmp_path / "link.rnn"
    link.symlink_to(target)
    assert main(["fmt", "--write", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert "  s = tanh(" in target.read_text()


def test_modes_are_kept_for_old_files_and_follow_the_umask_for_new_ones(tmp_path):
    old = tmp_path / "old.py"
    old.write_text("x")
    os.chmod(old, 0o640)
    atomic_write(str(old), b"y")
    assert stat.S_IMODE(os.stat(old).st_mode) == 0o640 and old.read_bytes() == b"y"
    mask = os.umask(0o027)
    try:
        atomic_write(str(tmp_path / "new.py"), b"z")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(os.stat(tmp_path / "new.py").st_mode) == 0o640


def test_a_missing_folder_is_named(tmp_path, capsys):
    out = tmp_path / "no" / "such" / "m.py"
    assert main(["compile", ELMAN, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"the folder '{tmp_path / 'no' / 'such'}' does not exist" in err and ".tmp" not in err
    with pytest.raises(RnncError, match="is a folder"):
        atomic_write(str(tmp_path), b"x")


def test_a_killed_runs_temporary_files_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".ck.npz.rnnc-{dead}-abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    mine = tmp_path / f".ck.npz.rnnc-{os.getpid()}-def456.tmp"  # a live writer's: kept
    mine.write_bytes(b"y")
    other = tmp_path / f".other.npz.rnnc-{dead}-abc123.tmp"  # another path's: kept
    other.write_bytes(b"z")
    atomic_write(str(tmp_path / "ck.npz"), b"data")
    assert not stale.exists() and mine.exists() and other.exists()


def test_a_closed_pipe_ends_the_command_quietly():
    cmd = f"{sys.executable} -m rnnc.cli_entry check {os.path.join(SPECS, 'tagger.rnn')} | head -1"
    for _ in range(3):
        r = subprocess.run(["bash", "-c", cmd + "; exit ${PIPESTATUS[0]}"], capture_output=True,
                           text=True)  # fmt: skip
        assert r.returncode == 141 and r.stderr == "", r.stderr
        assert r.stdout.startswith("model tagger")

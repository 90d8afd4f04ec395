"""No litter: the temporary files of a journal writer killed mid-write are removed by the next
process that uses the journal, and nobody else's are."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dagster_runway.journal import CLAIMED, Journal, Owner

FP = "ef" + "2" * 62

# A writer that stops for good between writing its temporary file and linking it into place.
_KILLED_WRITER = """
import os, sys, time
from dagster_runway.journal import Journal, Owner
def stuck(src, dst):
    print("writing", flush=True)
    time.sleep(600)
os.link = stuck
Journal(sys.argv[1]).claim(sys.argv[2], 1, partition="a.png", owner=Owner.current(), estimate_usd=0.25, input={})
"""


def _temps(root: Path) -> list[Path]:
    return sorted(root.rglob("*.tmp"))


def test_a_writer_killed_mid_create_leaves_a_temp_that_the_next_run_removes(tmp_path: Path) -> None:
    root = tmp_path / "journal"
    writer = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(root), FP],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert writer.stdout is not None and writer.stdout.readline() == b"writing\n"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(timeout=30)
    [temp] = _temps(root)
    assert temp.name.startswith(f".{socket.gethostname()}.{writer.pid}.")  # its writer is named

    journal = Journal(str(root))
    journal.verify_store()
    assert _temps(root) == []
    assert (
        journal.claim(FP, 1, partition="a.png", owner=Owner.current(), estimate_usd=0.25, input={}).state
        == CLAIMED
    )


def _next_run(root: Path) -> None:
    """A new process's first use of the journal."""
    code = "import sys; from dagster_runway.journal import Journal; Journal(sys.argv[1]).verify_store()"
    subprocess.run([sys.executable, "-c", code, str(root)], check=True, stdin=subprocess.DEVNULL, timeout=120)


def test_a_live_writer_s_temp_is_kept_and_an_hour_old_one_is_removed(tmp_path: Path) -> None:
    root = tmp_path / "journal"
    folder = root / "spend" / "000000"
    folder.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], stdin=subprocess.DEVNULL)
    try:
        host = socket.gethostname()
        kept = folder / f".{host}.{live.pid}.{'1' * 32}.tmp"  # being written right now
        legacy = folder / f".{'2' * 32}.tmp"  # an older release's name: no writer to ask, so by age
        elsewhere = folder / f".another-host.1.{'3' * 32}.tmp"
        replaced = folder / f"000000001.json.{'4' * 32}.tmp"  # an older release's overwrite
        for path in (kept, legacy, elsewhere, replaced):
            path.write_bytes(b"{")
        _next_run(root)
        assert _temps(root) == sorted([kept, legacy, elsewhere, replaced])

        hours_ago = time.time() - 2 * 3600
        for path in (legacy, elsewhere, replaced):
            os.utime(path, (hours_ago, hours_ago))
        _next_run(root)
        assert _temps(root) == [kept]
    finally:
        live.kill()
        live.wait()

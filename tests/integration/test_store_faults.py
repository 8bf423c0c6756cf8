"""Database faults: a clear error at start, the last good state while running."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from support import REPO, DaemonProcess, SocketmapClient, make_go_database, write_config


def start(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailcloak", "--config", str(config)],
                          capture_output=True, text=True, timeout=30, cwd=REPO)


def test_corrupt_file_at_start_is_one_clear_line(tmp_path):
    (tmp_path / "state.db").write_bytes(b"this is not an sqlite database" * 100)
    result = start(write_config(tmp_path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "corrupt or not an SQLite database" in lines[0]


def test_database_without_tables_is_refused(tmp_path):
    sqlite3.connect(tmp_path / "state.db").execute("CREATE TABLE other(x)").connection.commit()
    result = start(write_config(tmp_path))
    assert result.returncode == 1
    assert "run mailcloakctl init" in result.stderr


def test_database_removed_while_running_keeps_last_good_state(daemon, go_db):
    sm = SocketmapClient(daemon.socketmap_socket)
    assert sm.ask("alias1@d1.test") == "OK alice@d1.test"
    for suffix in ("", "-wal", "-shm"):
        Path(str(go_db) + suffix).unlink(missing_ok=True)
    time.sleep(1)  # several change checks
    assert sm.ask("alias1@d1.test") == "OK alice@d1.test"
    sm.close()


def test_corrupted_while_running_keeps_last_good_state_and_logs_once(daemon, go_db):
    sm = SocketmapClient(daemon.socketmap_socket)
    assert sm.ask("alias1@d1.test") == "OK alice@d1.test"
    con = sqlite3.connect(go_db)
    con.execute("INSERT INTO domains(domain_name) VALUES ('trigger.test')")
    con.commit()
    con.close()
    with open(go_db, "r+b") as f:  # overwrite every page after the header
        f.seek(100)
        f.write(b"\xff" * (os.path.getsize(go_db) - 100))
    Path(str(go_db) + "-wal").unlink(missing_ok=True)
    time.sleep(1.5)
    assert sm.ask("alias1@d1.test") == "OK alice@d1.test"
    assert "Traceback" not in daemon.log()
    sm.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the daemon as another user")
def test_read_only_folder_is_a_clear_error_for_mailcloakctl_style_writes():
    tmp = Path(tempfile.mkdtemp(prefix="mailcloak-ro-"))
    try:
        db = make_go_database(tmp / "state.db")
        con = sqlite3.connect(db)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        os.chmod(tmp, 0o555)
        os.chmod(db, 0o444)
        script = (
            "import asyncio, os\n"
            "from mailcloak.config import SQLiteConfig\n"
            "from mailcloak.store.sqlite import SQLiteStore\n"
            "from mailcloak.errors import StoreError\n"
            "os.setgid(65534); os.setuid(65534)  # after the imports: root's home is not readable\n"
            "async def main():\n"
            f"    store = await SQLiteStore.open(SQLiteConfig(path={str(db)!r}))\n"
            "    try:\n"
            "        await store.add_domain('x.test')\n"
            "    except StoreError as exc:\n"
            "        print('ERR', exc)\n"
            "    finally:\n"
            "        await store.close()\n"
            "try:\n"
            "    asyncio.run(main())\n"
            "except StoreError as exc:\n"
            "    print('ERR', exc)\n"
        )
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                timeout=30, cwd=REPO)
        assert result.stdout.startswith("ERR "), result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        assert sqlite3.connect(db).execute("SELECT count(*) FROM domains").fetchone()[0] == 3
    finally:
        os.chmod(tmp, 0o755)
        shutil.rmtree(tmp, ignore_errors=True)

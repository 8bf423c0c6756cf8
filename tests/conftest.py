import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import DaemonProcess, make_go_database, write_config  # noqa: E402


@pytest.fixture
def go_db(tmp_path):
    """A Go-project state.db (see support.make_go_database)."""
    return make_go_database(tmp_path / "state.db")


@pytest.fixture
def daemon(tmp_path, go_db):
    """The daemon as a real process on temporary sockets, over the Go-project database."""
    proc = DaemonProcess(write_config(tmp_path)).start()
    yield proc
    proc.stop()

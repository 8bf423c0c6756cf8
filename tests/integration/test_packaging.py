"""A wheel built from the repo, installed into a fresh venv, gives working commands and files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO, make_go_database, write_config


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("wheel")
    wheels = work / "wheels"
    run = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=work)  # noqa: E731
    built = run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO))
    assert built.returncode == 0, built.stderr
    venv = work / "venv"
    # The fresh venv sees the test venv's packages for the dependencies (no download), but the
    # mailcloak it runs is the wheel's, installed into the fresh venv itself.
    made = run(sys.executable, "-m", "venv", "--system-site-packages", str(venv))
    assert made.returncode == 0, made.stderr
    site = subprocess.run([sys.executable, "-c", "import aiohttp, os; print(os.path.dirname(os.path.dirname(aiohttp.__file__)))"],
                          capture_output=True, text=True).stdout.strip()
    pth = next((venv / "lib").glob("python3*/site-packages"))
    (pth / "test-deps.pth").write_text(site + "\n")
    wheel = next(wheels.glob("mailcloak-*.whl"))
    inst = run(str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(wheel))
    assert inst.returncode == 0, inst.stderr
    return venv


def test_commands_come_from_the_wheel(installed, tmp_path):
    bindir = installed / "bin"
    where = subprocess.run([str(bindir / "python"), "-c", "import mailcloak; print(mailcloak.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert str(installed) in where.stdout, where.stdout + where.stderr
    db = tmp_path / "state.db"
    assert subprocess.run([str(bindir / "mailcloakctl"), "--db", str(db), "init"],
                          capture_output=True, text=True, cwd=tmp_path).returncode == 0
    assert subprocess.run([str(bindir / "mailcloakctl"), "--db", str(db), "domains", "add", "x.test"],
                          capture_output=True, text=True, cwd=tmp_path).returncode == 0
    listed = subprocess.run([str(bindir / "mailcloakctl"), "--db", str(db), "domains", "list"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert listed.stdout == "x.test\tenabled\n"
    make_go_database(tmp_path / "go.db")
    config = write_config(tmp_path, sqlite={"path": str(tmp_path / "go.db")})
    check = subprocess.run([str(bindir / "mailcloak"), "--config", str(config), "--check-config"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr


def test_dovecot_script_and_samples_are_reachable(installed, tmp_path):
    out = subprocess.run([str(installed / "bin" / "mailcloak"), "--data-dir"], capture_output=True,
                         text=True, cwd=tmp_path)
    data = Path(out.stdout.strip())
    assert data == installed / "share" / "mailcloak"
    for name in ("dovecot/mailcloak.lua", "dovecot/dovecot-lua.conf.sample", "dovecot/2.3/10-mailcloak.conf",
                 "dovecot/2.3/mailcloak-oauth2.conf.ext", "dovecot/2.4/10-mailcloak.conf",
                 "configs/config.yaml.sample", "configs/mailcloak.service", "configs/openrc-mailcloak",
                 "configs/postfix-main.cf"):
        assert (data / name).read_bytes() == (REPO / name).read_bytes(), name

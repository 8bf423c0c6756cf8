"""The files shipped in configs/: the sample config documents every key, service files parse."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mailcloak.config import Config, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _flatten(data, prefix=""):
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        yield dotted
        if isinstance(value, dict):
            yield from _flatten(value, dotted + ".")


def test_sample_config_loads_and_documents_every_key():
    config = load_config(CONFIGS / "config.yaml.sample")
    assert config.idp.provider == "keycloak"
    documented = set(_flatten(yaml.safe_load((CONFIGS / "config.yaml.sample").read_text())))
    import typing

    def keys(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "source":
                continue
            dotted = f"{prefix}{f.name}"
            yield dotted
            tp = hints[f.name]
            args = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
            sub = tp if dataclasses.is_dataclass(tp) else (args[0] if args else None)
            if sub is not None:
                yield from keys(sub, dotted + ".")

    expected = {k for k in keys(Config)
                if not k.startswith(("idp.static.users.", "idp.static.lists."))}
    assert expected - documented == set()


def test_demo_config_loads():
    config = load_config(CONFIGS / "demo.yaml")
    assert config.idp.provider == "static"


def test_openrc_script_is_valid_shell():
    subprocess.run(["sh", "-n", str(CONFIGS / "openrc-mailcloak")], check=True)


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    # verify checks that ExecStart exists: point it at this checkout's entry point.
    entry = Path(sys.executable).with_name("mailcloak")
    unit = tmp_path / "mailcloak.service"
    unit.write_text((CONFIGS / "mailcloak.service").read_text().replace("/usr/bin/mailcloak", str(entry)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = unit.read_text()
    for directive in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/var/lib/mailcloak"):
        assert directive in text

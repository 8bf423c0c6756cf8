"""One decision line per policy request, in text or JSON, with the fields administrators search."""

import json
import time

import pytest

from support import DaemonProcess, PolicyClient, write_config


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_decision_line_per_request(tmp_path, go_db, log_format):
    config = write_config(tmp_path, daemon={"user": "", "log_level": "info", "log_format": log_format,
                                            "decision_log_level": "info"})
    proc = DaemonProcess(config).start()
    try:
        client = PolicyClient(proc.policy_socket)
        assert client.ask(protocol_state="RCPT", queue_id="4XyZ1", client_address="192.0.2.7",
                          sasl_method="PLAIN", sasl_username="Mailer", sender="noreply@d1.test",
                          recipient="someone@elsewhere.example") == "DUNNO"
        client.close()
        deadline = time.monotonic() + 5
        while "policy decision" not in proc.log() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.stop()
    lines = [line for line in proc.log().splitlines() if "policy decision" in line]
    assert len(lines) == 1
    if log_format == "json":
        entry = json.loads(lines[0])
        assert entry["level"] == "info"
        assert {k: entry[k] for k in ("queue_id", "client", "sasl_username", "sender", "recipient",
                                      "action", "rule")} == {
            "queue_id": "4XyZ1", "client": "192.0.2.7", "sasl_username": "Mailer",
            "sender": "noreply@d1.test", "recipient": "someone@elsewhere.example",
            "action": "DUNNO", "rule": "7 app may send as sender"}
        assert all(json.loads(line) for line in proc.log().splitlines() if line.startswith("{"))
    else:
        for part in ("queue_id=4XyZ1", "client=192.0.2.7", "sasl_username=Mailer",
                     "sender=noreply@d1.test", "recipient=someone@elsewhere.example", "action=DUNNO",
                     'rule="7 app may send as sender"'):
            assert part in lines[0]


def test_decision_lines_off_at_default_level(tmp_path, go_db):
    config = write_config(tmp_path, daemon={"user": "", "log_level": "info"})
    proc = DaemonProcess(config).start()
    try:
        client = PolicyClient(proc.policy_socket)
        for _ in range(20):
            client.ask(protocol_state="RCPT", sender="x@outside.example", recipient="alice@d1.test")
        client.close()
    finally:
        proc.stop()
    assert "policy decision" not in proc.log()

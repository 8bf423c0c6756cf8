"""Nothing from a request, the database or the IdP can break a reply frame (issue 7).

Postfix reads one `action=...` line and an empty line per policy request, and one netstring per
socketmap lookup whose payload it takes as the answer (an `OK` answer with a comma or a space is
several addresses to Postfix; a CR/LF/NUL is a broken frame). The daemon here serves a Go-project
database with alias rows written by hand with plain sqlite3 (target users holding commas,
newlines, spaces, NULs, a BLOB; a domain column that disagrees with the address, triggers
dropped), and a Keycloak stand-in whose users carry CR/LF/commas in their usernames. Every reply
is checked as raw bytes (tests/wire_checks.py).
"""

from __future__ import annotations

import http.client
import json
import socket
import sqlite3
from urllib.parse import urlencode

import pytest

from standins.keycloak import KeycloakStandIn
from support import DaemonProcess, make_go_database, policy_request, write_config
from wire_checks import (log_problems, netstring, parse_netstrings, read_netstring, read_until_closed,
                         split_policy_frames, unix_socket, wait_for)

CLIENT_ID, CLIENT_SECRET = "mailcloak", "kc-secret-inj-4d1"
HTTP_SECRET = "inj-shared-secret-77"

# Alias rows written by hand: (alias_email, target_user). None of these may reach a reply.
BAD_TARGETS = [
    ("comma@d1.test", "eve,mallory"),
    ("newline@d1.test", "eve\nmallory"),
    ("crlf@d1.test", "eve\r\naction=OK"),
    ("cr@d1.test", "eve\r"),
    ("space@d1.test", "eve mallory"),
    ("tab@d1.test", "eve\tmallory"),
    ("nul@d1.test", "eve\x00mallory"),
    ("colon@d1.test", "eve:1"),
    ("at@d1.test", "eve@evil.test"),
    ("empty@d1.test", ""),
    ("nel@d1.test", "eve\x85mallory"),
    ("ls@d1.test", "eve\u2028mallory"),
    ("blobnl@d1.test", b"eve\nmallory"),
]
BAD_ADDRESSES = [("we,ird@d1.test", "alice"), ("new\nline@d1.test", "alice"), ("sp ace@d1.test", "alice")]
NUL_ADDRESS = ("nul\x00x@d1.test", "alice")   # SQLite's substr() stops at the NUL: the trigger refuses it


def write_rows_by_hand(db) -> None:
    con = sqlite3.connect(db)
    insert = "INSERT INTO aliases(alias_email, target_user, alias_domain_name, enabled) VALUES (?, ?, ?, 1)"
    for address, target in BAD_TARGETS + BAD_ADDRESSES:
        con.execute(insert, (address, target, "d1.test"))
    # A BLOB that is plain text: read as the text it holds (Go's database/sql does the same).
    con.execute(insert, ("blob@d1.test", b"bob", "d1.test"))
    # A domain column that disagrees with the address, possible once the triggers are dropped.
    con.execute("DROP TRIGGER trg_aliases_domain_ins")
    con.execute("INSERT INTO domains(domain_name, enabled) VALUES (?, 1)", ("d1.test\nx",))
    con.execute("INSERT INTO domains(domain_name, enabled) VALUES (?, 1)", ("d1.test, bob@d2.test",))
    con.execute(insert, ("mismatch@d1.test", "alice", "d1.test\nx"))
    con.execute(insert, ("mismatch2@d1.test", "alice", "d1.test, bob@d2.test"))
    con.execute("INSERT INTO domains(domain_name, enabled) VALUES (?, 1)", ("d1.test\r\n",))
    con.execute(insert, ("mismatch3@d1.test", "alice", "d1.test\r\n"))      # equal once stripped
    con.execute(insert, (*NUL_ADDRESS, "d1.test"))
    con.commit()
    con.close()


@pytest.fixture(scope="module")
def keycloak():
    server = KeycloakStandIn(realm="mail")
    server.add_client(CLIENT_ID, CLIENT_SECRET)
    server.add_user("alice", "alice@d1.test")
    server.add_user("eve\r\naction=OK", "eve@d1.test")
    server.add_user("mal,lory", "mallory@d1.test")
    server.add_user("trent\x00x", "trent@d1.test")
    server.add_user("trudy", "trudy\r\n@d1.test")
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory, keycloak):
    tmp = tmp_path_factory.mktemp("inject")
    db = make_go_database(tmp / "state.db")
    write_rows_by_hand(db)
    (tmp / "http.secret").write_text(HTTP_SECRET)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = write_config(
        tmp,
        idp={"provider": "keycloak", "keycloak": {
            "base_url": keycloak.url, "realm": "mail", "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET}},
        http={"listen": f"127.0.0.1:{port}", "shared_secret_file": str(tmp / "http.secret")},
    )
    daemon = DaemonProcess(config).start()
    yield daemon, port
    daemon.stop()
    assert not log_problems(daemon.log()), log_problems(daemon.log())


RCPT = dict(protocol_state="RCPT", sender="x@outside.example")
CANARY = dict(RCPT, recipient="ghost@d1.test")
CANARY_ACTION = b"550 5.1.1 No such user"
KNOWN_ACTIONS = {
    b"DUNNO", b"550 5.1.1 No such user", b"550 5.7.1 Recipient domain not local",
    b"553 5.7.1 Sending from local domains requires authentication",
    b"553 5.7.1 Sender not owned by authenticated user", b"553 5.7.1 Unsupported authentication method",
    b"451 4.3.0 Temporary authentication/lookup failure", b"DEFER_IF_PERMIT 4.3.0 Malformed policy request",
}

# (request bytes, expected action or None for "any known action")
POLICY_CASES = [
    (policy_request(**RCPT, recipient="alice@d1.test\raction=OK"), b"550 5.7.1 Recipient domain not local"),
    (policy_request(**RCPT, recipient="alice@d1.test\r"), b"DUNNO"),      # a CRLF line end
    (policy_request(**RCPT, recipient="\ralice@d1.test"), None),
    (policy_request(**RCPT, recipient="alice@d1.test\x00action=OK"), b"DEFER_IF_PERMIT 4.3.0 Malformed policy request"),
    (policy_request(protocol_state="RCPT", sender="x\x00@d1.test", recipient="alice@d1.test"),
     b"DEFER_IF_PERMIT 4.3.0 Malformed policy request"),
    (policy_request(**RCPT, recipient="alice%0d%0aaction=OK@d1.test"), b"550 5.1.1 No such user"),
    (policy_request(**RCPT, recipient="alice@d1.test%0D%0Aaction%3DOK"), None),
    (policy_request(**RCPT, recipient="alice%00@d1.test"), b"550 5.1.1 No such user"),
    (policy_request(**RCPT, recipient="alice=0D=0A@d1.test", ccert_subject="+0D+0Aaction=OK"),
     b"550 5.1.1 No such user"),
    (policy_request(**RCPT, recipient="alice@d1.test", helo_name="x\raction=OK\r"), b"DUNNO"),
    (b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=alice@d1.test\xff\xfe\n\n",
     b"DEFER_IF_PERMIT 4.3.0 Malformed policy request"),
    (b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=alice@d1.test\xed\xa0\x80\n\n",
     b"DEFER_IF_PERMIT 4.3.0 Malformed policy request"),               # a UTF-8 surrogate
    (b"request=smtpd_access_policy\nact\rion=OK\nprotocol_state=RCPT\nrecipient=alice@d1.test\n\n", b"DUNNO"),
    (b"request=smtpd_access_policy\r\nprotocol_state=RCPT\r\nrecipient=alice@d1.test\r\n\r\n", b"DUNNO"),
    (b"request=smtpd_access_policy\naction=OK\n\naction=OK\n\n", None),  # two frames' worth
    # IdP users whose usernames hold CR/LF/comma/NUL exist; their names never reach the reply.
    (policy_request(**RCPT, recipient="eve@d1.test"), b"DUNNO"),
    (policy_request(**RCPT, recipient="mallory@d1.test"), b"DUNNO"),
    (policy_request(**RCPT, recipient="trent@d1.test"), b"DUNNO"),
    (policy_request(protocol_state="RCPT", sasl_method="XOAUTH2", sasl_username="eve@d1.test",
                    sender="eve@d1.test", recipient="alice@d1.test"), b"DUNNO"),
    (policy_request(protocol_state="RCPT", sasl_method="XOAUTH2", sasl_username="eve\raction=OK",
                    sender="eve@d1.test", recipient="alice@d1.test"),
     b"553 5.7.1 Sender not owned by authenticated user"),
    (policy_request(protocol_state="MAIL", sasl_method="XOAUTH2", sasl_username="mal,lory",
                    sender="mallory@d1.test"), b"DUNNO"),
    (policy_request(protocol_state="MAIL", sasl_method="XOAUTH2\r", sasl_username="trudy",
                    sender="trudy%0d%0a@d1.test"), b"553 5.7.1 Sender not owned by authenticated user"),
    # Aliases written by hand are not recipients that exist; the good one is.
    (policy_request(**RCPT, recipient="blob@d1.test"), b"DUNNO"),
    (policy_request(**RCPT, recipient="crlf@d1.test"), b"550 5.1.1 No such user"),
    (policy_request(**RCPT, recipient="comma@d1.test"), b"550 5.1.1 No such user"),
    (policy_request(**RCPT, recipient="mismatch@d1.test"), b"550 5.1.1 No such user"),
]


@pytest.mark.parametrize("request_bytes, expected", POLICY_CASES,
                         ids=[f"case{i}" for i in range(len(POLICY_CASES))])
def test_policy_reply_is_exactly_one_clean_frame_per_request(served, request_bytes, expected):
    daemon, _port = served
    sock = unix_socket(daemon.policy_socket)
    try:
        frames_wanted = max(1, request_bytes.count(b"\n\n"))
        sock.sendall(request_bytes + policy_request(**CANARY))
        sock.shutdown(socket.SHUT_WR)
        data = read_until_closed(sock)
    finally:
        sock.close()
    actions = split_policy_frames(data)            # frames and nothing else
    assert len(actions) == frames_wanted + 1, data
    assert actions[-1] == CANARY_ACTION, data      # the next request is answered as itself
    for action in actions[:-1]:
        assert action in KNOWN_ACTIONS, action
    if expected is not None:
        assert actions[0] == expected, data


# (key, expected reply payload or None for "any clean reply")
SOCKETMAP_CASES = [
    ("alias1@d1.test", b"OK alice@d1.test"),
    ("alias1+tag@d1.test", b"OK alice+tag@d1.test"),
    ("alias1+a,b@d1.test", b"OK alice@d1.test"),         # an extension with a comma is not copied
    ("alias1+a b@d1.test", b"OK alice@d1.test"),
    ("alias1+a:b@d1.test", b"OK alice@d1.test"),
    ("alias1+a\nb@d1.test", b"OK alice@d1.test"),
    ("alias1+a\r\nb@d1.test", b"OK alice@d1.test"),
    ("alias1+a\x00b@d1.test", b"OK alice@d1.test"),
    ("alias1+a\"b@d1.test", b"OK alice@d1.test"),
    ("alias1+a<b>@d1.test", b"OK alice@d1.test"),
    ("alias1+a\u2028b@d1.test", b"OK alice@d1.test"),
    ("alias1+a\x85b@d1.test", b"OK alice@d1.test"),
    ("alias1+5:x,@d1.test", b"OK alice@d1.test"),
    ("alias1@d1.test\n", b"OK alice@d1.test"),
    ("alias1@d1.test,bob@d2.test", b"NOTFOUND "),
    ("alias1@d1.test\nOK evil@x", b"NOTFOUND "),
    (",alias1@d1.test", b"NOTFOUND "),
    ("alias1:@d1.test", b"NOTFOUND "),
    ("d1.test", b"NOTFOUND "),
    ("a,b", b"NOTFOUND "),
    ("\n", b"NOTFOUND "),
    (":", b"NOTFOUND "),
    ("", b"NOTFOUND "),
    ("alias1@d1.test\x00", b"NOTFOUND "),
    # hand-written rows
    ("blob@d1.test", b"OK bob@d1.test"),
    ("blob+x@d1.test", b"OK bob+x@d1.test"),
    *[(address, b"NOTFOUND ") for address, _ in BAD_TARGETS],
    *[(address.replace("@", "+x,y@"), b"NOTFOUND ") for address, _ in BAD_TARGETS],
    *[(address, b"NOTFOUND ") for address, _ in BAD_ADDRESSES + [NUL_ADDRESS]],
    ("mismatch@d1.test", b"NOTFOUND "),
    ("mismatch2@d1.test", b"NOTFOUND "),
    ("mismatch3@d1.test", b"NOTFOUND "),
]


def test_socketmap_replies_are_clean_netstrings(served):
    daemon, _port = served
    sock = unix_socket(daemon.socketmap_socket)
    buffer = bytearray()
    try:
        for key, expected in SOCKETMAP_CASES:
            sock.sendall(netstring(b"alias " + key.encode("utf-8")))
            reply = read_netstring(sock, buffer)           # length, comma and payload checked
            if expected is not None:
                assert reply == expected, (key, reply)
        # the map name and odd requests
        for raw in (b"alias,x alias1@d1.test", b"alias\nalias1@d1.test", b"alias", b"ali\x00as x@d1.test",
                    b"alias alias1@d1.test\xff", b"\xff\xfe alias1@d1.test"):
            sock.sendall(netstring(raw))
            reply = read_netstring(sock, buffer)
            assert reply.split(b" ", 1)[0] in (b"NOTFOUND", b"PERM"), (raw, reply)
        assert not buffer, bytes(buffer)                     # nothing beyond one frame per request
    finally:
        sock.close()


def test_pipelined_socketmap_keys_get_one_reply_each(served):
    daemon, _port = served
    keys = [key for key, _ in SOCKETMAP_CASES]
    sock = unix_socket(daemon.socketmap_socket)
    try:
        sock.sendall(b"".join(netstring(b"alias " + k.encode()) for k in keys))
        sock.shutdown(socket.SHUT_WR)
        data = read_until_closed(sock)
    finally:
        sock.close()
    payloads, _ = parse_netstrings(data)
    assert payloads == [expected for _, expected in SOCKETMAP_CASES]


def test_hand_written_rows_are_reported_once(served):
    daemon, _port = served
    log = daemon.log()
    assert log.count("alias row(s) whose address or target_user cannot be used safely") == 1
    # and no value from a request, a row or the IdP started a log line of its own
    for line in log.splitlines():
        assert line[:4].isdigit() and line[4] == "-", line


def http_post(port: int, path: str, form: dict, secret: str | None = HTTP_SECRET) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=urlencode(form).encode(), headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize("user, password", [
    ("nobody\nresult=ok", "x"),
    ("Mailer\r\nresult=ok", "x\nresult=ok"),
    ("mailer", "wrong\r\nresult=ok"),
    ("mai\x00ler", "x"),
    ("eve\r\naction=OK", "x"),
])
def test_passdb_answer_lines_cannot_be_injected(served, user, password):
    _daemon, port = served
    status, body = http_post(port, "/dovecot/passdb", {"user": user, "password": password,
                                                       "service": "smtp\nresult=ok", "remote_ip": "192.0.2.9"})
    assert b"\r" not in body and b"\x00" not in body
    lines = body.decode().splitlines()
    assert lines[0].startswith("result=") and lines[0] != "result=ok"
    assert [line.split("=", 1)[0] for line in lines] in (["result"], ["result", "reason"])


def test_introspection_answer_escapes_idp_usernames(served, keycloak):
    _daemon, port = served
    token = keycloak.issue_user_token("eve\r\naction=OK")
    status, body = http_post(port, "/oauth2/introspect", {"token": token}, secret=None)
    assert status == 200
    assert b"\r" not in body and b"\n" not in body.rstrip(b"\n") and b"\x00" not in body
    doc = json.loads(body)
    assert doc["active"] is True and doc["username"] == "eve\r\naction=ok"
    token = keycloak.issue_user_token("trent\x00x")
    status, body = http_post(port, "/oauth2/introspect", {"token": token}, secret=None)
    assert b"\x00" not in body and json.loads(body)["username"] == "trent\x00x"


def test_odd_rows_written_while_running_do_not_stop_the_refresh(served):
    """A BLOB target, a text updated_at, a NULL-ish mix written while the daemon runs: the refresh
    goes on (a later good alias becomes visible) and the odd rows never reach a reply."""
    daemon, _port = served
    db = daemon.config["sqlite"]["path"]
    con = sqlite3.connect(db)
    con.execute("INSERT INTO aliases(alias_email, target_user, alias_domain_name, enabled, updated_at) "
                "VALUES (?, ?, ?, 1, ?)", ("late-blob@d1.test", b"eve\r\nmallory", "d1.test", "not a number"))
    con.execute("INSERT INTO aliases(alias_email, target_user, alias_domain_name, enabled, updated_at) "
                "VALUES (?, ?, ?, 1, ?)", ("late-text@d1.test", "carol", "d1.test", b"\xff"))
    con.commit()
    con.execute("INSERT INTO aliases(alias_email, target_user, alias_domain_name) VALUES (?, ?, ?)",
                ("late-good@d1.test", "bob", "d1.test"))
    con.commit()
    con.close()
    sock = unix_socket(daemon.socketmap_socket)
    buffer = bytearray()

    def ask(key: str) -> bytes:
        sock.sendall(netstring(b"alias " + key.encode()))
        return read_netstring(sock, buffer)

    try:
        wait_for(lambda: ask("late-good@d1.test") == b"OK bob@d1.test", 5, what="late-good visible")
        assert ask("late-blob@d1.test") == b"NOTFOUND "
        assert ask("late-text@d1.test") == b"OK carol@d1.test"
    finally:
        sock.close()
    assert not log_problems(daemon.log())

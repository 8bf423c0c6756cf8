"""Addresses as mailcloak compares them (mailcloak.addresses)."""

from __future__ import annotations

import pytest

from mailcloak.addresses import (
    Split,
    add_extension,
    check_address,
    check_domain,
    domain_of,
    is_safe_token,
    normalize,
    split_extension,
)
from mailcloak.errors import InvalidInput


@pytest.mark.parametrize("address, normal", [
    ("alice@d1.test", "alice@d1.test"),
    ("Alice@D1.Test", "alice@d1.test"),
    ("  alice@d1.test\n", "alice@d1.test"),
    ("first.last@sub.d1.test", "first.last@sub.d1.test"),
    ("alice+tag@d1.test", "alice+tag@d1.test"),
    ("o'brien@d1.test", "o'brien@d1.test"),
    ("a_b-c=d!e#f$g%h&i*j/k?l^m`n{o|p}q~r@d1.test", "a_b-c=d!e#f$g%h&i*j/k?l^m`n{o|p}q~r@d1.test"),
    ("x@localhost", "x@localhost"),
    ("x@xn--bcher-kva.test", "x@xn--bcher-kva.test"),
    ("jos\u00e9@b\u00fccher.test", "jos\u00e9@b\u00fccher.test"),
    ("1@2.3", "1@2.3"),
])
def test_check_address_accepts(address, normal):
    assert check_address(address) == normal


@pytest.mark.parametrize("address", [
    "",
    "   ",
    "alice",
    "alice@",
    "@d1.test",
    "@",
    "alice@@d1.test",
    "alice@d1.test@d2.test",
    "a@b@c",
    "ali ce@d1.test",
    "alice@d1 .test",
    "alice\t@d1.test",
    "ali\nce@d1.test",
    "ali\rce@d1.test",
    "ali\x00ce@d1.test",
    "ali\x01ce@d1.test",
    "ali\x1bce@d1.test",
    "ali\x7fce@d1.test",
    "ali\x85ce@d1.test",
    "ali\x9bce@d1.test",        # C1 control (CSI)
    "alice@d1\x9b.test",
    "ali\u2028ce@d1.test",
    "alice@d1.test\x00",
    "alice@d1..test",
    "alice@.d1.test",
    "alice@d1.test.",
    "al,ice@d1.test",
    "al;ice@d1.test",
    "al:ice@d1.test",
    "<alice@d1.test>",
    "al(ice)@d1.test",
    "al\"ice@d1.test",
    "al\\ice@d1.test",
    "alice@d1_[x].test",
    "a" * 320 + "@d1.test",
])
def test_check_address_refuses(address):
    with pytest.raises(InvalidInput):
        check_address(address)


@pytest.mark.parametrize("domain, normal", [
    ("d1.test", "d1.test"),
    ("D1.Test", "d1.test"),
    (" d1.test ", "d1.test"),
    ("localhost", "localhost"),
    ("a-b.c-d.test", "a-b.c-d.test"),
    ("xn--bcher-kva.test", "xn--bcher-kva.test"),
    ("b\u00fccher.test", "b\u00fccher.test"),
])
def test_check_domain_accepts(domain, normal):
    assert check_domain(domain) == normal


@pytest.mark.parametrize("domain", [
    "", " ", "d1 .test", "d1.test@x", "@d1.test", "d1..test", ".d1.test", "d1.test.", ".",
    "d1\x00.test", "d1\x01.test", "d1\x7f.test", "d1\x9b.test", "d1\u2028.test", "d1,d2.test",
    "d1;x.test", "d1:25", "[127.0.0.1]", "d1<x>.test",
    "a" * 254,
])
def test_check_domain_refuses(domain):
    with pytest.raises(InvalidInput):
        check_domain(domain)


@pytest.mark.parametrize("address, delimiters, expected", [
    ("alice+tag@d1.test", "+", ("alice@d1.test", "+tag")),
    ("Alice+Tag@D1.Test", "+", ("alice@d1.test", "+tag")),
    ("alice@d1.test", "+", ("alice@d1.test", "")),
    ("alice+a+b@d1.test", "+", ("alice@d1.test", "+a+b")),
    ("alice-tag@d1.test", "+-", ("alice@d1.test", "-tag")),
    ("alice+a-b@d1.test", "+-", ("alice@d1.test", "+a-b")),   # the first delimiter found splits
    ("alice-a+b@d1.test", "+-", ("alice@d1.test", "-a+b")),
    ("alice-a+b@d1.test", "-+", ("alice@d1.test", "-a+b")),   # order of the set does not matter
    ("alice.tag@d1.test", "+-.", ("alice@d1.test", ".tag")),
    ("alice+@d1.test", "+", ("alice@d1.test", "+")),         # strip_addr keeps the bare delimiter
    ("+tag@d1.test", "+", ("+tag@d1.test", "")),              # the local part would be empty
    ("-a+b@d1.test", "+-", ("-a+b@d1.test", "")),
    ("alice+tag@d1.test", "", ("alice+tag@d1.test", "")),     # sub-addressing off
    ("alice-tag@d1.test", "+", ("alice-tag@d1.test", "")),
    ("alice+tag", "+", ("alice+tag", "")),                    # no domain
    ("@d1.test", "+", ("@d1.test", "")),
    ("", "+", ("", "")),
    ("a+b@c@d1.test", "+", ("a@d1.test", "+b@c")),            # the local part ends at the last '@'
    ("alice@d+1.test", "+", ("alice@d+1.test", "")),          # never in the domain
])
def test_split_extension(address, delimiters, expected):
    result = split_extension(address, delimiters)
    assert result == Split(*expected)
    assert add_extension(result.base, result.extension) == address.lower()


# Postfix's exceptions, as src/global/split_addr.c (Postfix 3.x) applies them before splitting.
@pytest.mark.parametrize("address, delimiters, expected", [
    # "Don't split these, regardless of what the delimiter is": postmaster, mailer-daemon,
    # double-bounce (compared case-insensitively).
    ("postmaster@d1.test", "+", ("postmaster@d1.test", "")),
    ("mailer-daemon@d1.test", "-", ("mailer-daemon@d1.test", "")),
    ("MAILER-DAEMON@d1.test", "+-", ("mailer-daemon@d1.test", "")),
    ("double-bounce@d1.test", "-", ("double-bounce@d1.test", "")),
    ("postmaster+x@d1.test", "+", ("postmaster@d1.test", "+x")),    # only the exact local part
    ("mailer-daemon+x@d1.test", "+", ("mailer-daemon@d1.test", "+x")),
    # "Backwards compatibility: don't split owner-foo or foo-request" when '-' is in the set
    # (owner_request_special = yes, Postfix's default).
    ("owner-list@d1.test", "-", ("owner-list@d1.test", "")),
    ("Owner-List@d1.test", "+-", ("owner-list@d1.test", "")),
    ("owner-list+x@d1.test", "+-", ("owner-list+x@d1.test", "")),   # no split at all, not even '+'
    ("list-request@d1.test", "-", ("list-request@d1.test", "")),
    ("list-REQUEST@d1.test", "+-", ("list-request@d1.test", "")),
    ("list+x-request@d1.test", "+-", ("list+x-request@d1.test", "")),
    ("x-request@d1.test", "-", ("x-request@d1.test", "")),          # strlen - 8 > 0
    ("-request@d1.test", "-", ("-request@d1.test", "")),            # delimiter first: no split
    ("owner-list@d1.test", "+", ("owner-list@d1.test", "")),        # '-' no delimiter: ordinary
    ("owner+x@d1.test", "+", ("owner@d1.test", "+x")),
    ("list-request+x@d1.test", "+", ("list-request@d1.test", "+x")),
    ("list-request+x@d1.test", "+-", ("list@d1.test", "-request+x")),  # does not end in -request
    ("owner@d1.test", "-", ("owner@d1.test", "")),
    ("ownerx-list@d1.test", "-", ("ownerx@d1.test", "-list")),
    # strcspn: the first character in the set splits, whichever delimiter it is; at position 0
    # nothing is split, even when another delimiter follows.
    ("a.b+c@d1.test", "+.", ("a@d1.test", ".b+c")),
    ("+a-b@d1.test", "-+", ("+a-b@d1.test", "")),
    (".a+b@d1.test", "+.", (".a+b@d1.test", "")),
])
def test_split_extension_postfix_exceptions(address, delimiters, expected):
    assert split_extension(address, delimiters) == Split(*expected)


@pytest.mark.parametrize("address, extension, expected", [
    ("alice@d1.test", "+x", "alice+x@d1.test"),
    ("alice@d1.test", "", "alice@d1.test"),
    ("a@b@d1.test", "-y", "a@b-y@d1.test"),
])
def test_add_extension(address, extension, expected):
    assert add_extension(address, extension) == expected


@pytest.mark.parametrize("address, domain", [
    ("alice@D1.Test", "d1.test"), ("d1.test", ""), ("a@b@c.test", "c.test"), ("a@", ""),
])
def test_domain_of(address, domain):
    assert domain_of(address) == domain


def test_normalize():
    assert normalize("  Alice@D1.TEST \n") == "alice@d1.test"


@pytest.mark.parametrize("value, safe", [
    ("alice", True), ("+tag", True), ("a.b-c_d", True), ("", False), ("a b", False), ("a,b", False),
    ("a\nb", False), ("a\x00b", False), ("a@b", False), ("a\x9bb", False), ("<a>", False),
])
def test_is_safe_token(value, safe):
    assert is_safe_token(value) is safe

from stores import both_store_kinds  # noqa: F401 - every test here runs on both stores
from support import PolicyClient, SocketmapClient


def test_policy_and_socketmap_answer_over_the_go_database(daemon):
    policy = PolicyClient(daemon.policy_socket)
    assert policy.ask(protocol_state="RCPT", sender="x@outside.example",
                      recipient="nobody@d1.test").startswith("550 5.1.1")
    assert policy.ask(protocol_state="RCPT", sender="x@outside.example",
                      recipient="Alias1+tag@D1.test") == "DUNNO"
    policy.close()
    sm = SocketmapClient(daemon.socketmap_socket)
    assert sm.ask("Alias1+x@D1.Test") == "OK alice+x@d1.test"
    assert sm.ask("off@d1.test") == "NOTFOUND "
    assert sm.ask("d1.test") == "NOTFOUND "
    sm.close()

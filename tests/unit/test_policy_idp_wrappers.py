"""The IdP as the policy server hands it to gather_facts: a plain attribute is passed through as
it is, and only a question marks the decision as resting on the IdP (found when lists and the
server's try-at-once path were merged: `lists_enabled` came back as a function, always true), and
how long a decision made through it may be kept."""

from mailcloak.policy.server import FOREVER, _AtOnce, _Watched


class Provider:
    name = "keycloak"
    lists_enabled = False

    async def user_by_address(self, address):
        return None


def test_plain_attributes_pass_through_and_are_no_question():
    for wrapper in (_AtOnce(Provider()), _Watched(Provider())):
        assert wrapper.lists_enabled is False
        assert wrapper.name == "keycloak"
        assert not wrapper.asked


def test_a_question_answered_at_once_is_noted():
    wrapper = _AtOnce(Provider())
    answer = wrapper.user_by_address("a@d1.test")
    assert wrapper.asked
    try:
        answer.send(None)
    except StopIteration as done:
        assert done.value is None
    else:
        raise AssertionError("an answer from memory must not wait")


class Static(Provider):
    name = "static"


def test_how_long_a_decision_through_the_wrapper_may_be_kept():
    """Asked nothing, or only the static provider: for ever. A remote IdP asked: until the
    earliest end the IdP cache noted, and not at all when it noted none (nothing to vouch for)."""
    untouched, static, remote = _Watched(Provider()), _Watched(Static()), _Watched(Provider())
    for asked in (static, remote):
        asked.user_by_address("a@d1.test").close()  # a question (its answer is not needed here)
    assert untouched.expiry() == static.expiry() == FOREVER
    assert remote.expiry() is None
    remote.fresh.answered(130.0)
    remote.fresh.answered(120.0)
    assert remote.expiry() == 120.0
    remote.fresh.spoil()
    assert remote.expiry() is None

"""The pytest plugin: a user's own suite asserts on captured sessions in three lines."""

from __future__ import annotations

import shutil
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

HERE = Path(__file__).parent
CONFORMANCE = HERE / "conformance"


def test_the_plugin_is_registered_with_pytest() -> None:
    (ep,) = [e for e in entry_points(group="pytest11") if e.name == "mailpolicy"]
    assert ep.value == "mailpolicy.pytest_plugin"


@pytest.fixture
def user_project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A user's project: a captured session and their policy files."""
    captures = pytester.mkdir("captures")
    shutil.copy(CONFORMANCE / "black_text.json", captures / "spam.json")
    shutil.copy(HERE / "data" / "diff_new.toml", pytester.path / "policy.toml")
    shutil.copy(HERE / "data" / "diff_old.toml", pytester.path / "old_policy.toml")
    return pytester


def test_three_lines_in_a_users_suite(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(
        test_mail="""
        def test_spam_still_refused(mailpolicy_replay):
            replies = mailpolicy_replay("captures/spam.json", policy="policy.toml")
            assert replies.refused_by("security.lists.spammers")

        def test_the_old_policy_let_it_through(mailpolicy_replay):
            replies = mailpolicy_replay("captures/spam.json", policy="old_policy.toml")
            assert not replies.refused
            assert replies.to("RCPT TO:<r@example.com>").code == 250

        def test_its_own_policy(mailpolicy_replay):
            replies = mailpolicy_replay("captures/spam.json")
            assert replies.rules == ["security.lists.t"]  # the case's own rule
        """
    )
    result = user_project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_a_failing_assertion_shows_the_replies(user_project: pytest.Pytester) -> None:
    user_project.makepyfile(
        test_mail="""
        def test_spam_refused_by_the_wrong_rule(mailpolicy_replay):
            replies = mailpolicy_replay("captures/spam.json", policy="policy.toml")
            assert replies.refused_by("relay.reject_unauth_destination")
        """
    )
    result = user_project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    assert (
        "refused: RCPT TO:<r@example.com> -> 554 5.7.1 [security.lists.spammers]"
        in result.stdout.str()
    )


def test_paths_are_found_beside_the_test_file(user_project: pytest.Pytester) -> None:
    sub = user_project.mkpydir("tests")
    (sub / "cases").mkdir()
    shutil.copy(CONFORMANCE / "relay_outsider_denied.json", sub / "cases" / "relay.json")
    (sub / "test_relay.py").write_text(
        "def test_relay(mailpolicy_replay):\n"
        '    replies = mailpolicy_replay("cases/relay.json")\n'
        '    assert replies.refused_by("relay.reject_unauth_destination")\n'
        "\n"
        "def test_missing(mailpolicy_replay):\n"
        "    import pytest\n"
        "    from mailpolicy.adapters.replay import CaseError\n"
        "    with pytest.raises(CaseError, match='cannot read'):\n"
        '        mailpolicy_replay("cases/none.json")\n'
    )
    result = user_project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)

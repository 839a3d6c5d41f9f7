"""Password hashes: the stored format, verification, and never raising."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mailpolicy import passwords
from mailpolicy.passwords import hash_password, is_password_hash, verify_password

#: Tests use a low cost for speed; the default stays 14.
FAST = 4

_FORMAT = re.compile(r"\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def test_default_format() -> None:
    stored = hash_password("wonderland")
    match = _FORMAT.fullmatch(stored)
    assert match is not None
    assert match.group(1, 2, 3) == ("14", "8", "1")
    salt, key = _unb64(match.group(4)), _unb64(match.group(5))
    assert len(salt) == 16 and len(key) == 32
    assert not match.group(4).endswith("=") and not match.group(5).endswith("=")
    # the key is plain scrypt of the UTF-8 password: other tools can check it
    assert hashlib.scrypt(b"wonderland", salt=salt, n=1 << 14, r=8, p=1, dklen=32) == key
    assert verify_password("wonderland", stored)
    assert not verify_password("Wonderland", stored)


def test_parameters_are_recorded_and_used() -> None:
    stored = hash_password("pw", ln=FAST, r=2, p=3)
    assert stored.startswith("$scrypt$ln=4,r=2,p=3$")
    assert verify_password("pw", stored)


def test_salt_is_random() -> None:
    first, second = hash_password("same", ln=FAST), hash_password("same", ln=FAST)
    assert first != second
    assert verify_password("same", first) and verify_password("same", second)


def test_high_cost_works() -> None:
    # OpenSSL's default memory limit would refuse this without maxmem
    stored = hash_password("slow", ln=17)
    assert verify_password("slow", stored)


@pytest.mark.parametrize(
    ("ln", "r", "p"), [(0, 8, 1), (18, 8, 1), (14, 0, 1), (14, 8, 0), (40, 1, 1), (10, 256, 1)]
)
def test_unsupported_parameters_refused(ln: int, r: int, p: int) -> None:
    with pytest.raises(ValueError, match="unsupported scrypt parameters"):
        hash_password("pw", ln=ln, r=r, p=p)


def test_unicode_and_odd_passwords() -> None:
    for password in ["pässwörd", "", " ", "密码", "\x00nul", "a" * 10_000, "\udcff"]:
        stored = hash_password(password, ln=FAST)
        assert verify_password(password, stored)
        assert not verify_password(password + "x", stored)


def test_compare_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(passwords.hmac, "compare_digest", spy)
    stored = hash_password("pw", ln=FAST)
    assert verify_password("pw", stored)
    assert not verify_password("px", stored)
    assert len(calls) == 2


def test_handmade_hash_verifies() -> None:
    # The control for MALFORMED below: the same shape, built by hand, is fine.
    salt = b"saltsaltsalt"
    key = hashlib.scrypt(b"pw", salt=salt, n=1 << FAST, r=8, p=1, dklen=32)
    b64 = lambda data: base64.b64encode(data).decode().rstrip("=")  # noqa: E731
    stored = f"$scrypt$ln={FAST},r=8,p=1${b64(salt)}${b64(key)}"
    assert b64(salt) == "c2FsdHNhbHRzYWx0"
    assert is_password_hash(stored)
    assert verify_password("pw", stored)


def _good() -> str:
    return hash_password("pw", ln=FAST)


MALFORMED = [
    "",
    "pw",
    "$scrypt$",
    "$scrypt$ln=4,r=8,p=1$",
    "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0",
    "$scrypt$ln=4,r=8,p=1$$AAAA",
    "$scrypt$ln=4,r=8$c2FsdHNhbHRzYWx0$" + "A" * 43,
    "$scrypt$r=8,ln=4,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,
    "$scrypt$ln=x,r=8,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,
    "$scrypt$ln=-4,r=8,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,
    "$scrypt$ln=0,r=8,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,
    "$scrypt$ln=40,r=8,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,  # would need terabytes
    "$scrypt$ln=20,r=8,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,  # 1 GiB: over the limit
    "$scrypt$ln=4,r=8,p=1$c2Fsd!NhbHRzYWx0$" + "A" * 43,  # not base64
    "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0=$" + "A" * 43,  # padding is not written
    "$scrypt$ln=4,r=8,p=1$c2FsdA$" + "A" * 43,  # salt too short
    "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0$AAAA",  # key too short
    "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0$A",  # impossible base64 length
    "$scrypt$ln=4,r=8,p=1$" + "A" * 21 + "B$" + "A" * 43,  # non-canonical salt
    "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0$" + "A" * 42 + "B",  # non-canonical key
    "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaA",
    "{PLAIN}pw",
    " $scrypt$ln=4,r=8,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43,
]


@pytest.mark.parametrize("stored", MALFORMED)
def test_malformed_hashes_never_verify(stored: str) -> None:
    assert not is_password_hash(stored)
    assert verify_password("pw", stored) is False


def test_damaged_hashes_do_not_verify() -> None:
    stored = _good()
    assert is_password_hash(stored)
    assert not verify_password("pw", stored + "A")
    # scrypt output is prefix-stable: a truncated key must still fail
    assert not verify_password("pw", stored[:-1])
    assert not verify_password("pw", stored[:-2])
    assert not verify_password("pw", stored.replace("ln=4", "ln=5"))
    assert not verify_password("pw", stored + "\n")


def test_wrong_types_do_not_raise() -> None:
    assert verify_password(None, _good()) is False  # type: ignore[arg-type]
    assert verify_password("pw", None) is False  # type: ignore[arg-type]
    assert is_password_hash(None) is False  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None)
@given(st.text(max_size=40), st.text(max_size=40), st.integers(1, FAST))
def test_verify_round_trip(password: str, other: str, ln: int) -> None:
    assume(password != other)
    stored = hash_password(password, ln=ln, r=1)
    assert is_password_hash(stored)
    assert verify_password(password, stored)
    assert not verify_password(other, stored)


@given(st.text(max_size=120))
def test_arbitrary_text_never_raises(stored: str) -> None:
    assert verify_password("pw", stored) in (True, False)
    assert is_password_hash(stored) in (True, False)


def test_an_unknown_user_costs_a_real_check(monkeypatch: pytest.MonkeyPatch) -> None:
    # Timing must not tell which user names exist: a login for an unknown
    # user verifies against a dummy hash as costly as the accounts' hashes.
    from mailpolicy import passwords as pw
    from mailpolicy import policy as policy_module
    from mailpolicy.config import settings_from_mapping
    from mailpolicy.policy import compile_policy

    cheap, dear = pw.hash_password("a", ln=4), pw.hash_password("b", ln=10)
    policy = compile_policy(
        settings_from_mapping(
            {"accounts": {"a": {"password_hash": cheap}, "b": {"password_hash": dear}}}
        )
    )
    checked: list[str] = []
    real = pw.verify_password

    def spy(password: str, stored: str) -> bool:
        checked.append(stored)
        return real(password, stored)

    monkeypatch.setattr(policy_module, "verify_password", spy)
    assert policy.check_password("nobody", "b") is False
    assert policy.check_password("nobody", "guess") is False
    assert len(checked) == 2 and checked[0] == checked[1]  # made once, kept
    assert checked[0].startswith("$scrypt$ln=10,r=8,p=1$")  # the costliest account's cost
    assert checked[0] not in (cheap, dear)
    assert policy.check_password("b", "b") is True

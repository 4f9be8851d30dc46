"""One UUID, one spelling: ``canonical_uuid`` and the principal a token in any case yields."""

from __future__ import annotations

import jwt
import pytest

from nanomsg.auth import AuthError, Verifier, canonical_uuid
from nanomsg.clock import FakeClock

SECRET = "unit-secret-0123456789abcdef-0123456789"
USER = "6f1c2a4e-3b5d-4c7e-8f90-a1b2c3d4e5f6"
ENTITY = "0a9b8c7d-6e5f-4a3b-9c2d-1e0f2a3b4c5d"
NOW = 1_800_000_000.0


def token(user: str, entity: str) -> str:
    claims = {"userUUID": user, "entityUUID": entity, "levelOnEntity": 7, "exp": int(NOW) + 60}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture
def verifier() -> Verifier:
    return Verifier.from_material(clock=FakeClock(now=NOW), secret=SECRET)


@pytest.mark.parametrize("spelling", [USER, USER.upper(), USER[:9] + USER[9:].upper()])
def test_canonical_uuid_is_the_lower_case_form_of_any_spelling(spelling: str) -> None:
    assert canonical_uuid(spelling) == USER


@pytest.mark.parametrize(
    "value",
    [None, 7, "", USER.replace("-", ""), "{" + USER + "}", " " + USER, USER + "0", "urn:uuid:x"],
)
def test_canonical_uuid_is_none_for_anything_but_a_uuid_string(value: object) -> None:
    assert canonical_uuid(value) is None


def test_token_claims_in_upper_case_give_the_same_principal_as_lower_case(
    verifier: Verifier,
) -> None:
    lower = verifier.verify(token(USER, ENTITY))
    upper = verifier.verify(token(USER.upper(), ENTITY.upper()))
    assert (upper.user, upper.entity) == (lower.user, lower.entity) == (USER, ENTITY)


def test_a_claim_that_is_not_a_uuid_is_still_refused(verifier: Verifier) -> None:
    with pytest.raises(AuthError, match="userUUID must be a UUID"):
        verifier.verify(token(USER.replace("-", ""), ENTITY))
    with pytest.raises(AuthError, match="entityUUID must be a UUID"):
        verifier.verify(token(USER, ENTITY + "0"))

"""Token verification: nanomsg.auth.Verifier driven by a FakeClock, no sockets, no event loop."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from nanomsg.auth import MAX_LEVEL, AuthError, Verifier, is_uuid, mint
from nanomsg.clock import FakeClock

SECRET = "unit-secret-0123456789abcdef-0123456789"
OTHER_SECRET = "another-secret-0123456789abcdef-01234567"
USER = "6f1c2a4e-3b5d-4c7e-8f90-a1b2c3d4e5f6"
ENTITY = "0a9b8c7d-6e5f-4a3b-9c2d-1e0f2a3b4c5d"
NOW = 1_800_000_000.0
LEEWAY = 5.0


# --- helpers -----------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    """Valid claims; a change whose value is ``...`` removes that claim."""
    base: dict[str, Any] = {
        "userUUID": USER,
        "entityUUID": ENTITY,
        "levelOnEntity": 100,
        "iat": int(NOW),
        "exp": int(NOW) + 3600,
    }
    for key, value in changes.items():
        if value is ...:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def hs256(payload: dict[str, Any], key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(payload, key, algorithm=algorithm)


def hand_signed(header: dict[str, Any], payload: bytes, key: bytes) -> str:
    """An HS256-signed token built without PyJWT, so any key or payload text can be used."""
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(payload)
    sig = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig)


def public_pem(private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(now=NOW)


@pytest.fixture
def verifier(clock: FakeClock) -> Verifier:
    return Verifier.from_material(clock=clock, secret=SECRET, leeway=LEEWAY)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# --- accepted tokens ---------------------------------------------------------------------------


def test_valid_hs256_token_yields_principal_with_user_entity_level(verifier: Verifier) -> None:
    principal = verifier.verify(hs256(claims()))
    assert principal.user == USER
    assert principal.entity == ENTITY
    assert principal.level == 100
    assert principal.exp == int(NOW) + 3600
    assert principal.claims["userUUID"] == USER


def test_minted_token_is_accepted(verifier: Verifier) -> None:
    token = mint(secret=SECRET, user=USER, entity=ENTITY, level=42, now=NOW, ttl=60)
    principal = verifier.verify(token)
    assert (principal.user, principal.entity, principal.level) == (USER, ENTITY, 42)
    assert principal.exp == int(NOW) + 60


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("100", 100),
        ("0", 0),
        ("007", 7),
        (0, 0),
        (MAX_LEVEL, MAX_LEVEL),
        (str(MAX_LEVEL), MAX_LEVEL),
    ],
)
def test_level_as_int_or_digit_string_is_accepted(
    verifier: Verifier, raw: object, expected: int
) -> None:
    assert verifier.verify(hs256(claims(levelOnEntity=raw))).level == expected


def test_uppercase_uuids_are_accepted_and_used_in_lower_case(verifier: Verifier) -> None:
    principal = verifier.verify(hs256(claims(userUUID=USER.upper(), entityUUID=ENTITY.upper())))
    assert (principal.user, principal.entity) == (USER, ENTITY)


# --- claim contents ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "abc",
        "-5",
        1.5,
        "1.5",
        True,
        False,
        "",
        " 100",
        "1e3",
        "\u0661\u0660\u0660",
        [100],
        {"v": 1},
    ],
)
def test_non_integer_level_is_refused(verifier: Verifier, raw: object) -> None:
    with pytest.raises(AuthError, match="levelOnEntity must be an integer"):
        verifier.verify(hs256(claims(levelOnEntity=raw)))


@pytest.mark.parametrize("raw", [-5, -1, MAX_LEVEL + 1, str(MAX_LEVEL + 1)])
def test_level_outside_zero_to_maximum_is_refused(verifier: Verifier, raw: object) -> None:
    with pytest.raises(AuthError, match="levelOnEntity out of range"):
        verifier.verify(hs256(claims(levelOnEntity=raw)))


@pytest.mark.parametrize("claim", ["userUUID", "entityUUID", "levelOnEntity", "exp"])
def test_missing_required_claim_is_refused(verifier: Verifier, claim: str) -> None:
    with pytest.raises(AuthError, match=f"missing claim {claim}"):
        verifier.verify(hs256(claims(**{claim: ...})))


@pytest.mark.parametrize("claim", ["userUUID", "entityUUID", "levelOnEntity", "exp"])
def test_required_claim_set_to_null_counts_as_missing(verifier: Verifier, claim: str) -> None:
    with pytest.raises(AuthError, match=f"missing claim {claim}"):
        verifier.verify(hs256(claims(**{claim: None})))


NOT_UUIDS = [
    "not-a-uuid",
    "",
    123,
    "6f1c2a4e3b5d4c7e8f90a1b2c3d4e5f6",  # hex without hyphens
    "{6f1c2a4e-3b5d-4c7e8f90a1b2c3d4e5f6}",  # braces, 36 chars
    "6f1c-2a4e3b5d-4c7e-8f90-a1b2c3d4e5f6",  # hyphens in the wrong places
    "6f1c2a4_-3b5d-4c7e-8f90-a1b2c3d4e5f6",  # int() would take the underscore
    " f1c2a4e-3b5d-4c7e-8f90-a1b2c3d4e5f6",  # int() would strip the space
    "6f1c2a4e-3b5d-4c7e-8f90-a1b2c3d4e5fg",  # not hex
]


@pytest.mark.parametrize("value", NOT_UUIDS)
def test_non_uuid_user_is_refused(verifier: Verifier, value: object) -> None:
    with pytest.raises(AuthError, match="userUUID must be a UUID"):
        verifier.verify(hs256(claims(userUUID=value)))


@pytest.mark.parametrize("value", NOT_UUIDS)
def test_non_uuid_entity_is_refused(verifier: Verifier, value: object) -> None:
    with pytest.raises(AuthError, match="entityUUID must be a UUID"):
        verifier.verify(hs256(claims(entityUUID=value)))


@pytest.mark.parametrize("value", NOT_UUIDS)
def test_is_uuid_accepts_only_the_canonical_8_4_4_4_12_form(value: object) -> None:
    assert not is_uuid(value)
    assert is_uuid(USER)
    assert is_uuid(USER.upper())


@pytest.mark.parametrize("exp", ['"soon"', '"1800000000"', "true", "[1]", "{}"])
def test_non_numeric_exp_is_refused(verifier: Verifier, exp: str) -> None:
    payload = claims(exp=0)
    text = json.dumps(payload).replace('"exp": 0', f'"exp": {exp}')
    with pytest.raises(AuthError, match="exp must be a number"):
        verifier.verify(hand_signed({"alg": "HS256", "typ": "JWT"}, text.encode(), SECRET.encode()))


@pytest.mark.parametrize(
    "exp",
    ["NaN", "Infinity", "-Infinity", "1e400", pytest.param("1" + "0" * 400, id="huge-int")],
)
def test_non_finite_or_huge_exp_is_refused_not_crashing(verifier: Verifier, exp: str) -> None:
    text = json.dumps(claims(exp=0)).replace('"exp": 0', f'"exp": {exp}')
    with pytest.raises(AuthError, match="exp out of range"):
        verifier.verify(hand_signed({"alg": "HS256", "typ": "JWT"}, text.encode(), SECRET.encode()))


# --- signatures and algorithms -----------------------------------------------------------------


def test_token_signed_with_another_secret_is_refused(verifier: Verifier) -> None:
    with pytest.raises(AuthError, match="bad signature"):
        verifier.verify(hs256(claims(), key=OTHER_SECRET))


def test_tampered_payload_is_refused(verifier: Verifier) -> None:
    header, _, sig = hs256(claims()).split(".")
    forged = b64url(json.dumps(claims(levelOnEntity=999)).encode())
    with pytest.raises(AuthError, match="bad signature"):
        verifier.verify(f"{header}.{forged}.{sig}")


def test_alg_none_token_from_pyjwt_is_refused(verifier: Verifier) -> None:
    token = jwt.encode(claims(), key=None, algorithm="none")
    with pytest.raises(AuthError, match="algorithm not allowed"):
        verifier.verify(token)


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_token_by_hand_is_refused(verifier: Verifier, alg: str) -> None:
    token = (
        b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        + "."
        + b64url(json.dumps(claims()).encode())
        + "."
    )
    with pytest.raises(AuthError, match="algorithm not allowed"):
        verifier.verify(token)


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_algorithms_are_not_in_the_allow_list(clock: FakeClock, alg: str) -> None:
    long_secret = "k" * 64  # long enough for HS512, so only the algorithm can be the reason
    v = Verifier.from_material(clock=clock, secret=long_secret)
    assert v.verify(hs256(claims(), key=long_secret)).user == USER
    with pytest.raises(AuthError, match="algorithm not allowed"):
        v.verify(hs256(claims(), key=long_secret, algorithm=alg))


def test_header_without_alg_is_refused(verifier: Verifier) -> None:
    token = hand_signed({"typ": "JWT"}, json.dumps(claims()).encode(), SECRET.encode())
    with pytest.raises(AuthError, match="algorithm not allowed"):
        verifier.verify(token)


def test_hs256_token_keyed_with_rsa_public_pem_is_refused_by_public_key_verifier(
    clock: FakeClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    pem = public_pem(rsa_key)
    v = Verifier.from_material(clock=clock, public_key_pem=pem)
    token = hand_signed({"alg": "HS256", "typ": "JWT"}, json.dumps(claims()).encode(), pem)
    with pytest.raises(AuthError, match="algorithm not allowed"):
        v.verify(token)


def test_hs256_token_keyed_with_rsa_public_pem_is_refused_when_secret_also_set(
    clock: FakeClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    pem = public_pem(rsa_key)
    v = Verifier.from_material(clock=clock, secret=SECRET, public_key_pem=pem)
    token = hand_signed({"alg": "HS256", "typ": "JWT"}, json.dumps(claims()).encode(), pem)
    with pytest.raises(AuthError, match="bad signature"):
        v.verify(token)


def test_rs256_token_signed_by_matching_private_key_is_accepted(
    clock: FakeClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    v = Verifier.from_material(clock=clock, public_key_pem=public_pem(rsa_key))
    principal = v.verify(jwt.encode(claims(), rsa_key, algorithm="RS256"))
    assert (principal.user, principal.entity, principal.level) == (USER, ENTITY, 100)


def test_es256_token_signed_by_matching_private_key_is_accepted(
    clock: FakeClock, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    v = Verifier.from_material(clock=clock, public_key_pem=public_pem(ec_key))
    principal = v.verify(jwt.encode(claims(), ec_key, algorithm="ES256"))
    assert (principal.user, principal.entity, principal.level) == (USER, ENTITY, 100)


def test_rs256_token_signed_by_another_rsa_key_is_refused(
    clock: FakeClock, rsa_key: rsa.RSAPrivateKey
) -> None:
    v = Verifier.from_material(clock=clock, public_key_pem=public_pem(rsa_key))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(AuthError, match="bad signature"):
        v.verify(jwt.encode(claims(), other, algorithm="RS256"))


def test_rs256_token_refused_when_public_key_is_ec(
    clock: FakeClock, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    v = Verifier.from_material(clock=clock, public_key_pem=public_pem(ec_key))
    with pytest.raises(AuthError, match="algorithm not allowed"):
        v.verify(jwt.encode(claims(), rsa_key, algorithm="RS256"))


def test_es256_token_refused_when_only_a_secret_is_configured(
    verifier: Verifier, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(AuthError, match="algorithm not allowed"):
        verifier.verify(jwt.encode(claims(), ec_key, algorithm="ES256"))


def test_hs256_token_refused_when_only_a_public_key_is_configured(
    clock: FakeClock, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    v = Verifier.from_material(clock=clock, public_key_pem=public_pem(ec_key))
    with pytest.raises(AuthError, match="algorithm not allowed"):
        v.verify(hs256(claims()))


def test_from_material_without_any_key_is_an_error(clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="no signing key"):
        Verifier.from_material(clock=clock)


def test_from_material_rejects_a_p384_public_key(clock: FakeClock) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ValueError, match="neither RSA nor EC"):
        Verifier.from_material(clock=clock, public_key_pem=public_pem(key))


# --- time --------------------------------------------------------------------------------------


def test_token_expired_beyond_leeway_is_refused(verifier: Verifier) -> None:
    with pytest.raises(AuthError, match="token expired"):
        verifier.verify(hs256(claims(exp=int(NOW - LEEWAY) - 1)))


def test_token_expired_within_leeway_is_accepted(verifier: Verifier) -> None:
    principal = verifier.verify(hs256(claims(exp=int(NOW) - 3)))
    assert principal.exp == int(NOW) - 3


def test_token_becomes_expired_when_clock_passes_exp_plus_leeway(
    verifier: Verifier, clock: FakeClock
) -> None:
    token = hs256(claims(exp=int(NOW) + 60))
    clock.advance(60 + LEEWAY)  # exactly exp + leeway: still valid
    assert verifier.verify(token).user == USER
    clock.advance(0.001)
    with pytest.raises(AuthError, match="token expired"):
        verifier.verify(token)


def test_token_with_nbf_in_the_future_is_refused(verifier: Verifier) -> None:
    with pytest.raises(AuthError, match="not yet valid"):
        verifier.verify(hs256(claims(nbf=int(NOW) + 60)))


def test_token_with_nbf_within_leeway_is_accepted(verifier: Verifier) -> None:
    assert verifier.verify(hs256(claims(nbf=int(NOW) + 3))).user == USER


def test_token_with_nbf_in_the_past_is_accepted(verifier: Verifier) -> None:
    assert verifier.verify(hs256(claims(nbf=int(NOW) - 60))).user == USER


def test_expires_at_is_exp_plus_leeway(clock: FakeClock) -> None:
    v = Verifier.from_material(clock=clock, secret=SECRET, leeway=7.5)
    principal = v.verify(hs256(claims(exp=int(NOW) + 100)))
    assert v.expires_at(principal) == int(NOW) + 100 + 7.5


# --- audience and issuer -----------------------------------------------------------------------


@pytest.fixture
def scoped(clock: FakeClock) -> Verifier:
    return Verifier.from_material(
        clock=clock, secret=SECRET, audience="nanomsg", issuer="https://partner.example"
    )


def test_right_audience_and_issuer_are_accepted(scoped: Verifier) -> None:
    token = hs256(claims(aud="nanomsg", iss="https://partner.example"))
    assert scoped.verify(token).user == USER


def test_audience_list_containing_ours_is_accepted(scoped: Verifier) -> None:
    token = hs256(claims(aud=["other", "nanomsg"], iss="https://partner.example"))
    assert scoped.verify(token).user == USER


def test_wrong_audience_is_refused(scoped: Verifier) -> None:
    with pytest.raises(AuthError, match="wrong audience"):
        scoped.verify(hs256(claims(aud="someone-else", iss="https://partner.example")))


def test_missing_audience_is_refused(scoped: Verifier) -> None:
    with pytest.raises(AuthError, match="missing claim aud"):
        scoped.verify(hs256(claims(iss="https://partner.example")))


def test_wrong_issuer_is_refused(scoped: Verifier) -> None:
    with pytest.raises(AuthError, match="wrong issuer"):
        scoped.verify(hs256(claims(aud="nanomsg", iss="https://evil.example")))


def test_missing_issuer_is_refused(scoped: Verifier) -> None:
    with pytest.raises(AuthError, match="missing claim iss"):
        scoped.verify(hs256(claims(aud="nanomsg")))


def test_audience_and_issuer_ignored_when_not_configured(verifier: Verifier) -> None:
    token = hs256(claims(aud="anything", iss="anyone"))
    assert verifier.verify(token).user == USER


def test_minted_token_with_audience_and_issuer_passes_scoped_verifier(scoped: Verifier) -> None:
    token = mint(
        secret=SECRET,
        user=USER,
        entity=ENTITY,
        level=1,
        now=NOW,
        audience="nanomsg",
        issuer="https://partner.example",
    )
    assert scoped.verify(token).level == 1


# --- malformed input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b.c",
        "...",
        "a.b",
        "eyJhbGciOiJIUzI1NiJ9",
        "eyJhbGciOiJIUzI1NiJ9.!!!.???",
        b64url(b"[1,2]") + "." + b64url(b"{}") + ".",  # header not an object
        b64url(b"\xff\xfe") + "." + b64url(b"{}") + ".",  # header not UTF-8
    ],
)
def test_garbage_strings_are_refused(verifier: Verifier, token: str) -> None:
    with pytest.raises(AuthError):
        verifier.verify(token)


def test_payload_that_is_not_an_object_is_refused(verifier: Verifier) -> None:
    token = hand_signed({"alg": "HS256"}, b"[1, 2, 3]", SECRET.encode())
    with pytest.raises(AuthError, match="invalid token"):
        verifier.verify(token)


@pytest.mark.parametrize("token", [None, 123, {"token": "x"}, b"abc.def.ghi", ""])
def test_non_string_or_empty_token_is_refused(verifier: Verifier, token: object) -> None:
    with pytest.raises(AuthError, match="non-empty string"):
        verifier.verify(token)


def test_token_longer_than_8192_is_refused(verifier: Verifier) -> None:
    token = hs256(claims(padding="x" * 8192))
    assert len(token) > 8192
    with pytest.raises(AuthError, match="too long"):
        verifier.verify(token)


def test_token_of_8192_chars_is_not_refused_for_length(verifier: Verifier) -> None:
    base = len(hs256(claims(padding="")))
    # base64 grows 4 chars per 3 payload bytes; pick padding landing near the limit from below.
    padding = "x" * ((8192 - base) * 3 // 4 - 3)
    token = hs256(claims(padding=padding))
    assert 8100 < len(token) <= 8192
    assert verifier.verify(token).user == USER


# --- the HS256 fast path agrees with PyJWT ------------------------------------------------------


def _flip_last_char(segment: str) -> str:
    """The same bytes with non-zero unused low bits: a non-canonical base64url spelling."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    if len(segment) % 4 in (2, 3):
        last = alphabet.index(segment[-1])
        return segment[:-1] + alphabet[last | 1 if len(segment) % 4 == 3 else last | 3]
    return segment + "A"


def _corpus() -> list[tuple[str, str]]:
    key = SECRET.encode()
    good = hs256(claims())
    h, p, s = good.split(".")
    header = {"alg": "HS256", "typ": "JWT"}
    body = json.dumps(claims()).encode()
    tokens = {
        "valid": good,
        "other key": hs256(claims(), key=OTHER_SECRET),
        "padded segments": f"{h}{'=' * (-len(h) % 4)}.{p}{'=' * (-len(p) % 4)}.{s}=",
        "too much padding": f"{h}.{p}.{s}===",
        "junk in signature": f"{h}.{p}.{s[:-2]}!!",
        "non-canonical signature": f"{h}.{p}.{_flip_last_char(s)}",
        "non-canonical payload": f"{h}.{_flip_last_char(p)}.{s}",
        "empty signature": f"{h}.{p}.",
        "short signature": f"{h}.{p}.{s[:10]}",
        "payload not json": hand_signed(header, b"{not json", key),
        "payload a list": hand_signed(header, b"[1]", key),
        "payload not utf-8": hand_signed(header, b'{"a":"\xff"}', key),
        "kid string": hand_signed({**header, "kid": "k1"}, body, key),
        "kid number": hand_signed({**header, "kid": 7}, body, key),
        "no typ": hand_signed({"alg": "HS256"}, body, key),
        "extra header": hand_signed({**header, "x5u": "https://x"}, body, key),
        "crit empty": hand_signed({**header, "crit": []}, body, key),
        "crit unknown": hand_signed({**header, "crit": ["exp"], "exp": 1}, body, key),
        "b64 false": hand_signed({**header, "b64": False, "crit": ["b64"]}, body, key),
        "missing user": hs256(claims(userUUID=...)),
        "null entity": hs256(claims(entityUUID=None)),
        "missing exp": hs256(claims(exp=...)),
        "level string": hs256(claims(levelOnEntity="7")),
        "level float": hs256(claims(levelOnEntity=1.5)),
        "expired": hs256(claims(exp=int(NOW) - 60)),
        "nan exp": hand_signed(
            header, json.dumps(claims(exp=0)).replace('"exp": 0', '"exp": NaN').encode(), key
        ),
        "aud string": hs256(claims(aud="nanomsg")),
        "aud list": hs256(claims(aud=["other", "nanomsg"])),
        "aud wrong": hs256(claims(aud="other")),
        "aud number": hs256(claims(aud=5)),
        "aud list with number": hs256(claims(aud=["nanomsg", 5])),
        "aud empty": hs256(claims(aud="")),
        "iss right": hs256(claims(iss="https://partner.example")),
        "iss wrong": hs256(claims(iss="https://elsewhere.example")),
        "iss number": hand_signed(header, json.dumps(claims(iss=5)).encode(), key),
        "aud and iss": hs256(claims(aud="nanomsg", iss="https://partner.example")),
        "sub string": hs256(claims(sub="someone")),
        "sub number": hand_signed(header, json.dumps(claims(sub=5)).encode(), key),
        "jti number": hand_signed(header, json.dumps(claims(jti=[1])).encode(), key),
    }
    return list(tokens.items())


def _outcome(call: Any) -> tuple[str, object]:
    try:
        return "accepted", call()
    except AuthError as exc:
        return "refused", str(exc)


@pytest.mark.parametrize("scoped_to", [None, ("nanomsg", "https://partner.example")])
@pytest.mark.parametrize(("name", "token"), _corpus())
def test_hs256_fast_path_gives_the_same_outcome_as_pyjwt(
    clock: FakeClock, scoped_to: tuple[str, str] | None, name: str, token: str
) -> None:
    audience, issuer = scoped_to or ("", "")
    v = Verifier.from_material(clock=clock, secret=SECRET, audience=audience, issuer=issuer)
    fast = _outcome(lambda: v.verify(token))
    reference = _outcome(lambda: v._principal(v._pyjwt_claims(token, "HS256")))
    if name == "b64 false":  # PyJWT refuses it too, but only after the signature check
        assert fast[0] == reference[0] == "refused"
        return
    assert fast == reference, name


def test_hs256_fast_path_refuses_any_critical_header_extension(verifier: Verifier) -> None:
    # PyJWT would accept crit ["b64"] with b64 true; nothing here needs extensions, so refuse.
    token = hand_signed(
        {"alg": "HS256", "crit": ["b64"], "b64": True},
        json.dumps(claims()).encode(),
        SECRET.encode(),
    )
    with pytest.raises(AuthError, match="invalid token"):
        verifier.verify(token)


def test_hs256_tokens_do_not_go_through_pyjwt(
    verifier: Verifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """So the comparison above compares two implementations, not one with itself."""
    token = hs256(claims())

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("PyJWT called for HS256")

    monkeypatch.setattr(jwt, "decode", forbidden)
    monkeypatch.setattr(jwt, "get_unverified_header", forbidden)
    assert verifier.verify(token).user == USER


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("9" * 5000, id="5000-digit-string"),
        pytest.param("0" * 4999 + "7", id="5000-chars-leading-zeros"),
        pytest.param("1" + "0" * 10, id="11-digit-string"),
    ],
)
def test_level_digit_strings_of_any_length_are_refused_or_read_never_crashing(
    verifier: Verifier, raw: str
) -> None:
    token = hs256(claims(levelOnEntity=raw))
    if raw.lstrip("0") == "7":
        assert verifier.verify(token).level == 7
        return
    with pytest.raises(AuthError, match="levelOnEntity out of range"):
        verifier.verify(token)


def test_a_5000_digit_level_number_is_refused_not_crashing(verifier: Verifier) -> None:
    text = json.dumps(claims(levelOnEntity=0)).replace(
        '"levelOnEntity": 0', '"levelOnEntity": ' + "9" * 5000
    )
    with pytest.raises(AuthError):
        verifier.verify(hand_signed({"alg": "HS256", "typ": "JWT"}, text.encode(), SECRET.encode()))

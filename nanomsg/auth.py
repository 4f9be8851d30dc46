"""Token verification: a JWT string -> a Principal, or an AuthError saying why not.

Pure apart from key material and an injected clock. The algorithm allow-list is explicit and
each algorithm is bound to its own key (HS256 -> the shared secret, RS256/ES256 -> the public
key), so a token can never make us use a public key as an HMAC secret, and ``none`` is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.algorithms import get_default_algorithms

from nanomsg.clock import Clock
from nanomsg.models import Principal

REQUIRED_CLAIMS = ("userUUID", "entityUUID", "levelOnEntity", "exp")
MAX_LEVEL = 1_000_000_000
MAX_LEVEL_DIGITS = len(str(MAX_LEVEL))
MAX_EXP = 2**53  # seconds; beyond this a float loses whole seconds


class AuthError(Exception):
    """The token was refused; ``str(exc)`` is a short reason safe to show the caller."""


def is_uuid(value: object) -> bool:
    """True for a canonical-form UUID string."""
    if not isinstance(value, str) or len(value) != 36:
        return False
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return False
    # uuid.UUID also accepts hyphens anywhere, "_" and surrounding spaces; insist on 8-4-4-4-12.
    return str(parsed) == value.lower()


def canonical_uuid(value: object) -> str | None:
    """The one spelling of a UUID the server uses (lower-case 8-4-4-4-12), or None when
    ``value`` is not a UUID string.

    UUIDs name users, entities and rule subjects, and are compared as strings everywhere
    (rules, bans, idempotency keys). The same UUID in another case must be the same user, so
    every UUID that enters the server (token claims, path parameters, body fields) passes
    through here, and storage holds only this form.
    """
    if not is_uuid(value):
        return None
    assert isinstance(value, str)
    return value.lower()


def parse_level(value: object) -> int:
    """levelOnEntity is an int, or a string of digits as the original's partners send it."""
    if isinstance(value, bool):
        raise AuthError("levelOnEntity must be an integer")
    if isinstance(value, int):
        level = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        # int() raises on strings of over 4300 digits; past 10 significant digits the level
        # is out of range anyway, so it is never parsed.
        digits = value.lstrip("0") or "0"  # int() counts leading zeros towards its limit
        if len(digits) > MAX_LEVEL_DIGITS:
            raise AuthError("levelOnEntity out of range")
        level = int(digits)
    else:
        raise AuthError("levelOnEntity must be an integer")
    if not 0 <= level <= MAX_LEVEL:
        raise AuthError("levelOnEntity out of range")
    return level


_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")


def _b64url(segment: str) -> bytes:
    """Decode one token segment: base64url, canonical, optionally padded (as PyJWT accepts);
    anything else is a ValueError."""
    stripped = segment.rstrip("=")
    padding = len(segment) - len(stripped)
    if (
        padding > 2
        or (padding and len(segment) % 4)
        or len(stripped) % 4 == 1
        or not _BASE64URL.fullmatch(stripped)
    ):
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    if base64.urlsafe_b64encode(data).rstrip(b"=") != stripped.encode():
        raise ValueError("not canonical base64url")  # extra bits set in the last character
    return data


def _json_object(data: bytes) -> dict[str, Any] | None:
    """A JSON object, or None for other JSON; ValueError when not JSON at all. The standard
    library parser, like PyJWT's: it reads NaN and big integers, which _principal refuses."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True, slots=True)
class Verifier:
    """Verifies tokens against the configured keys, audience and issuer."""

    keys: Mapping[str, Any]  # algorithm name -> key object or secret
    clock: Clock
    audience: str = ""
    issuer: str = ""
    leeway: float = 5.0

    @classmethod
    def from_material(
        cls,
        *,
        clock: Clock,
        secret: str = "",
        public_key_pem: bytes = b"",
        audience: str = "",
        issuer: str = "",
        leeway: float = 5.0,
    ) -> Verifier:
        keys: dict[str, Any] = {}
        if secret:
            keys["HS256"] = secret.encode()
        if public_key_pem:
            algos = get_default_algorithms()
            for name in ("RS256", "ES256"):
                try:
                    keys[name] = algos[name].prepare_key(public_key_pem)
                except Exception:
                    continue
            if not any(name in keys for name in ("RS256", "ES256")):
                raise ValueError("the public key is neither RSA nor EC (P-256)")
        if not keys:
            raise ValueError("no signing key configured")
        return cls(keys=keys, clock=clock, audience=audience, issuer=issuer, leeway=leeway)

    def verify(self, token: object) -> Principal:
        """Check signature, algorithm, expiry, audience, issuer and claim types."""
        if not isinstance(token, str) or not token:
            raise AuthError("token must be a non-empty string")
        if len(token) > 8192:
            raise AuthError("token too long")
        parts = token.split(".")
        try:
            header = _json_object(_b64url(parts[0])) if len(parts) == 3 else None
        except ValueError:
            header = None
        if header is None:
            raise AuthError("malformed token")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.keys:
            raise AuthError("algorithm not allowed")
        if alg == "HS256":
            return self._principal(self._hs256_claims(parts, header))
        return self._principal(self._pyjwt_claims(token, alg))

    def _hs256_claims(self, parts: list[str], header: dict[str, Any]) -> dict[str, Any]:
        """HS256 without PyJWT: the path every connection takes, ~2.7x cheaper than PyJWT's
        (which re-parses the token and re-validates the key on every call).

        Same checks and outcomes as ``_pyjwt_claims`` (tests/unit/test_auth.py compares the
        two on a corpus of tokens): canonical base64url segments, a JSON object header with
        no critical extensions and a string ``kid`` if any, a constant-time HMAC comparison,
        a JSON object payload, the required claims, issuer and audience when configured, and
        string ``sub`` / ``jti`` when present.
        """
        if "crit" in header or header.get("b64", True) is not True:
            raise AuthError("invalid token")
        if "kid" in header and not isinstance(header["kid"], str):
            raise AuthError("invalid token")
        try:
            payload = _b64url(parts[1])
            signature = _b64url(parts[2])
        except ValueError:
            raise AuthError("invalid token") from None
        signing_input = f"{parts[0]}.{parts[1]}".encode()
        expected = hmac.new(self.keys["HS256"], signing_input, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, signature):
            raise AuthError("bad signature")
        try:
            claims = _json_object(payload)
        except ValueError:
            claims = None
        if claims is None:
            raise AuthError("invalid token")
        for claim in REQUIRED_CLAIMS:
            if claims.get(claim) is None:
                raise AuthError(f"missing claim {claim}")
        if self.issuer:
            if "iss" not in claims:
                raise AuthError("missing claim iss")
            if claims["iss"] != self.issuer:
                raise AuthError("wrong issuer")
        if self.audience:
            audiences = claims.get("aud")
            if not audiences:
                raise AuthError("missing claim aud")
            if isinstance(audiences, str):
                audiences = [audiences]
            if (
                not isinstance(audiences, list)
                or not all(isinstance(a, str) for a in audiences)
                or self.audience not in audiences
            ):
                raise AuthError("wrong audience")
        for name in ("sub", "jti"):  # optional, but strings when present (as PyJWT checks)
            if name in claims and not isinstance(claims[name], str):
                raise AuthError("invalid token")
        return claims

    def _pyjwt_claims(self, token: str, alg: str) -> dict[str, Any]:
        """Verification by PyJWT, for the public-key algorithms."""
        options: dict[str, Any] = {
            # Expiry and not-before are checked below against the injected clock.
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_aud": bool(self.audience),
            "verify_iss": bool(self.issuer),
            "require": list(REQUIRED_CLAIMS),
        }
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=self.keys[alg],
                algorithms=[alg],
                audience=self.audience or None,
                issuer=self.issuer or None,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.InvalidAudienceError:
            raise AuthError("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"missing claim {exc.claim}") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad signature") from None
        except jwt.PyJWTError:
            raise AuthError("invalid token") from None
        return claims

    def _principal(self, claims: dict[str, Any]) -> Principal:
        now = self.clock.wall()
        exp = claims["exp"]
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise AuthError("exp must be a number")
        # NaN, infinities and huge ints (JSON allows them) would crash the arithmetic below.
        if not -MAX_EXP < exp < MAX_EXP:
            raise AuthError("exp out of range")
        if now > exp + self.leeway:
            raise AuthError("token expired")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and not isinstance(nbf, bool) and now + self.leeway < nbf:
            raise AuthError("token not yet valid")
        user = canonical_uuid(claims["userUUID"])
        if user is None:
            raise AuthError("userUUID must be a UUID")
        entity = canonical_uuid(claims["entityUUID"])
        if entity is None:
            raise AuthError("entityUUID must be a UUID")
        level = parse_level(claims["levelOnEntity"])
        return Principal(user=user, entity=entity, level=level, exp=int(exp), claims=claims)

    def expires_at(self, principal: Principal) -> float:
        """The wall time after which a connection holding this principal is expired."""
        return principal.exp + self.leeway


def mint(
    *,
    secret: str,
    user: str,
    entity: str,
    level: int,
    now: float,
    ttl: float = 3600.0,
    audience: str = "",
    issuer: str = "",
) -> str:
    """An HS256 token for testers and the ``--dev`` mode."""
    claims: dict[str, Any] = {
        "userUUID": user,
        "entityUUID": entity,
        "levelOnEntity": level,
        "iat": int(now),
        "exp": int(now + ttl),
    }
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")

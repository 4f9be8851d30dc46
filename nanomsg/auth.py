"""Token verification: a JWT string -> a Principal, or an AuthError saying why not.

Pure apart from key material and an injected clock. The algorithm allow-list is explicit and
each algorithm is bound to its own key (HS256 -> the shared secret, RS256/ES256 -> the public
key), so a token can never make us use a public key as an HMAC secret, and ``none`` is refused.
"""

from __future__ import annotations

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


def parse_level(value: object) -> int:
    """levelOnEntity is an int, or a string of digits as the original's partners send it."""
    if isinstance(value, bool):
        raise AuthError("levelOnEntity must be an integer")
    if isinstance(value, int):
        level = value
    elif isinstance(value, str) and value.isascii() and value.isdigit():
        level = int(value)
    else:
        raise AuthError("levelOnEntity must be an integer")
    if not 0 <= level <= MAX_LEVEL:
        raise AuthError("levelOnEntity out of range")
    return level


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
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.keys:
            raise AuthError("algorithm not allowed")
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
        return self._principal(claims)

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
        user, entity = claims["userUUID"], claims["entityUUID"]
        if not is_uuid(user):
            raise AuthError("userUUID must be a UUID")
        if not is_uuid(entity):
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

"""Pure permission evaluation: (principal, room, rules) -> the flags the principal holds.

Rules (protocol.md, "Permissions"):
- owner-entity admins (entity is the room's owner and level >= level_admin) hold every flag and
  cannot be banned, except in a DM, which only its two users' rules open;
- otherwise the flags are the union of the *accepted* rules that apply: the ``user`` rule for the
  user, and ``entity`` rules for the user's entity whose level <= the user's level;
- ``a`` implies ``r`` and ``w``; a ``b`` on any applying rule denies everything.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from nanomsg.models import Principal, Room, Rule

VALID_FLAGS = frozenset("rwba")


@dataclass(frozen=True, slots=True)
class Access:
    """What a principal may do in one room, and why (for logs and HTTP reasons)."""

    read: bool
    write: bool
    admin: bool
    reason: str

    @property
    def flags(self) -> str:
        return (
            ("r" if self.read else "") + ("w" if self.write else "") + ("a" if self.admin else "")
        )


NONE = Access(read=False, write=False, admin=False, reason="no rule admits the caller")


def is_valid_flags(flags: str) -> bool:
    """True when ``flags`` uses only r, w, b, a, each at most once."""
    return set(flags) <= VALID_FLAGS and len(set(flags)) == len(flags)


def rule_applies(principal: Principal, rule: Rule) -> bool:
    """Whether ``rule`` speaks about this principal (accepted or not)."""
    if rule.kind == "user":
        return rule.subject == principal.user
    return rule.subject == principal.entity and rule.level <= principal.level


def _from_flags(flags: frozenset[str]) -> Access:
    admin = "a" in flags
    return Access(
        read=admin or "r" in flags,
        write=admin or "w" in flags,
        admin=admin,
        reason="rules " + "".join(sorted(flags)),
    )


# Every decision is one of these few values, built once and shared: a connection holding 100
# rooms keeps 100 references, not 100 objects.
_BY_FLAGS: Mapping[frozenset[str], Access] = MappingProxyType(
    {
        frozenset(combo): _from_flags(frozenset(combo))
        for n in (1, 2, 3)
        for combo in itertools.combinations("arw", n)
    }
)
_NO_ROOM = Access(read=False, write=False, admin=False, reason="no such room")
_OWNER_ADMIN = Access(read=True, write=True, admin=True, reason="owner-entity admin")
_BANNED = Access(read=False, write=False, admin=False, reason="banned")


# Every value ``evaluate`` returns, in a fixed order: a connection stores the decision on a room
# it holds as an index into this tuple (one byte, see nanomsg/subscription.py).
DECISIONS: tuple[Access, ...] = (*_BY_FLAGS.values(), NONE, _NO_ROOM, _OWNER_ADMIN, _BANNED)


def evaluate(principal: Principal, room: Room | None, rules: Iterable[Rule]) -> Access:
    """The principal's access to ``room``; a missing or deleted room grants nothing."""
    if room is None or room.deleted_at is not None:
        return _NO_ROOM
    # A DM is private to its two users: no rank in the owner entity reads it.
    if (
        not room.dm
        and principal.entity == room.entity_owner
        and principal.level >= room.level_admin
    ):
        return _OWNER_ADMIN
    flags: set[str] = set()
    for rule in rules:
        if rule.accepted and rule_applies(principal, rule):
            flags.update(rule.permissions)
    if "b" in flags:
        return _BANNED
    if not flags:
        return NONE
    return _BY_FLAGS.get(frozenset(flags)) or _from_flags(frozenset(flags))

"""Storage: one ``Store`` protocol, one implementation per backend (SQLite, PostgreSQL)."""

from nanomsg.store.base import (
    HistoryQuery,
    LimitBelowRules,
    NewMessage,
    NewRoom,
    RoomChanges,
    RoomGone,
    Store,
    StoreUnavailable,
    TooManyRules,
)

__all__ = [
    "HistoryQuery",
    "LimitBelowRules",
    "NewMessage",
    "NewRoom",
    "RoomChanges",
    "RoomGone",
    "Store",
    "StoreUnavailable",
    "TooManyRules",
]

"""Storage: one ``Store`` protocol, one implementation per backend (SQLite, PostgreSQL)."""

from nanomsg.store.base import (
    HistoryQuery,
    NewMessage,
    NewRoom,
    RoomGone,
    Store,
    StoreUnavailable,
    TooManyRules,
)

__all__ = [
    "HistoryQuery",
    "NewMessage",
    "NewRoom",
    "RoomGone",
    "Store",
    "StoreUnavailable",
    "TooManyRules",
]

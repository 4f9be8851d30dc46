"""The documents stay in step with the code: every setting in the README, every status and
query word in protocol.md."""

from __future__ import annotations

import re
from pathlib import Path

import orjson

from nanomsg import codec
from nanomsg.config import OPTIONS

ROOT = Path(__file__).resolve().parents[2]


def test_readme_configuration_table_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for opt in OPTIONS:
        assert re.search(rf"\| `{opt.flag}`.*\| `{opt.env}` \|", readme), opt.name


def test_protocol_md_names_every_status_and_query_word_the_server_sends() -> None:
    protocol = (ROOT / "protocol.md").read_text()
    frames = [v for v in vars(codec).values() if isinstance(v, bytes)]
    frames += [codec.badargs("r"), codec.history_end(0), codec.revoked(1)]
    frames += [codec.resumed(1, 0, True)]
    for frame in frames:
        word = orjson.loads(frame)["data"]
        assert f"`{word}`" in protocol, word

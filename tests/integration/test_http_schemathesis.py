"""The published OpenAPI document and the live side-port agree: a bounded schemathesis run, on
each backend, with every check (valid requests accepted, invalid ones refused, answers as
declared, undeclared methods 405, no 5xx).

The run is seeded and keeps no example database, so it generates the same requests every time;
it fails as soon as the server and the document it serves drift apart.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import Server

MAX_EXAMPLES = 30  # per operation and phase: about 10 s per backend
SEED = 20261206
RUN_TIMEOUT = 120.0


@pytest.mark.asyncio
async def test_side_port_keeps_the_contract_of_its_openapi_document(
    server: Server, tmp_path: Path
) -> None:
    # One caller who may create rooms, so the generated requests reach past the level check.
    caller = server.user(level=1000)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{server.http_url}/openapi.json",
        "--header",
        f"Authorization: Bearer {caller.token}",
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--generation-database",
        "none",
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--no-color",
        cwd=tmp_path,  # no schemathesis.toml of the checkout applies
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    report = output.decode(errors="replace")
    assert proc.returncode == 0, report[-6000:]
    # It sent requests to every operation it found in the document, not just loaded it.
    selected = re.search(r"Selected: (\d+)/(\d+)", report)
    tested = re.search(r"Tested: (\d+)", report)
    assert selected and tested, report[-3000:]
    assert int(tested[1]) == int(selected[1]) == int(selected[2]) >= 10, report[-3000:]

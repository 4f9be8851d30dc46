"""The deployment files keep the side-port private and size the process as docs/operations.md
asks: docker-compose.yml, the Dockerfile's and README's ``docker run`` lines, and the reverse
proxy examples of docs/operations.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from nanomsg.config import OPTIONS

ROOT = Path(__file__).resolve().parents[2]
SIDE_PORT = 7778
WS_PORT = 7777
LOOPBACK = {"127.0.0.1", "::1", "[::1]"}
MIN_NOFILE = 65536
PING_INTERVAL = next(opt.default for opt in OPTIONS if opt.name == "ping_interval")


def published(entry: str | int | dict[str, Any]) -> tuple[str, int]:
    """(host address, container port) of one compose ``ports`` entry; "" is every interface.

    Short syntax: ``[[HOST_IP:]HOST_PORT:]CONTAINER_PORT[/PROTO]``; long syntax: a mapping with
    ``target`` and an optional ``host_ip``.
    """
    if isinstance(entry, dict):
        return str(entry.get("host_ip", "")), int(entry["target"])
    text = str(entry).split("/")[0]
    if text.startswith("["):  # an IPv6 host: [::1]:HOST_PORT:CONTAINER_PORT
        host_ip, _, ports = text.partition("]:")
        return host_ip + "]", int(ports.rpartition(":")[2])
    parts = text.split(":")
    return (parts[0] if len(parts) == 3 else ""), int(parts[-1])


def compose_service() -> dict[str, Any]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["nanomsg"]
    assert isinstance(service, dict)
    return service


def test_published_tells_every_interface_from_loopback() -> None:
    assert published("7778:7778") == ("", 7778)
    assert published(7778) == ("", 7778)
    assert published("0.0.0.0:7778:7778") == ("0.0.0.0", 7778)
    assert published("127.0.0.1:17778:7778/tcp") == ("127.0.0.1", 7778)
    assert published({"target": 7778, "published": 7778}) == ("", 7778)
    assert published({"target": 7778, "host_ip": "127.0.0.1"}) == ("127.0.0.1", 7778)
    assert published("[::1]:7778:7778") == ("[::1]", 7778)


def test_compose_publishes_the_side_port_on_loopback_only_and_the_websocket_port() -> None:
    ports = [published(entry) for entry in compose_service().get("ports", [])]
    side = [host for host, container in ports if container == SIDE_PORT]
    assert all(host in LOOPBACK for host in side), ports
    assert any(container == WS_PORT for _, container in ports), ports


def test_compose_raises_the_open_file_limit() -> None:
    nofile = compose_service().get("ulimits", {}).get("nofile")
    assert isinstance(nofile, dict), "no ulimits: nofile: {soft, hard} on the nanomsg service"
    assert nofile["soft"] >= MIN_NOFILE
    assert nofile["hard"] >= nofile["soft"]


def test_docker_run_examples_publish_the_side_port_on_loopback_only() -> None:
    for name in ("README.md", "Dockerfile"):
        text = (ROOT / name).read_text()
        flags = re.findall(r"-p\s+(\S+)", text)
        assert flags, name
        side = [published(flag) for flag in flags if published(flag)[1] == SIDE_PORT]
        assert all(host in LOOPBACK for host, _ in side), (name, flags)


def proxy_example(language: str) -> str:
    operations = (ROOT / "docs" / "operations.md").read_text()
    found = re.search(rf"^```{language}\n(.*?)^```", operations, re.MULTILINE | re.DOTALL)
    assert found, f"no ```{language} block in docs/operations.md"
    return found.group(1)


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", value).groups()  # type: ignore[union-attr]
    return float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[unit]


def test_nginx_example_upgrades_outwaits_the_ping_interval_and_hides_the_side_port() -> None:
    nginx = proxy_example("nginx")
    assert "proxy_http_version 1.1;" in nginx
    assert "proxy_set_header Upgrade $http_upgrade;" in nginx
    assert re.search(r"proxy_set_header Connection \$connection_upgrade;", nginx)
    assert re.search(r"map \$http_upgrade \$connection_upgrade", nginx)
    timeout = re.search(r"proxy_read_timeout (\w+);", nginx)
    assert timeout and seconds(timeout.group(1)) > 2 * PING_INTERVAL
    assert re.search(rf"server [\w.]+:{WS_PORT};", nginx)
    assert str(SIDE_PORT) not in re.sub(r"#.*", "", nginx)


def test_caddy_example_waits_longer_than_the_ping_interval_and_hides_the_side_port() -> None:
    caddy = proxy_example("caddy")
    assert re.search(rf"reverse_proxy [\w.]+:{WS_PORT}\b", caddy)
    timeout = re.search(r"read_timeout (\w+)", caddy)
    assert timeout and seconds(timeout.group(1)) > 2 * PING_INTERVAL
    assert str(SIDE_PORT) not in re.sub(r"#.*", "", caddy)


def test_operations_md_tells_clients_to_use_wss() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    assert re.search(r"`wss://[\w.]+/chat`", operations)

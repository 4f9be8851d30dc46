"""Settings: OPTIONS match Config, env vars feed flag defaults, validate() names the variable."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from nanomsg.config import (
    OPTIONS,
    Config,
    ConfigError,
    Option,
    add_options,
    duration,
    from_env,
    from_namespace,
)

GOOD_SECRET = "s" * 32


def parse(environ: dict[str, str], argv: list[str]) -> Config:
    parser = argparse.ArgumentParser()
    add_options(parser, environ)
    return from_namespace(parser.parse_args(argv))


# --- OPTIONS <-> Config ------------------------------------------------------------------------


def test_every_option_has_a_config_field_and_every_field_an_option() -> None:
    assert [o.name for o in OPTIONS] == [f.name for f in dataclasses.fields(Config)]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.name)
def test_option_default_matches_config_field_default(option: Option) -> None:
    field_defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    assert option.name in field_defaults
    assert option.default == field_defaults[option.name]
    assert type(option.default) is type(field_defaults[option.name])


def test_option_flag_and_env_names() -> None:
    by_name = {o.name: o for o in OPTIONS}
    assert by_name["jwt_secret"].flag == "--jwt-secret"
    assert by_name["jwt_secret"].env == "NANOMSG_JWT_SECRET"
    assert by_name["http_port"].flag == "--http-port"
    assert by_name["http_port"].env == "NANOMSG_HTTP_PORT"


def test_empty_environment_gives_config_defaults() -> None:
    assert from_env({}) == Config()


# --- environment and flags ---------------------------------------------------------------------


def test_env_port_becomes_default_of_port_flag() -> None:
    parser = argparse.ArgumentParser()
    add_options(parser, {"NANOMSG_PORT": "9000"})
    assert parser.get_default("port") == 9000
    assert from_env({"NANOMSG_PORT": "9000"}).port == 9000


def test_flag_overrides_env() -> None:
    cfg = parse({"NANOMSG_PORT": "9000"}, ["--port", "9001"])
    assert cfg.port == 9001


def test_env_used_when_flag_absent() -> None:
    assert parse({"NANOMSG_PORT": "9000"}, []).port == 9000


def test_from_env_keyword_override_beats_env() -> None:
    assert from_env({"NANOMSG_PORT": "9000"}, port=9002).port == 9002


def test_env_string_settings_are_taken_verbatim() -> None:
    cfg = from_env(
        {
            "NANOMSG_JWT_SECRET": GOOD_SECRET,
            "NANOMSG_DATABASE_URL": "postgresql://u@h/db",
            "NANOMSG_REDIS_URL": "redis://localhost:6379/0",
        }
    )
    assert cfg.jwt_secret == GOOD_SECRET
    assert cfg.database_url == "postgresql://u@h/db"
    assert cfg.redis_url == "redis://localhost:6379/0"


def test_env_duration_setting_accepts_units() -> None:
    assert from_env({"NANOMSG_AUTH_TIMEOUT": "5m"}).auth_timeout == 300.0


def test_env_float_setting_is_parsed() -> None:
    assert from_env({"NANOMSG_JWT_LEEWAY": "2.5"}).jwt_leeway == 2.5


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("yes", True), ("off", False)])
def test_env_bool_setting_is_parsed(raw: str, expected: bool) -> None:
    assert from_env({"NANOMSG_DEV": raw}).dev is expected


def test_no_dev_flag_overrides_env_dev() -> None:
    assert parse({"NANOMSG_DEV": "1"}, ["--no-dev"]).dev is False


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("NANOMSG_PORT", "abc"),
        ("NANOMSG_HTTP_PORT", "80.5"),
        ("NANOMSG_JWT_LEEWAY", "soon"),
        ("NANOMSG_AUTH_TIMEOUT", "5x"),
        ("NANOMSG_DEV", "maybe"),
    ],
)
def test_bad_env_value_raises_config_error_naming_variable(env: str, value: str) -> None:
    with pytest.raises(ConfigError, match=env):
        from_env({env: value})


# --- duration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30", 30.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("0.5", 0.5),
        ("1.5m", 90.0),
        (" 5m ", 300.0),
    ],
)
def test_duration_parses_seconds_and_units(text: str, seconds: float) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "5x", "m5", "five"])
def test_duration_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        duration(text)


# --- validate ----------------------------------------------------------------------------------


def test_validate_without_key_names_jwt_secret() -> None:
    with pytest.raises(ConfigError, match="NANOMSG_JWT_SECRET"):
        Config().validate()


def test_validate_need_key_false_allows_no_key() -> None:
    cfg = Config()
    assert cfg.validate(need_key=False) is cfg


def test_validate_accepts_32_byte_secret() -> None:
    cfg = Config(jwt_secret=GOOD_SECRET)
    assert cfg.validate() is cfg


def test_validate_accepts_public_key_without_secret() -> None:
    cfg = Config(jwt_public_key="/etc/nanomsg/key.pem")
    assert cfg.validate() is cfg


@pytest.mark.parametrize("need_key", [True, False])
def test_validate_refuses_short_secret(need_key: bool) -> None:
    with pytest.raises(ConfigError, match="NANOMSG_JWT_SECRET must be at least 32 bytes"):
        Config(jwt_secret="s" * 31).validate(need_key=need_key)


def test_secret_length_counts_bytes_not_characters() -> None:
    sixteen_two_byte_chars = "é" * 16  # 32 bytes in UTF-8
    assert Config(jwt_secret=sixteen_two_byte_chars).validate().jwt_secret == "é" * 16


@pytest.mark.parametrize(
    "url",
    ["sqlite:///nanomsg.db", "sqlite://:memory:", "postgresql://u:p@h:5432/db", "postgres://h/db"],
)
def test_validate_accepts_database_urls(url: str) -> None:
    assert Config(jwt_secret=GOOD_SECRET, database_url=url).validate().database_url == url


@pytest.mark.parametrize("url", ["mysql://h/db", "", "nanomsg.db", "SQLITE:///x", "http://h"])
def test_validate_refuses_bad_database_url_naming_variable(url: str) -> None:
    with pytest.raises(ConfigError, match="NANOMSG_DATABASE_URL"):
        Config(jwt_secret=GOOD_SECRET, database_url=url).validate()


@pytest.mark.parametrize(
    "url", ["", "redis://localhost:6379/0", "rediss://h:6380", "unix:///run/redis.sock"]
)
def test_validate_accepts_redis_urls(url: str) -> None:
    assert Config(jwt_secret=GOOD_SECRET, redis_url=url).validate().redis_url == url


@pytest.mark.parametrize("url", ["http://localhost", "localhost:6379", "memcached://h"])
def test_validate_refuses_bad_redis_url_naming_variable(url: str) -> None:
    with pytest.raises(ConfigError, match="NANOMSG_REDIS_URL"):
        Config(jwt_secret=GOOD_SECRET, redis_url=url).validate()


@pytest.mark.parametrize(
    ("field", "value", "env"),
    [
        ("port", 70000, "NANOMSG_PORT"),
        ("http_port", -1, "NANOMSG_HTTP_PORT"),
        ("auth_timeout", 0.0, "NANOMSG_AUTH_TIMEOUT"),
        ("max_frame", 0, "NANOMSG_MAX_FRAME"),
        ("pg_pool_size", 0, "NANOMSG_PG_POOL_SIZE"),
        ("list_cache_mb", -1, "NANOMSG_LIST_CACHE_MB"),
        ("list_cache_mb", 1 << 21, "NANOMSG_LIST_CACHE_MB"),
        ("http_max_connections", 0, "NANOMSG_HTTP_MAX_CONNECTIONS"),
        ("log_level", "VERBOSE", "NANOMSG_LOG_LEVEL"),
    ],
)
def test_validate_refuses_out_of_range_values_naming_variable(
    field: str, value: object, env: str
) -> None:
    cfg = dataclasses.replace(Config(jwt_secret=GOOD_SECRET), **{field: value})
    with pytest.raises(ConfigError, match=env):
        cfg.validate()


@pytest.mark.parametrize("raw", ["nan", "inf", "-1"])
@pytest.mark.parametrize(
    "env",
    [
        "NANOMSG_AUTH_TIMEOUT",
        "NANOMSG_REFRESH_GRACE",
        "NANOMSG_HTTP_HEADER_TIMEOUT",
        "NANOMSG_HTTP_BODY_TIMEOUT",
    ],
)
def test_validate_refuses_non_finite_or_negative_durations(env: str, raw: str) -> None:
    cfg = from_env({"NANOMSG_JWT_SECRET": GOOD_SECRET, env: raw})
    with pytest.raises(ConfigError, match=env):
        cfg.validate()


@pytest.mark.parametrize("raw", ["nan", "inf", "-1"])
def test_validate_refuses_non_finite_or_negative_leeway(raw: str) -> None:
    cfg = from_env({"NANOMSG_JWT_SECRET": GOOD_SECRET, "NANOMSG_JWT_LEEWAY": raw})
    with pytest.raises(ConfigError, match="NANOMSG_JWT_LEEWAY"):
        cfg.validate()


def test_validate_accepts_zero_leeway() -> None:
    assert Config(jwt_secret=GOOD_SECRET, jwt_leeway=0.0).validate().jwt_leeway == 0.0


@pytest.mark.parametrize(
    ("settings", "variable"),
    [
        ({"workers": 2}, "NANOMSG_REDIS_URL"),
        ({"workers": 2, "redis_url": "redis://x", "port": 0}, "port 0"),
        ({"workers": 0}, "NANOMSG_WORKERS"),
        ({"redis_cluster": True}, "NANOMSG_REDIS_CLUSTER"),
        ({"resume_cap": 0}, "NANOMSG_RESUME_CAP"),
        ({"shutdown_timeout": 0}, "NANOMSG_SHUTDOWN_TIMEOUT"),
    ],
)
def test_validate_refuses_scale_out_settings_that_cannot_work(
    settings: dict[str, object], variable: str
) -> None:
    config = Config(jwt_secret="s" * 32, **settings)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=variable):
        config.validate()


def test_validate_accepts_workers_with_redis_and_fixed_ports() -> None:
    Config(jwt_secret="s" * 32, workers=4, redis_url="redis://127.0.0.1:6379").validate()

"""The service's settings (service/process/config.py), read from dicts in-process: every
setting's default and its effect, each also from a NAME_FILE, and every refusal a ConfigError
of one line that names the setting and never echoes a secret. How `python -m service` shows
such an error (one line, status 2) is in tests/service/test_cli.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.files import ConfigError, SecretFile
from service.process.config import MAX_AUDIT_PER_SECOND, Settings, with_password
from service.settings import THREADS, CacheSettings, PostgresSettings, RedisSettings

SECRET = "do-not-print-this-3f9a"
DATABASE_URL = "postgresql://svc@127.0.0.1:5432/users"
# Every setting that can hold a secret holds one, so that no error can echo it unnoticed.
WITH_SECRETS = {"DATABASE_URL": f"postgresql://svc:{SECRET}@127.0.0.1:5432/users",
                "REDIS_URL": f"redis://service:{SECRET}@127.0.0.1:6379/0",
                "API_TOKENS": f"{SECRET}-token"}


def refusal(env: dict[str, str]) -> str:
    """The message of the ConfigError that `env` gives, checked to be one line with no secret."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    message = str(caught.value)
    assert "\n" not in message and SECRET not in message, message
    return message


def test_only_database_url_is_required_and_the_rest_has_defaults() -> None:
    settings = Settings.from_env({"DATABASE_URL": DATABASE_URL})
    assert settings == Settings(
        postgres=PostgresSettings(url=DATABASE_URL, pool_size=THREADS),
        redis=RedisSettings(url="redis://127.0.0.1:6379/0"),
    )
    assert settings.postgres == PostgresSettings(DATABASE_URL, None, THREADS, 2, 5000)
    assert settings.redis == RedisSettings("redis://127.0.0.1:6379/0", None, 0.1, (), "cachestack")
    assert settings.cache == CacheSettings(300.0, 0.1, 60.0, 1.0, 10_000, 1.0)
    assert (settings.batching, settings.threads) == (True, THREADS)
    assert settings.app_role == "cachestack_app"
    assert (settings.api_tokens, settings.api_tokens_file) == (None, None)


def test_every_setting_takes_effect() -> None:
    settings = Settings.from_env({
        "DATABASE_URL": DATABASE_URL, "DB_POOL_SIZE": "7", "DB_CONNECT_TIMEOUT_SECONDS": "5",
        "DB_STATEMENT_TIMEOUT_MS": "250", "REDIS_URL": "rediss://cache.internal:6380/2",
        "CACHE_TIMEOUT_MS": "40", "REDIS_SENTINELS": " s1:26379 , [::1]:26380,,",
        "REDIS_SENTINEL_MASTER": "users", "CACHE_TTL_SECONDS": "60", "CACHE_TTL_JITTER": "0",
        "CACHE_NEGATIVE_TTL_SECONDS": "5", "CACHE_COOLDOWN_SECONDS": "0.5",
        "NEAR_CACHE_SIZE": "0", "CACHE_AUDIT_PER_SECOND": "2.5", "BATCHING": "off",
        "THREADS": "6", "DATABASE_APP_ROLE": "users_app", "API_TOKENS": "t1\n# old\nt2\n",
    })
    assert settings == Settings(
        postgres=PostgresSettings(DATABASE_URL, None, 7, 5, 250),
        redis=RedisSettings("rediss://cache.internal:6380/2", None, 0.04,
                            ("s1:26379", "[::1]:26380"), "users"),
        cache=CacheSettings(60.0, 0.0, 5.0, 0.5, 0, 2.5),
        batching=False, threads=6, app_role="users_app", api_tokens=("t1", "t2"),
    )


def test_the_pool_has_one_connection_per_thread_unless_told_otherwise() -> None:
    env = {"DATABASE_URL": DATABASE_URL, "THREADS": "6"}
    assert Settings.from_env(env).postgres.pool_size == 6
    assert Settings.from_env({**env, "DB_POOL_SIZE": "2"}).postgres.pool_size == 2


def test_the_audit_rate_setting() -> None:
    env = {"DATABASE_URL": DATABASE_URL}
    assert Settings.from_env(env).cache.audit_per_second == 1.0
    assert Settings.from_env({**env, "CACHE_AUDIT_PER_SECOND": "0"}).cache.audit_per_second == 0
    assert Settings.from_env({**env, "CACHE_AUDIT_PER_SECOND": str(MAX_AUDIT_PER_SECOND)}
                             ).cache.audit_per_second == MAX_AUDIT_PER_SECOND
    for bad in ("often", "-1", "1000", "nan", "inf"):
        assert "CACHE_AUDIT_PER_SECOND" in refusal({**env, "CACHE_AUDIT_PER_SECOND": bad})


@pytest.mark.parametrize(("raw", "expected"), [
    ("1", True), ("true", True), (" On ", True), ("YES", True), ("", True),
    ("0", False), ("false", False), ("off", False), ("No", False)])
def test_the_batching_setting(raw: str, expected: bool) -> None:
    assert Settings.from_env({"DATABASE_URL": DATABASE_URL, "BATCHING": raw}).batching is expected


@pytest.mark.parametrize(("name", "content", "read"), [
    ("DATABASE_URL", f"{DATABASE_URL}\n", lambda s: s.postgres.url),
    ("REDIS_URL", "redis://cache:6379/1\n", lambda s: s.redis.url),
    ("THREADS", "3\n", lambda s: s.threads),
    ("BATCHING", "0\n", lambda s: s.batching),
    ("CACHE_TTL_SECONDS", "42\n", lambda s: s.cache.ttl),
    ("REDIS_SENTINELS", "s1:26379\n", lambda s: s.redis.sentinels),
    ("DATABASE_APP_ROLE", "users_app\n", lambda s: s.app_role),
])
def test_any_setting_may_come_from_a_file_which_wins_over_the_variable(
        tmp_path: Path, name: str, content: str, read) -> None:
    path = tmp_path / name.lower()
    path.write_text(content)
    base = {"DATABASE_URL": DATABASE_URL}
    from_file = read(Settings.from_env({**base, f"{name}_FILE": str(path)}))
    assert from_file == read(Settings.from_env({**base, name: content.strip()}))
    assert read(Settings.from_env({**base, name: "ignored", f"{name}_FILE": str(path)})) \
        == from_file
    assert read(Settings.from_env({**base, f"{name}_FILE": ""})) == read(Settings.from_env(base))


def test_a_password_setting_goes_into_its_url_quoted() -> None:
    settings = Settings.from_env({"DATABASE_URL": DATABASE_URL, "DATABASE_PASSWORD": "p@ss:/w",
                                  "REDIS_URL": "redis://service@cache:6380/0",
                                  "REDIS_PASSWORD": "r p"})
    assert settings.postgres.url == "postgresql://svc:p%40ss%3A%2Fw@127.0.0.1:5432/users"
    assert settings.redis.url == "redis://service:r%20p@cache:6380/0"
    assert (settings.postgres.password, settings.redis.password) == (None, None)


def test_a_password_file_goes_into_the_url_and_is_read_again_for_each_connection(
        tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_text(f"{SECRET}\n")
    settings = Settings.from_env({"DATABASE_URL": DATABASE_URL,
                                  "DATABASE_PASSWORD_FILE": str(path),
                                  "REDIS_PASSWORD_FILE": str(path)})
    assert settings.postgres.url == f"postgresql://svc:{SECRET}@127.0.0.1:5432/users"
    for secret in (settings.postgres.password, settings.redis.password):
        assert isinstance(secret, SecretFile) and secret.read() == SECRET
    path.write_text("rotated\n")
    assert settings.postgres.password.read() == "rotated"


@pytest.mark.parametrize(("url", "password", "expected"), [
    ("postgresql://u@host/db", None, "postgresql://u@host/db"),
    ("postgresql://u@host/db", "", "postgresql://u@host/db"),
    ("postgresql://u:old@host:5433/db?sslmode=require", "new",
     "postgresql://u:new@host:5433/db?sslmode=require"),
    ("postgresql://u@[::1]:5432/db", "pw", "postgresql://u:pw@[::1]:5432/db"),
    ("redis://h/0", "pw", "redis://:pw@h/0"),
])
def test_with_password(url: str, password: str | None, expected: str) -> None:
    assert with_password(url, password) == expected


def test_with_password_keeps_a_quoted_user_name() -> None:
    assert with_password("postgresql://us%40er@host/db", "pw") == "postgresql://us%40er:pw@host/db"


def test_the_token_settings() -> None:
    base = {"DATABASE_URL": DATABASE_URL}
    assert Settings.from_env(base).api_tokens is None  # the API is open
    assert Settings.from_env({**base, "API_TOKENS": ""}).api_tokens == ()  # closed to all
    assert Settings.from_env({**base, "API_TOKENS": "a b\nc"}).api_tokens == ("c",)


def test_a_token_file_is_read_now_and_named_for_reading_again(tmp_path: Path) -> None:
    path = tmp_path / "api_tokens"
    path.write_text("first\n\n  second  \n")
    settings = Settings.from_env({"DATABASE_URL": DATABASE_URL, "API_TOKENS_FILE": str(path)})
    assert (settings.api_tokens, settings.api_tokens_file) == (("first", "second"), str(path))


def test_no_secret_is_in_the_settings_repr(tmp_path: Path) -> None:
    path = tmp_path / "password"
    path.write_text(f"{SECRET}\n")
    settings = Settings.from_env({**WITH_SECRETS, "DATABASE_PASSWORD_FILE": str(path),
                                  "REDIS_PASSWORD": SECRET})
    assert SECRET not in repr(settings) and str(path) in repr(settings)


# Each refusal: what is added to WITH_SECRETS, and the setting the message must name.
REFUSALS = [
    ({"DATABASE_URL": ""}, "DATABASE_URL"),
    ({"DATABASE_URL": f"postgresql://u:{SECRET}@127.0.0.1/db?ssl_mode=require"}, "DATABASE_URL"),
    ({"DATABASE_URL": f"host=h password={SECRET} nonsense"}, "DATABASE_URL"),
    ({"REDIS_URL": f"http://u:{SECRET}@127.0.0.1/0"}, "REDIS_URL"),
    ({"REDIS_URL": f"rediss://u:{SECRET}@127.0.0.1/0?ssl_ca_cert=/ca.crt"}, "REDIS_URL"),
    ({"REDIS_URL": f"redis://u:{SECRET}@127.0.0.1:port/0"}, "REDIS_URL"),
    ({"REDIS_SENTINELS": "s1"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "s1:26379,:26379"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "s1:0"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "s1:65536"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "s1:port"}, "REDIS_SENTINELS"),
    ({"CACHE_TIMEOUT_MS": "soon"}, "CACHE_TIMEOUT_MS"),
    ({"CACHE_TIMEOUT_MS": "0.5"}, "CACHE_TIMEOUT_MS"),
    ({"CACHE_TTL_SECONDS": "0"}, "CACHE_TTL_SECONDS"),
    ({"CACHE_TTL_JITTER": "1"}, "CACHE_TTL_JITTER"),
    ({"CACHE_TTL_JITTER": "-0.1"}, "CACHE_TTL_JITTER"),
    ({"CACHE_TTL_JITTER": "inf"}, "CACHE_TTL_JITTER"),
    ({"CACHE_NEGATIVE_TTL_SECONDS": "0.5"}, "CACHE_NEGATIVE_TTL_SECONDS"),
    ({"CACHE_COOLDOWN_SECONDS": "-1"}, "CACHE_COOLDOWN_SECONDS"),
    ({"NEAR_CACHE_SIZE": "-1"}, "NEAR_CACHE_SIZE"),
    ({"NEAR_CACHE_SIZE": "lots"}, "NEAR_CACHE_SIZE"),
    ({"BATCHING": "sometimes"}, "BATCHING"),
    ({"THREADS": "0"}, "THREADS"),
    ({"THREADS": "many"}, "THREADS"),
    ({"DB_POOL_SIZE": "0"}, "DB_POOL_SIZE"),
    ({"DB_CONNECT_TIMEOUT_SECONDS": "soon"}, "DB_CONNECT_TIMEOUT_SECONDS"),
    ({"DB_CONNECT_TIMEOUT_SECONDS": "0"}, "DB_CONNECT_TIMEOUT_SECONDS"),
    ({"DB_STATEMENT_TIMEOUT_MS": "0"}, "DB_STATEMENT_TIMEOUT_MS"),
    ({"DATABASE_APP_ROLE": " "}, "DATABASE_APP_ROLE"),
]


@pytest.mark.parametrize(("env", "named"), REFUSALS)
def test_a_bad_setting_is_refused_naming_it_and_no_secret(env: dict, named: str) -> None:
    assert named in refusal({**WITH_SECRETS, **env})


def test_without_database_url_the_refusal_says_both_ways_to_give_it() -> None:
    assert refusal({}) == "DATABASE_URL (or DATABASE_URL_FILE) is required"


@pytest.mark.parametrize("name", ["DATABASE_URL", "DATABASE_PASSWORD", "REDIS_URL",
                                  "REDIS_PASSWORD", "API_TOKENS", "THREADS"])
def test_a_file_setting_that_cannot_be_read_is_named_with_its_path(
        tmp_path: Path, name: str) -> None:
    missing = tmp_path / "nonexistent"
    message = refusal({**WITH_SECRETS, f"{name}_FILE": str(missing)})
    assert message.startswith(f"{name}_FILE: cannot read {missing}"), message


# Each number setting given a number that is not finite, where it is not refused today.
NOT_FINITE = [(name, raw) for name in (
    "THREADS", "DB_POOL_SIZE", "DB_CONNECT_TIMEOUT_SECONDS", "DB_STATEMENT_TIMEOUT_MS",
    "NEAR_CACHE_SIZE", "CACHE_TIMEOUT_MS", "CACHE_TTL_SECONDS", "CACHE_NEGATIVE_TTL_SECONDS",
    "CACHE_COOLDOWN_SECONDS", "CACHE_TTL_JITTER") for raw in ("nan", "inf")
    if (name, raw) != ("CACHE_TTL_JITTER", "inf")]


@pytest.mark.parametrize(("name", "raw"), NOT_FINITE)
def test_a_number_that_is_not_finite_is_refused_naming_the_setting(name: str, raw: str) -> None:
    assert name in refusal({**WITH_SECRETS, name: raw})


@pytest.mark.parametrize(("env", "named"), [
    ({"DATABASE_URL": "postgresql://u@127.0.0.1:port/db", "DATABASE_PASSWORD": SECRET},
     "DATABASE_URL"),
    ({"DATABASE_URL": "postgresql://u@[::1/db", "DATABASE_PASSWORD": SECRET}, "DATABASE_URL"),
    ({"REDIS_URL": "redis://service@127.0.0.1:port/0", "REDIS_PASSWORD": SECRET}, "REDIS_URL"),
])
def test_a_url_given_apart_from_its_password_is_checked_all_the_same(env: dict,
                                                                      named: str) -> None:
    assert named in refusal({**WITH_SECRETS, **env})


MULTI_HOST = ("postgresql://u@db-1:5432,db-2:5432,db-3/cachestack"
              "?target_session_attrs=read-write")


def test_a_url_of_several_hosts_is_taken_as_libpq_takes_it() -> None:
    """`up --ha`: the URL names each member of the cluster, and libpq finds the leader."""
    settings = Settings.from_env({"DATABASE_URL": MULTI_HOST, "DATABASE_PASSWORD": SECRET})
    assert settings.postgres.url == MULTI_HOST.replace("u@", f"u:{SECRET}@")


def test_each_port_of_a_url_of_several_hosts_is_checked() -> None:
    assert "DATABASE_URL" in refusal({**WITH_SECRETS, "DATABASE_URL": MULTI_HOST.replace(
        "db-2:5432", "db-2:port")})


def test_sentinels_need_the_name_of_what_they_watch() -> None:
    base = {"DATABASE_URL": DATABASE_URL, "REDIS_SENTINELS": "127.0.0.1:26379"}
    assert Settings.from_env(base).redis.sentinel_master == "cachestack"
    with pytest.raises(ConfigError, match="REDIS_SENTINEL_MASTER"):
        Settings.from_env({**base, "REDIS_SENTINEL_MASTER": " "})
    with pytest.raises(ConfigError, match="REDIS_SENTINELS"):
        Settings.from_env({**base, "REDIS_SENTINELS": "127.0.0.1"})

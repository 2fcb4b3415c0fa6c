"""The change stream in a running stack (`up --monitoring`): changes made by plain SQL, as the
superuser inside the Postgres container (never through the service), reach what the proxy
answers; one reader takes over when the other is killed; a slot dropped behind the readers'
back costs a new cache epoch, never a stale read; its role may do nothing else; Prometheus and
`status` watch it. One stack for the whole module.

Figures (how long until a change is seen, how long a takeover takes) are printed: run with -s
to see them."""

from __future__ import annotations

import json
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import docker
import pytest
from docker.models.containers import Container

from orchestrate.stack import DB_NAME, DB_STREAM, PROJECT_LABEL, SERVICE_LABEL
from tests.stores import psql, redis_cli
from tests.support import free_port

from .helpers import Api, Project, container, sweep
from .test_monitoring import query

SLOT = "cachestack_invalidation"  # the readers' default (service/process/config.py)
SEEN_WITHIN_S = 1.0  # what an operator's change may take to reach the API
DEADLINE_S = 60.0  # for what the machine's load decides (a takeover, a restart)

pytestmark = pytest.mark.usefixtures("docker_client")


@pytest.fixture(scope="module")
def monitored(docker_client: docker.DockerClient, images_mode: str) -> Iterator[Project]:
    """One stack with Prometheus for the module; its monitoring port is `monitored.prometheus`."""
    project = Project(f"ct{uuid.uuid4().hex[:8]}", free_port(), images_mode)
    project.prometheus = free_port()  # type: ignore[attr-defined]
    try:
        result = project.run("up", "--monitoring", "--monitoring-port",
                             str(project.prometheus))  # type: ignore[attr-defined]
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        yield project
    finally:
        project.run("down", "--volumes", timeout=120)
        sweep(docker_client, project.name)


@pytest.fixture(scope="module")
def api(monitored: Project) -> Api:
    return Api(monitored)


@pytest.fixture(scope="module")
def postgres(docker_client: docker.DockerClient, monitored: Project) -> Container:
    return container(docker_client, monitored, "postgres")


def readers(client: docker.DockerClient, project: Project) -> list[Container]:
    """The stream's containers, running or not."""
    return client.containers.list(all=True, ignore_removed=True, filters={"label": [
        f"{PROJECT_LABEL}={project.name}", f"{SERVICE_LABEL}=stream"]})


def backend_address(reader: Container, project: Project) -> str:
    reader.reload()
    return reader.attrs["NetworkSettings"]["Networks"][f"{project.name}_backend"]["IPAddress"]


def slot_reader(postgres: Container) -> tuple[str, str] | None:
    """(the walsender's pid, the address its reader connects from) while a reader has the slot."""
    rows = psql(postgres, "SELECT s.active_pid, host(a.client_addr) FROM pg_replication_slots s "
                          "JOIN pg_stat_activity a ON a.pid = s.active_pid "
                          f"WHERE s.slot_name = '{SLOT}'")
    return (rows[0][0], rows[0][1]) if rows else None


def reading(client: docker.DockerClient, project: Project, postgres: Container) -> Container:
    """The reader that has the slot (waiting for one to take it)."""
    until(lambda: slot_reader(postgres) is not None, "a reader on the slot", DEADLINE_S)
    _, address = slot_reader(postgres) or ("", "")
    [found] = [r for r in readers(client, project) if r.status == "running"
               and backend_address(r, project) == address]
    return found


def until(condition: Callable[[], bool], what: str, seconds: float,
          interval: float = 0.1) -> float:
    """Wait for `condition`; the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, f"no {what} within {seconds:.0f} s"
        time.sleep(interval)
    return time.monotonic() - started


def committed_at(postgres: Container, statement: str) -> float:
    """Run `statement` (one that changes users) as the superuser; the time it committed (a
    moment before, as Postgres's clock, the host's, says)."""
    [[when]] = psql(postgres, f"WITH changed AS ({statement} RETURNING 1) "
                              "SELECT extract(epoch FROM clock_timestamp()) FROM changed")
    return float(when)


def seen_after(since: float, check: Callable[[], bool]) -> float:
    """Read until `check()` holds, every 5 ms; the seconds from `since` (time.time())."""
    while not check():
        assert time.time() - since < SEEN_WITHIN_S, f"not seen within {SEEN_WITHIN_S} s"
        time.sleep(0.005)
    return time.time() - since


def cached(api: Api, user: dict[str, Any], by: str) -> None:
    """Read until the answer comes from the cache."""
    until(lambda: api.read(user, by)[0] == "HIT", f"a cached answer by {by}", 10)


def display_name(api: Api, user_id: int) -> str | None:
    reply = api.session.get(f"{api.url}/users/{user_id}", timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()["data"]["display_name"]


def new_name() -> str:
    return f"s{uuid.uuid4().hex[:10]}"


def in_reader(reader: Container, code: str) -> Any:
    """Run `code` with the service image's Python inside a stream container; its stdout as JSON."""
    result = reader.exec_run(["python", "-c", textwrap.dedent(code)])
    assert result.exit_code == 0, result.output.decode(errors="replace")
    return json.loads(result.output)


def test_the_stream_role_reads_its_slot_over_tls_and_may_do_nothing_else(
    docker_client: docker.DockerClient, monitored: Project, postgres: Container
) -> None:
    [(superuser, createdb, createrole, replication, bypassrls, owns)] = psql(
        postgres,
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, "
        f"(SELECT count(*) FROM pg_class WHERE relowner = r.oid) FROM pg_roles r "
        f"WHERE rolname = '{DB_STREAM}'")
    assert [superuser, createdb, createrole, replication, bypassrls, owns] == [
        "f", "f", "f", "t", "f", "0"]
    [rights] = psql(postgres, "SELECT " + ", ".join(
        f"has_table_privilege('{DB_STREAM}', '{table}', '{right}')"
        for table in ("users", "cache_namespace") for right in ("SELECT", "INSERT", "UPDATE",
                                                               "DELETE", "TRUNCATE")))
    assert rights == ["t", "f", "f", "f", "f"] * 2
    reading(docker_client, monitored, postgres)
    sessions = psql(postgres, "SELECT a.backend_type, s.ssl, s.version FROM pg_stat_activity a "
                              f"JOIN pg_stat_ssl s USING (pid) WHERE a.usename = '{DB_STREAM}'")
    assert "walsender" in {kind for kind, *_ in sessions}, sessions
    assert {(ssl, version) for _, ssl, version in sessions} == {("t", "TLSv1.3")}, sessions
    attempts = in_reader(readers(docker_client, monitored)[0], f"""
        import json, psycopg2
        password = open("/run/secrets/postgres_stream_password").read().strip()
        login = f"host=postgres user={DB_STREAM} password={{password}} connect_timeout=5"
        tls = "sslmode=verify-full sslrootcert=/run/secrets/ca.crt"
        def attempt(dsn, sql=None):
            try:
                with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
                    if sql:
                        cur.execute(sql)
                return "done"
            except psycopg2.Error as exc:
                return str(exc).strip().splitlines()[0]
        print(json.dumps({{
            "read over tls": attempt(f"{{login}} dbname={DB_NAME} {{tls}}",
                                     "SELECT count(*) FROM users"),
            "write": attempt(f"{{login}} dbname={DB_NAME} {{tls}}",
                             "UPDATE users SET display_name = 'x' WHERE false"),
            "create a table": attempt(f"{{login}} dbname={DB_NAME} {{tls}}",
                                      "CREATE TABLE mine (x int)"),
            "in plain text": attempt(f"{{login}} dbname={DB_NAME} sslmode=disable"),
            "another database": attempt(f"{{login}} dbname=postgres {{tls}}"),
            "physical replication": attempt(f"{{login}} dbname={DB_NAME} replication=true {{tls}}"),
        }}))
        """)
    assert attempts.pop("read over tls") == "done"
    assert attempts.pop("write").startswith("permission denied for table users")
    assert attempts.pop("create a table").startswith("permission denied for schema public")
    for what, error in attempts.items():
        assert "no pg_hba.conf entry" in error, (what, error)


def test_an_update_by_plain_sql_is_seen_through_the_proxy_within_a_second(
    api: Api, postgres: Container
) -> None:
    user = api.create(new_name())
    cached(api, user, "id")
    since = committed_at(postgres, "UPDATE users SET display_name = 'Changed by psql' "
                                   f"WHERE id = {user['id']}")
    took = seen_after(since, lambda: display_name(api, user["id"]) == "Changed by psql")
    print(f"\nan UPDATE by psql was seen through the proxy {took * 1000:.0f} ms after it committed")


def test_a_rename_and_an_insert_under_names_cached_as_nobody_are_seen_within_a_second(
    api: Api, postgres: Container
) -> None:
    user = api.create(new_name())
    cached(api, user, "username")
    renamed = {**user, "username": new_name()}
    cached(api, renamed, "username")  # "nobody" has that name, for now
    since = committed_at(postgres, f"UPDATE users SET username = '{renamed['username']}' "
                                   f"WHERE id = {user['id']}")
    took = seen_after(since, lambda: api.read(user, "username")[1] == []
                      and [u["id"] for u in api.read(renamed, "username")[1]] == [user["id"]])
    print(f"\na rename by psql was seen {took * 1000:.0f} ms after it committed")
    ghost = {"username": new_name()}
    ghost["email"] = f"{ghost['username']}@example.org"
    cached(api, ghost, "username")
    cached(api, ghost, "email")
    since = committed_at(postgres, "INSERT INTO users (username, email) VALUES "
                                   f"('{ghost['username']}', '{ghost['email']}')")
    took = seen_after(since, lambda: all(
        [u["username"] for u in api.read(ghost, by)[1]] == [ghost["username"]]
        for by in ("username", "email")))
    print(f"an INSERT by psql under names cached as nobody was seen {took * 1000:.0f} ms after")


def watch_takeover(postgres: Container, walsender: str) -> Iterator[bytes]:
    """A psql inside Postgres that says `watching`, then waits until another walsender than
    `walsender` has the slot and says when (Postgres's clock, the host's): its output as it
    comes."""
    api = postgres.client.api
    command = ["psql", "-U", "postgres", "-d", DB_NAME, "-qc", f"""
        DO $$ DECLARE deadline timestamptz := clock_timestamp() + interval '60 s';
        BEGIN
            RAISE NOTICE 'watching';
            WHILE NOT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = '{SLOT}'
                              AND active_pid IS NOT NULL AND active_pid <> {walsender}) LOOP
                IF clock_timestamp() > deadline THEN RAISE EXCEPTION 'no takeover'; END IF;
                PERFORM pg_sleep(0.005);
            END LOOP;
            RAISE NOTICE 'taken at %', extract(epoch FROM clock_timestamp());
        END $$"""]
    exec_id = api.exec_create(postgres.id, command, user=postgres.attrs["Config"]["User"])["Id"]
    return iter(api.exec_start(exec_id, stream=True))


KILLS = 3  # readers killed one after the other, each while changes stream
CHANGES = 600  # one commit every 50 ms: longer than the kills take


def ready(reader: Container) -> bool:
    """The reader runs and has taken its turn (its /readyz)."""
    reader.reload()
    return reader.status == "running" and reader.exec_run(
        ["python", "-m", "service.probe", "/readyz"]).exit_code == 0


def kill_the_reader(client: docker.DockerClient, monitored: Project,
                    postgres: Container) -> tuple[Container, float]:
    """SIGKILL the reader that has the slot while the other stands by; it and the seconds until
    another reader had the slot (Postgres's clock, the host's)."""
    until(lambda: all(ready(r) for r in readers(client, monitored)), "both readers ready",
          DEADLINE_S)
    victim = reading(client, monitored, postgres)
    walsender, _ = slot_reader(postgres) or ("", "")
    watcher = watch_takeover(postgres, walsender)
    said = b""
    while b"watching" not in said:
        said += next(watcher)
    killed_at = time.time()
    victim.kill(signal="SIGKILL")
    said += b"".join(watcher)
    assert b"taken at " in said, said.decode(errors="replace")
    return victim, float(said.split(b"taken at ")[1].split()[0]) - killed_at


def test_a_reader_killed_mid_stream_is_taken_over_and_no_change_is_missed(
    docker_client: docker.DockerClient, monitored: Project, api: Api, postgres: Container
) -> None:
    users = [api.create(new_name()) for _ in range(60)]
    for user in users:
        cached(api, user, "id")
    ids = ", ".join(str(u["id"]) for u in users)
    # Change n renames user n mod 60 'after n', one commit every 50 ms, whatever the readers do.
    writer = threading.Thread(target=psql, args=(postgres, f"""
        DO $$ DECLARE ids bigint[] := ARRAY[{ids}];
        BEGIN
            FOR n IN 0..{CHANGES - 1} LOOP
                UPDATE users SET display_name = 'after ' || n
                 WHERE id = ids[n % array_length(ids, 1) + 1];
                COMMIT;
                PERFORM pg_sleep(0.05);
            END LOOP;
        END $$"""))
    writer.start()
    last = (f"SELECT coalesce(max(split_part(display_name, ' ', 2)::int), -1) FROM users "
            f"WHERE id IN ({ids}) AND display_name LIKE 'after %'")
    takeovers = []
    for _ in range(KILLS):
        victim, took = kill_the_reader(docker_client, monitored, postgres)
        heir = reading(docker_client, monitored, postgres)
        assert heir.id != victim.id
        written = int(psql(postgres, last)[0][0]) + 1
        assert written < CHANGES, "the changes ended before the reader was killed"
        takeovers.append(took)
        print(f"\nthe other reader had the slot {took:.2f} s after its reader was SIGKILLed "
              f"({written} of {CHANGES} changes committed)")
        victim.reload()
        if victim.status != "running":  # Docker leaves a container that was killed stopped
            victim.start()
    writer.join(DEADLINE_S)
    assert int(psql(postgres, last)[0][0]) == CHANGES - 1, "the writer did not finish"
    print(f"takeovers: {', '.join(f'{t:.2f}' for t in takeovers)} s")
    # Everything committed is confirmed, so its invalidations were acknowledged by Redis.
    [[end]] = psql(postgres, "SELECT pg_current_wal_lsn()")
    until(lambda: psql(postgres, f"SELECT confirmed_flush_lsn >= '{end}' FROM "
                                 f"pg_replication_slots WHERE slot_name = '{SLOT}'") == [["t"]],
          "the changes confirmed", DEADLINE_S)
    names = dict(psql(postgres, f"SELECT id, display_name FROM users WHERE id IN ({ids})"))
    stale = [u["id"] for u in users if display_name(api, u["id"]) != names[str(u["id"])]]
    assert stale == []


def cache_epoch(monitored: Project, postgres: Container, redis: Container) -> str:
    [[namespace]] = psql(postgres, "SELECT value FROM cache_namespace")
    code, epoch = redis_cli(redis, "admin", "GET", f"cs:1:{namespace}:epoch")
    assert code == 0, epoch
    return epoch


def test_a_slot_dropped_behind_the_readers_back_begins_a_new_epoch_and_serves_nothing_stale(
    docker_client: docker.DockerClient, monitored: Project, api: Api, postgres: Container
) -> None:
    redis = container(docker_client, monitored, "redis")
    user = api.create(new_name())
    cached(api, user, "id")
    reading(docker_client, monitored, postgres)
    before = cache_epoch(monitored, postgres, redis)
    # The readers take the slot again within a second of losing it: the walsender is ended
    # and the slot dropped until the drop wins; the change after it is lost to any new slot.
    dropped_at = time.time()
    psql(postgres, f"""
        DO $$ BEGIN
            LOOP
                PERFORM pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots
                 WHERE slot_name = '{SLOT}' AND active_pid IS NOT NULL;
                BEGIN
                    PERFORM pg_drop_replication_slot('{SLOT}');
                    EXIT;
                EXCEPTION WHEN object_in_use THEN
                END;
            END LOOP;
        END $$""")
    psql(postgres, f"UPDATE users SET display_name = 'lost to the stream' WHERE id = {user['id']}")
    took = until(lambda: cache_epoch(monitored, postgres, redis) != before, "a new epoch",
                 DEADLINE_S, interval=0.02)
    print(f"\na dropped slot began a new cache epoch {time.time() - dropped_at:.2f} s after the "
          f"drop ({took:.2f} s after the change it lost)")
    assert display_name(api, user["id"]) == "lost to the stream"
    logs = b"".join(r.logs() for r in readers(docker_client, monitored)).decode()
    assert "the replication slot was made anew; the cache begins a new epoch" in logs
    reading(docker_client, monitored, postgres)


def test_prometheus_scrapes_both_readers_and_records_the_lag(
    monitored: Project, api: Api, postgres: Container
) -> None:
    port = monitored.prometheus  # type: ignore[attr-defined]
    until(lambda: [r["value"][1] for r in query(port, 'up{job="stream"}')] == ["1", "1"],
          "both readers scraped", DEADLINE_S, interval=1)
    for rule in ("cachestack:stream_lag_seconds:p50_1m", "cachestack:stream_lag_seconds:p99_1m",
                 "cachestack:stream_changes:rate1m"):
        def recorded(rule: str = rule) -> bool:
            user = api.create(new_name())
            psql(postgres, f"UPDATE users SET display_name = 'watched' WHERE id = {user['id']}")
            found = query(port, rule)
            return bool(found) and float(found[0]["value"][1]) > 0
        until(recorded, rule, DEADLINE_S, interval=1)
    [p99] = query(port, "cachestack:stream_lag_seconds:p99_1m")
    print(f"\nPrometheus: the stream's p99 lag over the last minute {float(p99['value'][1]):.3f} s")


def test_status_says_whether_the_stream_is_read_and_how_far_behind(
    docker_client: docker.DockerClient, monitored: Project, postgres: Container
) -> None:
    reading(docker_client, monitored, postgres)
    result = monitored.run("status")
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("change stream:")]
    assert line.startswith("change stream: live, ") and line.endswith(" bytes of WAL behind")
    stopped = [r for r in readers(docker_client, monitored) if r.status == "running"]
    for reader in stopped:
        reader.stop(timeout=10)
    try:
        until(lambda: psql(postgres, "SELECT active FROM pg_replication_slots "
                                     f"WHERE slot_name = '{SLOT}'") == [["f"]],
              "the slot let go", DEADLINE_S)
        result = monitored.run("status")
        assert result.returncode == 0, result.stderr
        assert "change stream: NOT READ: no reader has the slot" in result.stdout
    finally:
        for reader in stopped:
            reader.start()
    reading(docker_client, monitored, postgres)

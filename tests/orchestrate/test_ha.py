"""`up --ha`: Postgres as a Patroni cluster of three members with three etcd members, on one
stack brought up once; the tests run in file order on it. First what it is (a synchronous
cluster; who may reach what), then its faults under load (tests/outage.py: versioned updates,
creates and reads through the proxy, each read judged as bench/consistency.py judges it), then
the day-2 commands. Each fault must leave no stale read, no acknowledged create lost, and no
failure but 503s; the figures are printed for bench/RESULTS.md."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator

import docker
import pytest
from docker.models.containers import Container

from orchestrate import engine, patroni
from orchestrate.errors import OrchestrateError
from orchestrate.secretfiles import api_token, read_secret
from orchestrate.stack import (
    ETCD_MEMBERS,
    PATRONI_MEMBERS,
    PROJECT_LABEL,
    SERVICE_LABEL,
    STREAM_SLOT,
    describe_stack,
)
from tests.outage import Outcome, UnderLoad
from tests.steady_load import SteadyLoad
from tests.stores import psql
from tests.support import free_port

from .helpers import (
    Project,
    absent,
    backed_up,
    container,
    database_oid,
    derived_image,
    kill_main_process,
    not_as_written,
    one_line_error,
    sweep,
    until,
)

PAUSE_S = 20  # how long the leader stops answering: the fault itself, not a wait
WRITE_OUTAGE_S = 15.0  # the longest a write may wait for a new leader (the target)
# The share of reads of cached users answered, a failover's included (the target):
# the change stream begins a new cache epoch on the new leader's timeline, so the users cached
# before are read from Postgres again, which the pools must have found by then.
CACHED_FLOOR = 0.99


@pytest.fixture(scope="module")
def ha(docker_client: docker.DockerClient, images_mode: str) -> Iterator[Project]:
    project = Project(f"ct{uuid.uuid4().hex[:8]}", free_port(), images_mode)
    try:
        started = time.monotonic()
        result = project.run("up", "--ha")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        print(f"up --ha: {time.monotonic() - started:.1f} s "
              f"({result.stdout.strip().splitlines()[-1]})")
        yield project
    finally:
        project.run("down", "--volumes", timeout=120)
        sweep(docker_client, project.name)


def members(client: docker.DockerClient, project: Project) -> dict[str, patroni.Member]:
    return {m.name: m for m in patroni.cluster(client, project.name)}


def with_role(client: docker.DockerClient, project: Project, role: str) -> Container:
    [name] = [m.name for m in members(client, project).values() if m.role == role and m.up]
    return container(client, project, name)


def holds(check: Callable[[dict[str, patroni.Member]], bool], client: docker.DockerClient,
          project: Project) -> bool:
    """Whether `check` holds of the cluster; not while no member can tell (etcd away)."""
    try:
        return check(members(client, project))
    except OrchestrateError:
        return False


def settled(client: docker.DockerClient, project: Project) -> None:
    """Until every member streams again and the leader has a synchronous standby."""
    until(lambda: holds(lambda ms: len(ms) == len(PATRONI_MEMBERS)
                        and all(m.up for m in ms.values())
                        and any(m.role == patroni.SYNC_STANDBY for m in ms.values()),
                        client, project), "every member back, with a synchronous standby", 180)


def replicas_warnings(client: docker.DockerClient, project: Project, since: int) -> list[str]:
    """What the service's replicas warned of since `since` (epoch seconds): why a request
    failed, for the failure's message."""
    replicas = client.containers.list(ignore_removed=True, filters={"label": [
        f"{PROJECT_LABEL}={project.name}", f"{SERVICE_LABEL}=service"]})
    return [f"{replica.name}: {line}" for replica in replicas
            for line in replica.logs(since=since).decode(errors="replace").splitlines()
            if " WARNING " in line or " ERROR " in line]


def lead_handed_over_under(load: SteadyLoad) -> None:
    """A planned handover under load: no read fails, and a write fails only with a 503, at most
    one in a hundred requests: a write whose wait for a leader outlasts the pool's 3 s on a busy
    host, or whose commit was cut while it waited for the synchronous standby ("committed
    locally, but might not have been replicated"), which must not be acknowledged."""
    refused = [failure for failure in load.failures
               if failure.what.split()[0] in ("POST", "PATCH", "DELETE")
               and " -> 503 " in failure.what]
    assert [failure for failure in load.failures if failure not in refused] == []
    assert len(refused) <= load.requests_sent / 100, refused


def writable(postgres: Container) -> bool:
    """Whether `postgres` takes writes (False too while it restarts)."""
    try:
        return psql(postgres, "SELECT pg_is_in_recovery()") == [["f"]]
    except AssertionError:
        return False


def judged(client: docker.DockerClient, project: Project, load: UnderLoad,
           what: str) -> Outcome:
    outcome = load.outcome()
    print(f"{what}: {outcome.summary()}")
    assert outcome.violations == [], outcome.violations[:5]
    assert outcome.failures == [], outcome.failures[:5]
    assert outcome.cached_share >= CACHED_FLOOR
    database = patroni.database(client, project.name)
    assert absent(database, outcome.created) == []
    assert not_as_written(database, outcome.final) == []
    return outcome


def test_up_ha_makes_a_synchronous_cluster_and_status_shows_it(
        docker_client: docker.DockerClient, ha: Project) -> None:
    cluster = members(docker_client, ha)
    assert sorted(cluster) == sorted(PATRONI_MEMBERS)
    assert sorted(m.role for m in cluster.values()) == ["leader", "replica", "sync_standby"]
    status = ha.run("status")
    assert status.returncode == 0, status.stderr
    for member in cluster.values():
        assert f"{member.name}   {member.role}" in status.stdout
    leader = with_role(docker_client, ha, patroni.LEADER)
    [(names,)] = psql(leader, "SHOW synchronous_standby_names")
    assert [m.name for m in cluster.values() if m.role == patroni.SYNC_STANDBY][0] in names


def logical_slots(postgres: Container, where: str = "true") -> set[str]:
    return {row[0] for row in psql(postgres, "SELECT slot_name FROM pg_replication_slots "
                                             f"WHERE slot_type = 'logical' AND {where}")}


def stream_read_on_the_leader(client: docker.DockerClient, project: Project) -> None:
    """Until a reader of the change stream reads its slot on whichever member leads."""
    until(lambda: STREAM_SLOT in logical_slots(patroni.database(client, project.name), "active"),
          "the change stream read on the leader", 60)


def test_patroni_leaves_the_change_streams_slot_alone(
        docker_client: docker.DockerClient, ha: Project) -> None:
    """The stream's readers make its slot on the leader. Patroni drops the slots it does not
    manage whenever it (re)starts Postgres, as the former leader of a switchover does, but this
    one it keeps (ignore_slots); the readers follow the lead to the new leader."""
    stream_read_on_the_leader(docker_client, ha)
    leader = with_role(docker_client, ha, patroni.LEADER)
    psql(leader, "SELECT pg_create_logical_replication_slot('stranger', 'pgoutput')")
    assert ha.run("switchover").returncode == 0
    until(lambda: "stranger" not in logical_slots(leader), "Patroni's clean-up of the stranger", 60)
    assert logical_slots(leader) == {STREAM_SLOT}
    stream_read_on_the_leader(docker_client, ha)
    psql(leader, f"SELECT pg_drop_replication_slot('{STREAM_SLOT}')")  # the former leader's copy


def test_nothing_of_patroni_or_etcd_answers_the_service_without_credentials(
        docker_client: docker.DockerClient, ha: Project) -> None:
    """From a replica of the service (the network it shares with the members): etcd is not
    even reachable, and Patroni's REST API refuses a client without a certificate of the
    project CA. Inside a member, the replication role may not log in to the database, nor the
    runtime role replicate."""
    replica = container(docker_client, ha, "service")
    probe = ("import socket, ssl\n"
             "try:\n    socket.create_connection(('etcd-1', 2379), timeout=3)\n"
             "    print('etcd reachable')\n"
             "except OSError:\n    print('etcd unreachable')\n"
             "context = ssl.create_default_context(cafile='/run/secrets/ca.crt')\n"
             "try:\n    with socket.create_connection(('postgres-1', 8008), timeout=3) as raw:\n"
             "        tls = context.wrap_socket(raw, server_hostname='postgres-1')\n"
             "        tls.sendall(b'GET /cluster HTTP/1.0\\r\\n\\r\\n')\n"
             "        print('api answered', tls.recv(100)[:12])\n"
             "except (ssl.SSLError, OSError) as exc:\n"
             "    print('api refused', type(exc).__name__)\n")
    result = replica.exec_run(["python", "-c", probe])
    output = result.output.decode()
    assert "etcd unreachable" in output and "api refused" in output, output
    member = container(docker_client, ha, PATRONI_MEMBERS[0])
    for login in ("user=cachestack_replication dbname=cachestack",
                  "user=cachestack_app dbname=replication replication=true"):
        refused = member.exec_run(["psql", f"host=postgres-2 sslmode=verify-full "
                                   f"sslrootcert=/run/secrets/ca.crt {login} connect_timeout=5",
                                   "-c", "SELECT 1"], user="999:999", environment={})
        assert refused.exit_code != 0 and b"no pg_hba.conf entry" in refused.output, refused


def test_no_secret_of_the_members_is_in_their_configuration_or_logs(
        docker_client: docker.DockerClient, ha: Project) -> None:
    stack = describe_stack(ha.name, ha=True)
    values = [read_secret(name) for name in stack.secrets if not name.endswith(".crt")]
    for name in (*PATRONI_MEMBERS, *ETCD_MEMBERS):
        found = container(docker_client, ha, name)
        seen = json.dumps(found.attrs) + found.logs().decode(errors="replace")
        assert not [v for v in values if v in seen], name


def test_the_leader_killed(docker_client: docker.DockerClient, ha: Project) -> None:
    victim = with_role(docker_client, ha, patroni.LEADER)
    with UnderLoad(ha.url, api_token()) as load:
        load.until_writes(200)
        kill_main_process(victim)
        until(lambda: victim.reload() or victim.attrs["RestartCount"] >= 1, "the restart")
        load.until_writes(300)
    outcome = judged(docker_client, ha, load, "leader's main process killed")
    assert outcome.longest_write_gap <= WRITE_OUTAGE_S
    settled(docker_client, ha)
    stream_read_on_the_leader(docker_client, ha)
    assert "change stream: live" in ha.run("status").stdout


def test_the_leader_paused_comes_back_as_a_replica(
        docker_client: docker.DockerClient, ha: Project) -> None:
    """The leader stops answering (its container frozen) for longer than its lead lasts: a
    replica takes over; the old leader, let go, must accept nothing more (whatever it took
    while cut off is never acknowledged) and come back as a replica."""
    victim = with_role(docker_client, ha, patroni.LEADER)
    with UnderLoad(ha.url, api_token()) as load:
        load.until_writes(200)
        print(f"leader paused at {load.elapsed():.1f} s of the load")
        victim.pause()
        try:
            time.sleep(PAUSE_S)
        finally:
            victim.unpause()
        load.until_writes(300)
        name = victim.labels[SERVICE_LABEL]
        until(lambda: holds(lambda ms: ms[name].role != patroni.LEADER and ms[name].up,
                            docker_client, ha), "the old leader back as a replica", 120)
    outcome = judged(docker_client, ha, load, f"leader paused {PAUSE_S} s")
    assert outcome.longest_write_gap < PAUSE_S  # a replica took over before the leader thawed
    settled(docker_client, ha)


def test_the_synchronous_standby_killed(docker_client: docker.DockerClient,
                                        ha: Project) -> None:
    victim = with_role(docker_client, ha, patroni.SYNC_STANDBY)
    with UnderLoad(ha.url, api_token()) as load:
        load.until_writes(200)
        kill_main_process(victim)
        load.until_writes(300)
    judged(docker_client, ha, load, "synchronous standby killed")
    settled(docker_client, ha)


def test_an_etcd_member_killed(docker_client: docker.DockerClient, ha: Project) -> None:
    victim = container(docker_client, ha, ETCD_MEMBERS[0])
    with UnderLoad(ha.url, api_token()) as load:
        load.until_writes(200)
        kill_main_process(victim)
        until(lambda: victim.reload() or victim.attrs["RestartCount"] >= 1, "the restart")
        load.until_writes(300)
    outcome = judged(docker_client, ha, load, "one etcd member killed")
    assert outcome.longest_write_gap < 5
    settled(docker_client, ha)


def test_two_etcd_members_away_stop_the_writes_until_one_returns(
        docker_client: docker.DockerClient, ha: Project) -> None:
    """No quorum: Patroni cannot tell who leads, so the leader steps down, writes get 503
    (never a 500, nothing acknowledged lost), cached reads go on; one member back, and a
    leader is elected again, on a new timeline: a failover for the cache (a new epoch)."""
    victims = [container(docker_client, ha, name) for name in ETCD_MEMBERS[:2]]
    try:
        with UnderLoad(ha.url, api_token()) as load:
            load.until_writes(200)
            for victim in victims:
                victim.stop(timeout=5)
            running = patroni.running_members(docker_client, ha.name)

            def stepped_down() -> bool:
                """No member takes writes, seen twice a second apart: a look that fails (a
                member stopping, or a `docker exec` that failed under load) counts as not
                writable."""
                if any(writable(member) for member in running):
                    return False
                time.sleep(1)
                return not any(writable(member) for member in running)

            until(stepped_down, "the leader stepping down", 60)
            written = load.acknowledged_writes()
            time.sleep(3)  # how long the writes are watched failing: the fault, not a wait
            assert load.acknowledged_writes() == written
            victims[0].start()
            load.until_writes(300)
        outcome = judged(docker_client, ha, load, "two etcd members stopped, then one back")
        assert outcome.statuses.get("503", 0) > 0
    finally:  # whatever failed, the tests after this one find etcd whole
        for victim in victims:
            victim.reload()
            if victim.status != "running":
                victim.start()
    settled(docker_client, ha)


def test_switchover_hands_the_lead_to_the_synchronous_standby(
        docker_client: docker.DockerClient, ha: Project) -> None:
    settled(docker_client, ha)
    leader = with_role(docker_client, ha, patroni.LEADER).labels[SERVICE_LABEL]
    standby = with_role(docker_client, ha, patroni.SYNC_STANDBY).labels[SERVICE_LABEL]
    [other] = set(PATRONI_MEMBERS) - {leader, standby}
    assert one_line_error(ha.run("switchover", "--to", leader)) == f"error: {leader} leads already"
    assert "not the synchronous standby" in one_line_error(ha.run("switchover", "--to", other))
    assert members(docker_client, ha)[leader].role == patroni.LEADER  # refused: nothing done
    with SteadyLoad(ha.url, api_token) as load:
        time.sleep(2)
        result = ha.run("switchover")
        time.sleep(2)
    assert result.returncode == 0, result.stderr
    print(f"switchover under load: {load.requests_sent} requests, {len(load.failures)} failed; "
          f"{result.stdout.strip()}")
    lead_handed_over_under(load)
    assert members(docker_client, ha)[standby].role == patroni.LEADER


def test_rotate_under_load_fails_no_request(docker_client: docker.DockerClient,
                                            ha: Project) -> None:
    started = int(time.time())
    with SteadyLoad(ha.url, api_token) as load:
        time.sleep(2)
        result = ha.run("rotate")
        time.sleep(2)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    print(f"rotate under load: {load.requests_sent} requests, {len(load.failures)} failed; "
          f"{result.stdout.strip().splitlines()[-1]}")
    assert load.failures == [], (result.stdout, replicas_warnings(docker_client, ha, started))
    settled(docker_client, ha)


def test_backup_and_restore_use_the_leader(docker_client: docker.DockerClient,
                                           ha: Project) -> None:
    with SteadyLoad(ha.url, api_token) as load:
        time.sleep(1)
        dump = backed_up(ha)
        time.sleep(1)
    assert load.failures == []
    leader = patroni.database(docker_client, ha.name)
    before = database_oid(leader)
    result = ha.run("restore", str(dump), "--yes")
    assert result.returncode == 0, [line for line in result.stderr.splitlines()
                                    if not line.lstrip().startswith("|")][-10:]
    leader = patroni.database(docker_client, ha.name)
    assert database_oid(leader) != before
    replica = with_role(docker_client, ha, patroni.SYNC_STANDBY)
    until(lambda: database_oid(replica) == database_oid(leader), "the restore on the replicas")


def test_a_new_member_image_rolls_over_the_members_without_a_failed_request(
        docker_client: docker.DockerClient, ha: Project) -> None:
    stack = describe_stack(ha.name, ha.port, ha=True)
    refs = {stack.service(c.labels[SERVICE_LABEL]).image: c.image.id
            for c in docker_client.containers.list(ignore_removed=True, filters={
                "label": f"org.cachestack.project={ha.name}"})}
    refs["patroni"] = derived_image(docker_client, refs["patroni"], f"cachestack/patroni:{ha.name}")
    with SteadyLoad(ha.url, api_token) as load:
        time.sleep(2)
        started = time.monotonic()
        engine.realise(docker_client, stack, refs, {})
        took = time.monotonic() - started
        time.sleep(2)
    print(f"rolling update of the members under load: {took:.1f} s, {load.requests_sent} "
          f"requests, {len(load.failures)} failed")
    lead_handed_over_under(load)
    assert {container(docker_client, ha, name).image.id for name in PATRONI_MEMBERS} == {
        refs["patroni"]}

"""The distributed job queue on a real redis-server (loopback, started by the test module)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import SecretStr

from radai.config import ScaleOutSettings
from radai.domain import Priority
from radai.errors import ConfigError
from radai.storage.redis_streams import GROUP, Delivery, JobMessage, JobStreams, default_consumer_name
from tests.radai.redis_server import RedisServer, missing_reason, run_redis

pytestmark = pytest.mark.skipif(missing_reason() is not None, reason=str(missing_reason()))

MODEL = "lung"
IDLE_S = 0.3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with run_redis(Path(tmp_path_factory.mktemp("redis"))) as running:
        yield running


@pytest.fixture(autouse=True)
def client(server: RedisServer) -> Iterator[redis.Redis]:
    c = server.client()
    c.flushall()  # every test starts from an empty Redis
    yield c
    c.close()


def streams(server: RedisServer, consumer: str, claim_idle_s: float = IDLE_S, **kwargs: int) -> JobStreams:
    """A worker or receiver with its own connection pool, as separate processes would have."""
    return JobStreams(server.client(), "radai", consumer, claim_idle_s, **kwargs)


def entries(client: redis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of a stream, as the bytes-typed client returns them."""
    found: Any = client.xrange(key)
    return list(found)


def job(n: int, model_key: str = "lung@1") -> JobMessage:
    return JobMessage(
        job_id=f"job-{n:04d}",
        study_uid=f"1.2.826.0.1.3680043.8.498.{n}",
        series_uid=f"1.2.826.0.1.3680043.8.498.{n}.1",
        model_key=model_key,
        priority=Priority.STAT if n % 2 else Priority.ROUTINE,
        instances=(f"spool/{n}/a.dcm", f"spool/{n}/b.dcm"),
        enqueued_at=1_700_000_000.25 + n,
    )


def test_published_job_is_taken_acknowledged_and_trimmed(server: RedisServer, client: redis.Redis) -> None:
    receiver, worker = streams(server, "receiver-1"), streams(server, "worker-1")
    assert receiver.publish(MODEL, job(1))
    groups = client.xinfo_groups("radai:jobs:lung")  # the names the Helm chart's KEDA trigger uses
    assert [g["name"] for g in groups] == [GROUP.encode()]

    [delivery] = worker.take([MODEL], block_ms=0)
    assert delivery.message == job(1)
    assert (delivery.model_id, delivery.delivery_count) == (MODEL, 1)
    assert worker.pending(MODEL) == 1
    assert worker.ack(delivery)
    assert not worker.ack(delivery)
    assert worker.pending(MODEL) == 0
    assert client.xlen("radai:jobs:lung") == 0
    assert worker.take([MODEL], block_ms=50) == []


def test_same_job_published_twice_is_queued_once(server: RedisServer, client: redis.Redis) -> None:
    receiver = streams(server, "receiver-1")
    assert receiver.publish(MODEL, job(1))
    assert not receiver.publish(MODEL, job(1))
    assert client.xlen("radai:jobs:lung") == 1
    assert receiver.forget(job(1).job_id)
    assert receiver.publish(MODEL, job(1))  # an explicit re-run after forget
    assert client.xlen("radai:jobs:lung") == 2


def test_concurrent_receivers_queue_each_job_once(server: RedisServer, client: redis.Redis) -> None:
    receivers = [streams(server, f"receiver-{i}") for i in range(2)]
    accepted: list[list[str]] = [[], []]
    barrier = threading.Barrier(2)

    def publish_all(i: int) -> None:
        barrier.wait()
        for n in range(40):
            if receivers[i].publish(MODEL, job(n)):
                accepted[i].append(job(n).job_id)

    threads = [threading.Thread(target=publish_all, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(accepted[0] + accepted[1]) == [job(n).job_id for n in range(40)]
    assert client.xlen("radai:jobs:lung") == 40


def test_two_workers_share_a_stream_without_getting_the_same_job(server: RedisServer) -> None:
    receiver = streams(server, "receiver-1")
    for n in range(60):
        receiver.publish(MODEL, job(n))
    done: list[list[str]] = [[], []]

    def work(i: int) -> None:
        worker = streams(server, f"worker-{i}")
        while deliveries := worker.take([MODEL], block_ms=0, count=1 + i):
            for d in deliveries:
                done[i].append(d.message.job_id)
                assert worker.ack(d)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(done[0] + done[1]) == [job(n).job_id for n in range(60)]
    assert not set(done[0]) & set(done[1])
    assert receiver.pending(MODEL) == 0 and receiver.lag(MODEL) == 0


def test_job_of_a_dead_worker_is_reclaimed_by_another_after_the_idle_timeout(server: RedisServer) -> None:
    idle_s = 1.0  # the "not yet" check below must not outlast it even on a loaded machine
    streams(server, "receiver-1").publish(MODEL, job(7))
    dead, alive = streams(server, "worker-dead", idle_s), streams(server, "worker-alive", idle_s)
    [taken] = dead.take([MODEL], block_ms=0)  # ...and the worker dies: no ack, no touch

    assert alive.take([MODEL], block_ms=0) == []  # not idle long enough yet
    time.sleep(idle_s + 0.1)
    [reclaimed] = alive.take([MODEL], block_ms=0)
    assert reclaimed.message.job_id == taken.message.job_id == job(7).job_id
    assert reclaimed.entry_id == taken.entry_id
    assert reclaimed.delivery_count == 2
    assert alive.reclaimed_total() == {MODEL: 1}
    assert not dead.touch(taken)  # a worker that was only slow learns it lost the job
    assert alive.ack(reclaimed)
    assert not dead.ack(taken)  # ...and its late ack changes nothing
    assert alive.pending(MODEL) == 0


def test_touch_keeps_a_long_job_from_being_reclaimed(server: RedisServer) -> None:
    idle_s = 1.2
    streams(server, "receiver-1").publish(MODEL, job(3))
    busy, other = streams(server, "worker-busy", idle_s), streams(server, "worker-other", idle_s)
    [running] = busy.take([MODEL], block_ms=0)
    deadline = time.monotonic() + 2 * idle_s
    while time.monotonic() < deadline:  # long inference: touch every idle_s / 6
        assert busy.touch(running)
        assert other.take([MODEL], block_ms=0) == []
        time.sleep(idle_s / 6)
    time.sleep(idle_s + 0.1)  # the worker stops touching (it died)
    [reclaimed] = other.take([MODEL], block_ms=0)
    assert reclaimed.message.job_id == job(3).job_id


def test_touch_does_not_reset_the_delivery_count(server: RedisServer) -> None:
    streams(server, "receiver-1").publish(MODEL, job(3))
    worker = streams(server, "worker-1")
    [running] = worker.take([MODEL], block_ms=0)
    for _ in range(3):
        assert worker.touch(running)
    [info] = worker.client.xpending_range("radai:jobs:lung", GROUP, min="-", max="+", count=10)
    assert info["times_delivered"] == 1


def test_job_that_kills_every_worker_goes_to_the_dead_letters(
    server: RedisServer, client: redis.Redis
) -> None:
    idle_s = 0.2
    receiver = streams(server, "receiver-1")
    receiver.publish(MODEL, job(1))  # the poison job
    receiver.publish(MODEL, job(2))
    [first] = streams(server, "worker-0", idle_s, max_reclaims=2).take([MODEL], block_ms=0)
    assert first.message.job_id == job(1).job_id
    counts = []
    for i in range(1, 3):  # each worker takes it and dies
        time.sleep(idle_s + 0.05)
        [again] = streams(server, f"worker-{i}", idle_s, max_reclaims=2).take([MODEL], block_ms=0)
        assert again.message.job_id == job(1).job_id
        counts.append(again.delivery_count)
    assert counts == [2, 3]
    time.sleep(idle_s + 0.05)
    last = streams(server, "worker-3", idle_s, max_reclaims=2)
    [healthy] = last.take([MODEL], block_ms=0)  # the third reclaim exceeds max_reclaims=2
    assert healthy.message.job_id == job(2).job_id
    assert last.dead_lettered_total() == {MODEL: 1}
    assert last.dead_letters(MODEL) == 1
    [(_, dead)] = entries(client, "radai:dead:lung")
    assert dead[b"job_id"] == job(1).job_id.encode()
    assert dead[b"dead_deliveries"] == b"4"
    assert dead[b"dead_reason"] == b"reclaimed 3 times"
    assert JobMessage.from_fields(dead) == job(1)  # the original fields are kept for a re-run
    assert last.pending(MODEL) == 1  # only the healthy job, now running
    time.sleep(idle_s + 0.05)
    assert last.take([MODEL], block_ms=0)[0].message.job_id == job(2).job_id  # no poison left


def test_undecodable_entry_goes_to_the_dead_letters(server: RedisServer, client: redis.Redis) -> None:
    worker = streams(server, "worker-1")
    worker.take([MODEL], block_ms=0)  # makes the group
    client.xadd("radai:jobs:lung", {"v": "1", "job_id": "x"})
    assert worker.take([MODEL], block_ms=0) == []
    [(_, dead)] = entries(client, "radai:dead:lung")
    assert dead[b"dead_reason"].startswith(b"undecodable")
    assert worker.pending(MODEL) == 0


def test_lag_and_pending_count_waiting_and_running_jobs(server: RedisServer, client: redis.Redis) -> None:
    receiver, worker = streams(server, "receiver-1"), streams(server, "worker-1")
    assert (receiver.lag(MODEL), receiver.pending(MODEL)) == (0, 0)  # no stream yet
    for n in range(5):
        receiver.publish(MODEL, job(n))
    assert (receiver.lag(MODEL), receiver.pending(MODEL)) == (5, 0)
    first, second = worker.take([MODEL], block_ms=0, count=2)
    assert (receiver.lag(MODEL), receiver.pending(MODEL)) == (3, 2)
    assert worker.ack(second)  # out of order: lag must stay a number (no XDEL tombstones)
    assert client.xinfo_groups("radai:jobs:lung")[0]["lag"] == 3
    assert (receiver.lag(MODEL), receiver.pending(MODEL)) == (3, 1)
    assert worker.ack(first)
    assert client.xlen("radai:jobs:lung") == 3  # acknowledged entries are trimmed
    for d in worker.take([MODEL], block_ms=0, count=10):
        worker.ack(d)
    assert (receiver.lag(MODEL), receiver.pending(MODEL), client.xlen("radai:jobs:lung")) == (0, 0, 0)


def test_lag_is_counted_when_someone_else_deleted_entries(server: RedisServer, client: redis.Redis) -> None:
    receiver, worker = streams(server, "receiver-1"), streams(server, "worker-1")
    for n in range(4):
        receiver.publish(MODEL, job(n))
    ids = [entry_id for entry_id, _ in entries(client, "radai:jobs:lung")]
    worker.take([MODEL], block_ms=0)
    client.xdel("radai:jobs:lung", ids[2])  # a tombstone: Redis no longer knows the lag
    assert client.xinfo_groups("radai:jobs:lung")[0]["lag"] is None
    assert receiver.lag(MODEL) == 2


def test_jobs_published_before_any_worker_existed_are_taken(server: RedisServer, client: redis.Redis) -> None:
    receiver = streams(server, "receiver-1")
    for n in range(3):
        receiver.publish(MODEL, job(n))
    client.xgroup_destroy("radai:jobs:lung", GROUP)  # the group lost: a worker makes it again at id 0
    worker = streams(server, "worker-1")
    got = worker.take([MODEL], block_ms=0, count=10)
    assert [d.message.job_id for d in got] == [job(n).job_id for n in range(3)]


def test_worker_recovers_when_the_group_vanishes_under_it(server: RedisServer, client: redis.Redis) -> None:
    worker = streams(server, "worker-1")
    assert worker.take([MODEL], block_ms=0) == []  # the worker knows the group now
    client.flushall()  # like a Redis restart without persistence
    fields: dict[Any, Any] = dict(job(4).to_fields())
    client.xadd("radai:jobs:lung", fields)
    [delivery] = worker.take([MODEL], block_ms=0)
    assert delivery.message == job(4)


def test_take_honours_count_and_model_order(server: RedisServer) -> None:
    receiver, worker = streams(server, "receiver-1"), streams(server, "worker-1")
    receiver.publish("a", job(1))
    receiver.publish("b", job(2))
    receiver.publish("b", job(3))
    assert [d.message.job_id for d in worker.take(["b", "a"], block_ms=0)] == [job(2).job_id]
    got = worker.take(["a", "b"], block_ms=0, count=5)
    assert [(d.model_id, d.message.job_id) for d in got] == [("a", job(1).job_id), ("b", job(3).job_id)]
    with pytest.raises(ValueError):
        worker.take(["a"], block_ms=0, count=0)


def test_blocking_take_wakes_up_for_a_job_published_meanwhile(server: RedisServer) -> None:
    receiver, worker = streams(server, "receiver-1"), streams(server, "worker-1")
    worker.take(["a", "b"], block_ms=0)
    timer = threading.Timer(0.2, receiver.publish, args=("b", job(5)))
    timer.start()
    try:
        got = worker.take(["a", "b"], block_ms=10_000)
    finally:
        timer.join()
    assert [(d.model_id, d.message) for d in got] == [("b", job(5))]


def test_released_job_is_taken_at_once_without_counting_as_a_reclaim(server: RedisServer) -> None:
    streams(server, "receiver-1").publish(MODEL, job(8))
    leaving, staying = streams(server, "worker-leaving", 60.0), streams(server, "worker-staying", 60.0)
    [taken] = leaving.take([MODEL], block_ms=0)
    assert leaving.release(taken)
    [again] = staying.take([MODEL], block_ms=0)
    assert (again.message.job_id, again.delivery_count) == (job(8).job_id, 1)
    assert not leaving.release(taken)  # no longer its job


def test_prune_forgets_silent_consumers_but_never_one_holding_a_job(
    server: RedisServer, client: redis.Redis
) -> None:
    receiver = streams(server, "receiver-1")
    receiver.publish(MODEL, job(1))
    receiver.publish(MODEL, job(2))
    holder, idle = streams(server, "worker-holder", 60.0), streams(server, "worker-idle", 60.0)
    assert len(holder.take([MODEL], block_ms=0)) == 1
    [done] = idle.take([MODEL], block_ms=0)
    assert idle.ack(done)
    time.sleep(0.15)
    assert idle.prune_consumers(MODEL, idle_s=0.1) == 1
    consumers = client.xinfo_consumers("radai:jobs:lung", GROUP)
    assert [(c["name"], c["pending"]) for c in consumers] == [(b"worker-holder", 1)]
    assert idle.prune_consumers("unknown-model", idle_s=0.1) == 0


def test_settings_select_prefix_consumer_and_timeout(server: RedisServer, client: redis.Redis) -> None:
    settings = ScaleOutSettings(
        mode="distributed",
        role="worker",
        database_url=SecretStr("postgresql://radai@127.0.0.1/radai"),
        redis_url=SecretStr(server.url),
        stream_prefix="site-a",
        consumer_name="gpu-0",
        claim_idle_seconds=1.5,
    )
    js = JobStreams.from_settings(settings)
    try:
        assert (js.stream_key("brain"), js.dead_key("brain")) == ("site-a:jobs:brain", "site-a:dead:brain")
        assert (js.consumer, js.claim_idle_ms) == ("gpu-0", 1500)
        assert js.publish("brain", job(1))
        [d] = js.take(["brain"], block_ms=0)
        consumers = client.xinfo_consumers("site-a:jobs:brain", GROUP)
        assert [c["name"] for c in consumers] == [b"gpu-0"] and isinstance(d, Delivery)
    finally:
        js.close()
    with pytest.raises(ConfigError):
        JobStreams.from_settings(ScaleOutSettings())
    assert default_consumer_name() == f"{socket.gethostname()}-{os.getpid()}"


def test_message_fields_round_trip_and_reject_foreign_entries() -> None:
    assert JobMessage.from_fields(job(9).to_fields()) == job(9)
    with pytest.raises(ValueError):
        JobMessage.from_fields({"v": "1", "job_id": "x"})
    with pytest.raises(ValueError):
        JobMessage.from_fields({**job(9).to_fields(), "v": "99"})
    with pytest.raises(ValueError):
        JobMessage.from_fields({**job(9).to_fields(), "instances": '{"a": 1}'})


@pytest.mark.parametrize(("protocol", "decode"), [(2, True), (3, False), (3, True)])
def test_any_client_protocol_and_decoding_works(server: RedisServer, protocol: int, decode: bool) -> None:
    c = redis.Redis.from_url(server.url, protocol=protocol, decode_responses=decode)
    try:
        js = JobStreams(c, "radai", "worker-1", IDLE_S)
        assert js.publish("a", job(1)) and js.publish("b", job(2))
        got = js.take(["a", "b"], block_ms=0, count=2)
        assert [(d.model_id, d.message) for d in got] == [("a", job(1)), ("b", job(2))]
        assert (js.lag("a"), js.pending("a")) == (0, 1)
        time.sleep(IDLE_S + 0.05)
        [again] = js.take(["a"], block_ms=0)
        assert (again.message, again.delivery_count) == (job(1), 2)
        assert js.touch(again) and js.ack(again) and js.pending("a") == 0
    finally:
        c.close()

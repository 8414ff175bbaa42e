"""Job queue of the distributed mode: one Redis stream per model, read by the consumer group `workers`.

Delivery is at least once. A receiver publishes a job to `<prefix>:jobs:<model id>` (once per job id: a
`<prefix>:published:<job id>` marker is set in the same Lua script as the XADD). A worker `take`s jobs with
XREADGROUP, calls `touch` every few seconds while a long job runs (that resets the entry's idle time, so
nobody reclaims a job whose worker is alive) and `ack`s once the results are delivered. The entry of a worker
that died stays pending; after `claim_idle_s` of silence the next `take` of any worker claims it (XAUTOCLAIM).
An entry claimed more than `max_reclaims` times (a job that kills every worker) is moved to the dead-letter
stream `<prefix>:dead:<model id>` and acknowledged.

Bounding the stream: `ack` trims with `XTRIM MINID <oldest pending id>`, i.e. drops exactly the entries that
every consumer is done with. Not `XADD MAXLEN`, which would drop jobs not yet done when the backlog is long,
and not `XDEL`, which leaves tombstones that make Redis report the group's `lag` as nil (KEDA scales on it).

The keys of one publish are not in one hash slot: this targets a single Redis (or a replicated primary),
not Redis Cluster.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from redis.exceptions import ResponseError

from radai.config import ScaleOutSettings
from radai.domain import Priority
from radai.errors import ConfigError
from radai.storage import redis_lua

log = logging.getLogger(__name__)

GROUP = "workers"  # the consumer group every worker joins (the Helm chart's KEDA trigger names it)
_FORMAT = "1"  # version of the stream-entry fields below
_DEAD_MAXLEN = 10_000  # dead letters kept per model (approximate trim)


def default_consumer_name() -> str:
    """`<hostname>-<pid>`: unique per worker process (a pod name is a hostname)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class JobMessage:
    """One job on a stream. `instances` are spooled files relative to the shared `storage.data_dir`."""

    job_id: str
    study_uid: str
    series_uid: str
    model_key: str  # id@version
    priority: Priority
    instances: tuple[str, ...]
    enqueued_at: float
    # The whole chain the job heads, in order (a model consuming another's mask runs after it, on the same
    # worker): (job id, whether it runs; False: re-run for its mask only, its results already delivered).
    chain: tuple[tuple[str, bool], ...] = ()

    def to_fields(self) -> dict[str, str]:
        return {
            "v": _FORMAT,
            "job_id": self.job_id,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "model": self.model_key,
            "priority": self.priority.value,
            "instances": json.dumps(list(self.instances)),
            "enqueued_at": repr(self.enqueued_at),
            "chain": json.dumps([[job_id, run] for job_id, run in self.chain]),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any]) -> JobMessage:
        """Decode stream fields (bytes or str); ValueError when they are not a job of this format."""
        data = {_text(k): _text(v) for k, v in fields.items()}
        try:
            if data["v"] != _FORMAT:
                raise ValueError(f"unknown job format {data['v']!r}")
            instances = json.loads(data["instances"])
            if not isinstance(instances, list) or not all(isinstance(p, str) for p in instances):
                raise ValueError("instances is not a list of paths")
            return cls(
                job_id=data["job_id"],
                study_uid=data["study_uid"],
                series_uid=data["series_uid"],
                model_key=data["model"],
                priority=Priority(data["priority"]),
                instances=tuple(instances),
                enqueued_at=float(data["enqueued_at"]),
                chain=_chain(data.get("chain", "[]")),
            )
        except KeyError as exc:
            raise ValueError(f"job entry lacks field {exc}") from exc


def _chain(text: str) -> tuple[tuple[str, bool], ...]:
    items = json.loads(text)
    if not isinstance(items, list) or not all(
        isinstance(i, list) and len(i) == 2 and isinstance(i[0], str) and isinstance(i[1], bool)
        for i in items
    ):
        raise ValueError("chain is not a list of [job id, run] pairs")
    return tuple((job_id, run) for job_id, run in items)


@dataclass(frozen=True)
class Delivery:
    """A job handed to this consumer. `delivery_count` > 1: it was claimed from a consumer that went silent."""

    model_id: str
    entry_id: str
    message: JobMessage
    delivery_count: int = 1


class JobQueue(Protocol):
    """The distributed job queue as the receiver and the workers see it."""

    def publish(self, model_id: str, message: JobMessage) -> bool: ...

    def take(self, model_ids: Sequence[str], block_ms: int, count: int = 1) -> list[Delivery]: ...

    def touch(self, delivery: Delivery) -> bool: ...

    def ack(self, delivery: Delivery) -> bool: ...

    def release(self, delivery: Delivery) -> bool: ...

    def lag(self, model_id: str) -> int: ...

    def pending(self, model_id: str) -> int: ...


class JobStreams:
    """Redis Streams implementation of `JobQueue`. Thread-safe (redis-py pools connections)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        consumer: str,
        claim_idle_s: float,
        *,
        max_reclaims: int = 3,
        dedupe_ttl_s: int = 86_400,
    ) -> None:
        if claim_idle_s <= 0 or max_reclaims < 0 or dedupe_ttl_s < 1 or not prefix or not consumer:
            raise ValueError("invalid job stream settings")
        self.client = client
        self.prefix = prefix
        self.consumer = consumer
        self.claim_idle_ms = max(1, round(claim_idle_s * 1000))
        self.max_reclaims = max_reclaims
        self.dedupe_ttl_s = dedupe_ttl_s
        self._publish = client.register_script(redis_lua.PUBLISH)
        self._ack = client.register_script(redis_lua.ACK)
        self._owned_claim = client.register_script(redis_lua.OWNED_CLAIM)
        self._prune = client.register_script(redis_lua.PRUNE)
        self._lock = threading.Lock()
        self._groups: set[str] = set()  # models whose group this instance has made sure of
        self._cursors: dict[str, str] = {}  # XAUTOCLAIM scan position per model
        self._reclaimed: dict[str, int] = {}
        self._dead: dict[str, int] = {}

    @classmethod
    def from_settings(cls, settings: ScaleOutSettings, *, max_reclaims: int = 3) -> JobStreams:
        if settings.redis_url is None:
            raise ConfigError("scaleout.redis_url is not set")
        client = redis.Redis.from_url(settings.redis_url.get_secret_value())
        consumer = settings.consumer_name or default_consumer_name()
        return cls(
            client, settings.stream_prefix, consumer, settings.claim_idle_seconds, max_reclaims=max_reclaims
        )

    def ping(self) -> bool:
        """Redis answers (for /readyz)."""
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self.client.close()

    # -- key names (the Helm chart's KEDA trigger uses stream_key) ------------------------------------------

    def stream_key(self, model_id: str) -> str:
        return f"{self.prefix}:jobs:{model_id}"

    def dead_key(self, model_id: str) -> str:
        return f"{self.prefix}:dead:{model_id}"

    def marker_key(self, job_id: str) -> str:
        return f"{self.prefix}:published:{job_id}"

    # -- receiver side ---------------------------------------------------------------------------------------

    def publish(self, model_id: str, message: JobMessage) -> bool:
        """Queue a job once: False when this job id was published within `dedupe_ttl_s` (a second receiver,
        a retry). Creates the stream and its group (at id 0, so nothing published before a worker is lost)."""
        args: list[str] = [GROUP, str(self.dedupe_ttl_s)]
        for name, value in message.to_fields().items():
            args += [name, value]
        entry = self._publish(keys=[self.stream_key(model_id), self.marker_key(message.job_id)], args=args)
        with self._lock:
            self._groups.add(model_id)
        return entry is not None

    def forget(self, job_id: str) -> bool:
        """Drop a job's publish marker so that the same job id can be queued again (an explicit re-run)."""
        return bool(self.client.delete(self.marker_key(job_id)))

    # -- worker side -----------------------------------------------------------------------------------------

    def take(self, model_ids: Sequence[str], block_ms: int, count: int = 1) -> list[Delivery]:
        """Up to `count` jobs of the given models, earlier models first: entries of silent consumers
        (idle > claim_idle_s) first, then new ones; waits up to `block_ms` (0: no wait) when there are none."""
        if count < 1:
            raise ValueError("count must be at least 1")
        models = list(dict.fromkeys(model_ids))
        if not models:
            return []
        try:
            return self._take(models, block_ms, count)
        except ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise
            # The stream or its group vanished (a Redis restart without persistence): make them again.
            with self._lock:
                self._groups.difference_update(models)
                for model in models:
                    self._cursors.pop(model, None)
            return self._take(models, block_ms, count)

    def touch(self, delivery: Delivery) -> bool:
        """Reset the idle time of a job this worker is still running, so that no other worker reclaims it.
        Call it well within `claim_idle_s` (e.g. every claim_idle_s / 3) during long inference. False: the
        job was reclaimed by another worker meanwhile (or is done); this worker should drop it."""
        args = [GROUP, self.consumer, delivery.entry_id, "0", ""]
        return bool(self._owned_claim(keys=[self.stream_key(delivery.model_id)], args=args))

    def release(self, delivery: Delivery) -> bool:
        """Hand a job back unstarted (graceful shutdown): the next `take` of any worker claims it, and this
        delivery is not counted towards the dead-letter limit."""
        args = [
            GROUP,
            self.consumer,
            delivery.entry_id,
            str(self.claim_idle_ms + 1),
            str(max(0, delivery.delivery_count - 1)),
        ]
        return bool(self._owned_claim(keys=[self.stream_key(delivery.model_id)], args=args))

    def ack(self, delivery: Delivery) -> bool:
        """The job's results are delivered: remove it from the group's pending list and the stream. False when
        it was already acknowledged (a worker that was too slow and lost it, finishing anyway)."""
        n = self._ack(keys=[self.stream_key(delivery.model_id)], args=[GROUP, delivery.entry_id])
        return int(n) == 1

    def prune_consumers(self, model_id: str, idle_s: float) -> int:
        """Forget the group's consumers that hold no job and were silent for `idle_s` (workers gone for good;
        a live one is simply re-created by its next `take`). Returns how many were removed."""
        if self._group_info(model_id) is None:
            return 0
        args = [GROUP, str(max(0, round(idle_s * 1000)))]
        return int(self._prune(keys=[self.stream_key(model_id)], args=args))

    # -- numbers for metrics and autoscaling ---------------------------------------------------------------

    def lag(self, model_id: str) -> int:
        """Entries not yet delivered to any worker (XINFO GROUPS `lag`; what KEDA's lagCount reads)."""
        group = self._group_info(model_id)
        if group is None:
            return 0
        lag = group.get("lag")
        if lag is not None:
            return int(lag)
        # Redis reports nil when entries were XDELed by someone else: count past the last delivered one.
        last = _text(group["last-delivered-id"])
        return len(self.client.xrange(self.stream_key(model_id), min=f"({last}", max="+") or [])

    def pending(self, model_id: str) -> int:
        """Entries delivered and not yet acknowledged (jobs running, or held by a dead worker)."""
        group = self._group_info(model_id)
        return 0 if group is None else int(group["pending"])

    def dead_letters(self, model_id: str) -> int:
        return int(self.client.xlen(self.dead_key(model_id)))

    def reclaimed_total(self) -> dict[str, int]:
        """Entries this instance claimed from silent consumers, per model (a counter for metrics)."""
        with self._lock:
            return dict(self._reclaimed)

    def dead_lettered_total(self) -> dict[str, int]:
        """Entries this instance moved to the dead letters, per model (a counter for metrics)."""
        with self._lock:
            return dict(self._dead)

    # -- internals -------------------------------------------------------------------------------------------

    def _group_info(self, model_id: str) -> dict[str, Any] | None:
        try:
            groups = self.client.xinfo_groups(self.stream_key(model_id))
        except ResponseError:  # no such stream yet
            return None
        for group in groups:
            if _text(group["name"]) == GROUP:
                return {str(k): v for k, v in group.items()}
        return None

    def _ensure_groups(self, models: Iterable[str]) -> None:
        for model in models:
            with self._lock:
                if model in self._groups:
                    continue
            try:
                self.client.xgroup_create(self.stream_key(model), GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            with self._lock:
                self._groups.add(model)

    def _take(self, models: list[str], block_ms: int, count: int) -> list[Delivery]:
        self._ensure_groups(models)
        out: list[Delivery] = []
        for model in models:
            if len(out) < count:
                out += self._reclaim(model, count - len(out))
        # One stream at a time so that `count` holds and earlier models go first.
        for model in models:
            if len(out) < count:
                out += self._read([model], count - len(out), None)
        if out or block_ms <= 0:
            return out
        got = self._read(models, count, block_ms)
        for extra in got[count:]:  # entries arrived on several streams at once: hand the surplus back
            self.release(extra)
        return got[:count]

    def _read(self, models: list[str], count: int, block_ms: int | None) -> list[Delivery]:
        keys = {self.stream_key(m): m for m in models}
        streams: dict[Any, Any] = {key: ">" for key in keys}
        reply: Any = self.client.xreadgroup(GROUP, self.consumer, streams, count=count, block=block_ms)
        if not reply:
            return []
        pairs = reply.items() if isinstance(reply, dict) else reply
        by_key: dict[str, list[Any]] = {}
        for key, entries in pairs:
            # RESP2 answers [[key, [(id, fields), ...]]], RESP3 {key: [[(id, fields), ...]]}.
            if entries and isinstance(entries[0], list):
                entries = entries[0]
            by_key[_text(key)] = list(entries)
        out: list[Delivery] = []
        for key, model in keys.items():  # in the caller's model order
            for entry_id, fields in by_key.get(key, []):
                delivery = self._delivery(model, _text(entry_id), fields, 1)
                if delivery is not None:
                    out.append(delivery)
        return out

    def _reclaim(self, model: str, count: int) -> list[Delivery]:
        key = self.stream_key(model)
        with self._lock:
            cursor = self._cursors.get(model, "0-0")
        reply: Any = self.client.xautoclaim(
            key, GROUP, self.consumer, self.claim_idle_ms, cursor, count=count
        )
        with self._lock:
            self._cursors[model] = _text(reply[0])
        claimed: list[Any] = list(reply[1])
        deleted: list[Any] = list(reply[2]) if len(reply) > 2 else []
        if deleted:  # pending entries whose data is gone (Redis 7 drops them from the pending list itself)
            self.client.xack(key, GROUP, *deleted)
        if not claimed:
            return []
        pipe = self.client.pipeline(transaction=False)
        for entry_id, _fields in claimed:
            pipe.xpending_range(key, GROUP, min=entry_id, max=entry_id, count=1)
        infos: list[Any] = pipe.execute()
        out: list[Delivery] = []
        for (entry_id, fields), info in zip(claimed, infos, strict=True):
            if not info:  # acknowledged in between by its late owner
                continue
            times = int(info[0]["times_delivered"])
            with self._lock:
                self._reclaimed[model] = self._reclaimed.get(model, 0) + 1
            if times - 1 > self.max_reclaims:
                self._dead_letter(model, _text(entry_id), fields, times, f"reclaimed {times - 1} times")
                continue
            delivery = self._delivery(model, _text(entry_id), fields, times)
            if delivery is not None:
                out.append(delivery)
        return out

    def _delivery(self, model: str, entry_id: str, fields: Any, times: int) -> Delivery | None:
        try:
            message = JobMessage.from_fields(fields or {})
        except ValueError as exc:
            self._dead_letter(model, entry_id, fields or {}, times, f"undecodable: {exc}")
            return None
        return Delivery(model, entry_id, message, times)

    def _dead_letter(
        self, model: str, entry_id: str, fields: Mapping[Any, Any], times: int, reason: str
    ) -> None:
        args: list[Any] = [GROUP, entry_id, str(_DEAD_MAXLEN)]
        for name, value in fields.items():
            args += [name, value]
        args += ["dead_reason", reason, "dead_entry_id", entry_id, "dead_deliveries", str(times)]
        args += ["dead_consumer", self.consumer, "dead_at", repr(time.time())]
        self._ack(keys=[self.stream_key(model), self.dead_key(model)], args=args)
        with self._lock:
            self._dead[model] = self._dead.get(model, 0) + 1
        job = _text(fields.get(b"job_id", fields.get("job_id", b"?")))
        log.error("job %s of model %s moved to %s: %s", job, model, self.dead_key(model), reason)

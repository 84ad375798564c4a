"""Job records in Redis: the distributed deployment's record store.

Records are JSON strings; listings use lexicographic sorted sets whose members
are sort keys (creation time, then id), so cursor pagination is a range query.
Read-modify-write goes through WATCH/MULTI and retries on contention.
"""

from __future__ import annotations

import time

import redis

from .errors import SettingsError
from .records import (
    DURATION_BUCKETS,
    JOB_STATES,
    IdempotencyConflictError,
    JobRecord,
    Mutator,
    RecordBackend,
    bucket_index,
    decode_cursor,
    encode_cursor,
    histogram_from_counts,
    sort_key,
    time_key,
)

__all__ = ["RedisRecords", "persistence_warning", "refusal", "check_redis"]


class RedisRecords(RecordBackend):
    """`RecordBackend` on Redis.

    Parameters
    ----------
    url : `str`
        Redis URL, e.g. ``redis://127.0.0.1:6379/0``.
    prefix : `str`
        Prefix of every key written (lets several deployments or tests share a database).
    """

    def __init__(self, url: str, prefix: str = "alsub:"):
        self.url = url
        self.prefix = prefix
        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)

    # keys ---------------------------------------------------------------------------
    def _job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _owner_index(self, owner: str, state: str | None = None) -> str:
        base = f"{self.prefix}idx:owner:{owner}"
        return base if state is None else f"{base}:state:{state}"

    def _state_set(self, state: str) -> str:
        return f"{self.prefix}state:{state}"

    def _idem(self, owner: str, key: str) -> str:
        return f"{self.prefix}idem:{owner}:{key}"

    def _index(self, pipe, record: JobRecord, old_state: str | None) -> None:
        member = sort_key(record)
        if old_state is not None and old_state != record.state:
            pipe.zrem(self._owner_index(record.owner, old_state), member)
            pipe.srem(self._state_set(old_state), record.id)
        pipe.zadd(self._owner_index(record.owner), {member: 0})
        pipe.zadd(self._owner_index(record.owner, record.state), {member: 0})
        pipe.sadd(self._state_set(record.state), record.id)

    # records ------------------------------------------------------------------------
    def create(self, record, fingerprint=None):
        idem_key = (
            self._idem(record.owner, record.idempotency_key)
            if record.idempotency_key is not None
            else None
        )
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    if idem_key is not None:
                        pipe.watch(idem_key)
                        known = pipe.hgetall(idem_key)
                        if known:
                            job_id = known[b"job_id"].decode()
                            existing = pipe.get(self._job(job_id))
                            if existing is not None:
                                stored = known.get(b"fingerprint", b"").decode() or None
                                if fingerprint is not None and stored != fingerprint:
                                    raise IdempotencyConflictError(job_id)
                                return JobRecord.from_json(existing), False
                    pipe.multi()
                    if idem_key is not None:
                        pipe.delete(idem_key)
                        mapping = {"job_id": record.id, "fingerprint": fingerprint or ""}
                        pipe.hset(idem_key, mapping=mapping)
                    pipe.set(self._job(record.id), record.to_json())
                    self._index(pipe, record, None)
                    pipe.execute()
                    return record, True
                except redis.WatchError:
                    continue

    def get(self, job_id):
        data = self.redis.get(self._job(job_id))
        return JobRecord.from_json(data) if data is not None else None

    def update(self, job_id, mutate: Mutator):
        key = self._job(job_id)
        while True:
            with self.redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    data = pipe.get(key)
                    if data is None:
                        return None, False
                    record = JobRecord.from_json(data)
                    old_state = record.state
                    if not mutate(record):
                        return JobRecord.from_json(data), False
                    record.updated_at = time.time()
                    pipe.multi()
                    pipe.set(key, record.to_json())
                    self._index(pipe, record, old_state)
                    pipe.execute()
                    return record, True
                except redis.WatchError:
                    continue

    def delete(self, job_id):
        record = self.get(job_id)
        if record is None:
            return False
        member = sort_key(record)
        with self.redis.pipeline() as pipe:
            pipe.delete(self._job(job_id))
            pipe.zrem(self._owner_index(record.owner), member)
            for state in JOB_STATES:
                pipe.zrem(self._owner_index(record.owner, state), member)
                pipe.srem(self._state_set(state), job_id)
            pipe.execute()
        if record.idempotency_key is not None:
            idem_key = self._idem(record.owner, record.idempotency_key)
            if self.redis.hget(idem_key, "job_id") == job_id.encode():
                self.redis.delete(idem_key)
        return True

    def list(self, owner, state=None, since=None, limit=50, cursor=None):
        upper = "(" + decode_cursor(cursor) if cursor is not None else "+"
        lower = "[" + time_key(since) if since is not None else "-"
        members = self.redis.zrevrangebylex(
            self._owner_index(owner, state), upper, lower, start=0, num=limit + 1
        )
        keys = [m.decode() for m in members]
        page = keys[:limit]
        blobs = self.redis.mget([self._job(k.partition(":")[2]) for k in page]) if page else []
        records = [JobRecord.from_json(b) for b in blobs if b is not None]
        next_cursor = encode_cursor(page[-1]) if len(keys) > limit else None
        return records, next_cursor

    def count_active(self, owner):
        with self.redis.pipeline(transaction=False) as pipe:
            for state in ("queued", "running"):
                pipe.zcard(self._owner_index(owner, state))
            return sum(int(n) for n in pipe.execute())

    def state_counts(self):
        with self.redis.pipeline(transaction=False) as pipe:
            for state in JOB_STATES:
                pipe.scard(self._state_set(state))
            return {state: int(n) for state, n in zip(JOB_STATES, pipe.execute(), strict=True)}

    def in_state(self, state):
        ids = [m.decode() for m in self.redis.smembers(self._state_set(state))]
        blobs = self.redis.mget([self._job(i) for i in ids]) if ids else []
        return [JobRecord.from_json(b) for b in blobs if b is not None]

    # metrics ------------------------------------------------------------------------
    def observe_duration(self, seconds):
        key = f"{self.prefix}durations"
        with self.redis.pipeline() as pipe:
            pipe.hincrby(key, f"b{bucket_index(seconds)}", 1)
            pipe.hincrbyfloat(key, "sum", float(seconds))
            pipe.hincrby(key, "count", 1)
            pipe.execute()

    def duration_histogram(self):
        raw = {k.decode(): v for k, v in self.redis.hgetall(f"{self.prefix}durations").items()}
        per_bucket = [int(raw.get(f"b{i}", 0)) for i in range(len(DURATION_BUCKETS) + 1)]
        return histogram_from_counts(
            per_bucket, float(raw.get("sum", 0.0)), int(raw.get("count", 0))
        )

    # ownership, rate limits, workers ------------------------------------------------
    def add_owner(self, kind, blob_id, owner):
        self.redis.sadd(f"{self.prefix}blob:{kind}:{blob_id}", owner)

    def is_owner(self, kind, blob_id, owner):
        return bool(self.redis.sismember(f"{self.prefix}blob:{kind}:{blob_id}", owner))

    def remove_owner(self, kind, blob_id, owner):
        key = f"{self.prefix}blob:{kind}:{blob_id}"
        with self.redis.pipeline() as pipe:
            pipe.srem(key, owner)
            pipe.scard(key)
            _, left = pipe.execute()
        return int(left)

    def forget_blob(self, kind, blob_id):
        self.redis.delete(f"{self.prefix}blob:{kind}:{blob_id}")

    def hit(self, key, window):
        current = int(time.time() // window)
        counter = f"{self.prefix}rate:{key}:{current}"
        with self.redis.pipeline() as pipe:
            pipe.incr(counter)
            pipe.expire(counter, int(window) + 1)
            count, _ = pipe.execute()
        return int(count)

    def count(self, key, window):
        current = int(time.time() // window)
        return int(self.redis.get(f"{self.prefix}rate:{key}:{current}") or 0)

    def worker_seen(self, name):
        self.redis.zadd(f"{self.prefix}workers", {name: time.time()})

    def worker_gone(self, name):
        self.redis.zrem(f"{self.prefix}workers", name)

    def live_workers(self, max_age):
        members = self.redis.zrangebyscore(f"{self.prefix}workers", time.time() - max_age, "+inf")
        return [m.decode() for m in members]

    def ping(self):
        self.redis.ping()

    def close(self):
        self.redis.close()


def persistence_warning(client: redis.Redis) -> str | None:
    """What an operator should hear when the Redis holding the records keeps nothing on
    disk (no append-only file, no snapshot rules), else None; None too when the server
    does not say (CONFIG renamed or refused, as managed services do)."""
    try:
        appendonly = client.config_get("appendonly").get("appendonly", "")
        save = client.config_get("save").get("save", "")
    except redis.RedisError:
        return None
    if str(appendonly).lower() == "yes" or str(save).strip():
        return None
    return (
        "the Redis of ALSUB_REDIS_URL keeps nothing on disk (appendonly no, no save rules): "
        "a restart forgets every job, and the disk cleaning then deletes their products; "
        "run it with --appendonly yes"
    )


def refusal(url: str) -> str | None:
    """Why the Redis at ``url`` refuses this deployment (wrong user or password, a database
    number it does not have), else None. None too while it cannot be reached: the service
    waits out an outage, but a refusal is a setting to change (it was a 503 "unreachable"
    or a 500 on every request, and a worker retrying forever)."""
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.ping()
    except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
        return str(exc)  # ConnectionErrors by their class, refusals by their meaning
    except (redis.ConnectionError, redis.TimeoutError):
        return None
    except redis.ResponseError as exc:
        return str(exc)
    finally:
        client.close()
    return None


def check_redis(url: str) -> None:
    """Raise `store.errors.SettingsError` when the Redis at ``url`` refuses it (`refusal`);
    `alsub serve` and `alsub worker` call it at start-up."""
    reason = refusal(url)
    if reason:
        raise SettingsError(f"ALSUB_REDIS_URL: the Redis server refuses it: {reason}")

"""Each owner's index of tasks for the `redis` backend, and the listing that pages through it.

- Key: `sia:<queue>:owner-tasks:<owner>` is a sorted set of the owner's task
  ids scored by creation time (ms), added to on submit; each submit renews
  its expiry (twice the retention) and trims entries older than that.
- Expiry: entries whose job has expired are dropped when a listing meets them.
- Paging: newest first, entries of one score in descending id order; a cursor
  holds the (score, id) of the last entry read. A listing reads at most
  `LIST_SCAN` entries per call, so a page filtered by status may hold fewer
  tasks than asked for and still have a next page.

The index knows task ids only: the backend turns ids into tasks (`Load`).
redis-py's exceptions pass through to `sia.tasks.redis`, which turns them into
`Unavailable`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sia.tasks.codec import bad_cursor, cursor_from_text, cursor_to_text

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from redis import asyncio as aioredis

    from sia.domain import Task, TaskStatus

    #: The tasks of some ids, in order; None for each whose job has expired.
    Load = Callable[[Sequence[str]], Awaitable[Sequence[Task | None]]]

#: The most index entries one `list` call reads: the bound on its work when a status
#: filter (or expired entries) leaves most of them out.
LIST_SCAN = 250
#: Index entries read per round when filtering by status (jobs are fetched per round).
_LIST_BATCH = 50


class OwnerIndex:
    """The per-owner sorted sets of one queue; see the module docstring."""

    def __init__(self, queue: str, *, kept: int) -> None:
        self._prefix = f"sia:{queue}:owner-tasks:"
        self._kept = kept  # seconds an entry (and an idle set) is kept

    def key(self, owner: str) -> str:
        """The sorted set holding `owner`'s task ids."""
        return self._prefix + owner

    async def add(self, redis: aioredis.Redis, owner: str, task_id: str, created_ms: int) -> None:
        """Add a task to its owner's index; renew the set's expiry and trim its old entries."""
        index = self.key(owner)
        async with redis.pipeline(transaction=True) as pipe:
            pipe.zadd(index, {task_id: created_ms})
            pipe.zremrangebyscore(index, "-inf", f"({created_ms - self._kept * 1000}")
            pipe.expire(index, self._kept)
            await pipe.execute()

    async def page(
        self,
        redis: aioredis.Redis,
        owner: str,
        load: Load,
        *,
        status: TaskStatus | None,
        limit: int,
        after: str,
    ) -> tuple[list[Task], str]:
        """`owner`'s tasks (or those in `status`) newest first, and the next page's cursor.

        Reads at most max(LIST_SCAN, limit) entries, and removes those whose
        job has expired.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        position = _position(after) if after else None
        index = self.key(owner)
        budget = max(LIST_SCAN, limit)
        page: list[Task] = []
        expired: list[bytes] = []
        scanned, more = 0, True
        while more and len(page) < limit and scanned < budget:
            need = limit - len(page)
            want = min(budget - scanned, need if status is None else max(need, _LIST_BATCH))
            entries = await _entries_after(redis, index, position, want + 1)
            more, entries = len(entries) > want, entries[:want]  # one more: is there a next?
            tasks = await load([member.decode() for member, _ in entries])
            for n, (member, score) in enumerate(entries):
                if len(page) == limit:  # is any task left in this batch for the next page?
                    more = more or any(_shown(task, status) for task in tasks[n:])
                    break
                position, scanned = (score, member), scanned + 1
                task = tasks[n]
                if task is None:
                    expired.append(member)
                elif _shown(task, status):
                    page.append(task)
        if expired:
            await redis.zrem(index, *expired)
        if not more or position is None:
            return page, ""
        return page, cursor_to_text(str(position[0]), position[1].decode())

    def __repr__(self) -> str:
        return f"OwnerIndex(prefix={self._prefix!r}, kept={self._kept})"


async def _entries_after(
    redis: aioredis.Redis, index: str, position: tuple[int, bytes] | None, count: int
) -> Sequence[tuple[bytes, int]]:
    """Up to `count` (id, score) entries of `index` after `position`, newest first.

    Entries of one score come in descending id order (Redis's), so the
    position's own score is read whole and cut at its id.
    """
    if position is None:
        found = await redis.zrevrange(index, 0, count - 1, withscores=True)
        return [(member, int(score)) for member, score in found]
    score, last = position
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrevrangebyscore(index, score, score)
        pipe.zrevrangebyscore(index, f"({score}", "-inf", start=0, num=count, withscores=True)
        ties, older = await pipe.execute()
    entries = [(member, score) for member in ties if member < last]
    entries += [(member, int(older_score)) for member, older_score in older]
    return entries[:count]


def _shown(task: Task | None, status: TaskStatus | None) -> bool:
    """Whether a listing filtered by `status` (None: none) shows `task` (None: expired)."""
    return task is not None and (status is None or task.status is status)


def _position(after: str) -> tuple[int, bytes]:
    """The (score, id) of the index entry a cursor from `list` resumes after."""
    score, task_id = cursor_from_text(after)
    try:
        return int(score), task_id.encode()
    except ValueError as exc:
        raise bad_cursor() from exc

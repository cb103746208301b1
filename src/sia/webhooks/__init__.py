"""Webhooks: a task's events POSTed to the URL it named, signed, durable, retried.

    urls.py         which URLs may be used: syntax at submit, vetted addresses at delivery
    events.py       the event types and their JSON bodies
    store.py        Delivery, the DeliveryStore protocol, build_delivery_store
    sqlite_store.py redis_store.py   pending deliveries beside the tasks
    sender.py       one attempt on the wire (aiohttp, no redirects, bounded answer)
    dispatcher.py   Webhooks: check at submit, enqueue, the worker, retries, metrics

The service calls `Webhooks.check(request)` at submit and
`Webhooks.enqueue(task, kind)` when a task ends (and per image when asked);
the app opens the store from `build_delivery_store(settings)`, then
`Webhooks(settings, store, metrics)`, and closes them in reverse order.
docs/clients.md#webhooks is the receiver's side.
"""

from __future__ import annotations

from sia.webhooks.dispatcher import Webhooks
from sia.webhooks.events import (
    EVENT_TYPES,
    TASK_CANCELLED,
    TASK_FAILED,
    TASK_IMAGE,
    TASK_SUCCEEDED,
    Event,
    final_kind,
    task_event,
)
from sia.webhooks.store import Delivery, DeliveryStore, build_delivery_store
from sia.webhooks.urls import check_webhook_url, resolve_public

__all__ = [
    "EVENT_TYPES",
    "TASK_CANCELLED",
    "TASK_FAILED",
    "TASK_IMAGE",
    "TASK_SUCCEEDED",
    "Delivery",
    "DeliveryStore",
    "Event",
    "Webhooks",
    "build_delivery_store",
    "check_webhook_url",
    "final_kind",
    "resolve_public",
    "task_event",
]

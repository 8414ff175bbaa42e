"""The destinations and retry parts of the API for tests that are about something else."""

from __future__ import annotations

from typing import Any

from radai.api.studies import retry_dead_deliveries
from radai.destination_admin import EchoResults, ServerDestinations
from radai.storage.sqlite import SqliteJobStore


def no_destinations(store: SqliteJobStore) -> dict[str, Any]:
    """create_api keyword arguments: no destinations configured; retry re-queues dead-lettered deliveries."""
    return {
        "destinations": ServerDestinations([], [], EchoResults(), store),
        "retry": retry_dead_deliveries(store),
    }

"""Fixtures of the chart tests: the chart loaded once, and its renders (default, scale-out with bundled
servers, scale-out with external servers), each with the Prometheus Operator's and KEDA's APIs offered."""

from __future__ import annotations

from collections.abc import Iterator

import helm_python
import pytest

from .chart import (
    CHART,
    EXTERNAL,
    OPERATOR_APIS,
    SCALEOUT,
    Manifest,
    render,
)


@pytest.fixture(scope="module")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def default(chart: helm_python.Chart) -> list[Manifest]:
    return render(chart, {}, OPERATOR_APIS)


@pytest.fixture(scope="module")
def scaleout(chart: helm_python.Chart) -> list[Manifest]:
    return render(chart, SCALEOUT, OPERATOR_APIS)


@pytest.fixture(scope="module")
def external(chart: helm_python.Chart) -> list[Manifest]:
    return render(chart, EXTERNAL, OPERATOR_APIS)


@pytest.fixture(scope="module")
def renders(
    default: list[Manifest], scaleout: list[Manifest], external: list[Manifest]
) -> dict[str, list[Manifest]]:
    return {"default": default, "scaleout": scaleout, "external": external}

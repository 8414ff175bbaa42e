"""Prometheus metrics. Prefix `radai_`, latencies in seconds, labels bounded (never a UID or patient value)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)

# One histogram per pipeline stage, each the time spent since the previous stage:
# received (first instance -> last instance), complete (last instance -> study declared complete),
# queued (complete -> job queued), inferred (queued -> inference done), encoded, delivered.
STAGES = ("received", "complete", "queued", "inferred", "encoded", "delivered")

STAGE_SECONDS = Histogram(
    "radai_study_stage_seconds",
    "Time spent in each pipeline stage, per job (since the previous stage)",
    ["stage", "model"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
STUDY_SECONDS = Histogram(
    "radai_study_end_to_end_seconds",
    "Time from the first instance received to the last destination acknowledging the job's results",
    ["model", "priority"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
INSTANCES_RECEIVED = Counter(
    "radai_instances_received_total",
    "C-STORE requests answered, by configured sender name (the allow-list entry's name; 'unlisted' for a "
    "sender not on it) and outcome (the DIMSE status answered, e.g. success, out_of_resources)",
    ["sender", "outcome"],
    registry=REGISTRY,
)
BYTES_RECEIVED = Counter(
    "radai_received_bytes_total",
    "Bytes of data sets received in C-STORE requests, by configured sender name",
    ["sender"],
    registry=REGISTRY,
)
ASSOCIATIONS = Counter(
    "radai_associations_total",
    "DICOM associations requested of the receiver, by sender name, outcome (accepted, rejected) and reason "
    "(accepted: 'none'; rejected: called_ae, not_allowed, limit, admission_error, dicom_stack)",
    ["sender", "outcome", "reason"],
    registry=REGISTRY,
)
JOBS = Counter(
    "radai_jobs_total", "Jobs finished, by model and outcome", ["model", "outcome"], registry=REGISTRY
)
BATCH_SIZE = Histogram(
    "radai_scheduler_batch_size",
    "Patches per inference batch",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
    registry=REGISTRY,
)
BATCH_JOBS = Histogram(
    "radai_scheduler_batch_jobs",
    "Distinct jobs whose patches share one inference batch",
    ["model"],
    buckets=(1, 2, 4, 8, 16),
    registry=REGISTRY,
)
BATCH_SECONDS = Histogram(
    "radai_scheduler_batch_seconds",
    "Time the runtime takes for one batch",
    ["model"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
BATCH_WAIT_SECONDS = Histogram(
    "radai_scheduler_wait_seconds",
    "Time the oldest patch of a batch waited in the queue",
    ["model"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
INFERENCE_SECONDS = Histogram(
    "radai_inference_seconds",
    "Time one runtime call takes, by backend (onnx, tensorrt, torch, triton, fake)",
    ["backend"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "radai_scheduler_queue_depth", "Patches waiting for a batch", ["model"], registry=REGISTRY
)
BATCH_LIMIT = Gauge(
    "radai_scheduler_batch_limit",
    "The size at which the model's batches close: its card's runtime.max_batch, lowered to what fits in the "
    "GPU memory budget, to the fastest measured batch (scheduler.batch_tuning) and after an out-of-memory split",
    ["model"],
    registry=REGISTRY,
)
DELIVERIES = Counter(
    "radai_deliveries_total",
    "Delivery attempts of one job's results to one destination, by outcome: delivered, retry (failed, "
    "queued again after a back-off), dead (failed past the retry limit)",
    ["destination", "outcome"],
    registry=REGISTRY,
)
DELIVERY_SECONDS = Histogram(
    "radai_delivery_attempt_seconds",
    "Time one delivery attempt takes (association and every C-STORE), by destination and outcome",
    ["destination", "outcome"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
DELIVERIES_PENDING = Gauge(
    "radai_deliveries_pending",
    "Deliveries queued or being sent, per destination",
    ["destination"],
    registry=REGISTRY,
)
DELIVERIES_DEAD = Gauge(
    "radai_deliveries_dead",
    "Dead-lettered deliveries (past the retry limit, waiting for `radai studies retry`), per destination",
    ["destination"],
    registry=REGISTRY,
)
DESTINATION_UP = Gauge(
    "radai_destination_up",
    "1 when the destination answered the last C-ECHO (echoed in the background and by /readyz), else 0",
    ["destination"],
    registry=REGISTRY,
)
SHADOW_AGREEMENT = Histogram(
    "radai_shadow_agreement",
    "Agreement of a shadow model version with the active version on the same series: Dice per label "
    "(label = the label's name) for segmentation, F1 of matched findings (label = 'findings') for detection",
    ["model", "version", "label"],
    buckets=(0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0),
    registry=REGISTRY,
)
SHADOW_RUNS = Counter(
    "radai_shadow_runs_total",
    "Shadow runs by outcome (compared, failed); their results are never sent",
    ["model", "version", "outcome"],
    registry=REGISTRY,
)
AUDIT_EVENTS = Counter(
    "radai_audit_events_total",
    "Records written to the audit log, by event (association.accepted, model.activated, result.delivered, ...)",
    ["event"],
    registry=REGISTRY,
)
MODEL_ACTIVATIONS = Counter(
    "radai_model_switches_total",
    "Times a running server switched which versions it serves (activation, shadow, add, remove)",
    registry=REGISTRY,
)


class GpuMemoryCollector(Collector):
    """`radai_gpu_memory_bytes{device,kind}` at scrape time: `used` and `total` of each CUDA device (the
    driver's figures, every process included) and `reserved` by this process's PyTorch caching allocator.

    Reported only once torch is loaded and has initialised CUDA (a model runs on the GPU): a scrape never
    imports torch nor creates a CUDA context. No series at all on a machine without a GPU."""

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "radai_gpu_memory_bytes",
            "GPU memory per CUDA device: used and total (driver), reserved (this process's PyTorch allocator)",
            labels=["device", "kind"],
        )
        torch = sys.modules.get("torch")
        cuda = getattr(torch, "cuda", None)
        if cuda is not None and cuda.is_available() and cuda.is_initialized():
            for index in range(cuda.device_count()):
                free, total = cuda.mem_get_info(index)
                device = f"cuda:{index}"
                gauge.add_metric([device, "used"], float(total - free))
                gauge.add_metric([device, "total"], float(total))
                gauge.add_metric([device, "reserved"], float(cuda.memory_reserved(index)))
        yield gauge


REGISTRY.register(GpuMemoryCollector())

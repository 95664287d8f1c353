"""Prometheus metrics of a node, served on ``--metrics-port``.

Nodes keep plain counters; collectors read them (and the live state) at scrape time, so
the hot path never touches the metrics library. Only latencies, which need every sample,
go into histograms as they happen. Each node has its own registry, so several nodes can
share a process (tests, the local cluster's in-process use).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def serve(registry: CollectorRegistry, host: str, port: int) -> int:
    """Serve /metrics over HTTP from a background thread; returns the bound port."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server.server_port


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _per_node(name: str, doc: str, values: dict[str, float], kind=GaugeMetricFamily) -> Metric:
    family = kind(name, doc, labels=["node"])
    for node, value in values.items():
        family.add_metric([node], value)
    return family


class _NodeMetrics(Collector):
    """A node's own registry, with this collector (reading the node at scrape time) in it."""

    def __init__(self, node) -> None:
        self.node = node
        self.registry = CollectorRegistry()
        self.registry.register(self)


class StageMetrics(_NodeMetrics):
    """A pipeline stage after the first: its compute and its Tier 2 nodes."""

    def __init__(self, node) -> None:
        super().__init__(node)
        self.attention_round_trip = Histogram(
            "glinthawk_attention_round_trip_seconds", "Send of q/k/v to receipt of the attention output, per layer",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )

    def collect(self) -> Iterator[Metric]:
        node = self.node
        yield _counter("glinthawk_tier1_busy_seconds", "Seconds Tier 1 spent computing stages",
                       node.merger.stats.busy_seconds if node.merger else 0.0)
        links = {a: l for a, l in node.links.items() if l.alive}
        yield _per_node("glinthawk_network_sent_bytes", "Frame bytes sent to each Tier 2 node",
                        {a: l.conn.bytes_sent for a, l in links.items()}, CounterMetricFamily)
        yield _per_node("glinthawk_network_received_bytes", "Frame bytes received from each Tier 2 node",
                        {a: l.conn.bytes_received for a, l in links.items()}, CounterMetricFamily)


class Tier1Metrics(StageMetrics):
    def collect(self) -> Iterator[Metric]:
        node, stats = self.node, self.node.stats
        yield _counter("glinthawk_requests_admitted", "Requests accepted into the queue", stats.admitted)
        yield _counter("glinthawk_requests_finished", "Requests answered with a result", stats.finished)
        yield _counter("glinthawk_requests_failed", "Requests answered with an error", stats.failed)
        yield _counter("glinthawk_generated_tokens", "Tokens sampled", node.generated_tokens)
        yield _counter("glinthawk_first_tokens", "Requests that finished prefill (got their first token)",
                       stats.first_tokens)
        yield _gauge("glinthawk_requests_waiting", "Requests queued for KV room", len(node.waiting))
        yield _gauge("glinthawk_micro_batches_in_flight", "Micro-batches holding sequences",
                     node.micro_batches_in_flight)
        links = {a: l for a, l in node.links.items() if l.alive}
        yield _per_node("glinthawk_kv_tokens_used", "KV tokens reserved on each Tier 2 node",
                        {a: l.used_tokens for a, l in links.items()})
        yield _per_node("glinthawk_kv_tokens_free", "KV tokens free on each Tier 2 node",
                        {a: l.free_tokens for a, l in links.items()})
        yield from super().collect()


class Tier2Metrics(_NodeMetrics):
    def __init__(self, node) -> None:
        super().__init__(node)
        self.attention_seconds = Histogram(
            "glinthawk_tier2_attention_seconds", "Append + attention time of one micro-batch at one layer",
            labelnames=["layer"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )

    def collect(self) -> Iterator[Metric]:
        node = self.node
        store = node.store
        yield _gauge("glinthawk_kv_tokens_capacity", "KV capacity in tokens", store.capacity_tokens if store else 0)
        yield _gauge("glinthawk_kv_tokens_used", "KV tokens reserved", store.used_tokens if store else 0)
        yield _gauge("glinthawk_kv_tokens_free", "KV tokens free", store.free_tokens if store else 0)
        yield _gauge("glinthawk_kv_sequences", "Sequences holding KV here", store.num_sequences if store else 0)
        owner = node.owner
        yield _counter("glinthawk_network_sent_bytes", "Frame bytes sent to Tier 1", owner.bytes_sent if owner else 0)
        yield _counter("glinthawk_network_received_bytes", "Frame bytes received from Tier 1",
                       owner.bytes_received if owner else 0)

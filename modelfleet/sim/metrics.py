"""The sim's `/metrics`: vLLM's Prometheus names, labels and help texts.

Routing reads a server's queue from `/metrics`, and `modelfleet report` reads
its latency histograms, so the sim must be scraped exactly like vLLM 0.32
(`engine="0"`, `model_name=...` labels, the same buckets; compare
fixtures/vllm-0.32.0-cpu/metrics-*.txt). Only the series a client uses are
simulated; the rest of vLLM's hundreds of lines are left out.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")


class Histogram:
    """A Prometheus histogram: cumulative buckets rendered, per-bucket counts kept."""

    __slots__ = ("buckets", "counts", "total", "count")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def render(self, name: str, labels: str, out: list[str]) -> None:
        running = 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            running += n
            out.append(f'{name}_bucket{{engine="0",le="{bound}",{labels}}} {float(running)}')
        out.append(f'{name}_bucket{{engine="0",le="+Inf",{labels}}} {float(self.count)}')
        out.append(f'{name}_count{{engine="0",{labels}}} {float(self.count)}')
        out.append(f'{name}_sum{{engine="0",{labels}}} {self.total!r}')


@dataclass(frozen=True)
class CacheConfig:
    """What `vllm:cache_config_info` says about the KV cache (clients read its size there)."""

    block_size: int
    num_blocks: int
    prefix_caching: bool

    def labels(self) -> str:
        """vLLM's label names in vLLM's (sorted) order; only those the sim can answer truly."""
        return (f'block_size="{self.block_size}",enable_prefix_caching="{self.prefix_caching}",'
                f'engine="0",kv_cache_size_tokens="{self.block_size * self.num_blocks}",'
                f'num_gpu_blocks="{self.num_blocks}"')


class SimMetrics:
    """Counters and histograms of one sim; gauges are read live when rendered."""

    def __init__(self, model_name: str, cache: CacheConfig | None = None) -> None:
        self.labels = f'model_name="{model_name}"'
        self.cache = cache
        self.created = time.time()
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found there
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.success = dict.fromkeys(FINISHED_REASONS, 0)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.e2e = Histogram(LATENCY_BUCKETS)
        self.queue_time = Histogram(LATENCY_BUCKETS)
        self.http: dict[tuple[str, str, str], int] = {}

    def count_http(self, handler: str, method: str, status: int) -> None:
        """By status class, as vLLM's instrumentator; 499 (the client left) as it is."""
        key = (handler, method, "499" if status == 499 else f"{status // 100}xx")
        self.http[key] = self.http.get(key, 0) + 1

    def prefix_cache(self, *, queried: int, hit: int) -> None:
        """One request's lookup, in tokens, counted when it is admitted (as vLLM does)."""
        self.prefix_queries += queried
        self.prefix_hits += hit

    def finished(self, *, reason: str, prompt_tokens: int, generation_tokens: int,
                 queued_s: float, ttft_s: float | None, e2e_s: float) -> None:
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += generation_tokens
        self.success[reason] = self.success.get(reason, 0) + 1
        self.queue_time.observe(queued_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        self.e2e.observe(e2e_s)

    def render(self, running: int, waiting: int, kv_usage: float) -> str:
        lb = self.labels
        out: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        head("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.")
        out.append(f'vllm:num_requests_running{{engine="0",{lb}}} {float(running)}')
        head("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.")
        out.append(f'vllm:num_requests_waiting{{engine="0",{lb}}} {float(waiting)}')
        head("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.")
        out.append(f'vllm:kv_cache_usage_perc{{engine="0",{lb}}} {float(kv_usage)}')
        for name, value, text in (
                ("queries", self.prefix_queries,
                 "Prefix cache queries, in terms of number of queried tokens."),
                ("hits", self.prefix_hits, "Prefix cache hits, in terms of number of cached tokens.")):
            head(f"vllm:prefix_cache_{name}_total", "counter", text)
            out.append(f'vllm:prefix_cache_{name}_total{{engine="0",{lb}}} {float(value)}')
            head(f"vllm:prefix_cache_{name}_created", "gauge", text)
            out.append(f'vllm:prefix_cache_{name}_created{{engine="0",{lb}}} {self.created!r}')
        head("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.")
        out.append(f'vllm:prompt_tokens_total{{engine="0",{lb}}} {float(self.prompt_tokens)}')
        head("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.")
        out.append(f'vllm:generation_tokens_total{{engine="0",{lb}}} {float(self.generation_tokens)}')
        head("vllm:request_success_total", "counter", "Count of successfully processed requests.")
        for reason, n in self.success.items():
            out.append(f'vllm:request_success_total{{engine="0",finished_reason="{reason}",{lb}}} {float(n)}')
        head("vllm:time_to_first_token_seconds", "histogram", "Histogram of time to first token in seconds.")
        self.ttft.render("vllm:time_to_first_token_seconds", lb, out)
        head("vllm:e2e_request_latency_seconds", "histogram", "Histogram of e2e request latency in seconds.")
        self.e2e.render("vllm:e2e_request_latency_seconds", lb, out)
        head("vllm:request_queue_time_seconds", "histogram",
             "Histogram of time spent in WAITING phase for request.")
        self.queue_time.render("vllm:request_queue_time_seconds", lb, out)
        if self.cache is not None:
            head("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig")
            out.append(f"vllm:cache_config_info{{{self.cache.labels()}}} 1.0")
        head("http_requests_total", "counter", "Total number of requests by method, status and handler.")
        for (handler, method, status), n in self.http.items():
            out.append(f'http_requests_total{{handler="{handler}",method="{method}",status="{status}"}} {float(n)}')
        out.append("")
        return "\n".join(out)

"""The simulated engine: a real OpenAI-compatible HTTP server that behaves like vLLM under load.

It is a simulator, never a model: replies are filler text, embeddings are
hashes of the text. Tests, the demo and the benchmarks run against it, so it
starts in well under a second and costs little CPU.

- `content`: tokens, filler text, embedding vectors (pure functions);
- `engine`: the timing model (batch, queue, steps with chunked prefill, continuous batching);
- `kvcache`: the KV cache's blocks, prefix caching and LRU eviction;
- `faults`: what `POST /sim/fault` can break;
- `metrics`: `/metrics` in vLLM's Prometheus names;
- `wire`: vLLM's request checks and response shapes;
- `server`: the aiohttp app and `serve()`.

Import `modelfleet.sim.server` only where a server is run: it pulls in aiohttp.
"""

"""`python -m bench.canned_server`: a server that answers at once with real vLLM bytes.

For measuring what a client costs, the server must cost the client nothing but the bytes of
a real answer: no sleeps, no generation, no variation. This one replays the captured vLLM
0.32.0 samples in tests/fixtures/vllm-0.32.0-cpu/ (a chat answer, its SSE stream, /metrics,
/v1/models) for every request, whatever it asks. A stream is written one event per write, as
an engine writes one chunk per token, so a client reads it in as many pieces as the timing
of the two processes makes (never all in one read by construction).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aiohttp import web

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "vllm-0.32.0-cpu"
MODEL = "tiny-llama"  # the model name inside the captured answers


def _events(sse: bytes) -> list[bytes]:
    """The captured stream cut into its events, each with its blank-line terminator."""
    return [event + b"\n\n" for event in sse.split(b"\n\n") if event.strip()]


def make_app() -> web.Application:
    chat = (FIXTURES / "chat.json").read_bytes().strip()
    events = _events((FIXTURES / "chat-stream.sse").read_bytes())
    metrics = (FIXTURES / "metrics-chat.txt").read_bytes()
    models = (FIXTURES / "models.json").read_bytes().strip()

    async def completions(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        if not body.get("stream"):
            return web.Response(body=chat, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        await response.write_eof()
        return response

    async def health(request: web.Request) -> web.Response:
        return web.Response()

    async def metrics_page(request: web.Request) -> web.Response:
        return web.Response(body=metrics, content_type="text/plain")

    async def models_page(request: web.Request) -> web.Response:
        return web.Response(body=models, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/v1/models", models_page)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.canned_server", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    web.run_app(make_app(), host=args.host, port=args.port, print=None, access_log=None,
                handle_signals=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

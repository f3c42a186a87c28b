"""`modelfleet gateway`: the fleet as one OpenAI-compatible HTTP endpoint.

A thin shell over the client core (`AsyncModelServer.relay()`), so every OpenAI client
gets what library callers get: peak-EWMA routing, prefix awareness, failover, retries
before the first byte. One concept per module:

  app.py      the routes (aiohttp.web) and the checks a body needs before routing
  errors.py   errors in OpenAI's shape, and the map from the core's exceptions
  auth.py     API keys: loading them, checking a request's Bearer key in constant time
  limits.py   body size (413) and requests at once (429 with Retry-After)
  access.py   the access log: one line per request, no key, no prompt
  metrics.py  the Prometheus registry given to the core, and the gateway's own series
  server.py   one worker: listen, serve, drain on SIGTERM / SIGINT
  workers.py  --workers N: N processes on one port (SO_REUSEPORT) and their supervisor
"""

from modelfleet.gateway.auth import KeyCheck, load_keys
from modelfleet.gateway.server import run_worker, serve

__all__ = ["KeyCheck", "load_keys", "run_worker", "serve"]

"""`lorakit serve`: an OpenAI-compatible server for one base model and many LoRA adapters.

`cache` (which adapters exist and which are loaded: LRU within a count and a byte limit),
`engine` (the worker that owns the model: requests, events, run-time adapter changes), `waiting`
(the bounded queue, round-robin by adapter), `scheduler` (continuous batching: rows join and leave
at every step, each step one forward) over `packed` (that forward: every request's new tokens in
one sequence, their keys and values in per-request slots), `static` (whole batches, the
earlier batcher), `metrics` (Prometheus text), `bodies` (what a request may hold, and reading it),
`replies` (JSON and server-sent-event answers), `app` (the FastAPI routes); the command line is
`lorakit.commands.serve`.
"""

from .app import create_app
from .bodies import Limits
from .cache import AdapterCache
from .engine import Engine

__all__ = ["AdapterCache", "Engine", "Limits", "create_app"]

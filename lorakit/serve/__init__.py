"""`lorakit serve`: an OpenAI-compatible server for one base model and many LoRA adapters.

`cache` (which adapters exist and which are loaded, LRU), `engine` (the dynamic batcher that runs
concurrent requests as mixed-adapter batches), `bodies` (what a request may hold, and reading it), `app` (the FastAPI routes); the command line is `lorakit.commands.serve`.
"""

from .app import create_app
from .bodies import Limits
from .cache import AdapterCache
from .engine import Engine

__all__ = ["AdapterCache", "Engine", "Limits", "create_app"]

"""The web dashboard (``pgq dashboard``): queues, jobs, workers, schedules, and actions behind a token.

Needs the ``dashboard`` extra (Starlette, uvicorn, Jinja2, python-multipart). htmx and uPlot are vendored
under ``static/vendor`` with their licenses: nothing to build.
"""

from __future__ import annotations

from .server import serve
from .web import create_app

__all__ = ["create_app", "serve"]

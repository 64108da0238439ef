"""The HTTP edge: the only package that imports Flask, and one that never imports torch.

Routes turn requests into calls on the domain (`service.chat`, `service.models`, `service.history`) and
its answers and errors into JSON; `create_app` wires them together (gunicorn runs
`service.web:create_app()`).
"""

from .app import create_app

__all__ = ["create_app"]

"""Kept for older imports: the builders live in `service.devmodels`."""

from service.devmodels import *  # noqa: F403

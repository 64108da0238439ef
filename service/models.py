"""The models this service offers, which of them are loaded, and switching between them.

Each loaded model is its own `Engine`. Switching starts the new one loading in the background while
the current one keeps answering, if memory holds both; if it would not, the current one is unloaded
first (the service says "loading" meanwhile) rather than risking the whole process. What a model's
weights take and what this machine allows are `inference.memory`'s figures.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from .catalog import CatalogEntry, accepts_images, lookup
from .errors import ModelUnavailable, UnknownModel
from .inference.engine import Engine
from .inference.memory import default_budget, weights_bytes

log = logging.getLogger(__name__)


def public_id(source: str) -> str:
    """What clients see and send: a hub id as is, a local folder by its name."""
    if source.startswith(("/", ".", "~")) or os.path.isdir(source):
        return PurePath(source).name
    return source


@dataclass
class Offer:
    id: str
    source: str
    catalog: CatalogEntry | None
    engine: Engine | None = None
    error: str | None = None

    @property
    def accepts_images(self) -> bool:
        return self.catalog.accepts_images if self.catalog else accepts_images(self.source)

    @property
    def state(self) -> str:
        if self.engine is None:
            return "failed" if self.error else "available"
        return {"ok": "loaded", "loading": "loading", "error": "failed"}.get(self.engine.state, "available")


class ModelManager:
    """Offered models by id; the active one answers requests that name no model."""

    def __init__(
        self,
        sources: list[str],
        default: str,
        make_engine: Callable[[str], Engine],
        *,
        dtype: str = "bfloat16",
        budget_bytes: int | None = None,
    ):
        self._offers: dict[str, Offer] = {}
        for source in dict.fromkeys([default, *sources]):
            offer = Offer(public_id(source), source, lookup(source))
            self._offers[offer.id] = offer
        self._make_engine = make_engine
        self._dtype = dtype
        self._budget = default_budget() if budget_bytes is None else budget_bytes
        self._lock = threading.Lock()
        self._active = public_id(default)
        self._pending: str | None = None

    @classmethod
    def single(cls, engine: Engine, source: str) -> ModelManager:
        """One model, already made (tests, or a caller that built its own engine)."""
        manager = cls([source], source, lambda _: engine, budget_bytes=0)
        manager._offers[public_id(source)].engine = engine
        return manager

    def start(self) -> ModelManager:
        """Start loading the default model."""
        offer = self._offers[self._active]
        if offer.engine is None:
            offer.engine = self._make_engine(offer.source).start()
        return self

    # --- lookups -----------------------------------------------------------------------------
    @property
    def offered(self) -> list[str]:
        return list(self._offers)

    def find(self, model: str) -> Offer:
        """The offer for an id or a source; `UnknownModel` names the offered ones."""
        offer = self._offers.get(model) or next((o for o in self._offers.values() if o.source == model), None)
        if offer is None:
            raise UnknownModel(model, self.offered)
        return offer

    def accepting_images(self) -> list[str]:
        """Ids of the offered models that read images (for the error a text model gives an image)."""
        return [o.id for o in self._offers.values() if o.accepts_images]

    @property
    def active(self) -> Offer:
        with self._lock:
            self._promote()
            return self._offers[self._active]

    def engine(self, model: str | None = None) -> Engine:
        """The engine for `model` (default: the active one). Raises `UnknownModel`, or
        `ModelUnavailable` when that model is not loaded."""
        offer = self.active if model is None else self.find(model)
        if offer.engine is None:
            if self._pending is not None:
                raise ModelUnavailable(f"switching to {self._pending}: the model is still loading")
            raise ModelUnavailable(
                offer.error
                or f"the model {offer.id} is not loaded; select it first (POST /api/models/active)"
            )
        return offer.engine

    def status(self) -> tuple[str, Offer, Engine | None]:
        """For health: "loading" | "ok" | "error", the offer it is about, and its engine if any."""
        offer = self.active
        if offer.engine is None and self._pending is not None:
            offer = self._offers[self._pending]
        engine = offer.engine
        if engine is None:
            return ("error" if offer.error else "loading"), offer, None
        state = {"ok": "ok", "error": "error"}.get(engine.state, "loading")
        return state, offer, engine

    def engines(self) -> list[tuple[str, Engine]]:
        """Every offer that has an engine (loading, loaded or failed), by id: what /metrics reports."""
        return [(o.id, o.engine) for o in list(self._offers.values()) if o.engine is not None]

    def describe(self) -> tuple[str, list[dict[str, Any]]]:
        """The active id and every offer, from one reading of each model's state.

        A model may finish loading between two reads; reading once and promoting from that reading keeps
        the listing from saying "loaded" of the model it is switching to while naming the old one active.
        """
        with self._lock:
            states = {o.id: o.state for o in self._offers.values()}
            self._promote(states)
            active, pending = self._active, self._pending
        out = []
        for offer in self._offers.values():
            entry = offer.catalog
            error = offer.error or (offer.engine.error if offer.engine else None)
            out.append(
                {
                    "id": offer.id,
                    "source": offer.source,
                    "state": states[offer.id],
                    "error": error,
                    "active": offer.id == active,
                    "pending": offer.id == pending,
                    "params_b": entry.params_b if entry else None,
                    "context_length": entry.context_length if entry else None,
                    "licence": entry.licence if entry else None,
                    "notes": entry.notes if entry else None,
                    "memory_gb": entry.memory_gb(self._dtype) if entry else None,
                    "accepts_images": offer.accepts_images,
                }
            )
        return active, out

    # --- switching ---------------------------------------------------------------------------
    def select(self, model: str) -> Offer:
        """Make `model` the active one: at once if loaded, else once it has loaded."""
        offer = self.find(model)
        with self._lock:
            if offer.state == "loaded":
                self._active, self._pending = offer.id, None
                return offer
            if offer.state == "loading":
                self._pending = offer.id
                return offer
            self._make_room(offer)
            offer.error = None
            offer.engine = self._make_engine(offer.source).start()
            self._pending = offer.id
            return offer

    def _promote(self, states: dict[str, str] | None = None) -> None:
        if self._pending is None:
            return
        pending = self._offers[self._pending]
        state = pending.state if states is None else states[pending.id]
        if state == "loaded":
            log.info("switched to %s", pending.id)
            self._active, self._pending = pending.id, None
        elif state == "failed":
            self._pending = None
            if self._offers[self._active].engine is None:  # nothing left to fall back on
                self._active = pending.id

    def _make_room(self, incoming: Offer) -> None:
        """Unload loaded models, least recently chosen first, until `incoming` fits the budget."""
        need = weights_bytes(incoming.source, self._dtype) or 0
        loaded = [o for o in self._offers.values() if o.engine is not None and o is not incoming]
        # the active one goes last: it keeps answering while the new one loads, if that fits
        loaded.sort(key=lambda o: o.id == self._active)
        used = sum(weights_bytes(o.source, self._dtype) or 0 for o in loaded)
        for offer in loaded:
            if used + need <= self._budget:
                break
            log.info("unloading %s to make room for %s", offer.id, incoming.id)
            used -= weights_bytes(offer.source, self._dtype) or 0
            if offer.engine is not None:
                offer.engine.close()
            offer.engine = None
            if offer.id == self._active:
                self._active = incoming.id

    def close(self) -> None:
        for offer in self._offers.values():
            if offer.engine is not None:
                offer.engine.close()

"""Domain errors: what the service refuses or cannot do, in the words a client should read.

Raised by the domain (chat, models, history, the engine), which knows nothing of HTTP: none of these
carries a status code. `service/web/errors.py` is the one place that turns each into a status, headers
and OpenAI's JSON error body. Each carries the message a client sees and, where it helps the client,
what to do about it: `param` names the field at fault, `retry_after` the seconds to wait.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error a client is told about; `message` is what it reads."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ServiceError, ValueError):
    """The request is wrong: a missing field, a value out of range, a malformed cursor."""


class PromptTooLong(ServiceError):
    """Even the system prompt and the newest turn do not fit the context with room for the reply."""


class UnknownModel(ServiceError, LookupError):
    """A model this service does not offer; `offered` lists the ids it does."""

    def __init__(self, model: str, offered: list[str]):
        super().__init__(
            f"the model {model!r} is not offered here; offered: {', '.join(offered)}", param="model"
        )
        self.model = model
        self.offered = offered


class ModelUnavailable(ServiceError):
    """The model is not loaded: still loading, failed to load, unloaded, or being switched to."""

    retry_after = 10


class QueueFull(ServiceError):
    """Too many requests are waiting; the caller should retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__("the model is busy: too many requests are waiting")
        self.retry_after = retry_after


class GenerationFailed(ServiceError):
    """The model failed while writing the reply (the engine goes on with other requests)."""

    def __init__(self, error: str):
        super().__init__(f"generation failed: {error}")
        self.error = error


class ConversationNotFound(ServiceError, LookupError):
    """No such conversation for this owner (whether it exists for someone else is not said)."""

    def __init__(self, conversation_id: str = ""):
        super().__init__("no such conversation")
        self.conversation_id = conversation_id


class HistoryDisabled(ServiceError):
    """History is off (private mode): nothing is stored, so there is nothing to find."""

    def __init__(self) -> None:
        super().__init__("history is off on this service (private mode): nothing is stored")


class HistoryUnavailable(ServiceError):
    """The shared history database (PostgreSQL) cannot be reached just now; the caller may retry.
    The message never names the database's address or password."""

    retry_after = 5

    def __init__(self) -> None:
        super().__init__("the conversation history is unreachable just now; retry in a few seconds")

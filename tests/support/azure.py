"""What every Azure test needs around the fake ARM: a credential that signs nothing, the real SDK
clients connected to the fake over loopback, the invoke tasks run in-process, and a guard that nothing
looks up the machine's public IP or runs DefaultAzureCredential (which calls 169.254.169.254).

A pytest plugin (conftest.py loads it through `pytest_plugins`): its fixtures are `fake` (a started
FakeArm, stopped after the test), `clients` (connected to it) and `azure_offline` (the guard plus a
scratch HOME, a wide terminal and none of the user's Azure settings); an Azure test module asks for the
guard with `pytestmark = pytest.mark.usefixtures("azure_offline")`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError
from invoke import Collection, Program

import tasks
from infra.azure import credentials
from infra.azure.credentials import AzureClients, Cloud, RetrySettings
from infra.azure.deployment import TOKEN_ENV
from tests.support.fake_arm import FakeArm

FAST = RetrySettings(total=3, backoff_factor=0.01, backoff_max=0.05, polling_interval=0)


class FakeCredential:
    """Stands in for DefaultAzureCredential: a token, and a record of the scopes asked for."""

    def __init__(self, fail: bool = False):
        self.scopes: list[str] = []
        self.fail = fail

    def get_token(self, *scopes: str, **kwargs) -> AccessToken:
        self.scopes += scopes
        if self.fail:
            raise ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token")
        return AccessToken("fake-token", int(time.time()) + 3600)


def connect_to(fake: FakeArm, credential=None, retry: RetrySettings = FAST) -> AzureClients:
    """The real SDK clients, pointed at the fake and trusting its throw-away CA."""
    return credentials.connect(
        Cloud(arm_endpoint=fake.url),
        fake.subscription,
        credential or FakeCredential(),
        retry=retry,
        verify=fake.ca_path,
    )


def invoke(*argv: str) -> int:
    """Runs `invoke ARGV...` on tasks.py in this process, as the user would; returns the exit code."""
    try:
        Program(namespace=Collection.from_module(tasks), version="test").run(["invoke", *argv])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture
def azure_offline(monkeypatch, tmp_path) -> None:
    def no_lookup(*args, **kwargs):
        raise AssertionError("tests must never look up the public IP (pass --allow-from)")

    def no_default_credential(*args, **kwargs):
        raise AssertionError("DefaultAzureCredential must not run in tests (it calls 169.254.169.254)")

    monkeypatch.setattr(credentials, "discover_public_ip", no_lookup)
    monkeypatch.setattr(credentials, "default_credential", no_default_credential)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")
    for name in ("XDG_CONFIG_HOME", TOKEN_ENV, "REQUESTS_CA_BUNDLE", "ACCESS_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake(tmp_path) -> Iterator[FakeArm]:
    arm = FakeArm().start(tmp_path)
    yield arm
    arm.stop()


@pytest.fixture
def clients(fake) -> AzureClients:
    return connect_to(fake)

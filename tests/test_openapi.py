"""docs/openapi.yaml is part of the product: it must be valid OpenAPI, list exactly the routes the app
serves, and describe the responses it really sends (and the requests it really takes)."""

from __future__ import annotations

import copy
import json
import re
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator, ValidationError
from openapi_spec_validator import validate as validate_openapi
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from service.inference.engine import Engine
from service.web import create_app

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(DOC.read_text())
BASE = "urn:qwen-box:openapi"
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
AUTOMATIC = {"HEAD", "OPTIONS"}  # Flask adds these to every route; the document leaves them out


def documented_routes(spec: dict[str, Any]) -> dict[str, set[str]]:
    return {path: {m for m in item if m in METHODS} for path, item in spec["paths"].items()}


def served_routes(app) -> dict[str, set[str]]:
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule.rule)
        routes.setdefault(path, set()).update(m.lower() for m in rule.methods - AUTOMATIC)
    return routes


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def _pointer(*parts: str) -> str:
    return "/" + "/".join(_escape(p) for p in parts)


def _at(pointer: str, spec: dict[str, Any] = SPEC) -> Any:
    node: Any = spec
    for part in pointer.lstrip("/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _deref(pointer: str) -> str:
    """Follow a `$ref` (to another object of the document) at `pointer`, if there is one there."""
    node = _at(pointer)
    return node["$ref"].removeprefix("#") if "$ref" in node else pointer


def check(instance: Any, pointer: str, spec: dict[str, Any] = SPEC) -> None:
    """Validate `instance` against the schema at `pointer` in the document (its $refs resolved)."""
    registry = Registry().with_resource(BASE, Resource.from_contents(spec, default_specification=DRAFT202012))
    validator = Draft202012Validator(
        {"$ref": f"{BASE}#{pointer}"}, registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    validator.validate(instance)


def sse_data(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]


def call(client, method: str, template: str, path: str | None = None, *, status: int, **kwargs):
    """Send a request and check it against the document: the JSON sent is a valid request body (or,
    with `invalid=True`, one the document refuses too), the status is documented for this operation,
    and the body matches that response's schema (each event's, for a stream)."""
    operation = _pointer("paths", template, method)
    assert method in SPEC["paths"][template], f"{method.upper()} {template} is not documented"
    invalid = kwargs.pop("invalid", False)  # a body sent on purpose to be refused
    if "json" in kwargs:
        schema = operation + _pointer("requestBody", "content", "application/json", "schema")
        if invalid:
            with pytest.raises(ValidationError):
                check(kwargs["json"], schema)
        else:
            check(kwargs["json"], schema)
    response = getattr(client, method)(path or template, **kwargs)
    assert response.status_code == status, response.get_data(as_text=True)
    responses = _at(operation + "/responses")
    assert str(status) in responses, f"{status} is not documented for {method.upper()} {template}"
    described = _deref(operation + _pointer("responses", str(status)))
    content = _at(described).get("content")
    if status == 204:
        assert content is None and response.get_data() == b""
        return response
    mimetype = response.mimetype
    ranges = (mimetype, mimetype.split("/")[0] + "/*", "*/*")
    documented = next((r for r in ranges if r in content), None)
    assert documented, f"{mimetype} is not documented for {status} of {method.upper()} {template}"
    media = described + _pointer("content", documented)
    if mimetype == "application/json":
        check(response.json, media + "/schema")
    elif mimetype == "text/event-stream":
        events = _at(media)["x-event-schema"]["$ref"].removeprefix("#")
        data = sse_data(response.get_data(as_text=True))
        assert data, "an empty stream"
        for payload in data:
            if payload != "[DONE]":
                check(json.loads(payload), events)
    return response


@pytest.fixture
def scripted_client(settings, scripted):
    return create_app(settings, engine=scripted("Hello there!")).test_client()


def test_the_document_is_valid_openapi_3_1():
    assert SPEC["openapi"].startswith("3.1")
    validate_openapi(SPEC)


def test_every_route_is_documented_with_its_methods_and_nothing_else(settings, engine):
    app = create_app(settings, engine=engine)
    assert served_routes(app) == documented_routes(SPEC)


def test_the_route_check_notices_a_missing_or_extra_route(settings, engine):
    served = served_routes(create_app(settings, engine=engine))
    spec = copy.deepcopy(SPEC)
    del spec["paths"]["/api/models/active"]
    assert served != documented_routes(spec)
    spec = copy.deepcopy(SPEC)
    spec["paths"]["/api/health"]["delete"] = spec["paths"]["/api/health"]["get"]
    assert served != documented_routes(spec)


def test_the_schema_check_notices_a_response_that_drifted():
    ok = {
        "status": "ok",
        "model": "m",
        "model_id": "m",
        "context_length": 4096,
        "history": True,
        "queue": {
            "active": 0,
            "waiting": 0,
            "completed": 0,
            "cancelled": 0,
            "failed": 0,
            "load_seconds": 1.0,
        },
    }
    check(ok, "/components/schemas/HealthOk")
    for drifted in ({**ok, "extra": 1}, {k: v for k, v in ok.items() if k != "queue"}, {**ok, "status": 1}):
        with pytest.raises(ValidationError):
            check(drifted, "/components/schemas/HealthOk")


def test_examples_in_the_document_are_valid_requests():
    for name, schema in SPEC["components"]["schemas"].items():
        for example in schema.get("examples", []):
            check(example, _pointer("components", "schemas", name))


def test_health_page_and_static_files(client):
    call(client, "get", "/api/health", status=200)
    call(client, "get", "/", status=200)
    call(client, "get", "/static/{filename}", "/static/style.css", status=200)
    call(client, "get", "/static/{filename}", "/static/no-such-file.css", status=404)


def test_health_while_loading_and_after_a_failed_load(settings, tiny_backend):
    release = threading.Event()
    loading = Engine(lambda: release.wait() and tiny_backend).start()
    try:
        call(create_app(settings, engine=loading).test_client(), "get", "/api/health", status=503)
    finally:
        release.set()

    def broken():
        raise OSError("model folder not found")

    failed = Engine(broken).start()
    failed.wait_ready(5)
    call(create_app(settings, engine=failed).test_client(), "get", "/api/health", status=503)


def test_native_chat_json_stream_and_refusals(scripted_client):
    c = scripted_client
    r = call(c, "post", "/api/chat", json={"message": "Hi", "max_tokens": 16}, status=200)
    assert r.json["message"]["content"] == "Hello there!"
    body = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    call(c, "post", "/api/chat", json={**body, "stream": True, "stop": ["zzz"]}, status=200)
    call(c, "post", "/api/chat", json={"message": "Hi", "tempreature": 1}, invalid=True, status=422)
    call(c, "post", "/api/chat", json={"message": "Hi", "model": "nope"}, status=400)
    call(c, "post", "/api/chat", data="{not json", content_type="application/json", status=400)
    call(c, "post", "/api/chat", data="hi", content_type="text/plain", status=415)
    call(c, "post", "/api/chat", json={"message": "Hi", "conversation_id": "f" * 24}, status=404)


def test_models_menu_and_switching(scripted_client):
    c = scripted_client
    menu = call(c, "get", "/api/models", status=200).json
    call(c, "post", "/api/models/active", json={"model": menu["active"]}, status=200)
    call(c, "post", "/api/models/active", json={"model": "nope"}, status=400)
    call(c, "post", "/api/models/active", json={"name": "x"}, invalid=True, status=422)


def test_conversations_round_trip(scripted_client):
    c = scripted_client
    conv = call(c, "post", "/api/conversations", json={}, status=201).json
    item = f"/api/conversations/{conv['id']}"
    call(c, "post", "/api/chat", json={"conversation_id": conv["id"], "message": "Hi"}, status=200)
    call(c, "get", "/api/conversations", "/api/conversations?limit=5", status=200)
    call(c, "get", "/api/conversations", "/api/conversations?limit=0", status=422)
    got = call(c, "get", "/api/conversations/{cid}", item, status=200).json
    assert [m["role"] for m in got["messages"]] == ["user", "assistant"]
    call(c, "patch", "/api/conversations/{cid}", item, json={"title": "Renamed"}, status=200)
    call(c, "patch", "/api/conversations/{cid}", item, json={}, invalid=True, status=422)
    r = call(c, "get", "/api/conversations/{cid}/export", item + "/export", status=200)
    assert r.headers["Content-Disposition"].startswith("attachment")
    call(c, "delete", "/api/conversations/{cid}", item, status=204)
    call(c, "get", "/api/conversations/{cid}", item, status=404)
    call(c, "get", "/api/conversations/{cid}", "/api/conversations/not-an-id", status=404)


def test_conversation_edits_regenerate_and_import(scripted_client):
    c = scripted_client
    conv = call(c, "post", "/api/conversations", json={}, status=201).json
    cid = conv["id"]
    for text in ("Hi", "Again"):
        call(c, "post", "/api/chat", json={"conversation_id": cid, "message": text}, status=200)
    alt = f"/api/conversations/{cid}/alternatives"
    call(c, "post", "/api/conversations/{cid}/alternatives", alt, json={"content": "v2"}, status=201)
    call(
        c,
        "post",
        "/api/conversations/{cid}/alternatives",
        alt,
        json={"status": "stop"},
        invalid=True,
        status=422,
    )
    shown = f"/api/conversations/{cid}/messages/3"
    got = call(
        c, "patch", "/api/conversations/{cid}/messages/{position}", shown, json={"shown": 0}, status=200
    )
    assert got.json["messages"][3]["meta"]["shown"] == 0
    cut = f"/api/conversations/{cid}/truncate"
    call(c, "post", "/api/conversations/{cid}/truncate", cut, json={"from": 2}, status=200)
    call(c, "post", "/api/conversations/{cid}/truncate", cut, json={"from": -1}, invalid=True, status=422)
    exported = c.get(f"/api/conversations/{cid}/export").json
    call(c, "post", "/api/conversations/import", json=exported, status=201)
    call(c, "post", "/api/conversations/import", json={"title": "t"}, invalid=True, status=422)


def test_history_off_answers_404(settings, scripted):
    c = create_app(replace(settings, history=False), engine=scripted()).test_client()
    r = call(c, "get", "/api/conversations", status=404)
    assert r.json["error"]["code"] == "history_disabled"


def test_openai_models_and_completions(scripted_client):
    c = scripted_client
    model = call(c, "get", "/v1/models", status=200).json["data"][0]["id"]
    messages = [{"role": "user", "content": "Hi"}]
    r = call(c, "post", "/v1/chat/completions", json={"model": model, "messages": messages}, status=200)
    assert r.json["choices"][0]["message"]["content"] == "Hello there!"
    stream = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    r = call(c, "post", "/v1/chat/completions", json=stream, status=200)
    assert sse_data(r.get_data(as_text=True))[-1] == "[DONE]"
    call(c, "post", "/v1/chat/completions", json={"model": "nope", "messages": messages}, status=404)
    refused = {"model": model, "messages": messages, "n": 2}
    call(c, "post", "/v1/chat/completions", json=refused, invalid=True, status=400)


def test_token_rate_limit_and_body_size(settings, scripted):
    guarded = replace(settings, access_token="t" * 20, rate_limit="1/minute", max_body_bytes=200)
    c = create_app(guarded, engine=scripted()).test_client()
    call(c, "get", "/api/health", status=200)
    for template in ("/api/models", "/v1/models", "/api/conversations"):
        call(c, "get", template, status=401)
    auth = {"Authorization": "Bearer " + "t" * 20}
    call(c, "post", "/api/chat", json={"message": "Hi"}, headers=auth, status=200)
    call(c, "post", "/api/chat", json={"message": "Hi"}, headers=auth, status=429)
    big = {"model": "x" * 300}
    call(c, "post", "/api/models/active", json=big, headers=auth, status=413)

"""Images: a tiny random SmolVLM (Idefics3) answering questions about pictures the tests draw with
Pillow, through /api/chat, /v1 with the official openai client, and every bad input refused."""

from __future__ import annotations

import base64
import io
import struct
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from PIL import Image

from service.config import Settings
from service.dev.tiny_vision import build_tiny_qwen_vl, build_tiny_vision
from service.images import BOMB_PIXELS
from service.inference.vision import VisionBackend, VisionOptions
from service.web import create_app
from tests.support.live import LiveServer


def png(
    size: tuple[int, int] = (96, 64), color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG"
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def noisy_png() -> bytes:
    """A PNG whose pixel data is most of the file, so cutting it short cuts pixels."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming `width` x `height` pixels, with a tiny (incomplete) body."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vision(tmp_path_factory.mktemp("tiny-smolvlm"), endless=True)


@pytest.fixture(scope="module")
def app(vision_dir: Path, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The real loading path: the text model is the default, the vision model is offered beside it
    and made active here (so requests naming no model go to it)."""
    settings = Settings(
        model_id=str(tiny_model_dir),
        models=str(vision_dir),
        log_level="warning",
        data_dir=str(tmp_path_factory.mktemp("data")),
        rate_limit="1000/minute",
    )
    app = create_app(settings)
    models = app.extensions["models"]
    assert models.engine().wait_ready(60)
    models.select(vision_dir.name)
    deadline = time.monotonic() + 60
    while models.active.id != vision_dir.name and time.monotonic() < deadline:
        time.sleep(0.05)
    assert models.active.id == vision_dir.name
    return app


@pytest.fixture
def client(app):
    return app.test_client()


def test_a_question_about_a_picture_is_answered(client, vision_dir):
    r = client.post(
        "/api/chat", json={"message": "What colour is this?", "images": [b64(png())], "max_tokens": 4}
    )
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["model"] == vision_dir.name
    assert body["usage"]["completion_tokens"] == 4
    # the image became image tokens in the prompt: far more than the question's few words
    text_only = client.post("/api/chat", json={"message": "What colour is this?", "max_tokens": 4}).get_json()
    assert body["usage"]["prompt_tokens"] > text_only["usage"]["prompt_tokens"] + 20


def test_the_image_reaches_the_model(vision_dir):
    """Different pictures, same question: the model's first-token scores differ (greedy tokens of a
    random model may not), so the pixels are read, not dropped on the way."""
    import torch

    backend = VisionBackend(str(vision_dir), dtype="int8")
    logits = []
    for color in ((255, 0, 0), (0, 0, 255)):
        picture = Image.open(io.BytesIO(png(color=color)))
        ids, inputs = backend.prepare([{"role": "user", "content": "colour?", "images": [picture]}])
        with torch.inference_mode():
            logits.append(backend.model(input_ids=torch.tensor([ids]), **inputs).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])
    assert "torchvision" not in sys.modules


def test_streamed_answer_with_images_in_messages(client):
    body = {
        "messages": [{"role": "user", "content": "", "images": [data_url(png()), b64(png(fmt="JPEG"))]}],
        "stream": True,
        "max_tokens": 3,
    }
    r = client.post("/api/chat", json=body)
    assert r.status_code == 200
    assert '"type": "done"' in r.get_data(as_text=True).replace('":"', '": "')


@pytest.mark.parametrize(
    ("image", "words"),
    [
        (b64(b"GIF89a" + b"\0" * 20), "images.0"),
        (b64(noisy_png()[: len(noisy_png()) // 2]), "corrupt or truncated"),
        (b64(b"%PDF-1.4 hello"), "supported format"),
        (b64(bomb_png(20_000, 20_000)), "too many pixels"),
        ("not base64!!", "base64"),
        ("https://example.com/cat.png", "not fetched"),
        (b64(png(fmt="BMP")), "supported format"),
    ],
)
def test_bad_images_are_refused_with_a_clear_422(client, app, image, words):
    """/api answers a request it cannot accept with 422 (as for any invalid field), /v1 with 400."""
    r = client.post("/api/chat", json={"message": "what is it?", "images": [image], "max_tokens": 2})
    assert r.status_code == 422, r.get_json()
    assert words in r.get_json()["error"]["message"]
    # and the service goes on serving
    assert client.post("/api/chat", json={"message": "hi", "max_tokens": 1}).status_code == 200


def test_image_limits(client, app):
    settings: Settings = app.extensions["settings"]
    too_many = [b64(png())] * (settings.max_images + 1)
    r = client.post("/api/chat", json={"message": "hi", "images": too_many})
    assert r.status_code == 422 and "at most 4" in r.get_json()["error"]["message"]
    big = b64(b"\x89PNG" + b"\0" * (settings.image_max_bytes + 10))
    r = client.post("/api/chat", json={"message": "hi", "images": [big]})
    assert (
        r.status_code == 422 and f"larger than {settings.image_max_bytes}" in r.get_json()["error"]["message"]
    )
    assert BOMB_PIXELS == Image.MAX_IMAGE_PIXELS  # Pillow's own limit, named


def test_a_text_model_given_an_image_names_the_models_that_can_see(client, tiny_model_dir, vision_dir):
    r = client.post(
        "/api/chat", json={"message": "what?", "images": [b64(png())], "model": tiny_model_dir.name}
    )
    assert r.status_code == 422
    message = r.get_json()["error"]["message"]
    assert "cannot see images" in message and vision_dir.name in message


def test_a_text_model_refuses_pictures_without_decoding_them(client, tiny_model_dir, monkeypatch):
    """Four chats with four 9459 x 9459 RGBA PNGs each (under the pixel limit) sent to a text model took a
    worker from 1.2 to 3.6 GB and 22-26 s to answer 422: the pixels were decoded before anything asked
    whether they were wanted. Now the headers are read and nothing is decoded."""
    from service import images

    def never(*args, **kwargs):
        raise AssertionError("a picture no model will see was decoded")

    monkeypatch.setattr(images, "_decode", never)
    big = b64(bomb_png(9459, 9459))
    body = {"message": "what?", "images": [big] * 4, "model": tiny_model_dir.name}
    for _ in range(4):
        r = client.post("/api/chat", json=body)
        assert r.status_code == 422 and "cannot see images" in r.get_json()["error"]["message"]


def test_pixels_decoded_at_once_stay_within_the_budget():
    """However many requests decode together, the pixels held at once never pass the budget; an image
    larger than the whole budget still decodes, alone."""
    import threading

    from service.images import PixelBudget

    budget, peak, lock = PixelBudget(100), [0], threading.Lock()
    inside = threading.Barrier(2, timeout=30)  # two of 40-pixel images fit together, three do not

    def decode(pixels: int) -> None:
        with budget.held(pixels):
            with lock:
                peak[0] = max(peak[0], budget.in_use)
            if pixels == 40:
                try:
                    inside.wait()
                except threading.BrokenBarrierError:
                    pass

    threads = [threading.Thread(target=decode, args=(n,)) for n in (40, 40, 40, 40, 250, 30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert peak[0] <= 100 and budget.in_use == 0


def test_a_large_jpeg_is_decoded_at_a_fraction_of_its_size(monkeypatch):
    """A JPEG larger than IMAGE_MAX_PIXELS is decoded straight at 1/2, 1/4 or 1/8 of its size (its
    full-size pixels are never held), then scaled to the cap."""
    from service.images import open_picture

    buf = io.BytesIO()
    Image.new("RGB", (4000, 3000), (200, 30, 30)).save(buf, "JPEG", quality=80)
    picture = open_picture(buf.getvalue(), where="images.0", max_bytes=5_000_000, max_pixels=1_048_576)
    assert picture.original_size == (4000, 3000)
    loaded, load = [], Image.Image.load

    def recording(self):
        loaded.append(self.size)
        return load(self)

    monkeypatch.setattr(Image.Image, "load", recording)
    decoded = picture.pixels()
    assert loaded and max(w * h for w, h in loaded) <= 4000 * 3000 // 4
    assert decoded.size[0] * decoded.size[1] <= 1_048_576 and decoded.getpixel((10, 10))[0] > 150


def test_models_say_which_accept_images(client, tiny_model_dir, vision_dir):
    data = {m["id"]: m for m in client.get("/api/models").get_json()["data"]}
    assert data[vision_dir.name]["accepts_images"] is True
    assert data[tiny_model_dir.name]["accepts_images"] is False


# --- /v1 with the official client over a real gunicorn -----------------------------------------------
@pytest.fixture(scope="module")
def server(vision_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with LiveServer({"MODEL_ID": str(vision_dir)}, tmp_path_factory.mktemp("logs") / "gunicorn.log") as s:
        yield s


@pytest.fixture(scope="module")
def oai(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _image_message(url: str, text: str = "What is in this picture?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


def test_openai_client_streams_an_answer_about_an_image(oai, vision_dir):
    stream = oai.chat.completions.create(
        model=vision_dir.name,
        messages=_image_message(data_url(png(fmt="WEBP"), "image/webp")),
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.prompt_tokens > 30  # the image's tokens


def test_openai_client_remote_urls_are_refused(oai, vision_dir):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(
            model=vision_dir.name, messages=_image_message("http://169.254.169.254/latest"), max_tokens=2
        )
    assert "not fetched" in str(caught.value)


def test_openai_client_corrupt_image(oai, vision_dir):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(
            model=vision_dir.name,
            messages=_image_message(data_url(noisy_png()[: len(noisy_png()) // 2])),
            max_tokens=2,
        )
    assert "image_url" in str(caught.value)


def test_the_fit_check_names_the_vm_size_a_vision_model_needs():
    from infra.azure.sizes import check_vm

    assert check_vm("HuggingFaceTB/SmolVLM-500M-Instruct", "int8", "Standard_B2s").fits
    large = check_vm("Qwen/Qwen2.5-VL-7B-Instruct", "int8", "Standard_B2s")
    assert not large.fits
    assert "--size Standard_B4ms" in large.message
    assert "--model HuggingFaceTB/SmolVLM-500M-Instruct" in large.message  # a model that also sees
    assert check_vm("Qwen/Qwen2.5-VL-7B-Instruct", "int8", "Standard_B4ms").fits


def test_a_body_may_exceed_max_body_bytes_only_by_its_images(client, app):
    settings: Settings = app.extensions["settings"]
    big = Image.effect_noise((700, 700), 80).convert("RGB")
    buffer = io.BytesIO()
    big.save(buffer, "PNG")
    photo = b64(buffer.getvalue())
    assert settings.max_body_bytes < len(photo) < settings.image_max_bytes
    r = client.post("/api/chat", json={"message": "describe", "images": [photo], "max_tokens": 1})
    assert r.status_code == 200, r.get_json()
    padding = "x" * settings.max_body_bytes
    r = client.post("/api/chat", json={"message": padding, "images": [photo], "max_tokens": 1})
    assert r.status_code == 413
    assert "larger than 1000000 bytes" in r.get_json()["error"]["message"]


# --- history -----------------------------------------------------------------------------------------
def test_images_are_stored_with_their_message_and_deleted_with_the_conversation(client, app):
    store = app.extensions["history"]
    data_dir = Path(app.extensions["settings"].data_dir)
    cid = client.post("/api/conversations", json={}).get_json()["id"]
    picture = png(color=(10, 200, 10))
    # a refused image stores nothing: no message, no image
    bad = client.post(
        "/api/chat", json={"message": "x", "images": [b64(picture[:40])], "conversation_id": cid}
    )
    assert bad.status_code == 422
    assert client.get(f"/api/conversations/{cid}").get_json()["messages"] == []
    assert store.image_bytes(cid) == 0

    r = client.post(
        "/api/chat", json={"message": "", "images": [b64(picture)], "conversation_id": cid, "max_tokens": 2}
    )
    assert r.status_code == 200, r.get_json()
    first_prompt = r.get_json()["usage"]["prompt_tokens"]
    conv = client.get(f"/api/conversations/{cid}").get_json()
    question = conv["messages"][0]
    assert conv["title"] == "Image"
    [ref] = question["meta"]["images"]
    assert ref["mime"] == "image/png" and (ref["width"], ref["height"]) == (96, 64)
    # in the history database (0600 like the rest of it), not in files beside it
    assert store.images(client_owner(client), cid, [ref["id"]]) == {ref["id"]: picture}
    assert store.image_bytes(cid) == len(picture)
    assert not (data_dir / "images").exists()
    # shown again on reload, to its owner only
    served = client.get(f"/api/conversations/{cid}/images/{ref['id']}")
    assert served.status_code == 200 and served.data == picture and served.mimetype == "image/png"
    stranger = app.test_client()
    assert stranger.get(f"/api/conversations/{cid}/images/{ref['id']}").status_code == 404
    assert client.get(f"/api/conversations/{cid}/images/{'0' * 64}").status_code == 404
    # the export references the image (id and type), it does not carry the bytes
    export = client.get(f"/api/conversations/{cid}/export").get_json()
    assert export["messages"][0]["meta"]["images"] == [ref]
    # the next turn sees the stored image again: its prompt holds the image tokens plus the new turn
    r = client.post("/api/chat", json={"message": "and now?", "conversation_id": cid, "max_tokens": 2})
    assert r.get_json()["usage"]["prompt_tokens"] > first_prompt + 2
    assert client.delete(f"/api/conversations/{cid}").status_code == 204
    assert store.image_bytes(cid) == 0


def client_owner(client) -> str:
    """The owner id the service gave this test client (its cookie), as the store knows it."""
    from service.web.conversations import COOKIE

    return "browser:" + client.get_cookie(COOKIE).value


def _instance(vision_dir: Path, data_dir: Path, database_url: str):
    app = create_app(
        Settings(
            model_id=str(vision_dir),
            log_level="warning",
            data_dir=str(data_dir),
            database_url=database_url,
            rate_limit="1000/minute",
        )
    )
    assert app.extensions["models"].engine().wait_ready(60)
    return app


def test_a_picture_one_instance_stored_is_shown_and_read_by_another(vision_dir, tmp_path, history_database):
    """Instances behind a load balancer share the history (PostgreSQL; on SQLite, one DATA_DIR): the
    image is in the database, so any of them shows it after a reload and gives it back to the model,
    a truncate through either drops the pictures no message names, and a delete drops the rest."""
    from service.web.conversations import COOKIE

    shared = tmp_path / "shared"
    first = _instance(vision_dir, shared if not history_database else tmp_path / "a", history_database)
    second = _instance(vision_dir, shared if not history_database else tmp_path / "b", history_database)
    a, b = first.test_client(), second.test_client()
    cid = a.post("/api/conversations", json={}).get_json()["id"]
    b.set_cookie(COOKIE, a.get_cookie(COOKIE).value)  # the same browser, sent elsewhere by the balancer
    red, blue = png(color=(250, 0, 0)), png(color=(0, 0, 250))
    for picture, text in ((red, "this one?"), (blue, "and this?")):
        body = {"message": text, "images": [b64(picture)], "conversation_id": cid, "max_tokens": 2}
        assert a.post("/api/chat", json=body).status_code == 200
    messages = b.get(f"/api/conversations/{cid}").get_json()["messages"]
    red_id, blue_id = (m["meta"]["images"][0]["id"] for m in messages if m["role"] == "user")
    assert b.get(f"/api/conversations/{cid}/images/{blue_id}").data == blue
    # the other instance gives both pictures back to the model on the next turn
    alone = b.post("/api/chat", json={"message": "more", "max_tokens": 2}).get_json()
    more = b.post("/api/chat", json={"message": "more", "conversation_id": cid, "max_tokens": 2}).get_json()
    assert more["usage"]["prompt_tokens"] > alone["usage"]["prompt_tokens"] + 2 * 30
    # edit and resend the second question: its picture goes with it, the first stays
    assert b.post(f"/api/conversations/{cid}/truncate", json={"from": 2}).status_code == 200
    assert a.get(f"/api/conversations/{cid}/images/{blue_id}").status_code == 404
    assert a.get(f"/api/conversations/{cid}/images/{red_id}").data == red
    store = first.extensions["history"]
    assert store.image_bytes(cid) == len(red)
    assert b.delete(f"/api/conversations/{cid}").status_code == 204
    assert store.image_bytes(cid) == 0 and not (tmp_path / "a" / "images").exists()


def test_a_truncate_keeps_a_picture_a_remaining_message_still_names(tmp_path, history_database):
    """No orphans, and no loss: one picture sent twice is one row, kept while either message stays."""
    from service.attachments import StoredImage
    from service.history import History, StoredMessage

    store = History(history_database or tmp_path / "history.db")
    try:
        conv = store.create("alice")
        picture = StoredImage("a" * 64, "image/png", png())
        other = StoredImage("b" * 64, "image/png", png(color=(1, 2, 3)))
        meta = {"images": [{"id": picture.id, "mime": "image/png", "width": 96, "height": 64}]}
        for images in ([picture], [picture, other]):
            names = {"images": [{**meta["images"][0], "id": i.id} for i in images]}
            store.append("alice", conv.id, StoredMessage("user", "look", meta=names), images)
            store.append("alice", conv.id, StoredMessage("assistant", "ok"))
        assert store.image_bytes(conv.id) == len(picture.data) + len(other.data)
        assert store.images("bob", conv.id, [picture.id]) == {}  # another owner's
        store.truncate("alice", conv.id, 2)  # the second question and its reply
        assert store.images("alice", conv.id, [picture.id, other.id]) == {picture.id: picture.data}
        store.truncate("alice", conv.id, 0)
        assert store.image_bytes(conv.id) == 0
    finally:
        store.close()


# --- Qwen2.5-VL: the catalog's larger vision model, on a tiny random network of its architecture ----
@pytest.fixture(scope="module")
def qwen_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("tiny-qwen2.5-vl"), endless=True)


@pytest.fixture(scope="module")
def qwen_client(qwen_vl_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    settings = Settings(
        model_id=str(qwen_vl_dir),
        log_level="warning",
        data_dir=str(tmp_path_factory.mktemp("qwen-data")),
        rate_limit="1000/minute",
    )
    app = create_app(settings)
    assert app.extensions["models"].engine().wait_ready(60)
    return app.test_client()


def test_qwen_vl_answers_about_a_picture_through_api_and_v1(qwen_client, qwen_vl_dir):
    r = qwen_client.post(
        "/api/chat", json={"message": "What colour is this?", "images": [b64(png())], "max_tokens": 5}
    )
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["model"] == qwen_vl_dir.name and body["usage"]["completion_tokens"] == 5
    # 96 x 64 pixels → resized to 84 x 56 (multiples of 28) → 6 x 4 patches of 14 pixels, merged 2 x 2:
    # 6 image tokens between <|vision_start|> and <|vision_end|>
    text_only = qwen_client.post("/api/chat", json={"message": "What colour is this?", "max_tokens": 5})
    assert text_only.status_code == 200
    assert body["usage"]["prompt_tokens"] == text_only.get_json()["usage"]["prompt_tokens"] + 6 + 2
    r = qwen_client.post(
        "/v1/chat/completions",
        json={
            "model": qwen_vl_dir.name,
            "messages": _image_message(data_url(png(fmt="JPEG"))),
            "max_tokens": 4,
        },
    )
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["usage"]["completion_tokens"] == 4
    # a conversation: the stored picture is read again on the next turn
    cid = qwen_client.post("/api/conversations", json={}).get_json()["id"]
    first = qwen_client.post(
        "/api/chat",
        json={"message": "and this?", "images": [b64(png())], "conversation_id": cid, "max_tokens": 2},
    ).get_json()
    again = qwen_client.post(
        "/api/chat", json={"message": "more", "conversation_id": cid, "max_tokens": 2}
    ).get_json()
    assert again["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"]
    assert "torchvision" not in sys.modules


def test_qwen_vl_decodes_at_the_positions_a_full_pass_would_use(qwen_vl_dir):
    """Each decode step's scores equal those of one forward pass over the prompt and the tokens so
    far: Qwen2.5-VL's 3-D rotary positions are carried into decoding (they once were the attention
    mask's count, a shape error), and a text-only prompt after a picture does not inherit its offset."""
    import torch

    backend = VisionBackend(str(qwen_vl_dir), dtype="float32")
    seen: list[torch.Tensor] = []
    sample = backend._sample
    backend._sample = lambda seq, logits: (seen.append(logits.clone()), sample(seq, logits))[1]  # type: ignore[method-assign]
    for picture in (Image.effect_noise((300, 200), 60).convert("RGB"), None):
        seen.clear()
        ids, inputs = backend.prepare(
            [{"role": "user", "content": "what?", "images": [picture] if picture else []}]
        )
        seq, token = backend.admit(ids, VisionOptions(max_tokens=8, inputs=inputs))
        tokens = [token] + [backend.step()[0] for _ in range(3)]
        backend.release(seq)
        whole = dict(inputs)
        if "mm_token_type_ids" in whole:  # the generated tokens are text
            kinds = whole["mm_token_type_ids"]
            whole["mm_token_type_ids"] = torch.cat([kinds, torch.zeros(1, 3, dtype=kinds.dtype)], dim=1)
        backend.model.get_submodule("model").rope_deltas = None
        with torch.inference_mode():
            reference = backend.model(input_ids=torch.tensor([ids + tokens[:-1]]), **whole).logits[0, -1]
        assert torch.allclose(seen[-1], reference, atol=1e-5), (seen[-1] - reference).abs().max()

"""The page with images, in a real headless Chromium: attach, paste and drop a picture the test draws
with Pillow, see its thumbnail before sending and in the transcript (again after a reload), and the
notice that offers to switch when the active model cannot see images. The models are real tiny
ones: the text default and a random SmolVLM beside it (service/dev/tiny_vision.py)."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import pytest
from PIL import Image

from service.config import Settings
from service.dev.tiny_vision import build_tiny_vision
from service.web import create_app
from tests.support.browser import expect, wait_ready, wait_reply

pytestmark = pytest.mark.browser

HOSTILE_NAME = "<img src=x onerror=alert(1)>.png"


def png(color: tuple[int, int, int] = (220, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (80, 48), color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vision(tmp_path_factory.mktemp("tiny-smolvlm-page"))


@pytest.fixture
def app(vision_dir: Path, tiny_model_dir: Path, tmp_path: Path):
    settings = Settings(
        model_id=str(tiny_model_dir),
        models=str(vision_dir),
        log_level="warning",
        data_dir=str(tmp_path / "data"),
    )
    app = create_app(settings)
    assert app.extensions["models"].engine().wait_ready(60)
    return app


def test_attach_switch_send_and_reload(page, serve, app, vision_dir):
    served = serve(app=app)
    page.goto(served.url)
    wait_ready(page)
    page.get_by_test_id("attach-file").set_input_files(
        {"name": HOSTILE_NAME, "mimeType": "image/png", "buffer": png()}
    )
    pending = page.get_by_test_id("attachments").get_by_test_id("thumbnail")
    expect(pending).to_have_count(1)
    assert pending.get_attribute("src").startswith("data:image/png;base64,")
    # the text model is active: the page says so and offers the one that sees
    expect(page.get_by_test_id("vision-notice")).to_be_visible()
    expect(page.get_by_test_id("vision-notice-text")).to_contain_text("cannot see images")
    switch = page.get_by_test_id("vision-switch")
    expect(switch).to_have_text(f"Switch to {vision_dir.name}")
    switch.click()
    expect(page.get_by_test_id("vision-notice")).to_be_hidden(timeout=30_000)
    wait_ready(page)

    page.get_by_test_id("input").fill("What is in the picture?")
    with page.expect_request(lambda r: r.url.endswith("/api/chat") and r.method == "POST") as info:
        page.get_by_test_id("input").press("Enter")
    wait_reply(page, timeout=30_000)
    [turn] = info.value.post_data_json["messages"][-1:]
    assert base64.b64decode(turn["images"][0].split(",", 1)[1]) == png()
    assert info.value.post_data_json["conversation_id"]
    expect(page.get_by_test_id("attachments")).to_be_hidden()
    user = page.locator('[data-testid="message"][data-role="user"]')
    expect(user.get_by_test_id("thumbnail")).to_have_count(1)
    reply = page.locator('[data-testid="message"][data-role="assistant"]').last
    expect(reply).not_to_have_attribute("data-finish", "error")

    # a reload shows the stored image again (fetched from the server, not from the page's memory)
    page.reload()
    wait_ready(page)
    thumb = page.locator('[data-testid="message"][data-role="user"]').get_by_test_id("thumbnail")
    expect(thumb).to_have_count(1)
    expect(thumb).to_have_attribute(
        "src", __import__("re").compile(r"^data:image/png;base64,"), timeout=10_000
    )
    assert page.problems == []  # the hostile file name ran nothing, and the CSP allowed every image


def _drop_or_paste(page, how: str, data: bytes) -> None:
    page.evaluate(
        """([how, bytes]) => {
            const file = new File([new Uint8Array(bytes)], 'drawn.png', { type: 'image/png' });
            const transfer = new DataTransfer();
            transfer.items.add(file);
            const init = { bubbles: true, cancelable: true };
            if (how === 'paste') {
                document.getElementById('input').dispatchEvent(
                    new ClipboardEvent('paste', { clipboardData: transfer, ...init }));
            } else {
                const area = document.querySelector('.composer-area');
                area.dispatchEvent(new DragEvent('dragover', { dataTransfer: transfer, ...init }));
                area.dispatchEvent(new DragEvent('drop', { dataTransfer: transfer, ...init }));
            }
        }""",
        [how, list(data)],
    )


def test_paste_and_drop_add_thumbnails_which_can_be_removed(page, serve, app):
    served = serve(app=app)
    page.goto(served.url)
    wait_ready(page)
    _drop_or_paste(page, "paste", png((0, 0, 200)))
    _drop_or_paste(page, "drop", png((0, 200, 0)))
    items = page.get_by_test_id("attachments").get_by_test_id("attachment")
    expect(items).to_have_count(2)
    items.first.get_by_test_id("attachment-remove").click()
    expect(items).to_have_count(1)
    items.first.get_by_test_id("attachment-remove").click()
    expect(page.get_by_test_id("attachments")).to_be_hidden()
    expect(page.get_by_test_id("vision-notice")).to_be_hidden()
    time.sleep(0.1)
    assert page.problems == []


def test_a_refused_send_keeps_its_images_in_the_composer(page, serve, app, vision_dir):
    """Sent to the text model anyway, the picture is refused (422): the question and the picture are
    back in the composer, so switching to the model that sees and sending again needs no re-attach."""
    served = serve(app=app)
    page.goto(served.url)
    wait_ready(page)
    page.get_by_test_id("attach-file").set_input_files(
        [
            {"name": "one.png", "mimeType": "image/png", "buffer": png()},
            {"name": "two.png", "mimeType": "image/png", "buffer": png((0, 90, 200))},
        ]
    )
    pending = page.get_by_test_id("attachments").get_by_test_id("thumbnail")
    expect(pending).to_have_count(2)
    page.get_by_test_id("input").fill("What is in the picture?")
    with page.expect_response(lambda r: r.url.endswith("/api/chat")) as refused:
        page.get_by_test_id("input").press("Enter")
    assert refused.value.status == 422
    expect(page.get_by_test_id("error")).to_contain_text("cannot see images")
    expect(pending).to_have_count(2)
    assert [pending.nth(i).get_attribute("src") for i in range(2)] == [
        "data:image/png;base64," + base64.b64encode(png()).decode(),
        "data:image/png;base64," + base64.b64encode(png((0, 90, 200))).decode(),
    ]
    expect(page.get_by_test_id("input")).to_have_value("What is in the picture?")
    expect(page.locator('[data-testid="message"][data-role="user"]')).to_have_count(0)
    expect(page.get_by_test_id("vision-notice")).to_be_visible()

    page.get_by_test_id("vision-switch").click()
    expect(page.get_by_test_id("vision-notice")).to_be_hidden(timeout=30_000)
    wait_ready(page)
    with page.expect_request(lambda r: r.url.endswith("/api/chat") and r.method == "POST") as info:
        page.get_by_test_id("input").press("Enter")
    wait_reply(page, timeout=30_000)
    assert len(info.value.post_data_json["messages"][-1]["images"]) == 2
    expect(page.get_by_test_id("attachments")).to_be_hidden()
    user = page.locator('[data-testid="message"][data-role="user"]')
    expect(user.get_by_test_id("thumbnail")).to_have_count(2)

"""The upload page in a real headless browser (Debian's chromium driven by Playwright),
against the Flask app and a real TorchServe serving both dog-breed models. Screenshots of
the result pages are saved to test-artifacts/ (ui-dog.png is the README's picture)."""

from __future__ import annotations

import base64
import io
import shutil
import threading
from pathlib import Path

import pytest
import waitress
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from serving.archive import build_archive
from serving.server import LocalServer, free_port
from tests.conftest import photo_file
from ui.app import create_app

pytestmark = [pytest.mark.browser, pytest.mark.torchserve]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine notes advise: no first-run, no background traffic to a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def ts_client(dog_export, imagenet_dogs_export, tmp_path_factory):
    store = tmp_path_factory.mktemp("ui_store")
    build_archive(dog_export, "dog_breeds", store)  # before imagenet_dogs by name
    build_archive(imagenet_dogs_export, "imagenet_dogs", store)
    with LocalServer(store, tmp_path_factory.mktemp("ui_ts")) as client:  # load_models=all
        yield client


@pytest.fixture(scope="module")
def app_url(ts_client):
    # waitress, as `make ui` serves the page.
    server = waitress.create_server(create_app(ts_client), host="127.0.0.1", port=free_port())
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.effective_port}/"
    server.close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def page():
    assert Path(CHROMIUM).exists(), "chromium missing: `make browser` installs Debian's chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 900, "height": 1000})
        finally:
            browser.close()


def upload(page, app_url: str, model: str, path: Path) -> None:
    page.goto(app_url)
    page.select_option("#model", model)
    page.set_input_files("#image", str(path))
    expect(page.locator("#preview")).to_be_visible()
    page.click("#submit")


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)
    assert (ARTIFACTS / name).stat().st_size > 10_000


def test_the_model_that_works_out_of_the_box_is_listed_first(page, app_url):
    page.goto(app_url)
    expect(page.locator("#model option")).to_have_text(["imagenet_dogs", "dog_breeds"])


def test_upload_a_dog_photo_and_read_its_breed(page, app_url, ts_client):
    expected = ts_client.predict("imagenet_dogs", photo_file("dog_labrador").read_bytes())
    assert expected["subject"] == "dog" and expected["breed"] == "Labrador retriever"
    upload(page, app_url, "imagenet_dogs", photo_file("dog_labrador"))
    # The answer waits on TorchServe; a cold worker on a busy 2-core machine can take a while.
    expect(page.locator("#headline")).to_have_text("A dog: Labrador retriever", timeout=60_000)
    expect(page.locator("#bars .bar")).to_have_count(len(expected["top_k"]))
    expect(page.locator("#error")).to_have_text("")
    screenshot(page, "ui-dog.png")


def test_upload_a_face_and_read_the_breed_shown(page, app_url, ts_client):
    expected = ts_client.predict("imagenet_dogs", photo_file("astronaut").read_bytes())
    assert expected["subject"] == "human"
    upload(page, app_url, "imagenet_dogs", photo_file("astronaut"))
    expect(page.locator("#headline")).to_have_text(
        f"A person. You look like a {expected['resembles']}.", timeout=60_000
    )
    expect(page.locator("#bars .bar")).to_have_count(len(expected["top_k"]))
    screenshot(page, "ui-human.png")


def test_upload_a_text_file_and_read_the_error_shown(page, app_url, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("these are my notes, not a photo")
    page.goto(app_url)
    expect(page.locator("#model option")).to_have_count(2)
    page.set_input_files("#image", str(text))
    page.click("#submit")
    expect(page.locator("#error")).to_contain_text("imagenet_dogs refused the image", timeout=60_000)
    expect(page.locator("#error")).to_contain_text("not a decodable image")
    expect(page.locator("#headline")).to_have_text("")


def test_torchserve_down_is_a_readable_message(dog_export, tmp_path):
    from serving.client import Client

    dead = Client(
        f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}", key_file=None, timeout=5
    )
    app = create_app(dead).test_client()
    r = app.post("/api/predict", data={"model": "x", "image": (photo_file("astronaut").open("rb"), "a.png")})
    assert r.status_code == 502 and "TorchServe is not reachable" in r.get_json()["error"]


def test_why_overlays_the_map_on_the_photo(page, app_url, ts_client):
    """After the answer, "Why?" shows the photo with the breed's map in colour and the colour
    scale; the picture is the server's overlay for the same photo; a second click hides it."""
    expected = ts_client.explain("imagenet_dogs", photo_file("dog_labrador").read_bytes(), overlay=True)
    upload(page, app_url, "imagenet_dogs", photo_file("dog_labrador"))
    expect(page.locator("#headline")).to_have_text("A dog: Labrador retriever", timeout=60_000)
    expect(page.locator("#overlay")).to_be_hidden()
    page.click("#why")
    expect(page.locator("#overlay")).to_be_visible(timeout=60_000)
    expect(page.locator("#scale")).to_be_visible()
    expect(page.locator("#why-text")).to_contain_text("Labrador retriever")
    src = page.locator("#overlay").get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    # The browser decoded the PNG: its natural size is that of the server's overlay.
    size = page.locator("#overlay").evaluate("img => [img.naturalWidth, img.naturalHeight]")
    want = Image.open(io.BytesIO(base64.b64decode(expected["explanation"]["overlay"]))).size
    assert tuple(size) == want and max(want) == 512
    screenshot(page, "ui-why.png")
    page.click("#why")
    expect(page.locator("#explained")).to_be_hidden()


def test_why_for_neither_says_there_is_nothing_to_explain(page, app_url):
    upload(page, app_url, "imagenet_dogs", photo_file("kitten"))
    expect(page.locator("#headline")).to_contain_text("Neither a dog nor a person", timeout=60_000)
    expect(page.locator("#why")).to_be_hidden()  # "none" answers have no top_k: no button

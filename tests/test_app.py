"""The upload-a-room-photo example app (examples/app): its own script serves a small IKEA index and a
real headless Chromium (Debian's, driven by Playwright) uploads photos to it; the upload checks, the
product-photo route and the words the page shows (headline, prices, no model scores) are also
tested in process with Flask's test client and hand-made results."""
import html
import importlib.util
import io
import json
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from conftest import REPO_ROOT, photo_bytes, running_server

flask = pytest.importorskip("flask", reason="the example app needs Flask: pip install -e '.[app]'")
pytest.importorskip("waitress", reason="the example app needs waitress: pip install -e '.[app]'")
requests = pytest.importorskip("requests", reason="the app tests post with requests: pip install -e '.[test]'")

APP_DIR = REPO_ROOT / "examples" / "app"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
CONCURRENT_UPLOADS = 20
ROOM_WISH = "a bright room with a soft rug"
# what a shopper must never read: term names, and numbers with 3 or more decimals (0.734, +0.012)
RAW_SCORE = re.compile(r"similarity|scene[ _]fit|diversity|\bscores?\b|\d\.\d{3}", re.IGNORECASE)
DATA_URI = re.compile(r'"data:[^"]*"')  # the inline preview: base64, not words


def chromium_path() -> str | None:
    """Debian's Chromium (`apt-get install chromium`), or $HGM_CHROMIUM."""
    candidate = os.environ.get("HGM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    return candidate if Path(candidate).is_file() else None


def load_app_module():
    spec = importlib.util.spec_from_file_location("hgm_example_app", APP_DIR / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def room_photos(ikea: Path) -> list[Path]:
    from hgm_mm.data import read_rooms

    return [room.image for room in read_rooms(ikea / "rooms.jsonl")[:CONCURRENT_UPLOADS]]


@pytest.fixture(scope="module")
def scene_labels(ikea_head_index: Path) -> set[str]:
    return set(json.loads((ikea_head_index / "model" / "hgm_config.json").read_text())["model"]["scene_labels"])


@pytest.fixture(scope="module")
def app_module():
    return load_app_module()


@pytest.fixture(scope="module")
def matcher(ikea_head_index: Path):
    from hgm_mm.ranking.matcher import Matcher

    return Matcher.load(ikea_head_index)


@pytest.fixture(scope="module")
def server(ikea_head_index: Path, tmp_path_factory) -> str:
    """`python examples/app/app.py --index DIR --port 0` in its own process; yields its URL."""
    with running_server([str(APP_DIR / "app.py"), "--index", str(ikea_head_index), "--host", "127.0.0.1",
                         "--port", "0", "--threads", "8"], tmp_path_factory.mktemp("server") / "stderr.log",
                        "the app") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="browser tests need Playwright: pip install -e '.[test]'")
    executable = chromium_path()
    if executable is None:
        pytest.skip("browser tests need Debian's Chromium: apt-get install -y chromium (or set HGM_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


def submit_photo(page, server: str, photo: Path, text: str = ""):
    """Fills the upload form and submits it; returns the HTTP response of the results page."""
    page.goto(server + "/")
    page.set_input_files("#photo", str(photo))
    if text:
        page.fill("#text", text)
    with page.expect_navigation() as navigation:
        page.click("button[type=submit]")
    return navigation.value


def expected_result(app_module, matcher, photo: Path, text: str):
    """What `Matcher.match` says of the photo as the app reads it (same decoding, same k)."""
    return matcher.match(image=app_module.read_room_photo(photo.read_bytes()), text=text,
                         k=app_module.DEFAULT_RESULTS)


def assert_headline_is_honest(headline: str, confident: str, result, app_module) -> None:
    """The scene in words when the result is confident of it; "not sure" and the two likeliest otherwise."""
    assert confident == ("true" if result.scene_confident else "false")
    if result.scene_confident:
        assert headline == app_module.scene_words(result.scene).capitalize()
        assert "not sure" not in headline.lower()
    else:
        assert headline.startswith("Not sure which room this is")
        for label in list(result.scene_probabilities)[:2]:
            assert app_module.scene_words(label) in headline


def assert_no_raw_scores(page_html: str, product_ids=()) -> None:
    """No term name and no 3-decimal number anywhere in the HTML, its attributes included; product
    ids ("001.660.95") and the inline preview are left out first, being no scores."""
    page_html = DATA_URI.sub('""', page_html)
    for product_id in sorted(product_ids, key=len, reverse=True):
        page_html = page_html.replace(product_id, "")
    found = RAW_SCORE.findall(page_html)
    assert not found, f"the page shows raw scores: {found[:5]}"


# -- in a real browser ------------------------------------------------------------------------------
# `browser` comes first in each test so that, without Chromium, the test skips before the server starts.
def test_room_photo_shows_scene_products_and_set(browser, page, server, room_photos, ikea_head_catalogue, scene_labels,
                                                 app_module, matcher, tmp_path):
    response = submit_photo(page, server, room_photos[0], text=ROOM_WISH)
    assert response.status == 200

    expected = expected_result(app_module, matcher, room_photos[0], ROOM_WISH)
    scene = page.get_attribute("#scene-label", "data-scene")
    assert scene in scene_labels and scene == expected.scene
    assert_headline_is_honest(page.inner_text("#scene-label"), page.get_attribute("#scene-label", "data-confident"),
                              expected, app_module)
    shown_scenes = page.eval_on_selector_all(".scene-probability", "els => els.map(e => e.dataset.scene)")
    percents = page.eval_on_selector_all(".scene-probability meter", "els => els.map(e => e.value)")
    assert shown_scenes == list(expected.scene_probabilities)[:app_module.SHOWN_SCENES]
    assert percents == sorted(percents, reverse=True) and all(p == int(p) for p in percents)
    assert 0 < sum(percents) <= 100 + len(percents)  # whole percents, each rounded
    names = page.eval_on_selector_all(".scene-probability span:first-child", "els => els.map(e => e.textContent)")
    assert names == [app_module.scene_words(label).capitalize() for label in shown_scenes]
    assert not any("_" in name for name in names)  # words, not labels

    page.wait_for_function("[...document.images].every(img => img.complete)")
    for section in ("#products", "#product-set"):
        cards = page.query_selector_all(f"{section} .product")
        assert cards, f"no products in {section}"
        for card in cards:
            product_id = card.get_attribute("data-product-id")
            assert product_id in ikea_head_catalogue
            assert card.query_selector(".title").inner_text() == ikea_head_catalogue[product_id].title
            assert card.query_selector(".category").inner_text() == ikea_head_catalogue[product_id].category.capitalize()
            photo = card.query_selector("img")
            assert photo.evaluate("img => img.naturalWidth") > 0
            assert card.query_selector(".reasons") is None
    set_ids = page.eval_on_selector_all("#product-set .product", "els => els.map(e => e.dataset.productId)")
    assert set_ids == [p.product_id for p in expected.product_set]  # the library's order, best first
    assert_no_raw_scores(page.content(), ikea_head_catalogue)
    assert len(page.query_selector_all("#products .product")) == 12
    assert page.evaluate("document.querySelector('img.preview').naturalWidth") > 0

    first = page.query_selector("#products .product")
    photo_url = first.query_selector("img").get_attribute("src")
    served = requests.get(server + photo_url, timeout=30)
    assert served.content == ikea_head_catalogue[first.get_attribute("data-product-id")].image.read_bytes()

    screenshot = tmp_path / "results.png"
    page.screenshot(path=str(screenshot), full_page=True)
    with Image.open(screenshot) as shot:
        assert shot.size[0] == 1280 and shot.size[1] > 900


def test_text_file_and_50_megapixel_photo_are_refused(browser, page, server, room_photos, tmp_path):
    text_file = tmp_path / "room.jpg"  # a name that claims a photo; the bytes decide
    text_file.write_text("this is a shopping list, not a photo\n")
    response = submit_photo(page, server, text_file)
    assert response.status == 415
    assert "not an image" in page.inner_text("#error")
    assert page.query_selector("#products") is None

    huge = tmp_path / "huge.jpg"
    Image.new("RGB", (10_000, 5_000), (190, 170, 150)).save(huge, quality=60)  # 50 megapixels
    assert huge.stat().st_size < 16 * 2**20  # under the byte limit: the pixel limit must refuse it
    started = time.monotonic()
    response = submit_photo(page, server, huge)
    assert response.status == 413
    message = page.inner_text("#error")
    assert "10000 x 5000" in message and "50.0 megapixels" in message and "limit is 25 megapixels" in message
    assert time.monotonic() - started < 30
    assert page.query_selector("#products") is None

    assert submit_photo(page, server, room_photos[1]).status == 200  # the server is still serving
    assert page.query_selector_all("#products .product")


def test_twenty_concurrent_uploads_all_succeed(browser, page, server, room_photos, scene_labels):
    photos = room_photos[:CONCURRENT_UPLOADS]
    assert len(photos) == CONCURRENT_UPLOADS
    start = threading.Barrier(CONCURRENT_UPLOADS)  # the posting threads and the browser go together

    def post(photo: Path) -> tuple[int, dict]:
        data = photo.read_bytes()
        start.wait(timeout=120)
        answer = requests.post(server + "/api/match", files={"photo": ("room.jpg", data, "image/jpeg")},
                               data={"text": "cosy and light"}, timeout=300)
        return answer.status_code, answer.json()

    page.goto(server + "/")
    page.set_input_files("#photo", str(photos[0]))
    with ThreadPoolExecutor(CONCURRENT_UPLOADS - 1) as pool:
        futures = [pool.submit(post, photo) for photo in photos[1:]]
        start.wait(timeout=120)
        with page.expect_navigation(timeout=300_000) as navigation:
            page.click("button[type=submit]")
        answers = [future.result() for future in futures]

    assert navigation.value.status == 200
    assert page.get_attribute("#scene-label", "data-scene") in scene_labels
    assert page.get_attribute("#scene-label", "data-confident") in ("true", "false")
    assert len(page.query_selector_all("#products .product")) == 12
    for status, document in answers:
        assert status == 200, document
        assert document["scene"] in scene_labels and document["scene"] == next(iter(document["scene_probabilities"]))
        assert isinstance(document["scene_confident"], bool)
        assert len(document["products"]) == 12 and document["product_set"]
        for product in document["products"]:
            assert product["photo_url"] == f"/products/{product['product_id']}/photo"
            assert {"score", "reasons", "why"} <= set(product)  # the JSON is for programs: scores stay
            assert "image" not in product["metadata"]  # no server path leaves the server


# -- in process: limits and routes ------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(app_module, matcher):
    return app_module.create_app(matcher).test_client()


def post_photo(client, data: bytes, *, path="/api/match", text="", filename="room.jpg"):
    return client.post(path, data={"photo": (io.BytesIO(data), filename), "text": text},
                       content_type="multipart/form-data")


def test_upload_over_the_byte_limit_is_refused(app_module, matcher):
    client = app_module.create_app(matcher, max_upload_bytes=100_000).test_client()
    big = os.urandom(150_000)
    answer = post_photo(client, big)
    assert answer.status_code == 413 and "larger than" in answer.get_json()["error"]
    page = post_photo(client, big, path="/match")
    assert page.status_code == 413 and b"larger than" in page.data and b'id="error"' in page.data
    assert post_photo(client, photo_bytes()).status_code == 200  # a photo under the limit still matches


@pytest.mark.parametrize("data, status, words", [
    (b"", 400, "Choose a photo"),
    (photo_bytes(format="GIF", mode="P"), 415, "not an image"),  # a real GIF: not an accepted format
    (photo_bytes(size=(640, 480))[:2000], 400, "truncated or corrupt"),
    (b"%PDF-1.4\n" + b"0" * 100, 415, "not an image"),
])
def test_uploads_that_are_not_usable_photos_are_refused(client, data, status, words):
    answer = post_photo(client, data)
    assert answer.status_code == status
    assert words in answer.get_json()["error"]


def test_wish_longer_than_the_limit_is_refused(client, app_module):
    answer = post_photo(client, photo_bytes(), text="x" * (app_module.MAX_TEXT_CHARS + 1))
    assert answer.status_code == 400 and "at most" in answer.get_json()["error"]


def test_png_webp_and_exif_rotated_photos_are_matched(client, app_module):
    for data in (photo_bytes(format="PNG", mode="RGBA"), photo_bytes(format="WEBP")):
        assert post_photo(client, data).status_code == 200
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), 90).save(buffer, format="JPEG", exif=exif)
    photo = app_module.read_room_photo(buffer.getvalue())
    assert photo.size == (200, 300) and photo.mode == "RGB"
    large = app_module.read_room_photo(photo_bytes(size=(3000, 2000)))
    from hgm_mm.apps.serving import WORKING_SIDE

    assert max(large.size) == WORKING_SIDE


def test_uploads_stay_in_memory(client, monkeypatch, tmp_path):
    import tempfile

    import werkzeug.formparser

    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was spooled to a temporary file")

    for module in (tempfile, werkzeug.formparser):
        for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile"):
            monkeypatch.setattr(module, name, no_disk, raising=False)
    noisy = Image.effect_noise((900, 900), 80).convert("RGB")  # about 1 MB as PNG, over werkzeug's 500 KB spill
    buffer = io.BytesIO()
    noisy.save(buffer, format="PNG")
    assert buffer.tell() > 600_000
    answer = post_photo(client, buffer.getvalue(), filename=str(tmp_path / "uploaded.png"))
    assert answer.status_code == 200 and answer.get_json()["products"]
    assert not (tmp_path / "uploaded.png").exists()  # the name a user sends is never used


def test_product_photos_are_served_by_index_id_only(client, ikea_head_catalogue):
    product_id, product = next(iter(ikea_head_catalogue.items()))
    answer = client.get(f"/products/{product_id}/photo")
    assert answer.status_code == 200 and answer.mimetype == "image/jpeg"
    assert answer.data == product.image.read_bytes()
    for unknown in ("no-such-product", "../../../../etc/passwd", str(product.image), "%2e%2e/app.py"):
        assert client.get(f"/products/{unknown}/photo", follow_redirects=True).status_code == 404


def test_words_are_shown_escaped(client):
    answer = post_photo(client, photo_bytes(), path="/match", text='<script>alert("hi")</script> oak')
    assert answer.status_code == 200 and b'class="product"' in answer.data
    assert b"<script>" not in answer.data and b"&lt;script&gt;" in answer.data


def test_pages_carry_a_content_security_policy(client):
    answer = client.get("/")
    assert answer.status_code == 200 and b'enctype="multipart/form-data"' in answer.data
    assert "default-src 'self'" in answer.headers["Content-Security-Policy"]
    assert answer.headers["X-Content-Type-Options"] == "nosniff"


def test_script_refuses_a_folder_that_is_not_an_index(app_module, tmp_path, capsys):
    assert app_module.main(["--index", str(tmp_path / "missing")]) == 2
    assert "hgm-mm index" in capsys.readouterr().err
    (tmp_path / "not-an-index").mkdir()
    assert app_module.main(["--index", str(tmp_path / "not-an-index")]) == 2
    assert "not a finished index folder" in capsys.readouterr().err


# -- the words a shopper reads ----------------------------------------------------------------------
def test_results_page_names_the_scene_only_when_confident_and_shows_no_scores(client, app_module, matcher,
                                                                              room_photos):
    photo = room_photos[2]
    answer = client.post("/match", data={"photo": (io.BytesIO(photo.read_bytes()), "room.jpg"), "text": ROOM_WISH},
                         content_type="multipart/form-data")
    assert answer.status_code == 200
    text = answer.get_data(as_text=True)
    expected = expected_result(app_module, matcher, photo, ROOM_WISH)
    label = re.search(r'<span id="scene-label" data-scene="([^"]+)"\s+data-confident="(true|false)">([^<]*)</span>',
                      text)
    assert label is not None and label.group(1) == expected.scene
    assert_headline_is_honest(html.unescape(label.group(3)), label.group(2), expected, app_module)
    assert_no_raw_scores(text, [p.product_id for p in [*expected.products, *expected.product_set]])
    assert text.count('class="product"') == len(expected.products) + len(expected.product_set)

    document = post_photo(client, photo.read_bytes(), text=ROOM_WISH).get_json()
    assert document["scene_confident"] == expected.scene_confident
    assert RAW_SCORE.search(json.dumps(document))  # the JSON keeps the scores for programs


def hand_made_result(app_module, probabilities: dict, confident: bool):
    from hgm_mm.ranking.matcher import MatchResult, RankedProduct

    sofa = RankedProduct("s1", 0.734, {"similarity": 0.7, "scene_fit": 0.034}, {
        "title": "KIVIK", "category": "sofa", "product_type": "3-seat sofa", "color": "Grey", "price": 1299,
        "currency": "SEK", "image": "/srv/photos/s1.jpg"}, why="A sofa: most living rooms in the catalogue have one.")
    lamp = RankedProduct("l1", 0.512, {"similarity": 0.5, "scene_fit": 0.012}, {"title": "MELODI", "category": "lamp"})
    return MatchResult(next(iter(probabilities)), probabilities, [sofa, lamp], [sofa, lamp], scene_confident=confident)


def test_headline_says_the_scene_or_that_it_is_not_sure(app_module):
    sure = hand_made_result(app_module, {"living_room": 0.81, "bedroom": 0.12, "kitchen": 0.066, "laundry": 0.004},
                            confident=True)
    assert app_module.scene_headline(sure) == "Living room"
    assert app_module.scene_percentages(sure) == [("living_room", "Living room", 81, "81%"),
                                                  ("bedroom", "Bedroom", 12, "12%"), ("kitchen", "Kitchen", 7, "7%")]
    assert app_module.scene_percentages(sure, count=4)[-1] == ("laundry", "Laundry room", 0, "<1%")

    unsure = hand_made_result(app_module, {"living_room": 0.36, "bedroom": 0.34, "kitchen": 0.30},
                              confident=False)
    assert app_module.scene_headline(unsure) == "Not sure which room this is — maybe a living room or a bedroom"
    unsure_outside = hand_made_result(app_module, {"outdoor": 0.4, "children_room": 0.3, "bathroom": 0.3},
                                      confident=False)
    assert app_module.scene_headline(unsure_outside) == ("Not sure which room this is — maybe an outdoor space or "
                                                         "a children's room")
    only_one = hand_made_result(app_module, {"hallway": 0.2}, confident=False)
    assert app_module.scene_headline(only_one) == "Not sure which room this is — maybe a hallway"


@pytest.mark.parametrize("metadata, shown", [
    ({"price": 1299}, "1,299.00"),
    ({"price": 19.5, "currency": "EUR"}, "19.50 EUR"),
    ({"price": 7, "currency": "$"}, "$7.00"),
    ({"price": "from 49 kr", "currency": "kr"}, "from 49 kr"),  # as the catalogue gives it, currency once
    ({"price": " 12,95 € "}, "12,95 €"),
    ({}, None),
    ({"price": None, "currency": "SEK"}, None),
    ({"price": ""}, None),
    ({"price": float("nan")}, None),
    ({"price": True}, None),
])
def test_prices_are_formatted_for_people(app_module, metadata, shown):
    assert app_module.format_price(metadata) == shown


def test_product_tiles_show_words_price_and_why_but_no_scores(client, app_module):
    from flask import render_template

    result = hand_made_result(app_module, {"living_room": 0.9, "bedroom": 0.1}, confident=True)
    sofa, lamp = result.products
    old = SimpleNamespace(product_id="o1", score=0.25, reasons={"similarity": 0.25},
                          metadata={"title": "RIBBA", "category": "decor", "size": "23x23 cm"})  # no `why` at all
    with client.application.test_request_context():
        tiles = {p.product_id: render_template("product.html", card=app_module.product_card(p))
                 for p in (sofa, lamp, old)}
        cards = {p.product_id: app_module.product_card(p) for p in (sofa, lamp, old)}
    assert cards["s1"].category == "Sofa" and cards["s1"].details == ["3-seat sofa", "Grey"]
    assert '<p class="price">1,299.00 SEK</p>' in tiles["s1"]
    assert "most living rooms in the catalogue have one" in tiles["s1"] and 'class="why"' in tiles["s1"]
    assert 'class="price"' not in tiles["l1"] and 'class="why"' not in tiles["l1"]
    assert cards["o1"].why == "" and 'class="why"' not in tiles["o1"] and "23x23 cm" in tiles["o1"]
    assert '<p class="category">Decor</p>' in tiles["o1"]
    for tile in tiles.values():
        assert_no_raw_scores(tile, ["s1", "l1", "o1"])
        assert "/srv/photos" not in tile  # a server path never reaches the page

"""`hgm-mm serve`: the JSON HTTP service over a small IKEA index built with the tiny random model.

In process through FastAPI's test client (routes, limits, refusals, OpenAPI), and as its own
process started by the CLI, under 20 concurrent clients and asked by `hgm-mm match --service`;
every answer is compared with what `Matcher.match` says of the same input in this process."""
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import photo_bytes, running_server

pytest.importorskip("fastapi", reason="the service needs FastAPI: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="the service reads forms with python-multipart: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the service runs on uvicorn: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the service tests post with httpx: pip install -e '.[serve]'")

CONCURRENT_CLIENTS = 20
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def matcher(ikea_head_index: Path):
    from hgm_mm.ranking.matcher import Matcher

    return Matcher.load(ikea_head_index)


@pytest.fixture(scope="module")
def client(matcher):
    from fastapi.testclient import TestClient

    from hgm_mm.apps.service import create_service

    return TestClient(create_service(matcher))


@pytest.fixture(scope="module")
def room_photos(ikea: Path) -> list[Path]:
    from hgm_mm.data import read_rooms

    return [room.image for room in read_rooms(ikea / "rooms.jsonl")[:CONCURRENT_CLIENTS]]


def expected(matcher, photo: bytes | None, text: str | None, **kwargs) -> dict:
    """What `Matcher.match` says of the input as the service reads it, as the service would send it."""
    from hgm_mm.apps.serving import read_room_photo, result_document

    image = read_room_photo(photo) if photo is not None else None
    return result_document(matcher.match(image=image, text=text, **kwargs), lambda pid: f"/products/{pid}/photo")


def assert_same_result(served: dict, wanted: dict) -> None:
    assert served["scene"] == wanted["scene"] and served["scene_confident"] == wanted["scene_confident"]
    for key in ("products", "product_set"):
        assert [p["product_id"] for p in served[key]] == [p["product_id"] for p in wanted[key]]
        assert [p["score"] for p in served[key]] == pytest.approx([p["score"] for p in wanted[key]], abs=1e-4)
        assert [p["photo_url"] for p in served[key]] == [p["photo_url"] for p in wanted[key]]
    assert list(served["scene_probabilities"]) == list(wanted["scene_probabilities"])


def post_match(client, photo: bytes | None = None, **fields):
    files = {"photo": ("room.jpg", photo, "image/jpeg")} if photo is not None else None
    return client.post("/match", files=files, data={k: str(v) for k, v in fields.items()})


# -- in process ------------------------------------------------------------------------------------
def test_health_names_the_model_and_catalogue(client, ikea_head_catalogue):
    from hgm_mm.version import __version__

    assert client.get("/health").json() == {"status": "ok", "model": "hgm-tiny",
                                            "products": len(ikea_head_catalogue), "version": __version__}


def test_photo_and_words_match_as_the_matcher_does(client, matcher, room_photos):
    photo = room_photos[0].read_bytes()
    answer = post_match(client, photo, text="a bright room with a soft rug", k=7)
    assert answer.status_code == 200
    document = answer.json()
    assert len(document["products"]) == 7
    assert_same_result(document, expected(matcher, photo, "a bright room with a soft rug", k=7))
    for product in [*document["products"], *document["product_set"]]:
        assert "image" not in product["metadata"]  # no server path leaves the server
        assert {"score", "reasons", "why"} <= set(product)


def test_words_alone_filters_and_events_reach_the_ranking(client, matcher, ikea_head_catalogue):
    from hgm_mm.ranking.profile import InteractionEvent, UserProfile

    ids = list(ikea_head_catalogue)
    category = ikea_head_catalogue[ids[0]].category
    answer = post_match(client, text="somewhere to sit", k=5, filter=json.dumps({"category": [category]}))
    assert answer.status_code == 200
    assert answer.json()["products"] and {p["metadata"]["category"] for p in answer.json()["products"]} == {category}
    assert_same_result(answer.json(), expected(matcher, None, "somewhere to sit", k=5,
                                               filter={"category": [category]}))

    events = [{"product_id": ids[3], "event": "purchase", "timestamp": 1_714_564_800},
              {"product_id": ids[5], "event": "view", "timestamp": "2024-05-02T10:00:00Z"}]
    personal = post_match(client, text="somewhere to sit", k=5, events=json.dumps(events)).json()
    profile = UserProfile.from_events([InteractionEvent("shopper", ids[3], "purchase", 1_714_564_800),
                                       InteractionEvent("shopper", ids[5], "view", 1_714_644_000)],
                                      "shopper", index=matcher.index)
    assert_same_result(personal, expected(matcher, None, "somewhere to sit", k=5, profile=profile))
    assert any(p["reasons"]["profile"] != 0 for p in personal["products"])


def test_price_ranges_are_sent_as_min_max():
    from hgm_mm.apps.serving import read_filter

    assert read_filter('{"price": {"max": 800}, "category": "sofa"}') == {"price": (None, 800), "category": "sofa"}
    assert read_filter({"price": {"min": 10, "max": 20}}) == {"price": (10, 20)}


@pytest.mark.parametrize("fields, photo, status, words", [
    ({}, None, 400, "Send a photo of the room, words"),
    ({"text": "   "}, None, 400, "Send a photo of the room, words"),
    ({}, b"", 400, "Choose a photo of your room"),  # an empty file
    ({}, photo_bytes(format="GIF", mode="P"), 415, "not an image"),
    ({}, b"%PDF-1.4\n" + b"0" * 100, 415, "not an image"),
    ({}, photo_bytes(size=(640, 480))[:2000], 400, "truncated or corrupt"),
    ({"text": "x" * 301}, None, 400, "at most 300 characters"),
    ({"text": "a sofa", "k": "0"}, None, 400, "between 1 and 100"),
    ({"text": "a sofa", "k": "ten"}, None, 400, "between 1 and 100"),
    ({"text": "a sofa", "k": "101"}, None, 400, "between 1 and 100"),
    ({"text": "a sofa", "filter": "{category: sofa}"}, None, 400, "filter is not valid JSON"),
    ({"text": "a sofa", "filter": "[1, 2]"}, None, 400, "filter must be a JSON object"),
    ({"text": "a sofa", "filter": '{"price": {"below": 3}}'}, None, 400, "a range is"),
    ({"text": "a sofa", "filter": '{"colour": "red"}'}, None, 400, "unknown attribute 'colour'"),
    ({"text": "a sofa", "filter": '{"image": "/etc/passwd"}'}, None, 400, "where a file lies on the server"),
    ({"text": "a sofa", "events": '{"product_id": "x"}'}, None, 400, "events must be a JSON list"),
    ({"text": "a sofa", "events": '[{"product_id": "x", "event": "buy", "timestamp": 1}]'}, None, 400,
     "events[0]: event 'buy' is not known"),
    ({"text": "a sofa", "events": '[{"product_id": "x", "event": "view", "timestamp": "soon"}]'}, None, 400,
     "is not a time"),
])
def test_requests_that_cannot_be_matched_are_refused_with_what_to_send(client, fields, photo, status, words):
    answer = post_match(client, photo, **fields)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]


def test_a_form_with_no_file_chosen_matches_its_words(client):
    nameless_empty_part = {"photo": ("", b"", "application/octet-stream")}  # what a browser sends
    assert client.post("/match", files=nameless_empty_part, data={"text": "a sofa"}).status_code == 200
    answer = client.post("/match", files=nameless_empty_part, data={"text": ""})
    assert answer.status_code == 400 and "Send a photo of the room, words" in answer.json()["error"]


def test_photos_over_the_pixel_or_byte_limit_are_refused_before_matching(matcher):
    from fastapi.testclient import TestClient

    from hgm_mm.apps.service import create_service

    small = TestClient(create_service(matcher, max_upload_bytes=100_000, max_pixels=1_000_000))
    assert post_match(small, photo_bytes(size=(1200, 1000))).status_code == 413  # 1.2 MP, few bytes
    answer = post_match(small, os.urandom(120_000))
    assert answer.status_code == 413 and "larger than" in answer.json()["error"]
    whole_body = post_match(small, os.urandom(400_000))  # refused by its length, before it is read
    assert whole_body.status_code == 413 and "larger than" in whole_body.json()["error"]

    def chunks():  # no Content-Length: the body is counted as it arrives
        boundary = b"--b\r\nContent-Disposition: form-data; name=\"photo\"; filename=\"r.jpg\"\r\n\r\n"
        yield boundary
        for _ in range(40):
            yield os.urandom(10_000)
        yield b"\r\n--b--\r\n"

    chunked = small.post("/match", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert chunked.status_code == 413
    assert post_match(small, photo_bytes()).status_code == 200  # under both limits it still matches


def test_limits_must_be_positive(matcher):
    from hgm_mm.apps.service import create_service

    with pytest.raises(ValueError, match="max_k=0"):
        create_service(matcher, max_k=0)


def test_products_are_looked_up_by_id_with_their_photo(client, ikea_head_catalogue):
    product_id, product = next(iter(ikea_head_catalogue.items()))
    document = client.get(f"/products/{product_id}").json()
    assert document["product_id"] == product_id and document["metadata"]["title"] == product.title
    assert "image" not in document["metadata"]
    photo = client.get(document["photo_url"])
    assert photo.status_code == 200 and photo.content == product.image.read_bytes()
    for missing in ("/products/no-such-id", "/products/no-such-id/photo", "/products/..%2Fetc%2Fpasswd/photo"):
        answer = client.get(missing)
        assert answer.status_code == 404 and answer.json()["error"]


def test_openapi_describes_every_route(client):
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {"/match", "/health", "/products/{product_id}", "/products/{product_id}/photo"}
    form = schema["paths"]["/match"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in form
    assert client.get("/docs").status_code == 200


# -- its own process -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service_url(ikea_head_index: Path, tmp_path_factory) -> str:
    """`hgm-mm serve --index DIR --port 0` in its own process; yields its URL."""
    with running_server(["-m", "hgm_mm", "serve", "--index", str(ikea_head_index), "--port", "0"],
                        tmp_path_factory.mktemp("service") / "stderr.log", "the service") as url:
        yield url


def test_twenty_concurrent_clients_all_get_the_matchers_answer(service_url, matcher, room_photos):
    def ask(photo: Path) -> tuple[Path, int, dict]:
        with httpx.Client(base_url=service_url, timeout=120) as http:
            answer = http.post("/match", files={"photo": (photo.name, photo.read_bytes(), "image/jpeg")},
                               data={"k": "5"})
            return photo, answer.status_code, answer.json()

    with ThreadPoolExecutor(CONCURRENT_CLIENTS) as pool:
        answers = list(pool.map(ask, room_photos))
    assert [status for _, status, _ in answers] == [200] * len(room_photos)
    for photo, _, document in answers[:5]:
        assert_same_result(document, expected(matcher, photo.read_bytes(), None, k=5))


def test_match_through_the_service_prints_what_the_index_gives(service_url, ikea_head_index, room_photos, capsys):
    from hgm_mm.apps.cli import main

    photo = str(room_photos[1])
    assert main(["match", photo, "--index", str(ikea_head_index), "--text", "warm light", "-k", "4", "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main(["match", photo, "--service", service_url, "--text", "warm light", "-k", "4", "--json"]) == 0
    remote = json.loads(capsys.readouterr().out)
    for document in (local, remote):
        for product in [*document["products"], *document["product_set"]]:
            product["photo_url"] = f"/products/{product['product_id']}/photo"
    assert_same_result(remote, local)
    assert remote["products"][0]["metadata"]["image"] == f"{service_url}/products/{remote['products'][0]['product_id']}/photo"

    assert main(["match", photo, "--service", service_url, "-k", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("scene: ") and "product set:" in printed


def test_match_names_a_service_it_cannot_reach(capsys, room_photos):
    from hgm_mm.apps.cli import main

    assert main(["match", str(room_photos[0]), "--service", "http://127.0.0.1:9"]) == 2
    error = capsys.readouterr().err
    assert "cannot reach the service at http://127.0.0.1:9" in error and "hgm-mm serve" in error


def test_serve_refuses_a_folder_that_is_not_an_index(tmp_path, capsys):
    from hgm_mm.apps.cli import main

    assert main(["serve", "--index", str(tmp_path), "--port", "0"]) == 2
    assert "hgm-mm serve" in capsys.readouterr().err

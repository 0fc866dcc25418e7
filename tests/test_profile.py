"""User profiles: reading events, recency decay and event weights, affinities, a profile from one photo."""
import json
import math
import warnings

import numpy as np
import pytest
from PIL import Image

from hgm_mm.data import DataError
from hgm_mm.retrieval.index import ProductIndex
from hgm_mm.ranking.profile import InteractionEvent, UserProfile, read_events, style_words

DAY = 86_400.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")
NOW = 1_714_564_800.0  # 2024-05-01T12:00:00Z


def basis(i: int, dim: int = 4) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    v[i] = 1.0
    return v


@pytest.fixture
def index() -> ProductIndex:
    """Four products on the axes of a 4-d space, with categories, colours and prices."""
    metadata = [
        {"category": "sofa", "color": "Dark grey", "price": 400.0},
        {"category": "sofa", "color": "Beige", "price": 600.0},
        {"category": "lamp", "color": "White", "price": 50.0},
        {"category": "rug", "color": "Black-brown", "price": 120.0},
    ]
    return ProductIndex.build(["p1", "p2", "p3", "p4"], np.stack([basis(i) for i in range(4)]), metadata)


def events_for_hand_check() -> list[InteractionEvent]:
    return [
        InteractionEvent("u1", "p1", "view", NOW),  # 1 * 1
        InteractionEvent("u1", "p2", "purchase", NOW - 30 * DAY),  # 5 * 0.5 = 2.5
        InteractionEvent("u1", "p3", "cart", NOW - 60 * DAY),  # 3 * 0.25 = 0.75
        InteractionEvent("u2", "p4", "purchase", NOW),  # another user: ignored
    ]


# -- reading events ---------------------------------------------------------------------------
def test_read_events_csv_takes_epoch_seconds_and_iso_times(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("user_id,product_id,event,timestamp\n"
                    "u1,p1,view,1714564800\n"
                    "u1,p2,cart,2024-05-01T12:00:00Z\n"
                    "u2,p3,purchase,2024-05-01T14:00:00+02:00\n"
                    "u2,p3,view,2024-05-01T12:00:00\n", encoding="utf-8")
    events = read_events(path)
    assert [(e.user_id, e.product_id, e.event) for e in events] == [
        ("u1", "p1", "view"), ("u1", "p2", "cart"), ("u2", "p3", "purchase"), ("u2", "p3", "view")]
    assert [e.timestamp for e in events] == [NOW, NOW, NOW, NOW]  # a zone-less time is UTC


def test_read_events_jsonl(tmp_path):
    path = tmp_path / "events.jsonl"
    rows = [{"user_id": "u1", "product_id": "p1", "event": "purchase", "timestamp": NOW},
            {"user_id": "u1", "product_id": "p2", "event": "view", "timestamp": "2024-05-02T12:00:00Z"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    events = read_events(path)
    assert [e.event for e in events] == ["purchase", "view"]
    assert events[1].timestamp == NOW + DAY


@pytest.mark.parametrize("content, line, words", [
    ("user_id,product_id,event,timestamp\nu1,p1,like,1714564800\n", 2, "event 'like'"),
    ("user_id,product_id,event,timestamp\nu1,p1,view,yesterday\n", 2, "timestamp 'yesterday'"),
    ("user_id,product_id,event,timestamp\nu1,p1,view,1\n,p2,view,1\n", 3, "user_id is ''"),
    ("user_id,product_id,event,timestamp\nu1,p1,view\n", 2, "expected 4 columns"),
    ("user,item,event,time\nu1,p1,view,1\n", 1, "header"),
])
def test_read_events_names_file_line_and_fix(tmp_path, content, line, words):
    path = tmp_path / "events.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_events(path)
    assert err.value.line == line and err.value.path == path
    assert words in str(err.value) and str(path) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_read_events_jsonl_refuses_missing_keys_and_missing_files(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"user_id": "u1", "product_id": "p1", "event": "view"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: missing key\(s\) \['timestamp'\]"):
        read_events(path)
    with pytest.raises(DataError, match="does not exist"):
        read_events(tmp_path / "absent.csv")


# -- from events ------------------------------------------------------------------------------
def test_profile_from_events_weighs_by_event_type_and_recency(index):
    profile = UserProfile.from_events(events_for_hand_check(), "u1", index=index, half_life_days=30.0)
    expected = np.array([1.0, 2.5, 0.75, 0.0])
    np.testing.assert_allclose(profile.vector, expected / np.linalg.norm(expected), rtol=1e-6)
    assert profile.category_affinity == pytest.approx({"sofa": 3.5 / 4.25, "lamp": 0.75 / 4.25})
    # colour words share their product's weight: "Dark grey" gives dark and grey 0.5 each
    assert profile.style_affinity == pytest.approx({"dark": 0.5 / 4.25, "grey": 0.5 / 4.25, "beige": 2.5 / 4.25,
                                                    "white": 0.75 / 4.25})
    assert profile.price_range == (50.0, 600.0)
    assert profile.n_events == 3


def test_custom_event_weights_and_half_life_change_the_profile(index):
    events = events_for_hand_check()
    equal = UserProfile.from_events(events, "u1", index=index, event_weights={"view": 1, "cart": 1, "purchase": 1},
                                    half_life_days=1e9)  # no decay, equal weights
    np.testing.assert_allclose(equal.vector, np.array([1, 1, 1, 0]) / math.sqrt(3), rtol=1e-6)
    fast_decay = UserProfile.from_events(events, "u1", index=index, half_life_days=1.0)
    assert np.argmax(fast_decay.vector) == 0  # only the fresh view still counts


def test_now_only_scales_weights_so_a_later_now_gives_the_same_profile(index):
    default = UserProfile.from_events(events_for_hand_check(), "u1", index=index)
    later = UserProfile.from_events(events_for_hand_check(), "u1", index=index, now=NOW + 100 * DAY)
    np.testing.assert_allclose(default.vector, later.vector, rtol=1e-5)
    assert default.category_affinity == pytest.approx(later.category_affinity)


def test_unknown_user_and_bad_settings_are_refused(index):
    with pytest.raises(ValueError, match="user 'nobody' has no events; users with events: \\['u1', 'u2'\\]"):
        UserProfile.from_events(events_for_hand_check(), "nobody", index=index)
    with pytest.raises(ValueError, match="half_life_days"):
        UserProfile.from_events(events_for_hand_check(), "u1", index=index, half_life_days=0)
    with pytest.raises(ValueError, match="event_weights"):
        UserProfile.from_events(events_for_hand_check(), "u1", index=index, event_weights={"like": 1})


def test_products_missing_from_the_index_are_left_out_with_a_warning(index):
    events = events_for_hand_check() + [InteractionEvent("u1", "gone", "purchase", NOW)]
    with pytest.warns(UserWarning, match="1 product\\(s\\) of their events are not in the index"):
        profile = UserProfile.from_events(events, "u1", index=index)
    expected = np.array([1.0, 2.5, 0.75, 0.0])
    np.testing.assert_allclose(profile.vector, expected / np.linalg.norm(expected), rtol=1e-6)
    assert profile.n_events == 4


# -- affinity ---------------------------------------------------------------------------------
def test_affinity_prefers_what_the_user_liked(index):
    profile = UserProfile.from_events(events_for_hand_check(), "u1", index=index)
    ids = ["p1", "p2", "p3", "p4"]
    affinity = profile.affinity(ids, index.vectors(ids), [index.metadata(i) for i in ids])
    assert affinity.shape == (4,)
    assert np.argmax(affinity) == 1  # the purchased sofa
    assert affinity[3] == min(affinity)  # a rug they never looked at, in a colour they never chose
    assert np.all(affinity <= 1.0) and np.all(affinity >= -1.0)


def test_affinity_parts_each_count():
    vector_only = UserProfile("u", vector=basis(0))
    np.testing.assert_allclose(vector_only.affinity(["a", "b"], np.stack([basis(0), basis(1)]), [{}, {}]), [1.0, 0.0])
    by_category = UserProfile("u", category_affinity={"sofa": 0.8, "lamp": 0.2})
    assert by_category.affinity(["a", "b", "c"], np.zeros((3, 4)), [{"category": "sofa"}, {"category": "lamp"}, {}]
                                ).tolist() == pytest.approx([1.0, 0.25, 0.0])
    by_price = UserProfile("u", price_range=(100.0, 200.0))
    fits = by_price.affinity(["a", "b", "c", "d"], np.zeros((4, 4)),
                             [{"price": 150}, {"price": 250}, {"price": 400}, {"price": "n/a"}])
    assert fits.tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])  # 1 inside, 0 one range width away
    assert style_words({"color": "Black-brown/White 2", "size": "80 cm"}) == ["black", "brown", "white"]


def test_profile_round_trips_through_json(index):
    profile = UserProfile.from_events(events_for_hand_check(), "u1", index=index)
    again = UserProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    np.testing.assert_allclose(again.vector, profile.vector, rtol=1e-6)
    assert (again.user_id, again.category_affinity, again.style_affinity, again.price_range, again.n_events) == (
        profile.user_id, profile.category_affinity, profile.style_affinity, profile.price_range, profile.n_events)
    with pytest.raises(ValueError, match="unknown key"):
        UserProfile.from_dict({**profile.to_dict(), "extra": 1})


# -- a new user from a photo ------------------------------------------------------------------
def test_new_user_profile_from_one_photo(tmp_path):
    import torch

    import hgm_mm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = hgm_mm.create_model("hgm-tiny")
    photo = tmp_path / "room.jpg"
    Image.new("RGB", (80, 60), (180, 120, 60)).save(photo)
    profile = UserProfile.from_photo(model, str(photo))
    with torch.no_grad():
        room = model.encode_room(str(photo))[0].numpy()
    assert profile.user_id == "new-user" and profile.n_events == 0 and not profile.category_affinity
    np.testing.assert_allclose(profile.vector, room, rtol=1e-5, atol=1e-6)
    assert abs(np.linalg.norm(profile.vector) - 1.0) < 1e-5
    others = np.random.default_rng(0).standard_normal((5, room.shape[0])).astype(np.float32)
    candidates = np.concatenate([others / np.linalg.norm(others, axis=1, keepdims=True), room[None]])
    affinity = profile.affinity([str(i) for i in range(6)], candidates, [{}] * 6)
    assert np.argmax(affinity) == 5  # the product that looks like the room

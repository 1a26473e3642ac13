"""Fine-tuning the structurally smaller net itself: the merged clustered net (``method="merged"``)
and the physically pruned net of a Torch-Pruning baseline (``pruning=<criterion>``).

The tied model of :mod:`explorer.training.tied` trains at full width: a merged block keeps its Cout
copies of every centroid channel and the block's second conv keeps all Cout input kernels, so an
epoch costs what the unclustered net costs. Where a block's first conv is merged (``fold_bn``: the
members of a cluster are identical after BatchNorm and ReLU up to a positive gain g_i), the block
computes exactly the same function as a *narrow* block: first conv with the k centroids, one
BatchNorm over them (the tied BN), and a second conv that reads k channels whose kernels are the
gain-weighted sums of the members' kernels, ``W'[:, c] = sum_{i in c} g_i W[:, i]``. That narrow
ResNet20 is what :func:`narrow_from_tied` builds and what trains: the same function class as the
tied model, at the compressed net's MACs (about half the work at 49% fewer MACs), and the same
structure the pruning baselines train (:func:`explorer.pruning.pruned_structure`), so that
clustering and pruning are compared on equal nets, recipes and budgets. The parametrisation
differs from the tied model's: the tied model trains the n_c member kernels of a merged channel
separately (their sum is what counts), the narrow net trains the sum.

After training, :func:`write_back` spreads each merged kernel back over its members,
``W[:, i] = W'[:, c] g_i / sum_{j in c} g_j^2`` (so that ``sum_i g_i W[:, i] = W'[:, c]``), and
the tied model's usual path (:func:`explorer.training.tied.materialize`, compress, export) applies
unchanged. Clustered layers that cannot merge (the residual-stream writers) stay
:class:`~explorer.training.tied.TiedConv` inside the narrow net.

A pruned net is narrow by construction; :func:`expand_pruned` writes it back into a masked
full-width ResNet20 (removed channels exactly zero), the representation the app, the engine and
:mod:`explorer.pruning` use.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..model import conv_layer
from .tied import TiedConv, _parent


def _merge_matrix(t: TiedConv) -> torch.Tensor:
    """(k, Cout) matrix M with M[label_i, i] = g_i: W' = W M^T along the input-channel axis."""
    k, cout = t.centroids.shape[0], len(t.labels)
    m = torch.zeros(k, cout)
    m[t.labels, torch.arange(cout)] = t.gains.float()
    return m


def _reader(block: nn.Module) -> tuple[nn.Module, str]:
    conv = block.conv2
    return conv, ("centroids" if isinstance(conv, TiedConv) else "weight")


@torch.no_grad()
def narrow_from_tied(tied: nn.Module, merged: set[str]) -> nn.Module:
    """A narrow copy of the tied model: each merged block first conv (a TiedConv with a tied
    BatchNorm) becomes a plain conv with its k centroids (k, Cin, 3, 3) and that BatchNorm (k); the
    block's second conv reads k channels, ``W'[:, c] = sum_{i in c} g_i W[:, i]``. Same eval-mode
    function as ``tied`` (float rounding aside), fewer MACs. ``tied`` is not changed. Raises
    ValueError for a merged layer that is not a block's first conv with a tied BatchNorm."""
    net = copy.deepcopy(tied)
    for name in sorted(merged):
        t = net.get_submodule(name)
        if not isinstance(t, TiedConv) or t.bn is None or conv_layer(name).residual:
            raise ValueError(f"{name}: only a block's first conv with a tied BatchNorm narrows")
        block, _ = _parent(net, name)
        k, cin = t.centroids.shape[:2]
        conv = nn.Conv2d(cin, k, 3, t.stride, 1, bias=False)
        conv.weight.copy_(t.centroids)
        reader, attr = _reader(block)
        w = getattr(reader, attr)
        m = _merge_matrix(t).to(w)
        new_w = torch.einsum("oihw,ci->ochw", w.detach(), m)
        if attr == "weight":
            new = nn.Conv2d(k, w.shape[0], 3, reader.stride, 1, bias=False)
            new.weight.copy_(new_w)
            block.conv2 = new
        else:
            reader.centroids = nn.Parameter(new_w.contiguous())
        block.conv1, block.bn1 = conv, t.bn
    return net


@torch.no_grad()
def write_back(narrow: nn.Module, tied: nn.Module, merged: set[str]) -> None:
    """Copy a trained narrow net (:func:`narrow_from_tied`) into ``tied`` in place: centroids and
    tied BatchNorm from the narrow first conv, each merged input kernel spread over its members
    (``W[:, i] = W'[:, c] g_i / sum_{j in c} g_j^2``), every other parameter and buffer as is."""
    nstate = narrow.state_dict()
    tstate = tied.state_dict()
    for key, value in nstate.items():
        if key in tstate and tstate[key].shape == value.shape:
            tstate[key].copy_(value)
    for name in sorted(merged):
        t = tied.get_submodule(name)
        block_path = name.rsplit(".", 1)[0]
        t.centroids.copy_(nstate[f"{block_path}.conv1.weight"])
        prefix = f"{block_path}.bn1."
        t.bn.load_state_dict({k[len(prefix):]: v for k, v in nstate.items() if k.startswith(prefix)})
        reader, attr = _reader(tied.get_submodule(block_path))
        merged_w = nstate[f"{block_path}.conv2.{attr}"]
        g = t.gains.float()
        norm = torch.zeros(t.centroids.shape[0]).index_add_(0, t.labels, g * g)
        spread = merged_w[:, t.labels] * (g / norm[t.labels]).view(1, -1, 1, 1)
        getattr(reader, attr).copy_(spread)


@torch.no_grad()
def expand_pruned(narrow: nn.Module, template: nn.Module, kept: dict[str, np.ndarray]) -> nn.Module:
    """The masked full-width ResNet20 (eval mode) computing the same function as a physically
    pruned ``narrow`` net (:func:`explorer.pruning.pruned_structure` of ``template``): kept
    channels of each pruned block's first conv written to their original indices, removed ones
    zero (filter, BatchNorm scale and shift; running mean 0, variance 1), the second conv's kernels
    for removed inputs zero. ``template`` (the masked net) gives the full shapes; not changed."""
    full = copy.deepcopy(template).float().eval()
    fstate, nstate = full.state_dict(), narrow.state_dict()
    for key, value in nstate.items():
        if fstate[key].shape == value.shape:
            fstate[key].copy_(value)
    for name, keep in kept.items():
        idx = torch.as_tensor(np.asarray(keep), dtype=torch.long)
        block = name.rsplit(".", 1)[0]
        w1 = torch.zeros_like(fstate[f"{block}.conv1.weight"])
        w1[idx] = nstate[f"{block}.conv1.weight"]
        fstate[f"{block}.conv1.weight"].copy_(w1)
        for part, fill in (("weight", 0.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            v = torch.full_like(fstate[f"{block}.bn1.{part}"], fill)
            v[idx] = nstate[f"{block}.bn1.{part}"]
            fstate[f"{block}.bn1.{part}"].copy_(v)
        w2 = torch.zeros_like(fstate[f"{block}.conv2.weight"])
        w2[:, idx] = nstate[f"{block}.conv2.weight"]
        fstate[f"{block}.conv2.weight"].copy_(w2)
    return full.eval()

"""Path-level interpretation (METHOD.md section 3.1), as plain numbers: the pictures are drawn from these.

Everything here reads :class:`~detector.prototypes.Prototypes` (per-class filter-on frequencies) and, for
single inputs, a :class:`~detector.models.PathOutput`. Nothing looks at pixels or single-filter features:
the unit of explanation is *which filters an input switches on*, layer by layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models import GATE_THRESHOLD, PathOutput
from ..prototypes import Prototypes

SIMILARITIES = ("jaccard", "cosine")


def layer_frequencies(protos: Prototypes) -> dict[str, Tensor]:
    """Per gated layer, Tensor (K, C_l) in [0, 1]: how often each filter is on for inputs of each class."""
    return {name: protos.frequency[:, sl] for name, sl in zip(protos.layer_names, protos.layer_slices())}


def filter_order(freq: Tensor) -> Tensor:
    """An order of a layer's filters (C,) that groups them by the class using them most, then by how much.

    Only for drawing: block structure on the class-by-filter heatmap shows class-specific filters.
    """
    top = freq.argmax(0)
    spread = freq.max(0).values - freq.mean(0)  # how much more the top class uses it than the average
    shared = freq.min(0).values  # filters every class uses go last
    key = torch.stack([shared > 0.5, top, -spread], dim=1)
    return torch.tensor(sorted(range(freq.shape[1]), key=lambda j: tuple(key[j].tolist())), dtype=torch.long)


def jaccard_matrix(on: Tensor) -> Tensor:
    """(K, K) Jaccard index |A & B| / |A | B| of K boolean rows; 1 where both rows are empty."""
    a = on.float()
    inter = a @ a.T
    union = a.sum(1)[:, None] + a.sum(1)[None, :] - inter
    out = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))
    return (out + out.T) / 2  # exact symmetry regardless of float rounding


def cosine_matrix(freq: Tensor) -> Tensor:
    """(K, K) cosine similarity of K non-negative rows; unit diagonal, 0 against an all-zero row."""
    norm = freq.norm(dim=1)
    out = (freq @ freq.T) / (norm[:, None] * norm[None, :]).clamp_min(1e-12)
    out = (out + out.T) / 2
    out.fill_diagonal_(1.0)
    return out.clamp(0.0, 1.0)


def similarity(freq: Tensor, method: str = "jaccard", threshold: float = GATE_THRESHOLD) -> Tensor:
    """Class-to-class path similarity from frequencies (K, G).

    ``jaccard``: of the sets of each class's frequent filters (on for more than ``threshold`` of its inputs,
    i.e. the prototype path); ``cosine``: of the frequency vectors themselves.
    """
    if method == "jaccard":
        return jaccard_matrix(freq > threshold)
    if method == "cosine":
        return cosine_matrix(freq)
    raise ValueError(f"method={method!r} must be one of {SIMILARITIES}")


def similarities(protos: Prototypes, threshold: float = GATE_THRESHOLD) -> dict:
    """Both similarity matrices, over the whole path and per layer."""
    per_layer = layer_frequencies(protos)
    return {
        method: {
            "path": similarity(protos.frequency, method, threshold),
            "layers": {n: similarity(f, method, threshold) for n, f in per_layer.items()},
        }
        for method in SIMILARITIES
    }


@dataclass
class Specificity:
    """How many classes use each filter.

    Attributes
    ----------
    users : Tensor (G,) int, number of classes whose inputs switch the filter on more than ``threshold``.
    owner : Tensor (G,) int, the class using it most.
    selectivity : Tensor (G,) in [0, 1]: 1 - normalised entropy of the filter's frequencies over classes;
        1 = only one class ever uses it, 0 = every class equally (NaN-free: unused filters get 0).
    threshold : the frequency above which a class counts as a user.
    """

    users: Tensor
    owner: Tensor
    selectivity: Tensor
    threshold: float

    def kind(self, num_classes: int) -> list[str]:
        """Per filter: ``unused`` (no class), ``specific`` (one), ``shared`` (more than half), else ``some``."""
        out = []
        for u in self.users.tolist():
            out.append("unused" if u == 0 else "specific" if u == 1 else "shared" if u > num_classes / 2 else "some")
        return out


KINDS = ("unused", "specific", "some", "shared")


def specificity(freq: Tensor, threshold: float = 0.5) -> Specificity:
    """:class:`Specificity` of every filter from frequencies (K, G)."""
    k = freq.shape[0]
    users = (freq > threshold).sum(0)
    total = freq.sum(0)
    share = freq / total.clamp_min(1e-12)
    entropy = -(share * share.clamp_min(1e-12).log()).sum(0)
    selectivity = (
        torch.where(total > 0, 1 - entropy / math.log(k), torch.zeros_like(total)) if k > 1 else torch.ones_like(total)
    )
    return Specificity(users, freq.argmax(0), selectivity.clamp(0, 1), threshold)


@dataclass
class Departure:
    """Where one input's path departs from class prototypes, layer by layer.

    Attributes
    ----------
    predicted : the predicted class.
    hamming : Tensor (L,) in [0, 1], fraction of the layer's filters where the input's hard path differs
        from the predicted class's prototype path (filters on for most of the class's inputs).
    extra : per layer, filters on for the input but not in the prototype.
    missing : per layer, prototype filters the input left off.
    hamming_all : Tensor (L, K), the same distance to every class's prototype.
    nearest : Tensor (L,) int, the class whose prototype is nearest in each layer.
    log_likelihood : Tensor (L,), mean log-probability of the input's gates under the predicted class's
        frequencies (clipped to [0.01, 0.99]); low means an unusual path for that class.
    """

    predicted: int
    hamming: Tensor
    extra: list[list[int]]
    missing: list[list[int]]
    hamming_all: Tensor
    nearest: Tensor
    log_likelihood: Tensor


def departures(out: PathOutput, protos: Prototypes) -> list[Departure]:
    """:class:`Departure` of each input of a forward pass against the prototypes."""
    pred = out.logits.argmax(1)
    proto = protos.hard
    result = []
    for i in range(out.logits.shape[0]):
        k = int(pred[i])
        ham, ham_all, extra, missing, ll = [], [], [], [], []
        for layer, sl in zip(out.layers, protos.layer_slices()):
            g = layer.hard[i].detach().cpu().float()
            ham_all.append((g[None, :] - proto[:, sl]).abs().mean(1))
            ham.append(ham_all[-1][k])
            extra.append(((g > 0) & (proto[k, sl] == 0)).nonzero().squeeze(1).tolist())
            missing.append(((g == 0) & (proto[k, sl] > 0)).nonzero().squeeze(1).tolist())
            f = protos.frequency[k, sl].clamp(0.01, 0.99)
            ll.append((g * f.log() + (1 - g) * (1 - f).log()).mean())
        ham_all_t = torch.stack(ham_all)
        result.append(Departure(k, torch.stack(ham), extra, missing, ham_all_t, ham_all_t.argmin(1), torch.stack(ll)))
    return result

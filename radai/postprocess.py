"""From class scores to a label map, as the card's `output` says: argmax or per-class thresholds, then the
connected-component clean-up and the restriction to another model's mask (multi-model pipelines). Pure.
`tensor_labels` takes the per-voxel step on the scores' device, so only the 8-bit label map reaches the host.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage

from radai.models.manifest import ArgmaxPost, ComponentsSpec, OutputSpec, ThresholdPost

_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)  # 26-neighbourhood


def _sigmoid(x: NDArray[np.float32]) -> NDArray[np.float32]:
    out: NDArray[np.float32] = (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)  # overflow-free
    return out


def threshold_labels(scores: NDArray[np.float32], post: ThresholdPost) -> NDArray[np.uint8]:
    """Channel c >= 1 is label c where its probability reaches the threshold; the most probable wins."""
    probs = _sigmoid(scores[1:]) if post.activation == "sigmoid" else scores[1:]
    best = np.argmax(probs, axis=0)
    top = np.take_along_axis(probs, best[None], axis=0)[0]
    labels: NDArray[np.uint8] = np.where(top >= post.threshold, best + 1, 0).astype(np.uint8)
    return labels


def clean_components(labels: NDArray[np.uint8], spec: ComponentsSpec) -> NDArray[np.uint8]:
    """Per label: drop components smaller than `min_voxels`, or all but the largest."""
    out = labels.copy()
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = labels == value
        components, count = ndimage.label(mask, structure=_CONNECTIVITY)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())[1:]
        keep = sizes >= spec.min_voxels
        if spec.largest_only:
            keep &= np.arange(1, count + 1) == int(np.argmax(sizes)) + 1
        drop = np.isin(components, np.nonzero(~keep)[0] + 1)
        out[drop] = 0
    return out


def to_labels(scores: NDArray[np.float32], spec: OutputSpec) -> NDArray[np.uint8]:
    """(K, X, Y, Z) scores on the source grid -> (X, Y, Z) label values, by the card's postprocessing."""
    post = spec.postprocess
    if isinstance(post, ThresholdPost):
        labels = threshold_labels(scores, post)
    elif isinstance(post, ArgmaxPost):
        labels = np.argmax(scores, axis=0).astype(np.uint8)
    else:
        raise ValueError(f"postprocess {post.kind!r} does not make a label map")
    if spec.components is not None:
        labels = clean_components(labels, spec.components)
    return labels


def tensor_labels(scores: torch.Tensor, spec: OutputSpec) -> NDArray[np.uint8]:
    """`to_labels` for (K, X, Y, Z) scores in a tensor: argmax or thresholds where the tensor is (a GPU),
    the connected-component clean-up on the host."""
    post = spec.postprocess
    with torch.inference_mode():
        if isinstance(post, ThresholdPost):
            probs = torch.sigmoid(scores[1:]) if post.activation == "sigmoid" else scores[1:]
            top, best = torch.max(probs, dim=0)
            labels = torch.where(top >= post.threshold, best + 1, 0)
        elif isinstance(post, ArgmaxPost):
            labels = torch.argmax(scores, dim=0)
        else:
            raise ValueError(f"postprocess {post.kind!r} does not make a label map")
        host: NDArray[np.uint8] = labels.to(torch.uint8).cpu().numpy()
    if spec.components is not None:
        host = clean_components(host, spec.components)
    return host


def restrict(labels: NDArray[np.uint8], mask: NDArray[np.bool_]) -> NDArray[np.uint8]:
    """Labels outside `mask` (another model's output, same grid) become background."""
    if mask.shape != labels.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the label map's {labels.shape}")
    out: NDArray[np.uint8] = np.where(mask, labels, 0).astype(np.uint8)
    return out

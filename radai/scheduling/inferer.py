"""Sliding-window inference over one volume with MONAI, for any predictor.

MONAI's inferer takes any callable, so the windowing, padding and blending are MONAI's and the predictor can
be anything: the scheduler (`lambda p: scheduler.infer(job_id, p)`), an ONNX session, a fake. `sliding_window`
works on the host with numpy; `sliding_window_tensor` keeps the volume, the windows, the Gaussian importance
map and the blended scores on the volume's device (a GPU: no window crosses to host memory).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from monai.inferers.utils import sliding_window_inference
from numpy.typing import NDArray

from radai.models.manifest import InputSpec

Predict = Callable[[NDArray[np.float32]], NDArray[np.float32]]
PredictTensor = Callable[[torch.Tensor], torch.Tensor]


def _as_predictor(predict: Predict) -> Callable[[torch.Tensor], torch.Tensor]:
    def predictor(windows: torch.Tensor) -> torch.Tensor:
        patches = np.ascontiguousarray(windows.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(predict(patches), dtype=np.float32))

    return predictor


def window_size(shape: tuple[int, ...], spec: InputSpec) -> tuple[int, ...]:
    """The card's patch, or for `whole` the volume itself rounded up to a multiple of `size_divisor` (MONAI
    pads a volume smaller than the window with `pad_value` and crops the scores back)."""
    if spec.patch_size != "whole":
        return spec.patch_size
    d = spec.size_divisor
    return tuple(-(-int(n) // d) * d for n in shape)


def sliding_window(
    image: NDArray[np.float32],
    spec: InputSpec,
    predict: Predict,
    sw_batch_size: int,
) -> NDArray[np.float32]:
    """Score a (C, X, Y, Z) volume -> (K, X, Y, Z), windows of `spec.patch_size` blended by `spec.blend`.

    `predict` gets (n <= sw_batch_size, C, *patch_size) float32 and returns (n, K, *patch_size) float32.
    Volumes smaller than a patch are padded with `spec.pad_value` and cropped back.
    """
    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    out = sliding_window_tensor(volume, spec, _as_predictor(predict), sw_batch_size)
    return np.ascontiguousarray(out.numpy(), dtype=np.float32)


def sliding_window_tensor(
    image: torch.Tensor,
    spec: InputSpec,
    predict: PredictTensor,
    sw_batch_size: int,
) -> torch.Tensor:
    """`sliding_window` on a (C, X, Y, Z) tensor: windows cut, scored by `predict` and blended on the
    image's device; returns (K, X, Y, Z) float32 there."""
    if image.ndim != 4 or image.shape[0] != spec.channels:
        raise ValueError(f"image must be ({spec.channels}, X, Y, Z), got shape {tuple(image.shape)}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    device = image.device
    with torch.inference_mode():
        out = sliding_window_inference(
            image.to(torch.float32)[None],
            roi_size=window_size(tuple(int(n) for n in image.shape[1:]), spec),
            sw_batch_size=sw_batch_size,
            predictor=predict,
            overlap=spec.overlap,
            mode=spec.blend,
            cval=spec.pad_value,
            padding_mode="constant",
            sw_device=device,
            device=device,
        )
    if not isinstance(out, torch.Tensor):  # only for predictors returning tuples or dicts
        raise TypeError(f"predict must return one array, MONAI gave {type(out).__name__}")
    return torch.as_tensor(out)[0]

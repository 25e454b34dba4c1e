"""Reference implementations in torch, written from the papers' and the torch tools' definitions, that the
tests compare npcam with."""

from __future__ import annotations

import torch


def torch_eigen_cam(a: torch.Tensor) -> torch.Tensor:
    """Eigen-CAM [h, w] of A [C, h, w] by torch's SVD, under npcam's sign convention (docs/methods.md): the
    principal direction v is oriented so that the activations' mean over positions projects positively on it,
    unless |mean . v| is below 1e-3 of the positions' root-mean-square norm, where the projection's value of
    largest magnitude is made positive."""
    channels, h, w = a.shape
    rows = a.reshape(channels, -1).T.double()
    mean = rows.mean(dim=0)
    v = torch.linalg.svd(rows - mean, full_matrices=False).Vh[0]
    projection = (rows - mean) @ v
    lean = torch.dot(mean, v) / rows.square().sum(dim=1).mean().sqrt()
    flip = lean < 0 if lean.abs() >= 1e-3 else projection[projection.abs().argmax()] < 0
    return (-projection if flip else projection).reshape(h, w)

"""Metrics as pure functions on tensors (no models, no files): the maths of the evaluation protocols in docs/generate-score.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "l2_normalize",
    "pairwise_cosine",
    "mean_pairwise_cosine",
    "matched_cosine",
    "is_all_black",
    "edge_f1_iou",
    "edge_f1_tolerant",
    "binarize_edges",
    "ssim",
    "rmse",
    "confusion_matrix",
    "segmentation_scores",
    "landmark_error",
]


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm: (N, D) -> (N, D)."""
    return F.normalize(x.float(), dim=-1, eps=eps)


def pairwise_cosine(real: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every (real, generated) pair: (R, D), (G, D) -> (R, G)."""
    return l2_normalize(real) @ l2_normalize(generated).T


def mean_pairwise_cosine(real: torch.Tensor, generated: torch.Tensor) -> float:
    """Mean cosine over ALL real x generated pairs (DINO / CLIP-I of DreamBooth, Ruiz et al. 2023 §4.1)."""
    if real.shape[0] == 0 or generated.shape[0] == 0:
        raise ValueError(f"need at least one real and one generated feature, got {real.shape[0]} and {generated.shape[0]}")
    return pairwise_cosine(real, generated).mean().item()


def matched_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of matched pairs (CLIP-T: image i with the text of its prompt): (N, D)x2 -> (N,)."""
    if a.shape != b.shape:
        raise ValueError(f"matched_cosine needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return (l2_normalize(a) * l2_normalize(b)).sum(-1)


def is_all_black(images: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """True for images whose every value is <= threshold (a safety-filtered output): (B, C, H, W) -> (B,)."""
    return images.flatten(1).amax(dim=1) <= threshold


def binarize_edges(edges: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """An edge map in [0, 1] (or {0, 255} uint8) -> bool map; channels are OR-ed."""
    x = edges.float()
    if edges.dtype == torch.uint8:
        x = x / 255.0
    if x.ndim == 3:
        x = x.amax(dim=0)
    return x > threshold


def edge_f1_iou(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Pixel-wise F1 and IoU of two binary edge maps (H, W) (ControlNet++ Canny consistency).

    Both maps empty counts as a perfect match (1, 1); exactly one empty gives (0, 0).
    """
    if pred.shape != target.shape:
        raise ValueError(f"edge maps differ in size: {tuple(pred.shape)} vs {tuple(target.shape)}")
    p, t = pred.bool(), target.bool()
    tp = (p & t).sum().item()
    fp = (p & ~t).sum().item()
    fn = (~p & t).sum().item()
    if tp + fp + fn == 0:
        return 1.0, 1.0
    f1 = 2 * tp / (2 * tp + fp + fn)
    iou = tp / (tp + fp + fn)
    return f1, iou


def edge_f1_tolerant(pred: torch.Tensor, target: torch.Tensor, tolerance: int = 1) -> float:
    """Boundary F1 with a distance tolerance (the BSDS boundary-benchmark convention): a predicted edge pixel is
    correct if a target edge lies within ``tolerance`` pixels (Chebyshev distance), and a target pixel is
    recalled if a predicted edge lies that close. ``tolerance=0`` is the pixel-wise F1 of :func:`edge_f1_iou`.

    At low resolution (32 px) the pixel-wise F1 punishes a one-pixel shift as hard as a missing edge.
    """
    if pred.shape != target.shape:
        raise ValueError(f"edge maps differ in size: {tuple(pred.shape)} vs {tuple(target.shape)}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    p, t = pred.bool(), target.bool()
    if not p.any() and not t.any():
        return 1.0
    if not p.any() or not t.any():
        return 0.0

    def grow(m: torch.Tensor) -> torch.Tensor:
        if tolerance == 0:
            return m
        k = 2 * tolerance + 1
        return torch.nn.functional.max_pool2d(m[None, None].float(), k, 1, tolerance)[0, 0] > 0

    precision = (p & grow(t)).sum().item() / p.sum().item()
    recall = (t & grow(p)).sum().item() / t.sum().item()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # (1, 1, k, k)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004), Gaussian 11x11 window, per image: (B, C, H, W)x2 -> (B,)."""
    if x.shape != y.shape:
        raise ValueError(f"ssim needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    c = x.shape[1]
    k = min(window, x.shape[-1], x.shape[-2])
    w = _gaussian_window(k, sigma, x.device, x.dtype).expand(c, 1, k, k)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x = F.conv2d(x, w, groups=c)
    mu_y = F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mu_x**2
    syy = F.conv2d(y * y, w, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float()


def rmse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Root-mean-square error per item: (B, ...)x2 -> (B,). Depth is compared on a 0-255 scale (ControlNet++)."""
    if x.shape != y.shape:
        raise ValueError(f"rmse needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    return (x.double() - y.double()).pow(2).flatten(1).mean(1).sqrt().float()


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows = target class, columns = predicted class."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (t.max() >= num_classes or p.max() >= num_classes or t.min() < 0 or p.min() < 0):
        raise ValueError(f"class ids must lie in [0, {num_classes}), got target {t.min()}..{t.max()}, pred {p.min()}..{p.max()}")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_scores(conf: torch.Tensor) -> dict[str, float]:
    """mIoU, mAcc and aAcc from a confusion matrix; classes absent from both target and prediction are skipped."""
    conf = conf.double()
    tp = conf.diag()
    gt = conf.sum(1)
    pr = conf.sum(0)
    union = gt + pr - tp
    present = union > 0
    if not present.any():
        raise ValueError("segmentation_scores: the confusion matrix is empty (no labelled pixels)")
    iou = tp[present] / union[present]
    has_gt = gt > 0
    acc = tp[has_gt] / gt[has_gt] if has_gt.any() else torch.zeros(1, dtype=conf.dtype)
    return {
        "miou": iou.mean().item(),
        "macc": acc.mean().item(),
        "aacc": (tp.sum() / conf.sum()).item(),
    }


def landmark_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L2 distance between matched landmarks, in pixels: (B, K, 2)x2 -> (B,) (OFT's face metric)."""
    if pred.shape != target.shape:
        raise ValueError(f"landmark sets differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    return (pred.double() - target.double()).norm(dim=-1).mean(-1).float()

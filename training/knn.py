"""Weighted k-NN classification of frozen features (Wu et al. 2018, as DINO evaluates its backbones).

Each rank extracts the features of its share of a labeled store's train split (the bank) and of
its val split (the queries); the bank is gathered to every rank, each rank classifies its own
queries, and the hit counts are summed, so every query counts once across ranks.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F

from training.config import TrainError
from training.dist import World, sum_tensor


@torch.no_grad()
def extract(backbone: torch.nn.Module, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features and labels of every batch `loader` yields on this rank."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    for batch in loader:
        feats.append(F.normalize(backbone(batch["image"]).float(), dim=1))
        labels.append(batch["label"])
    backbone.train(was_training)
    if not feats:  # a split smaller than the number of ranks leaves some ranks nothing
        device = next(backbone.parameters()).device
        width = cast(int, backbone.num_features)  # a timm model's
        return torch.zeros(0, width, device=device), torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels)


def gather_rows(world: World, t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `t`, concatenated in rank order (ranks may hold different row counts)."""
    if not world.distributed:
        return t
    count = torch.tensor([len(t)], device=t.device)
    counts = [torch.zeros_like(count) for _ in range(world.size)]
    dist.all_gather(counts, count)
    most = int(max(c.item() for c in counts))
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)])


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int, k: int,
                temperature: float, chunk: int = 256) -> torch.Tensor:
    """Class of each query: the votes of its k most cosine-similar bank rows, each weighted exp(sim / T).

    Rows must be L2-normalised. Queries go in chunks so the similarity matrix stays small.
    """
    k = min(k, len(bank))
    preds = []
    for start in range(0, len(queries), chunk):
        sims, idx = (queries[start:start + chunk] @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(idx), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (sims / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=bank.device)


def knn_top1(backbone: torch.nn.Module, bank_loader: Any, query_loader: Any, world: World, num_classes: int,
             k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy (%) of weighted k-NN over the whole query split; the same value on every rank."""
    bank, bank_labels = extract(backbone, bank_loader)
    bank, bank_labels = gather_rows(world, bank), gather_rows(world, bank_labels)
    queries, labels = extract(backbone, query_loader)
    preds = knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
    hits = torch.tensor([(preds == labels).sum().item(), len(labels)], dtype=torch.float64, device=bank.device)
    sum_tensor(world, hits)
    correct, total = hits.tolist()
    if total == 0:
        raise TrainError("the k-NN validation split yielded no samples (check eval.knn_path and data.val_split)")
    return 100 * correct / total

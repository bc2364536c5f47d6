"""Zero-shot metrics from similarity scores: ranks, classification accuracy, retrieval recall.

Ranks count ties against the model: the true item's rank is the number of candidates scoring at
least as high as it (itself included), so a model whose embeddings are all equal ranks everything
last, never first.
"""
from __future__ import annotations

import numpy as np

DEFAULT_TEMPLATE = "a photo of a {}."

TIES = "rank = number of candidates scoring >= the true one (itself included): ties count against the model"



def true_ranks(scores: np.ndarray, true: np.ndarray) -> np.ndarray:
    """scores [N, K], true [N] indices -> [N] int64 1-based rank of each row's true column (ties
    count against it: the number of columns scoring >= the true one)."""
    s = np.asarray(scores)
    return (s >= s[np.arange(s.shape[0]), true][:, None]).sum(1).astype(np.int64)


def top1_predictions(scores: np.ndarray, true: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """[N] the top-1 class of each row, a tie with the true class broken against it (so the
    prediction is the true class exactly when its rank is 1)."""
    s = np.array(scores, dtype=np.float64)
    rows = np.arange(s.shape[0])
    s[rows, true] = -np.inf
    return np.where(ranks == 1, true, s.argmax(1))


def classification_metrics(ranks: np.ndarray, preds: np.ndarray, labels: np.ndarray, class_names: list[str],
                           worst_k: int = 10) -> tuple[dict, np.ndarray]:
    """(metrics, confusion [K, K] int64) from each item's true-class rank, top-1 prediction and label.

    metrics: n, top1, top5 (k = min(5, K), ``top5_k``), mean_per_class_top1 (over classes with
    items), per_class [{index, name, n, top1}] and worst_classes (the ``worst_k`` lowest per-class
    top-1, ties by more items first, each with its 3 most frequent wrong predictions)."""
    k = len(class_names)
    ranks, preds, labels = (np.asarray(a, dtype=np.int64) for a in (ranks, preds, labels))
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    counts = confusion.sum(1)
    present = np.flatnonzero(counts)
    acc = {int(c): float(confusion[c, c] / counts[c]) for c in present}
    per_class = [{"index": int(c), "name": class_names[c], "n": int(counts[c]), "top1": acc[int(c)]} for c in present]
    worst = []
    for c in sorted(acc, key=lambda c: (acc[c], -counts[c], c))[:worst_k]:
        row = confusion[c].copy()
        row[c] = 0
        wrong = [int(j) for j in np.argsort(-row, kind="stable")[:3] if row[j] > 0]
        worst.append({"index": c, "name": class_names[c], "n": int(counts[c]), "top1": acc[c],
                      "confused_with": [{"index": j, "name": class_names[j], "count": int(row[j])} for j in wrong]})
    n = len(labels)
    k5 = min(5, k)
    metrics = {"n": n, "top1": float((ranks <= 1).mean()) if n else None,
               "top5": float((ranks <= k5).mean()) if n else None, "top5_k": k5,
               "mean_per_class_top1": float(np.mean(list(acc.values()))) if acc else None,
               "classes": k, "classes_with_items": len(present), "per_class": per_class, "worst_classes": worst}
    return metrics, confusion


def retrieval_metrics(sim: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """sim [N, N] video x caption similarities, caption i describing video i -> for text->video (each
    caption's column) and video->text (each video's row): recall@k (k capped at N), median and mean
    rank, and the ranks themselves."""
    sim = np.asarray(sim)
    n = sim.shape[0]
    if sim.shape != (n, n):
        raise ValueError(f"retrieval needs a square video x caption matrix, got {sim.shape}")
    out = {"n": n, "k_capped_at": n if n < max(ks) else None}
    for name, m in (("t2v", sim.T), ("v2t", sim)):
        r = true_ranks(m, np.arange(n))
        out[name] = {**{f"r{k}": float((r <= min(k, n)).mean()) for k in ks},
                     "median_rank": float(np.median(r)), "mean_rank": float(r.mean()), "ranks": r.tolist()}
    return out

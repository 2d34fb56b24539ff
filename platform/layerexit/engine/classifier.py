"""AdaInfer's exit classifier: per exit layer, a linear SVM on [top-1 probability, top1-top2 gap] trained on
traces, labelled "this layer's top-1 equals the final layer's". Stored as plain numbers in the thresholds
file (no pickle), so it loads anywhere.

A plain SVM optimises accuracy, which lets through wrong exits when agreement is rare (early layers). The
bias is then raised until the exits it allows reach ``min_precision`` on the training traces, so a layer
that can't be trusted simply never exits.
"""

from __future__ import annotations

import numpy as np

from layerexit.engine.thresholds import LinearClassifier
from layerexit.engine.traces import ExitTraces


def train_exit_classifier(traces: ExitTraces, min_precision: float = 0.9, c: float = 1.0) -> LinearClassifier:
    """Fit one LinearSVC per exit layer (not the final layer)."""
    from sklearn.svm import LinearSVC

    agree = traces.agrees()
    mean, scale, coef, intercept = {}, {}, {}, {}
    for j, layer in enumerate(traces.layers[:-1]):
        x = np.stack([traces.conf[:, j], traces.gap[:, j]], axis=1).astype(np.float64)
        y = agree[:, j].astype(int)
        mu = x.mean(axis=0)
        sd = x.std(axis=0) + 1e-6
        z = (x - mu) / sd
        if y.min() == y.max():  # one class only: always or never exit
            w = np.zeros(2)
            b = 1.0 if y[0] == 1 else -1.0
        else:
            svm = LinearSVC(C=c, class_weight="balanced", dual="auto", max_iter=5000).fit(z, y)
            w = svm.coef_[0]
            b = float(svm.intercept_[0])
            b = _raise_bias_for_precision(z @ w, y, b, min_precision)
        mean[layer], scale[layer] = mu.tolist(), sd.tolist()
        coef[layer], intercept[layer] = w.tolist(), b
    return LinearClassifier(mean=mean, scale=scale, coef=coef, intercept=intercept)


def _raise_bias_for_precision(scores: np.ndarray, y: np.ndarray, bias: float, min_precision: float) -> float:
    """Smallest shift of the decision boundary so that the exits taken reach ``min_precision``."""
    order = np.argsort(-scores)
    s, lab = scores[order], y[order]
    precision = np.cumsum(lab) / np.arange(1, len(lab) + 1)
    # Exits taken when score + b > 0: the top-k scores. Keep the largest k with precision >= target.
    ok = np.nonzero(precision >= min_precision)[0]
    current_k = int((scores + bias > 0).sum())
    if current_k and precision[current_k - 1] >= min_precision:
        return bias
    if len(ok) == 0:
        return -float(s[0]) - 1.0  # never exit at this layer
    k = int(ok.max()) + 1
    threshold = s[k - 1] if k == len(s) else (s[k - 1] + s[k]) / 2
    return -float(threshold) + (1e-9 if k == len(s) else 0.0)


def classifier_exit_decisions(classifier: LinearClassifier, traces: ExitTraces) -> np.ndarray:
    """(N, E-1) bool: where the classifier would exit, per trace token and exit layer."""
    out = np.zeros((traces.conf.shape[0], len(traces.layers) - 1), dtype=bool)
    for j, layer in enumerate(traces.layers[:-1]):
        if layer not in classifier.coef:
            continue
        x = np.stack([traces.conf[:, j], traces.gap[:, j]], axis=1)
        z = (x - np.array(classifier.mean[layer])) / np.array(classifier.scale[layer])
        out[:, j] = z @ np.array(classifier.coef[layer]) + classifier.intercept[layer] > 0
    return out

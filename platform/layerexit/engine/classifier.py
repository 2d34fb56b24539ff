"""Learned exit signals trained on traces.

AdaInfer's exit classifier: per exit layer, a linear SVM on [top-1 probability, top1-top2 gap] trained on
traces, labelled "this layer's top-1 equals the final layer's". Stored as plain numbers in the thresholds
file (no pickle), so it loads anywhere.

A plain SVM optimises accuracy, which lets through wrong exits when agreement is rare (early layers). The
bias is then raised until the exits it allows reach ``min_precision`` on the training traces, so a layer
that can't be trusted simply never exits.

The hidden-state probe (``train_exit_probe``): a logistic regression per exit layer on the final-normed hidden
state, predicting the same label. Its check costs 2*H FLOPs instead of a full LM head (on SmolLM2 the head
costs about 8 decoder layers), so the head runs once, at the exit.
"""

from __future__ import annotations

import numpy as np

from layerexit.engine.thresholds import LinearClassifier, LinearProbe
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


def train_exit_probe(traces: ExitTraces, min_precision: float = 0.9, c: float = 0.1,
                     ) -> tuple[LinearProbe, dict[int, float]]:
    """Fit a logistic-regression probe per exit layer; return it and, per layer, the lowest probability
    threshold whose exits reach ``min_precision`` on the training traces (1.0 where none does)."""
    from sklearn.linear_model import LogisticRegression

    if traces.hidden is None:
        raise ValueError("traces hold no hidden states: record them with keep_hidden=True")
    agree = traces.agrees()
    weight, bias, thresholds = {}, {}, {}
    for j, layer in enumerate(traces.layers[:-1]):
        x = traces.hidden[:, j].astype(np.float32)
        y = agree[:, j].astype(int)
        if y.min() == y.max():
            weight[layer] = [0.0] * x.shape[1]
            bias[layer] = 10.0 if y[0] == 1 else -10.0
            thresholds[layer] = 0.5
            continue
        lr = LogisticRegression(C=c, max_iter=2000).fit(x, y)
        weight[layer] = lr.coef_[0].tolist()
        bias[layer] = float(lr.intercept_[0])
        p = lr.predict_proba(x)[:, 1]
        thresholds[layer] = _threshold_for_precision(p, y, min_precision)
    return LinearProbe(weight=weight, bias=bias), thresholds


def _threshold_for_precision(p: np.ndarray, y: np.ndarray, min_precision: float) -> float:
    order = np.argsort(-p)
    precision = np.cumsum(y[order]) / np.arange(1, len(y) + 1)
    ok = np.nonzero(precision >= min_precision)[0]
    if len(ok) == 0:
        return 1.0
    return float(min(1.0, p[order][ok.max()]))


def probe_traces(probe: LinearProbe, traces: ExitTraces) -> ExitTraces:
    """The traces with each probed exit layer's ``conf`` column replaced by the probe's probability, so threshold
    rules over the probe (the ``probe`` policy) are scored like confidence thresholds. Layers the probe lacks keep
    probability 0 (never exit); the final layer's column is kept."""
    from dataclasses import replace

    if traces.hidden is None:
        raise ValueError("traces hold no hidden states: record them with keep_hidden=True")
    conf = np.zeros_like(traces.conf, dtype=np.float32)
    conf[:, -1] = traces.conf[:, -1]
    for j, layer in enumerate(traces.layers[:-1]):
        if layer in probe.weight:
            z = traces.hidden[:, j].astype(np.float32) @ np.asarray(probe.weight[layer], dtype=np.float32)
            conf[:, j] = 1.0 / (1.0 + np.exp(-(z + probe.bias[layer])))
    return replace(traces, conf=conf)

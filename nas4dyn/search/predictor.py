"""Accuracy predictor for dynamic subnets: validation accuracy, exit rates and gate rates from the arch.

Features and targets: :mod:`nas4dyn.search.predictor_features`. With the rates,
:mod:`nas4dyn.search.candidate_costs` gives an unmeasured candidate every cost objective.

Two models, fitted on the study's own measured trials:

- ``mlp``: a small torch MLP (an ensemble of two seeds) with one head per target: accuracy (standardised,
  squared error), exit rates (a softmax over the arch's active exits and the final classifier, cross-entropy
  against the measured shares), gate rates (sigmoid, binary cross-entropy, gated slots only);
- ``gbm``: LightGBM gradient-boosted trees for accuracy, rates from the MLP's heads;
- ``ensemble``: the mean of the two accuracies (out of fold the best on the predictor strategy's own
  proposals, the second best in K-fold over all measured trials: scripts/bench_predictor.py).

Either way a second LightGBM model predicts the *cost share* of archs with exits (measured expected cost over
the limit their exit budget set; median 0.90 on the default run), and :func:`rates_of` moves the MLP's exit
shares onto that cost: calibration meets the budget, so the budget, not the MLP, pins down the expected cost
(offline, scripts/bench_predictor.py: median expected-MAC error 2.9% -> 1.5% out of fold).

``caution`` > 0 lowers every predicted accuracy by ``caution`` × half the two models' disagreement
(``|mlp - gbm| / 2``; at 1 the ensemble's prediction becomes the lower of the two): where the models disagree the
search's pick is most often an over-rating (the predictor strategy's proposals of the session-13 run: the
disagreement rank-correlates 0.71 with LightGBM's error; scripts/bench_predictor.py, docs/BENCHMARKS.md "Search").

``kind="auto"`` picks, per fit, the model whose out-of-fold predictions rank the measured trials best (Kendall
τ over K folds) and reports that τ and the RMSE; the search shows it in its progress bar.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
from scipy.stats import kendalltau
from torch import nn

from nas4dyn.errors import ConfigError
from nas4dyn.search.candidate_costs import fit_exit_shares
from nas4dyn.search.predictor_features import Featurizer, Samples, cost_limit
from search_spaces.arch import Arch

__all__ = ["Featurizer", "Prediction", "Samples", "SubnetPredictor", "check_predictor", "rates_of"]

log = logging.getLogger(__name__)

KINDS = ("auto", "mlp", "gbm", "ensemble")
MODELS = KINDS[1:]  # what "auto" chooses from
# LightGBM's parameters for accuracy and the cost share (out of fold on the default run, smaller trees or
# monotone constraints did no better: scripts/bench_predictor.py).
GBM_PARAMS = {"objective": "regression", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 3,
              "bagging_fraction": 0.8, "bagging_freq": 1, "feature_fraction": 0.8, "verbose": -1, "num_threads": 1,
              "num_boost_round": 300}
MIN_TRIALS = 8  # fewer measured trials than this fit nothing useful (and K-fold needs some per fold)


class _MLP(nn.Module):
    def __init__(self, features: int, outputs: int, hidden: int = 128):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@dataclass
class Prediction:
    """Predicted accuracy, exit shares (per position + final; 0 where inactive), gate rates per slot and cost
    share (expected budget metric over the budget's limit; 1 without exits)."""

    accuracy: np.ndarray
    exits: np.ndarray
    gates: np.ndarray
    cost_share: np.ndarray


@dataclass
class SubnetPredictor:
    """Predicts a subnet's validation accuracy, exit shares and gate rates (see the module docstring)."""

    kind: str = "auto"
    folds: int = 5
    seed: int = 0
    epochs: int = 300
    members: int = 2
    gbm_params: dict[str, Any] = field(default_factory=dict)  # overrides of the accuracy model's LightGBM params
    caution: float = 0.0  # predicted accuracy minus caution x |mlp - gbm| / 2 (see the module docstring)
    chosen: str = ""  # the model that predicts accuracy after fit ("mlp", "gbm" or "ensemble")
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> {"tau", "rmse"} out of fold
    _mlps: list[_MLP] = field(default_factory=list)
    _gbm: Any = None
    _share: Any = None  # LightGBM model of the cost share, or a constant (few archs with exits)
    _norm: tuple[np.ndarray, np.ndarray, float, float] = (np.zeros(0), np.ones(0), 0.0, 1.0)

    @property
    def tau(self) -> float:
        return self.scores.get(self.chosen, {}).get("tau", float("nan"))

    # ---- fitting ------------------------------------------------------------------------------------
    def _fit_mlps(self, data: Samples) -> None:
        mean, std = data.x.mean(0), data.x.std(0)
        std[std < 1e-8] = 1.0
        acc_mean, acc_std = float(data.accuracy.mean()), float(data.accuracy.std()) or 1.0
        self._norm = (mean, std, acc_mean, acc_std)
        x = torch.as_tensor((data.x - mean) / std, dtype=torch.float32)
        acc = torch.as_tensor((data.accuracy - acc_mean) / acc_std, dtype=torch.float32)
        exits, emask = torch.as_tensor(data.exits, dtype=torch.float32), torch.as_tensor(data.exit_mask)
        gates, gmask = torch.as_tensor(data.gates, dtype=torch.float32), torch.as_tensor(data.gate_mask)
        n_exit = emask.shape[1]
        self._mlps = []
        for member in range(self.members):
            torch.manual_seed(self.seed * 100 + member)
            mlp = _MLP(x.shape[1], 1 + n_exit + gmask.shape[1])
            opt = torch.optim.Adam(mlp.parameters(), lr=3e-3, weight_decay=1e-4)
            for _ in range(self.epochs):
                out = mlp(x)
                logits = out[:, 1:1 + n_exit].masked_fill(~emask, -1e9)
                loss = nn.functional.mse_loss(out[:, 0], acc)
                loss = loss - (exits * torch.log_softmax(logits, 1).masked_fill(~emask, 0.0)).sum(1).mean()
                if gmask.any():
                    bce = nn.functional.binary_cross_entropy_with_logits(out[:, 1 + n_exit:], gates, reduction="none")
                    loss = loss + bce[gmask].mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            self._mlps.append(mlp.eval())

    def _lgbm(self, x: np.ndarray, y: np.ndarray, **overrides: Any) -> Any:
        import lightgbm

        params = {**GBM_PARAMS, "seed": self.seed, **overrides}
        rounds = params.pop("num_boost_round")
        return lightgbm.train(params, lightgbm.Dataset(x, y), num_boost_round=rounds)

    def _fit_share(self, data: Samples) -> None:
        known = np.isfinite(data.cost_share)
        if known.sum() < MIN_TRIALS:  # too few archs with exits to learn from: their median (calibration's aim: 1)
            self._share = float(np.median(data.cost_share[known])) if known.any() else 1.0
        else:
            self._share = self._lgbm(data.x[known], data.cost_share[known])

    def _fit(self, data: Samples, kind: str) -> None:
        self._fit_mlps(data)
        self._fit_share(data)
        fit_gbm = kind != "mlp" or self.caution > 0  # the disagreement needs both models
        self._gbm = self._lgbm(data.x, data.accuracy, **self.gbm_params) if fit_gbm else None
        self.chosen = kind

    def cross_validate_kinds(self, data: Samples, kinds: Sequence[str]) -> dict[str, dict[str, float]]:
        """Out-of-fold Kendall τ and RMSE of each model kind's accuracy over ``self.folds`` folds of ``data``
        (one MLP and one LightGBM fit per fold serve every kind: "ensemble" is their mean)."""
        order = np.random.default_rng(self.seed).permutation(len(data))
        predicted = {k: np.zeros(len(data)) for k in kinds}
        for fold in np.array_split(order, min(self.folds, len(data))):
            model = SubnetPredictor("gbm", seed=self.seed, epochs=self.epochs, members=self.members,
                                    gbm_params=self.gbm_params)
            model._fit(data.subset(np.setdiff1d(order, fold)), "mlp" if set(kinds) == {"mlp"} else "gbm")
            for k in kinds:
                model.chosen = k
                predicted[k][fold] = model.predict_x(data.x[fold], data.exit_mask[fold], data.gate_mask[fold]).accuracy
        scores = {}
        for k, p in predicted.items():
            tau = kendalltau(p, data.accuracy).statistic
            scores[k] = {"tau": float(tau) if np.isfinite(tau) else 0.0,
                         "rmse": float(np.sqrt(np.mean((p - data.accuracy) ** 2)))}
        return scores

    def cross_validate(self, data: Samples, kind: str) -> dict[str, float]:
        """Out-of-fold Kendall τ and RMSE of ``kind``'s accuracy over ``self.folds`` folds of ``data``."""
        return self.cross_validate_kinds(data, [kind])[kind]

    def fit(self, data: Samples) -> "SubnetPredictor":
        """Score the candidate model kinds out of fold, then fit the best (``kind``, or by τ for "auto") on all
        of ``data``.

        Raises:
            ConfigError: fewer than MIN_TRIALS measured trials, or an unknown kind.
        """
        check_predictor(self.kind)
        if len(data) < MIN_TRIALS:
            raise ConfigError(f"the predictor needs at least {MIN_TRIALS} measured trials, the study has {len(data)}; "
                              "raise --warmup")
        kinds = MODELS if self.kind == "auto" else (self.kind,)
        self.scores = self.cross_validate_kinds(data, kinds)
        best = max(kinds, key=lambda k: self.scores[k]["tau"])
        self._fit(data, best)
        log.info("predictor: %s", ", ".join(f"{k} tau {s['tau']:.3f} rmse {s['rmse']:.4f}" for k, s in self.scores.items()))
        return self

    # ---- predicting -----------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_x(self, x: np.ndarray, exit_mask: np.ndarray, gate_mask: np.ndarray) -> Prediction:
        mean, std, acc_mean, acc_std = self._norm
        xt = torch.as_tensor((x - mean) / std, dtype=torch.float32)
        emask = torch.as_tensor(exit_mask)
        n_exit = emask.shape[1]
        outs = torch.stack([mlp(xt) for mlp in self._mlps]).mean(0)
        exits = torch.softmax(outs[:, 1:1 + n_exit].masked_fill(~emask, -1e9), 1).numpy()
        gates = torch.sigmoid(outs[:, 1 + n_exit:]).numpy() * gate_mask
        accuracy = mlp_accuracy = outs[:, 0].numpy() * acc_std + acc_mean
        if self._gbm is not None:
            gbm_accuracy = self._gbm.predict(x)
            accuracy = {"mlp": mlp_accuracy, "gbm": gbm_accuracy,
                        "ensemble": (mlp_accuracy + gbm_accuracy) / 2}[self.chosen]
            accuracy = accuracy - self.caution * np.abs(mlp_accuracy - gbm_accuracy) / 2
        share = self._share.predict(x) if hasattr(self._share, "predict") else np.full(len(x), self._share)
        share = np.where(exit_mask[:, :-1].any(1), np.clip(share, 0.05, 1.0), 1.0)
        return Prediction(np.clip(accuracy, 0.0, 1.0), exits, gates, share)

    def predict(self, featurizer: Featurizer, archs: Sequence[Arch], budgets: Sequence[float]) -> Prediction:
        """Predictions for uncalibrated ``archs`` at their exit ``budgets``."""
        x = np.asarray([featurizer.row(a, b) for a, b in zip(archs, budgets)], dtype=np.float32)
        return self.predict_x(x, np.stack([featurizer.exit_mask(a) for a in archs]),
                              np.stack([featurizer.gate_mask(a) for a in archs]))


def rates_of(featurizer: Featurizer, arch: Arch, prediction: Prediction, row: int,
             exit_budget: float) -> tuple[list[float], list[float]]:
    """One arch's predicted exit shares (its exits, then the final classifier) and gate rates (its gated
    blocks in network order), as :meth:`CandidateCosts.metrics` takes them; the exit shares moved so that the
    expected budget metric is the predicted cost share of the limit ``exit_budget`` sets."""
    exits = prediction.exits[row][featurizer.exit_mask(arch)]
    gates = prediction.gates[row][featurizer.gate_mask(arch)]
    if arch.exits:
        costs = featurizer.costs.exit_costs(arch, gates.tolist())[featurizer.metric]
        exits = fit_exit_shares(exits, costs, float(prediction.cost_share[row]) * cost_limit(costs, exit_budget))
    return exits.tolist(), gates.tolist()


def check_predictor(kind: Optional[str]) -> None:
    """Raises:
        ConfigError: unknown predictor kind.
    """
    if kind not in KINDS:
        raise ConfigError(f"--predictor {kind!r}: choose one of {', '.join(KINDS)}")

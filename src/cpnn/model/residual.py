"""An optional cell-state term on top of the cell-type mixture.

A mixture of fixed cell-type prototypes can only express what differs *between* types.
Programs that every type switches on together in some regions (HLA class I and B2M
under interferon, stress and ribosomal programs) are invisible to it. The residual head
is a ridge map from a bag's (already scaled) mean features to what the mixture leaves
unexplained on log1p CP10k, fitted after the networks, *cross-fitted*: its targets are the
mixture's out-of-fold predictions (each training bag predicted by the ensemble members
that held it out for validation), so it learns what the mixture misses on tissue it has
not seen rather than the networks' training error.

Two forms, both on log1p CP10k (``m`` the mixture, ``x`` the features):

- ``additive``: ``m + ridge(x)``, the mixture kept as it is;
- ``blend``: ``c * m + ridge(x)`` with **one** mixture weight ``c`` for every gene, taken
  from :data:`BLEND_WEIGHTS` by the same inner cross-validation, the ridge fitted on
  ``y - c * m``. For one penalty this is exactly the average of the additive model and a
  linear probe of ``y`` weighted ``c : 1 - c`` (ridge is linear in its targets), so it
  hedges the mixture with a probe on the same features: one number learnt, not one per gene;
- ``stacked``: ``a_g * m + ridge(x)`` with one unpenalised, non-negative mixture
  coefficient per gene, fitted jointly with the ridge (a stacking of the mixture and a
  linear probe). Where the mixture's prediction of a gene is noisy on held-out tissue its
  coefficient shrinks towards 0 and the features take over; where it is good, ``a_g``
  stays near 1. Without this, a heavily penalised ridge cannot undo a poor mixture gene.

It only acts when it helps: the form and penalty are chosen by inner cross-validation
over the training groups (sections / patients) on the *final* out-of-fold prediction,
with "no residual" among the candidates (ties keep the simpler form), so on data where
the mixture already explains what the features can predict the head stays off. It never
changes the cell-type weights.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from .probes import DEFAULT_ALPHA_GRID, RidgeProbe, _mean_pearson, inner_folds

#: the head's forms, simplest first (ties in the inner cross-validation keep the earlier)
HEAD_FORMS = ("off", "additive", "blend", "stacked")

#: mixture weights ``c`` the ``blend`` form chooses among (``c = 1`` is the additive form)
BLEND_WEIGHTS = (0.75, 0.5, 0.25)

#: forms that keep one mixture weight for every gene, and the weights each may use
_FIXED_WEIGHTS = {"additive": (1.0,), "blend": BLEND_WEIGHTS}


def stacked_ridge_path(p: np.ndarray, m: np.ndarray, y: np.ndarray, alphas: Sequence[float]) -> list:
    """The stacked form for every penalty, from one SVD of the projected features.

    Fits ``y_g ~ c_g * m_g + p @ beta_g + intercept_g`` by ridge on ``beta`` only,
    ``beta`` profiled out: with ``H = p (p'p + alpha I)^-1 p'`` (centred),
    ``c_g = m_g'(I - H) y_g / m_g'(I - H) m_g``, clipped at 0 (the mixture is never used
    upside down). (The additive form, ``c_g = 1``, is the plain ridge path of ``y - m``:
    :meth:`cpnn.model.probes.RidgeProbe._ridge_path`.)

    Parameters
    ----------
    p
        ``(N, k)`` projected features.
    m, y
        ``(N, G)`` mixture and observed log1p CP10k.
    alphas
        Ridge penalties.

    Returns
    -------
    list
        Per penalty, ``(c (G,), coef (k, G), intercept (G,))``.
    """
    pm, mm, ym = p.mean(axis=0), m.mean(axis=0), y.mean(axis=0)
    pc, mc, yc = p - pm, m - mm, y - ym
    u, s, vt = np.linalg.svd(pc, full_matrices=False)
    utm, uty = u.T @ mc, u.T @ yc
    out = []
    for alpha in alphas:
        gain = s / (s * s + alpha)
        smooth = (s * gain)[:, None]  # H = U diag(s^2 / (s^2 + alpha)) U'
        resid_m = mc - u @ (smooth * utm)
        resid_y = yc - u @ (smooth * uty)
        denom = np.einsum("ng,ng->g", mc, resid_m)
        c = np.where(denom > 1e-12, np.einsum("ng,ng->g", mc, resid_y) / np.maximum(denom, 1e-12), 0.0)
        c = np.clip(c, 0.0, None)
        coef = vt.T @ (gain[:, None] * (uty - c * utm))
        out.append((c, coef, ym - c * mm - pm @ coef))
    return out


class ResidualHead:
    """Ridge from bag features to what the mixture misses on log1p CP10k (see the module).

    Parameters
    ----------
    n_components
        PCA dimensions of the standardised features (as in the HEST probe).
    alphas
        Ridge penalties to choose from; "off" is always a candidate.
    n_inner_folds
        Folds of the inner cross-validation (grouped when groups are given).
    seed
        For the inner folds when there are no groups.
    forms
        Head forms the inner cross-validation may choose besides "off"
        (``"additive"``, ``"blend"``, ``"stacked"``); ``CPNNConfig.residual_head="blend"``
        or ``"stacked"`` offers that form besides the additive one.
    """

    def __init__(self, n_components: int = 256, alphas: Sequence[float] = DEFAULT_ALPHA_GRID,
                 n_inner_folds: int = 4, seed: int = 0,
                 forms: Sequence[str] = ("additive",)) -> None:
        bad = [f for f in forms if f not in HEAD_FORMS[1:]]
        if bad or not forms:
            raise ValueError(f"residual head forms must be among {HEAD_FORMS[1:]}, got {list(forms)}")
        self.n_components = n_components
        self.alphas = tuple(float(a) for a in alphas)
        self.n_inner_folds = n_inner_folds
        self.seed = seed
        self.forms = tuple(f for f in HEAD_FORMS[1:] if f in forms)
        self.alpha_: Optional[float] = None  # None: off
        self.form_: str = "off"
        self.mixture_coef_: Optional[np.ndarray] = None  # (G,) in the stacked form
        self.mixture_weight_: Optional[float] = None  # c in the blend form
        self.cv_scores_: Dict[str, float] = {}
        self.oof_fraction_: Optional[float] = None  # share of training bags with an out-of-fold mixture
        self._probe: Optional[RidgeProbe] = None

    @property
    def active(self) -> bool:
        """Whether the inner cross-validation switched the head on."""
        return self._probe is not None

    def fit(self, features: np.ndarray, mixture_log: np.ndarray, observed_log: np.ndarray,
            groups: Optional[Sequence] = None) -> "ResidualHead":
        """Choose the form and penalty (or off) and fit on all rows.

        Parameters
        ----------
        features
            ``(N, D)`` one feature row per bag.
        mixture_log, observed_log
            ``(N, G)`` log1p CP10k of the model's mixture and of the observed counts.
        groups
            Group of each row; inner folds hold out whole groups.
        """
        x = np.asarray(features, dtype=np.float64)
        base = np.asarray(mixture_log, dtype=np.float64)
        y = np.asarray(observed_log, dtype=np.float64)
        if not (x.shape[0] == base.shape[0] == y.shape[0]) or base.shape != y.shape:
            raise ValueError(f"residual head: shapes {x.shape}, {base.shape}, {y.shape} do not agree")
        folds = inner_folds(len(x), groups, self.n_inner_folds, self.seed)
        if len(x) < 4 or len(folds) < 2:
            return self
        n_folds = len(folds)
        usable = [f for f in folds if (~f).sum() >= 3 and f.sum() >= 2]  # Pearson needs a few rows
        probe = RidgeProbe(n_components=self.n_components, alphas=self.alphas, seed=self.seed)
        off = 0.0
        # one row per fixed mixture weight (additive: c = 1, blend: each of BLEND_WEIGHTS;
        # stacked: one row, its weights fitted per gene), one column per penalty
        weights = {form: _FIXED_WEIGHTS.get(form, (None,)) for form in self.forms}
        scores = {form: np.zeros((len(weights[form]), len(self.alphas))) for form in self.forms}
        for test in usable:
            tr = ~test
            mean, std, comps = probe._fit_transform_basis(x[tr])
            p_tr, p_te = probe._project(x[tr], mean, std, comps), probe._project(x[test], mean, std, comps)
            off += _mean_pearson(base[test], y[test]) / n_folds
            for form in self.forms:
                if form == "stacked":
                    for i, (c, coef, inter) in enumerate(stacked_ridge_path(p_tr, base[tr], y[tr], self.alphas)):
                        pred = c * base[test] + p_te @ coef + inter
                        scores[form][0, i] += _mean_pearson(pred, y[test]) / n_folds
                    continue
                for w, c in enumerate(weights[form]):  # the ridge path of y - c * m
                    coefs, inters = probe._ridge_path(p_tr, y[tr] - c * base[tr], self.alphas)
                    for i in range(len(self.alphas)):
                        pred = c * base[test] + p_te @ coefs[i] + inters[i]
                        scores[form][w, i] += _mean_pearson(pred, y[test]) / n_folds
        self.cv_scores_ = {"off": float(off)}
        for form in self.forms:
            for w, c in enumerate(weights[form]):
                # keys: bare penalties (additive), "blend <c> <penalty>", "stacked <penalty>"
                prefix = {"additive": "", "blend": f"blend {c!r} ", "stacked": "stacked "}[form]
                self.cv_scores_.update({f"{prefix}{a!r}": float(v) for a, v in zip(self.alphas, scores[form][w])})
        best_form, best_alpha, best_weight, best = "off", None, None, off
        for form in self.forms:  # strict improvement: ties keep the simpler form
            table = scores[form]
            if not np.isfinite(table).any():
                continue
            w, i = np.unravel_index(int(np.nanargmax(table)), table.shape)
            if table[w, i] > best:
                best_form, best_alpha, best_weight, best = form, self.alphas[i], weights[form][w], float(table[w, i])
        if best_form == "off":
            return self
        self.form_, self.alpha_ = best_form, best_alpha
        if best_form != "stacked":
            if best_form == "blend":
                self.mixture_weight_ = float(best_weight)
            self._probe = probe.fit_alpha(x, y - best_weight * base, best_alpha)
            return self
        fitted = RidgeProbe(n_components=self.n_components, alphas=[best_alpha])
        fitted.alpha_ = best_alpha
        fitted.mean_, fitted.std_, fitted.components_ = probe._fit_transform_basis(x)
        p_all = fitted._project(x, fitted.mean_, fitted.std_, fitted.components_)
        (self.mixture_coef_, fitted.coef_, fitted.intercept_), = stacked_ridge_path(p_all, base, y, [best_alpha])
        self._probe = fitted
        return self

    def predict(self, features: np.ndarray, mixture_log: Optional[np.ndarray] = None) -> np.ndarray:
        """``(N, G)`` residual on log1p CP10k (only when :attr:`active`): what is added to
        the mixture's log1p CP10k. The stacked form needs that mixture (``mixture_log``)."""
        if self._probe is None:
            raise RuntimeError("the residual head is off or not fitted; check .active first")
        out = self._probe.predict(features)
        if self.form_ in ("stacked", "blend"):
            if mixture_log is None:
                raise ValueError(f"the {self.form_} residual head needs the mixture's log1p CP10k (mixture_log)")
            coef = self.mixture_coef_ if self.form_ == "stacked" else self.mixture_weight_
            out = out + (coef - 1.0) * np.asarray(mixture_log, dtype=np.float64)
        return out

    def correct(self, composition: np.ndarray, features: np.ndarray) -> np.ndarray:
        """The mixture's ``composition`` (rows sum to 1) with the head applied, as a composition."""
        from .._numerics import composition_log1p

        comp = np.asarray(composition, np.float64)
        log = composition_log1p(comp)
        log = log + self.predict(features, log)
        expr = np.clip(np.expm1(log), 0.0, None)
        return (expr / np.maximum(expr.sum(axis=1, keepdims=True), 1e-300)).astype(np.float32)

    def describe(self) -> Dict[str, Any]:
        """What the inner cross-validation chose, for metrics files."""
        out: Dict[str, Any] = {"active": self.active, "form": self.form_, "alpha": self.alpha_,
                               "forms_offered": list(self.forms)}
        if self.mixture_weight_ is not None:
            out["mixture_weight"] = self.mixture_weight_
        if self.mixture_coef_ is not None:
            q = np.quantile(self.mixture_coef_, [0.1, 0.5, 0.9])
            out["mixture_coef_quantiles_10_50_90"] = [round(float(v), 4) for v in q]
            out["mixture_coef_zero_fraction"] = float(np.mean(self.mixture_coef_ == 0))
        return out

    # -- files -----------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """Numbers and numpy arrays (the model file stores the arrays as tensors)."""
        out: Dict[str, Any] = {"alpha": self.alpha_, "cv_scores": dict(self.cv_scores_), "form": self.form_,
                               "n_components": self.n_components, "oof_fraction": self.oof_fraction_}
        if self._probe is not None:
            p = self._probe
            out.update(mean=p.mean_.astype(np.float32), std=p.std_.astype(np.float32),
                       components=p.components_.astype(np.float32), coef=p.coef_.astype(np.float32),
                       intercept=p.intercept_.astype(np.float32))
            if self.mixture_coef_ is not None:
                out["mixture_coef"] = self.mixture_coef_.astype(np.float32)
            if self.mixture_weight_ is not None:
                out["mixture_weight"] = float(self.mixture_weight_)
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ResidualHead":
        head = cls(n_components=int(d.get("n_components", 256)))
        head.alpha_ = d.get("alpha")
        head.cv_scores_ = dict(d.get("cv_scores") or {})
        oof = d.get("oof_fraction")
        head.oof_fraction_ = None if oof is None else float(oof)
        if head.alpha_ is not None:
            head.form_ = str(d.get("form") or "additive")  # files before the stacked form were additive
            p = RidgeProbe(n_components=head.n_components, alphas=[head.alpha_])
            p.alpha_ = head.alpha_
            p.mean_, p.std_ = np.asarray(d["mean"], np.float64), np.asarray(d["std"], np.float64)
            p.components_ = np.asarray(d["components"], np.float64)
            p.coef_, p.intercept_ = np.asarray(d["coef"], np.float64), np.asarray(d["intercept"], np.float64)
            if head.form_ == "stacked":
                head.mixture_coef_ = np.asarray(d["mixture_coef"], np.float64)
            if head.form_ == "blend":
                head.mixture_weight_ = float(d["mixture_weight"])
            head._probe = p
        return head

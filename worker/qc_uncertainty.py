"""``chexmask qc uncertainty``: does the latent-sample uncertainty add to Dice RCA in
telling a bad mask from a good one?

Cases are the model's own masks of annotated held-out images: the clean image
('clean'), its nine re-framed and re-processed versions of ``chexmask evaluate --ood``
(``worker.augment.CONDITIONS``, the same seeded images) and its six degraded copies of
``chexmask qc validate`` (``IMAGE_DEGRADATIONS``). Per case: the true Dice per organ
against the (transformed) ground truth, Dice RCA (Max and Mean, overall and per organ)
as ``assess`` computes it for serving (the bank's calibration and caps), and the mean
landmark standard deviation over N latent samples, per organ and over all 120 landmarks.

The report, per set of cases ('all', and 'clean_and_ood' without the image
degradations): Spearman correlation of each predictor with the true error (1 - Dice),
overall and per organ; per threshold, how many masks are bad (true Dice below it) and
the area under the ROC curve of each predictor for flagging them; and whether
uncertainty adds to RCA: logistic regression on [1 - RCA, log uncertainty], fitted
leaving one source image out (so no copy of a held-out image is fitted on), against
RCA alone, with a bootstrap over source images of the AUC difference.

Cases are cached in ``cases.json`` under the output folder, one source image at a time,
so an interrupted run resumes and a report (other thresholds, say) is re-made without
scoring again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from scipy.stats import spearmanr

from chexmask.anatomy import FRAME, N_LANDMARKS, ORGAN_ROWS
from chexmask.worker import rca
from chexmask.worker.augment import CONDITIONS, ood_sample
from chexmask.worker.bank import ReferenceBank
from chexmask.worker.qc_commands import IMAGE_DEGRADATIONS, degrade_image
from chexmask.worker.train import load_landmarks

KINDS = ("clean", *CONDITIONS, *IMAGE_DEGRADATIONS)
# rca's organ keys -> the anatomy's landmark rows (both lungs: RL and LL together).
ORGANS = {"rl": ("RL",), "ll": ("LL",), "lungs": ("RL", "LL"), "heart": ("H",)}
# Predictors, each oriented so that larger means worse: RCA estimates Dice, so 1 - RCA.
PREDICTORS = ("rca_max", "rca_mean", "uncertainty")
# 0.9: 0.04 under the model's clean held-out masks' mean (0.940) and below the lowest of
# them (0.9005): a mask worse than any the model makes of an image like its training
# data. 0.85 (clearly broken masks only) is reported beside it.
THRESHOLDS = (0.9, 0.85)
BOOTSTRAP = 2000
RIDGE = 1e-2  # L2 weight on the standardised logistic coefficients: keeps a separable fold finite


@dataclass(frozen=True)
class CacheKey:
    """What the cached cases depend on: a cache with another key is ignored."""

    weights_sha256: str
    bank: str  # the bank file's sha256
    samples: int
    seed: int


def case_images(image: np.ndarray, truth: np.ndarray, image_id: str, kinds: tuple[str, ...], seed: int) -> Iterator:
    """(kind, image, ground truth) of one source image's cases of ``kinds``, in KINDS order."""
    rng = np.random.default_rng([seed, *image_id.encode()])  # the image degradations' strengths
    for kind in KINDS:
        if kind in IMAGE_DEGRADATIONS:
            degraded = degrade_image(image, kind, truth, rng)  # drawn for every kind: same image whatever is asked
        if kind not in kinds:
            continue
        if kind == "clean":
            yield kind, image, truth
        elif kind in CONDITIONS:
            yield (kind, *ood_sample(image, truth, kind, image_id, seed))
        else:
            yield kind, degraded, truth


def score_case(
    model, bank: ReferenceBank, image: np.ndarray, truth: np.ndarray, samples: int, seed: int
) -> dict[str, float | str]:
    """True Dice, Dice RCA as served and the landmark spread of the model's mask of one image."""
    from chexmask.worker.model import segment_with_uncertainty
    from chexmask.worker.postprocess import landmarks_to_pixels
    from chexmask.worker.qc import ORGAN_FIELDS, assess

    landmarks, latents, std = segment_with_uncertainty(model, image[None], samples, seed)
    points = landmarks_to_pixels(landmarks[0])
    qc = assess(image, points, latents[0], bank)
    true = rca.dice_table(points, np.asarray(truth)[None], FRAME)
    row: dict[str, float | str] = {"true": float(true["overall"][0]), "flags": " ".join(qc.flags)}
    row |= {f"true_{organ}": float(true[organ][0]) for organ in ORGANS}
    suffixes = {organ: suffix for suffix, organ in ORGAN_FIELDS.items()}  # 'heart' -> 'h'
    for stat in ("max", "mean"):
        row[f"rca_{stat}"] = getattr(qc, f"dice_rca_{stat}")
        row |= {f"rca_{stat}_{organ}": getattr(qc, f"dice_rca_{stat}_{suffixes[organ]}") for organ in ORGANS}
    row["uncertainty"] = float(std[0].mean())
    for organ, parts in ORGANS.items():
        rows = np.concatenate([np.arange(N_LANDMARKS)[ORGAN_ROWS[p]] for p in parts])
        row[f"uncertainty_{organ}"] = float(std[0][rows].mean())
    return row


def collect_cases(
    model,
    bank: ReferenceBank,
    images: Path,
    landmarks: Path,
    ids: list[str],
    key: CacheKey,
    cache: Path,
    kinds: tuple[str, ...] = KINDS,
    progress: Iterable[str] | None = None,
) -> tuple[list[dict], int]:
    """Every case of ``ids`` x ``kinds``: from ``cache`` where it holds them under the same
    key, else scored and added to it after each source image (``progress``: ``ids``
    wrapped in a progress bar). Returns the rows and how many came from the cache."""
    rows = _read_cache(cache, key)
    done = {(r["id"], r["kind"]) for r in rows}
    cached = sum((i, k) in done for i in ids for k in kinds)
    for image_id in ids if progress is None else progress:
        wanted = [k for k in kinds if (image_id, k) not in done]
        if not wanted:
            continue
        image = cv2.imread(str(images / f"{image_id}.png"), cv2.IMREAD_GRAYSCALE)
        truth = load_landmarks(landmarks, image_id)
        for kind, picture, points in case_images(image, truth, image_id, tuple(wanted), key.seed):
            started = time.process_time()
            row = score_case(model, bank, picture, points, key.samples, key.seed)
            rows.append({"id": image_id, "kind": kind, **row, "cpu_s": time.process_time() - started})
        _write_cache(cache, key, rows)
    order = {k: n for n, k in enumerate(KINDS)}
    selected = [r for r in rows if r["id"] in set(ids) and r["kind"] in kinds]
    return sorted(selected, key=lambda r: (ids.index(r["id"]), order[r["kind"]])), cached


def _read_cache(path: Path, key: CacheKey) -> list[dict]:
    if not path.is_file():
        return []
    stored = json.loads(path.read_text())
    return list(stored["rows"]) if stored.get("key") == asdict(key) else []


def _write_cache(path: Path, key: CacheKey, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"key": asdict(key), "rows": rows}))
    partial.replace(path)  # a run stopped mid-write leaves the previous cache whole


# ---------------------------------------------------------------------------
# Statistics


def spearman(score: np.ndarray, error: np.ndarray) -> float:
    """Spearman rank correlation of a predictor (larger = worse) with the true error."""
    return float(spearmanr(score, error).statistic)


def auc(score: np.ndarray, bad: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` (larger = worse) for flagging the ``bad``
    cases: the share of (bad, good) pairs in which the bad case scores higher, ties
    counting half (the Mann-Whitney U over the number of pairs)."""
    bad = np.asarray(bad, bool)
    wins = np.sign(score[bad][:, None] - score[~bad][None, :])  # 1, 0 (tie) or -1 per pair
    return float(wins.mean() / 2 + 0.5)


def logistic_log_odds(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """Log-odds of ``test_x`` [n,d] under an L2-regularised logistic regression fitted on
    (``train_x``, ``train_y``), the features standardised on the training rows."""
    mean, scale = train_x.mean(0), train_x.std(0) + 1e-12
    design = lambda x: np.c_[np.ones(len(x)), (x - mean) / scale]  # noqa: E731
    a, y = design(train_x), np.asarray(train_y, np.float64)

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = a @ w
        penalty = RIDGE * np.r_[0.0, w[1:]]
        return float(np.logaddexp(0, z).sum() - y @ z + penalty @ w / 2), a.T @ (expit(z) - y) + penalty

    weights = minimize(loss, np.zeros(a.shape[1]), jac=True, method="L-BFGS-B").x
    return design(test_x) @ weights


def out_of_fold(features: np.ndarray, bad: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each case's log-odds from a logistic regression fitted without its group (its
    source image and every copy of it)."""
    scores = np.empty(len(bad))
    for group in np.unique(groups):
        held = groups == group
        scores[held] = logistic_log_odds(features[~held], bad[~held], features[held])
    return scores


def bootstrap_difference(
    a: np.ndarray, b: np.ndarray, bad: np.ndarray, groups: np.ndarray, reps: int = BOOTSTRAP, seed: int = 0
) -> tuple[float, float]:
    """95 % interval of AUC(a) - AUC(b), resampling whole groups (source images) with
    replacement; resamples with only good or only bad cases are skipped."""
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    differences = []
    for _ in range(reps):
        rows = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        if bad[rows].all() or not bad[rows].any():
            continue
        differences.append(auc(a[rows], bad[rows]) - auc(b[rows], bad[rows]))
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(low), float(high)


# ---------------------------------------------------------------------------
# Report


def predictor(rows: list[dict], name: str, organ: str | None = None) -> np.ndarray:
    """A predictor's values, larger = worse: 1 - Dice RCA, or the landmark spread."""
    values = np.array([r[name if organ is None else f"{name}_{organ}"] for r in rows], np.float64)
    return values if name == "uncertainty" else 1 - values


def error(rows: list[dict], organ: str | None = None) -> np.ndarray:
    return 1 - np.array([r["true" if organ is None else f"true_{organ}"] for r in rows], np.float64)


def flagging(rows: list[dict], threshold: float, seed: int = 0) -> dict:
    """Bad masks (true Dice below ``threshold``) and each predictor's AUC for flagging
    them; uncertainty's AUC against each RCA estimate's; and whether log uncertainty
    added to an RCA estimate raises its AUC. The combination is fitted leaving one
    source image out; it is held against the RCA estimate as it is, not re-fitted the
    same way: a one-feature fit ranks as the feature does, but pooling its out-of-fold
    scores mixes each fold's own intercept into the ranking, a cost the combination
    pays too and RCA itself does not (so the test leans against uncertainty)."""
    bad = np.array([r["true"] for r in rows]) < threshold
    groups = np.array([r["id"] for r in rows])
    out: dict = {"bad": int(bad.sum()), "good": int((~bad).sum())}
    if bad.all() or not bad.any():
        return out
    out["auc"] = {name: auc(predictor(rows, name), bad) for name in PREDICTORS}
    uncertainty = predictor(rows, "uncertainty")
    out["uncertainty_against"], out["combined"] = {}, {}
    for name in ("rca_max", "rca_mean"):
        estimate = predictor(rows, name)
        low, high = bootstrap_difference(uncertainty, estimate, bad, groups, seed=seed)
        out["uncertainty_against"][name] = {
            "difference": auc(uncertainty, bad) - auc(estimate, bad),
            "ci95": [low, high],
        }
        refitted = out_of_fold(estimate[:, None], bad, groups)
        both = out_of_fold(np.c_[estimate, np.log(uncertainty)], bad, groups)
        low, high = bootstrap_difference(both, estimate, bad, groups, seed=seed)
        out["combined"][name] = {
            "auc_rca": auc(estimate, bad),
            "auc_rca_refitted": auc(refitted, bad),
            "auc_with_uncertainty": auc(both, bad),
            "difference": auc(both, bad) - auc(estimate, bad),
            "ci95": [low, high],
        }
    return out


def report(rows: list[dict], thresholds: tuple[float, ...] = THRESHOLDS) -> dict:
    """Spearman with true error (overall, per organ) and flagging, for one set of cases."""
    correlations = {
        organ or "overall": {name: spearman(predictor(rows, name, organ), error(rows, organ)) for name in PREDICTORS}
        for organ in (None, *ORGANS)
    }
    return {
        "cases": len(rows),
        "images": len({r["id"] for r in rows}),
        "spearman": correlations,
        "flagging": {str(t): flagging(rows, t) for t in thresholds},
    }


def summarise(rows: list[dict], thresholds: tuple[float, ...] = THRESHOLDS) -> dict:
    """The report of all cases and of the clean and OOD ones, and the means per kind."""
    clean_and_ood = [r for r in rows if r["kind"] not in IMAGE_DEGRADATIONS]
    sets = {"all": rows} | ({"clean_and_ood": clean_and_ood} if len(clean_and_ood) < len(rows) else {})
    by_kind = {
        kind: {
            "n": len(sel),
            "true": float(np.mean([r["true"] for r in sel])),
            "rca_max": float(np.mean([r["rca_max"] for r in sel])),
            "uncertainty": float(np.mean([r["uncertainty"] for r in sel])),
        }
        for kind in KINDS
        if (sel := [r for r in rows if r["kind"] == kind])
    }
    return {name: report(sel, thresholds) for name, sel in sets.items()} | {"by_kind": by_kind}


def scatter(rows: list[dict], threshold: float, path: Path) -> None:
    """True Dice against Dice RCA (Max), coloured by the landmark spread (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    shown = ax.scatter(
        [r["rca_max"] for r in rows],
        [r["true"] for r in rows],
        c=[r["uncertainty"] for r in rows],
        norm=LogNorm(),
        cmap="viridis",
        s=16,
        alpha=0.85,
    )
    ax.axhline(threshold, color="k", ls=":", lw=0.8)
    ax.plot([0, 1], [0, 1], "k--", lw=0.6)
    lows = [min(r["rca_max"], r["true"]) for r in rows]
    ax.set(
        xlim=(min(lows) - 0.02, 1),
        ylim=(min(lows) - 0.02, 1),
        xlabel="Dice RCA (Max)",
        ylabel="true Dice ((lungs + heart) / 2)",
        title=f"{len(rows)} masks of {len({r['id'] for r in rows})} held-out images",
    )
    bar = fig.colorbar(shown, ax=ax, label="mean landmark std (px, 1024 frame), log scale")
    for axis in (bar.ax.yaxis.set_major_formatter, bar.ax.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%g"))  # 1.5, 2, 3 rather than 2 x 10^0
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe(name: str, part: dict) -> str:
    """A set's report as text: the Spearman table and, per threshold, the flagging."""
    lines = [f"{name} ({part['cases']} masks of {part['images']} images), Spearman with true error (1 - Dice):"]
    lines.append(f"  {'':<8}" + "".join(f"{p:>13}" for p in PREDICTORS))
    for organ, row in part["spearman"].items():
        lines.append(f"  {organ:<8}" + "".join(f"{row[p]:>13.3f}" for p in PREDICTORS))
    for threshold, flag in part["flagging"].items():
        line = f"  true Dice < {threshold}: {flag['bad']} bad of {flag['bad'] + flag['good']}"
        if "auc" not in flag:
            lines.append(line + ", no AUC")
            continue
        lines.append(line + "; AUC " + ", ".join(f"{p} {v:.3f}" for p, v in flag["auc"].items()))
        for rca_name, c in flag["combined"].items():
            against = flag["uncertainty_against"][rca_name]
            lines.append(
                f"    uncertainty - {rca_name}: AUC {against['difference']:+.3f} "
                f"(95% CI {against['ci95'][0]:+.3f} to {against['ci95'][1]:+.3f})"
            )
            lines.append(
                f"    {rca_name} + log uncertainty, leave one image out: AUC {c['auc_with_uncertainty']:.3f}, "
                f"{c['difference']:+.3f} on {rca_name} (95% CI {c['ci95'][0]:+.3f} to {c['ci95'][1]:+.3f}); "
                f"{rca_name} re-fitted so: {c['auc_rca_refitted']:.3f}"
            )
    return "\n".join(lines)

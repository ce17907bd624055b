"""How many labelled images a site needs: train on growing subsets, fit an inverse power law.

The subsets are nested (each contains the smaller ones), stratified (each keeps the class
mix, or the age quintiles) and patient-disjoint (a patient's images are all in or all out),
drawn from the training split afresh for every seed. Each model is evaluated on the test
split. The fit, metric(n) = a - b n^-c (AUC) or a + b n^-c (MAE), gets percentile-bootstrap
intervals that resample both the test cases and the seeds at each size.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy.optimize import OptimizeWarning, curve_fit

from configs import LearningCurveConfig, TaskKind, TaskSpec
from tasks.evaluate import no_skill_value, primary_metric, primary_value, save_figure

AGE_STRATA = 5  # regression subsets keep the training split's age quintiles
EXPONENT_BOUNDS = (0.05, 2.0)  # learning-curve exponents outside this range are not plausible
EXTRAPOLATION_LIMIT = 4  # beyond this many times the largest measured size, the curve is not trusted


def patient_order(patients: np.ndarray, targets: np.ndarray, task: TaskKind, seed: int) -> np.ndarray:
    """Patient keys in a seeded order whose every prefix keeps the strata's share of the images.

    A patient's stratum is its most common class, or the age quintile (of the images) its
    mean age falls in. Within a stratum patients are shuffled, and each is placed at the
    share of its stratum's images that come before it (plus a random part of its own), so
    every prefix of the order holds each stratum's images in about their overall proportion.
    """
    frame = pd.DataFrame({"patient": patients, "target": targets})
    per_patient = frame.groupby("patient", sort=True)["target"]
    if task is TaskKind.CLASSIFICATION:
        strata = per_patient.agg(lambda t: t.mode().iloc[0])
    else:
        edges = np.quantile(targets, np.linspace(0, 1, AGE_STRATA + 1)[1:-1])
        strata = pd.Series(np.searchsorted(edges, per_patient.mean().to_numpy()), index=per_patient.mean().index)
    counts = per_patient.size()
    rng = np.random.default_rng(seed)
    keys = pd.Series(0.0, index=strata.index)
    for _, members in strata.groupby(strata):
        shuffled = rng.permutation(members.index.to_numpy())
        images = counts[shuffled].to_numpy(float)
        before = np.cumsum(images) - images
        keys[shuffled] = (before + rng.random(len(shuffled)) * images) / images.sum()
    return keys.sort_values(kind="stable").index.to_numpy()


def nested_subsets(patients: np.ndarray, targets: np.ndarray, task: TaskKind, sizes: list[int],
                   seed: int) -> dict[int, np.ndarray]:
    """Image rows of each subset, smallest first, each holding the one before.

    Patients are taken in `patient_order`; one whose images would overshoot the size is
    passed over for the next patients, and taken by a later (larger) subset, so sizes are
    met exactly where the patients allow. (A real archive has patients with dozens of
    images: NIH's training split has one with 61.)
    """
    order = patient_order(patients, targets, task, seed)
    counts = pd.Series(patients).value_counts()
    waiting, chosen, taken, subsets = list(order), [], 0, {}
    for size in sorted(sizes):
        passed_over = []
        for patient in waiting:
            if taken + counts[patient] <= size:
                chosen.append(patient)
                taken += counts[patient]
            else:
                passed_over.append(patient)
        if taken < size and passed_over:  # nobody fits exactly: the next patient, overshooting
            chosen.append(passed_over.pop(0))
            taken += counts[chosen[-1]]
        waiting = passed_over
        rows = np.flatnonzero(np.isin(patients, chosen))
        if task is TaskKind.CLASSIFICATION and len(np.unique(targets[rows])) < len(np.unique(targets)):
            raise ValueError(f"a subset of {size} images misses a class: too small for this data")
        subsets[size] = rows
    return subsets


def curve_sizes(config: LearningCurveConfig, n_train: int) -> list[int]:
    """The configured sizes below the training split's size, then all of it."""
    return sorted({size for size in config.sizes if size < n_train} | {n_train})


@dataclass
class CurvePoint:
    """One model of the curve: its training subset, and its test outputs and metrics."""

    size: int  # images asked for
    seed: int
    images: int  # images in the subset
    patients: int
    strategy: str
    epochs: int
    seconds: float
    metrics: dict[str, float]
    outputs: np.ndarray = field(repr=False)  # test outputs, for the bootstrap


def power_law(n: np.ndarray, a: float, b: float, c: float, sign: float) -> np.ndarray:
    return a - sign * b * np.power(n, -c)


@dataclass(frozen=True)
class CurveFit:
    a: float  # the asymptote: the metric with unlimited labels of this kind
    b: float
    c: float  # the exponent: how fast the curve bends
    sign: float  # +1: higher is better (AUC), -1: lower is better (MAE)

    def predict(self, n: float | np.ndarray) -> float | np.ndarray:
        return power_law(np.asarray(n, float), self.a, self.b, self.c, self.sign)

    def flat_at(self, gain: float) -> float:
        """The size from which doubling it gains less than `gain`: b n^-c (1 - 2^-c) = gain."""
        per_doubling = self.b * (1 - 2 ** -self.c)
        return (per_doubling / gain) ** (1 / self.c) if per_doubling > 0 else 1.0


def fit_power_law(sizes: np.ndarray, values: np.ndarray, higher_is_better: bool) -> CurveFit | None:
    """Least squares over every (size, value) point; None when the fit does not converge."""
    sign = 1.0 if higher_is_better else -1.0
    start_a = values.max() if higher_is_better else values.min()
    spread = abs(values[sizes == sizes.min()].mean() - start_a) + 1e-3
    bounds = ([-np.inf, 0.0, EXPONENT_BOUNDS[0]], [np.inf, np.inf, EXPONENT_BOUNDS[1]])
    if higher_is_better and values.max() <= 1.0:  # AUC and accuracy cannot pass 1
        bounds[1][0] = 1.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            (a, b, c), _ = curve_fit(lambda n, a, b, c: power_law(n, a, b, c, sign), sizes.astype(float), values,
                                     p0=[start_a, spread * sizes.min() ** 0.5, 0.5], bounds=bounds, maxfev=20_000)
    except (RuntimeError, ValueError):
        return None
    return CurveFit(float(a), float(b), float(c), sign)


@dataclass
class LearningCurve:
    """The fitted curve, its bootstrap, and the answer in words."""

    metric: str
    higher_is_better: bool
    table: pd.DataFrame  # one row per point
    fit: CurveFit
    n_now: int
    now: tuple[float, float, float]  # measured mean at all images, and its interval
    doubled: tuple[float, float, float]  # predicted at 2 x n_now, and its interval
    flat: tuple[float, float, float]  # where doubling gains less than flat_gain, and its interval
    marked: tuple[int, float, float, float] | None  # size, measured mean and interval there
    bands: dict[str, np.ndarray]  # grid of sizes, the fit's lower and upper percentiles
    replicates: int  # bootstrap replicates whose fit converged
    flat_gain: float
    no_skill: float | None = None  # the metric without skill (AUC 0.5; the training mean's MAE at all images)

    def answer(self) -> str:
        name, n = {"roc_auc": "AUC", "mae": "MAE"}.get(self.metric, self.metric), self.n_now
        unit = " years" if self.metric == "mae" else ""
        now, doubled, flat = self.now, self.doubled, self.flat
        lines = [f"With {n:,} labelled training images, test {name} is {now[0]:.3f}{unit} "
                 f"[{now[1]:.3f}, {now[2]:.3f}].",
                 f"With 2x the labels ({2 * n:,}), expect {name} {doubled[0]:.3f}{unit} "
                 f"[{doubled[1]:.3f}, {doubled[2]:.3f}] (an extrapolation beyond the largest set measured)."]
        gain = f"a doubling gains less than {self.flat_gain:g}{unit}"
        smallest = int(self.table["images"].min())
        if flat[0] < smallest:  # the fit puts the bend below every size measured: say only that
            lines.append(f"The curve is flat across the sizes measured ({smallest:,} to {n:,} images; {gain}): "
                         "more labels of the same kind buy little.")
        elif flat[0] <= n:
            lines.append(f"The curve has already flattened ({gain}) at about {flat[0]:,.0f} images "
                         f"[{flat[1]:,.0f}, {flat[2]:,.0f}]: more labels of the same kind buy little.")
        elif flat[0] > EXTRAPOLATION_LIMIT * n:
            lines.append(f"The curve is still climbing: it would flatten ({gain}) only beyond "
                         f"{EXTRAPOLATION_LIMIT}x the images measured (fit: about {flat[0]:,.0f} "
                         f"[{flat[1]:,.0f}, {flat[2]:,.0f}]), further than this data can say.")
        else:
            lines.append(f"The curve flattens ({gain}) at about {flat[0]:,.0f} images "
                         f"[{flat[1]:,.0f}, {flat[2]:,.0f}].")
        if self.marked:
            size, mean, low, high = self.marked
            lines.append(f"At {size} images: {name} {mean:.3f}{unit} [{low:.3f}, {high:.3f}].")
        if self.no_skill is not None:
            without = "answering every image with the training mean age" if unit else "a constant answer"
            lines.append(f"Without skill ({without}): {name} {self.no_skill:.3f}{unit}.")
        return " ".join(lines)


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def learning_curve(points: list[CurvePoint], spec: TaskSpec, test_targets: np.ndarray,
                   settings: LearningCurveConfig, seed: int, confidence: float = 0.95) -> LearningCurve:
    """Fit the curve to every point; bootstrap over test cases and, within each size, over seeds."""
    metric, higher_is_better = primary_metric(spec.kind)
    table = pd.DataFrame([{"size": p.size, "seed": p.seed, "images": p.images, "patients": p.patients,
                           "strategy": p.strategy, "epochs": p.epochs, "seconds": p.seconds, **p.metrics}
                          for p in points])
    images = table["images"].to_numpy(float)
    fit = fit_power_law(images, table[metric].to_numpy(float), higher_is_better)
    if fit is None:
        raise RuntimeError("the learning curve could not be fitted to the measured points")
    by_size = {size: [i for i, p in enumerate(points) if p.size == size] for size in sorted(table["size"].unique())}
    n_now = int(table.loc[table["size"] == max(by_size), "images"].max())
    grid = np.unique(np.geomspace(images.min(), 2 * n_now, 60))
    rng = np.random.default_rng(seed)
    samples = {"now": [], "doubled": [], "flat": [], "marked": [], "band": []}
    mark = settings.mark if settings.mark in by_size else None
    while len(samples["band"]) < settings.bootstrap_samples:
        cases = rng.integers(0, len(test_targets), len(test_targets))
        if spec.classification and len(np.unique(test_targets[cases])) < spec.num_outputs:
            continue
        drawn = [(size, i) for size, rows in by_size.items() for i in rng.choice(rows, len(rows))]
        values = np.array([primary_value(spec.kind, test_targets[cases], points[i].outputs[cases], spec.positive_index)
                           for _, i in drawn])
        sizes = np.array([points[i].images for _, i in drawn], float)
        replicate = fit_power_law(sizes, values, higher_is_better)
        if replicate is None:
            samples["band"].append(np.full(len(grid), np.nan))
            continue
        at = pd.Series(values).groupby([size for size, _ in drawn]).mean()
        samples["now"].append(at[max(by_size)])
        samples["marked"].append(at[mark] if mark else np.nan)
        samples["doubled"].append(replicate.predict(2 * n_now))
        samples["flat"].append(replicate.flat_at(settings.flat_gain))
        samples["band"].append(replicate.predict(grid))
    band = np.array(samples["band"])
    measured = table.groupby("size")[metric].mean()

    def summary(point: float, key: str) -> tuple[float, float, float]:
        return (point, *_percentiles(np.array(samples[key], float), confidence))

    marked = None
    if mark:
        marked = (mark, *summary(float(measured[mark]), "marked"))
    return LearningCurve(
        metric=metric, higher_is_better=higher_is_better, table=table, fit=fit, n_now=n_now,
        now=summary(float(measured[max(by_size)]), "now"), doubled=summary(float(fit.predict(2 * n_now)), "doubled"),
        flat=summary(fit.flat_at(settings.flat_gain), "flat"), marked=marked,
        bands={"sizes": grid, **dict(zip(("low", "high"), np.nanpercentile(band, [50 * (1 - confidence),
                                                                               50 * (1 + confidence)], axis=0)))},
        replicates=int(np.isfinite(band[:, 0]).sum()), flat_gain=settings.flat_gain,
        no_skill=no_skill_value(metric, table.loc[table["size"] == max(by_size)].mean(numeric_only=True).to_dict()))


def plot_curve(curve: LearningCurve, path: Path, title: str) -> Path:
    """Every point, the seed means, the fit with its bootstrap band (dashed past the data), the marked size."""
    table, metric = curve.table, curve.metric
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(table["images"], table[metric], s=14, alpha=0.5, color="grey", label="one seed")
    means = table.groupby("size").agg(images=("images", "mean"), value=(metric, "mean"))
    ax.plot(means["images"], means["value"], "o", color="black", label="mean over seeds")
    sizes = curve.bands["sizes"]
    inside = sizes <= curve.n_now
    ax.fill_between(sizes, curve.bands["low"], curve.bands["high"], alpha=0.2, label="bootstrap band")
    ax.plot(sizes[inside], curve.fit.predict(sizes[inside]), color="C0", label="inverse power law")
    ax.plot(sizes[~inside], curve.fit.predict(sizes[~inside]), "--", color="C0", label="extrapolated")
    if curve.marked:
        size = curve.marked[0]
        ax.axvline(size, color="C3", linestyle=":", label=f"{size} images")
    if curve.no_skill is not None:
        ax.axhline(curve.no_skill, color="grey", linestyle=":", label="without skill")
    if curve.flat[0] <= sizes.max():
        ax.axvline(curve.flat[0], color="C2", linestyle="-.", label=f"flat (< {curve.flat_gain:g} per doubling)")
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def curve_markdown(curve: LearningCurve, title: str, plot: str) -> str:
    metric = curve.metric
    fit = curve.fit
    lines = [f"# {title}", "", curve.answer(), "",
             f"Fit: {metric}(n) = {fit.a:.3f} {'-' if fit.sign > 0 else '+'} {fit.b:.3g} n^-{fit.c:.3f} "
             f"({curve.replicates} bootstrap replicates over test cases and seeds).", "",
             "| images asked | images | patients | seeds | strategy | test " + metric + " mean | min | max |",
             "|---|---|---|---|---|---|---|---|"]
    for size, rows in curve.table.groupby("size"):
        lines.append(f"| {size} | {rows['images'].mean():.0f} | {rows['patients'].mean():.0f} | {len(rows)} | "
                     f"{'/'.join(sorted(set(rows['strategy'])))} | {rows[metric].mean():.4f} | "
                     f"{rows[metric].min():.4f} | {rows[metric].max():.4f} |")
    lines += ["", plot]
    return "\n".join(lines)


def extrapolation_note(curve: LearningCurve) -> str:
    """The one caveat every reader needs, in a sentence (see the README for the rest)."""
    measured = math.log2(curve.n_now / curve.table["images"].min())
    return (f"Measured over {measured:.1f} doublings ({curve.table['images'].min():.0f} to {curve.n_now:,} images); "
            f"predictions past {curve.n_now:,} are extrapolations of the fitted shape.")

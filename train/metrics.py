"""Controllability: re-annotate a generated image and compare with the condition it was
given (as ControlNet++ does), plus the sudden-convergence detector (the stop signal).

Each metric takes the input condition map and the re-annotated map (uint8 arrays of
one size) and returns one number; `higher_is_better` says which way is good.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


def edge_f1(reference: np.ndarray, predicted: np.ndarray, threshold: int = 127, tolerance: int = 0) -> float:
    """F1 of edge pixels (both maps binarised at `threshold`); two blank maps score 1.

    `tolerance`: an edge pixel counts as matched when the other map has an edge within
    that many pixels (Euclidean), as edge benchmarks (BSDS) do; 0 = the same pixel."""
    ref, pred = reference > threshold, predicted > threshold
    if not ref.any() and not pred.any():
        return 1.0
    if not ref.any() or not pred.any():
        return 0.0
    if tolerance:
        precision = float((_distance_to(ref)[pred] <= tolerance).mean())
        recall = float((_distance_to(pred)[ref] <= tolerance).mean())
    else:
        tp = float(np.logical_and(ref, pred).sum())
        precision, recall = tp / pred.sum(), tp / ref.sum()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _distance_to(edges: np.ndarray) -> np.ndarray:
    """Per pixel, the Euclidean distance to the nearest edge pixel."""
    import cv2

    return cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, 5)


def edge_f1_2px(reference: np.ndarray, predicted: np.ndarray) -> float:
    """Edge F1 with a 2-pixel tolerance: a generated edge one pixel off still counts."""
    return edge_f1(reference, predicted, tolerance=2)


def ssim(reference: np.ndarray, predicted: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    a, b = reference.astype(np.float64), predicted.astype(np.float64)
    return float(structural_similarity(a, b, data_range=255.0, channel_axis=-1 if a.ndim == 3 else None))


def rmse(reference: np.ndarray, predicted: np.ndarray) -> float:
    """On maps scaled to [0, 1] (depth is per-image normalised)."""
    scale = 65535.0 if reference.dtype == np.uint16 else 255.0
    return float(np.sqrt(np.mean((reference.astype(np.float64) / scale - predicted.astype(np.float64) / scale) ** 2)))


def palette_ids(seg: np.ndarray) -> np.ndarray:
    """ADE20K colours back to class ids (-1 for colours not in the palette)."""
    from stages.annotators.seg import ade20k_palette

    palette = ade20k_palette().astype(np.int64)
    codes = (seg[..., 0].astype(np.int64) << 16) | (seg[..., 1].astype(np.int64) << 8) | seg[..., 2]
    lookup = {int(c): i for i, c in enumerate((palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2])}
    out = np.full(codes.shape, -1, np.int64)
    for code in np.unique(codes):
        out[codes == code] = lookup.get(int(code), -1)
    return out


def miou(reference: np.ndarray, predicted: np.ndarray) -> float:
    """Mean IoU over the ADE20K classes present in either map."""
    ref, pred = palette_ids(reference), palette_ids(predicted)
    classes = [c for c in np.union1d(np.unique(ref), np.unique(pred)) if c >= 0]
    if not classes:
        return 1.0
    ious = [np.logical_and(ref == c, pred == c).sum() / np.logical_or(ref == c, pred == c).sum() for c in classes]
    return float(np.mean(ious))


def normal_angle_error(reference: np.ndarray, predicted: np.ndarray) -> float:
    """Mean angle in degrees between the normals two RGB normal maps encode."""
    def vectors(rgb):
        v = rgb.astype(np.float64) / 127.5 - 1.0
        return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-8)

    cos = np.clip((vectors(reference) * vectors(predicted)).sum(-1), -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)).mean())


def keypoint_distance(reference: list, predicted: list) -> float | None:
    """Mean distance (in image fractions) between body keypoints, each reference person
    matched to the closest detected one over the joints both have; None when nobody
    was detected in the generated image (the metric applies where persons are found)."""
    def person_distance(a, b):
        pairs = [(p, q) for p, q in zip(a, b) if p is not None and q is not None]
        return float(np.mean([np.hypot(p[0] - q[0], p[1] - q[1]) for p, q in pairs])) if pairs else None

    if not predicted or not reference:
        return None
    scores = []
    for person in reference:
        found = [d for d in (person_distance(person, other) for other in predicted) if d is not None]
        if found:
            scores.append(min(found))
    return float(np.mean(scores)) if scores else None


def clip_score(images, prompts: list[str], model: str) -> float:
    """100 x cosine similarity of CLIP image and text embeddings (>= 0), averaged; `model`
    is a local folder or hub id of a transformers CLIPModel."""
    from stages.models.clip_score import ClipScorer

    return float(np.mean(ClipScorer(model, "cpu")(list(images), prompts)))


def colour_error(condition: np.ndarray, again: np.ndarray) -> float:
    """Mean absolute difference of two colour grids (the condition and the generated image's
    grid), as a fraction of the 8-bit range: 0 is the same colours everywhere."""
    return float(np.abs(condition.astype(np.float64) - again.astype(np.float64)).mean() / 255.0)


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[np.ndarray, np.ndarray], float]
    higher_is_better: bool = True


#: the metric each condition is judged by
METRICS: dict[str, Metric] = {
    "canny": Metric("f1_2px", edge_f1_2px),
    "mlsd": Metric("f1_2px", edge_f1_2px),
    "hed": Metric("ssim", ssim),
    "lineart": Metric("ssim", ssim),
    "lineart_anime": Metric("ssim", ssim),
    "scribble": Metric("ssim", ssim),
    "depth": Metric("rmse", rmse, higher_is_better=False),
    "seg": Metric("miou", miou),
    "normal": Metric("angular_error", normal_angle_error, higher_is_better=False),
    "color_grid": Metric("colour_error", colour_error, higher_is_better=False),
}


def controllability(condition: str, annotator, conditions: Sequence[np.ndarray], images: Sequence[np.ndarray],
                    seed: int = 0) -> float:
    """Mean metric over images: each generated image is re-annotated and compared with its condition.
    Random-threshold annotators (canny) are called with the same seed for every image."""
    if condition not in METRICS:
        raise ValueError(f"no controllability metric for {condition!r}; have {sorted(METRICS)}")
    metric = METRICS[condition]
    scores = []
    for cond, image in zip(conditions, images):
        again, _ = annotator(np.asarray(image), np.random.default_rng(seed))
        cond = np.asarray(cond)
        if cond.ndim == 3 and again.ndim == 2:
            cond = cond[..., 0]
        scores.append(metric.fn(cond, again))
    return float(np.mean(scores))


def controllability_scores(condition: str, annotator, conditions: Sequence[np.ndarray], images: Sequence[np.ndarray],
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the metric against its own condition and against another image's
    condition (the conditions rolled by one: a derangement, so no image keeps its own).
    Oriented so that higher is better (a lower-is-better metric is negated)."""
    if condition not in METRICS:
        raise ValueError(f"no controllability metric for {condition!r}; have {sorted(METRICS)}")
    metric = METRICS[condition]
    sign = 1.0 if metric.higher_is_better else -1.0
    conds, again = [], []
    for cond, image in zip(conditions, images):
        annotated, _ = annotator(np.asarray(image), np.random.default_rng(seed))
        cond = np.asarray(cond)
        if cond.ndim == 3 and annotated.ndim == 2:
            cond = cond[..., 0]
        conds.append(cond)
        again.append(annotated)
    own = [metric.fn(c, a) for c, a in zip(conds, again)]
    other = [metric.fn(conds[(i + 1) % len(conds)], a) for i, a in enumerate(again)] if len(conds) > 1 else own
    return sign * np.asarray(own, np.float64), sign * np.asarray(other, np.float64)


#: the stop signal's defaults: own-condition scores must beat shuffled ones by MARGIN
#: (edge F1 0.05), one-sided, at significance ALPHA, at two validations in a row
STOP_MARGIN, STOP_ALPHA = 0.05, 0.01


def _sign_test(differences: np.ndarray) -> float:
    """One-sided exact sign test, H1: the median difference is > 0 (zeros dropped)."""
    from math import comb

    d = differences[differences != 0]
    n, k = len(d), int((d > 0).sum())
    if n == 0:
        return 1.0
    return float(sum(comb(n, i) for i in range(k, n + 1)) / 2 ** n)


def paired_p_value(own: Sequence[float], shuffled: Sequence[float], margin: float = STOP_MARGIN) -> float:
    """One-sided p-value that own - shuffled exceeds `margin`, paired over the images:
    Wilcoxon's signed-rank test (scipy), or where scipy is missing the exact sign test."""
    d = np.asarray(own, np.float64) - np.asarray(shuffled, np.float64) - margin
    if len(d) < 2 or not np.any(d != 0):
        return 1.0
    try:
        from scipy.stats import wilcoxon
    except ImportError:  # pragma: no cover - scipy is optional
        return _sign_test(d)
    return float(wilcoxon(d, alternative="greater", zero_method="wilcox").pvalue)


def significant_convergence(steps: Sequence[int], own: Sequence[Sequence[float]], shuffled: Sequence[Sequence[float]],
                            margin: float = STOP_MARGIN, alpha: float = STOP_ALPHA) -> int | None:
    """The stop signal: the first validation step at which the validation images follow
    their own conditions better than shuffled ones by more than `margin`, significantly
    (paired one-sided test over the images, p < alpha), and still do at the next
    validation; None until that next validation confirms it.

    Each validation is judged on its own images, not against the previous validation, so
    how often validation runs does not change what the rule asks for: spacing only sets
    how soon after the rise a validation looks (and confirms)."""
    significant = [paired_p_value(o, s, margin) < alpha for o, s in zip(own, shuffled)]
    for i in range(len(significant) - 1):
        if significant[i] and significant[i + 1]:
            return int(steps[i])
    return None


def validation_spacing(steps: Sequence[int]) -> int:
    """The validation spacing of a recorded run: the gcd of its steps."""
    return math.gcd(*steps) if steps else 1


def sudden_convergence(steps: Sequence[int], values: Sequence[float], higher_is_better: bool = True,
                       min_rise: float | None = None) -> int | None:
    """The step where the metric jumps, or None. The earlier rule, for a curve of means
    only (no per-image scores); the trainer uses significant_convergence.

    Rule: the largest rise between consecutive evaluations, counted only if (a) it is at
    least `min_rise` (default: 3x the median absolute change), (b) it is confirmed: the next
    evaluation exists and keeps at least half of the rise, and (c) it is a step, not a spike:
    the mean after it exceeds the mean before it by at least half the rise. The returned
    step is the evaluation after the jump."""
    v = np.asarray(values, np.float64) * (1 if higher_is_better else -1)
    if len(v) < 3:
        return None
    rises = np.diff(v)
    i = int(np.argmax(rises))
    rise = rises[i]
    floor = min_rise if min_rise is not None else max(3 * float(np.median(np.abs(rises))), 1e-9)
    if rise <= 0 or rise < floor:
        return None
    if i + 2 >= len(v) or v[i + 2] < v[i] + rise / 2:
        return None  # not confirmed (yet)
    if v[i + 1:].mean() - v[:i + 1].mean() < rise / 2:
        return None
    return int(steps[i + 1])


class ConvergenceTracker:
    """The metric over training; the sudden-convergence step once the rule finds one
    (it is kept once found); whether a run asked to stop K steps after it should stop.

    Given per-image scores (`own`, `shuffled`: add_scores, as the trainer does), the rule
    is significant_convergence. A one-sided paired test over n images cannot reach
    p < alpha when 2**-n >= alpha (fewer than 7 images at alpha 0.01; the trainer's
    default is 4): then, as when only the mean per validation is given (add), the older
    sudden_convergence on the curve decides, and to_json says so."""

    def __init__(self, higher_is_better: bool = True, margin: float = STOP_MARGIN, alpha: float = STOP_ALPHA):
        self.higher_is_better = higher_is_better
        self.margin, self.alpha = margin, alpha
        self.steps: list[int] = []
        self.values: list[float] = []
        self.shuffled_values: list[float] = []
        self.p_values: list[float] = []
        self._own: list[np.ndarray] = []
        self._shuffled: list[np.ndarray] = []
        self.converged_at: int | None = None

    def add(self, step: int, value: float) -> int | None:
        self.steps.append(step)
        self.values.append(value)
        if self.converged_at is None and not self._own:
            self.converged_at = sudden_convergence(self.steps, self.values, self.higher_is_better)
        return self.converged_at

    def add_scores(self, step: int, own: Sequence[float], shuffled: Sequence[float]) -> int | None:
        """One validation's per-image scores (higher is better, as controllability_scores
        gives them); the curve keeps the mean in the metric's own direction."""
        own, shuffled = np.asarray(own, np.float64), np.asarray(shuffled, np.float64)
        sign = 1.0 if self.higher_is_better else -1.0
        self.steps.append(step)
        self.values.append(float(sign * own.mean()))
        self.shuffled_values.append(float(sign * shuffled.mean()))
        self._own.append(own)
        self._shuffled.append(shuffled)
        self.p_values.append(paired_p_value(own, shuffled, self.margin))
        if self.converged_at is not None:
            return self.converged_at
        if not self.significance_possible(len(own)):
            self.converged_at = sudden_convergence(self.steps, self.values, self.higher_is_better)
        elif len(self._own) >= 2 and self.p_values[-1] < self.alpha and self.p_values[-2] < self.alpha:
            self.converged_at = significant_convergence(self.steps, self._own, self._shuffled, self.margin, self.alpha)
        return self.converged_at

    def last_is_best(self) -> bool:
        """Whether the latest validation scored better than every earlier one (the first
        always does): when the trainer saves its `best` checkpoint."""
        if not self.values:
            return False
        earlier, last = self.values[:-1], self.values[-1]
        return not earlier or (last > max(earlier) if self.higher_is_better else last < min(earlier))

    def significance_possible(self, n: int) -> bool:
        """Whether n paired images can reach p < alpha at all (the smallest one-sided p of
        the sign and signed-rank tests is 2**-n)."""
        return 2.0 ** -n < self.alpha

    def should_stop(self, step: int, after: int | None) -> bool:
        return after is not None and self.converged_at is not None and step >= self.converged_at + after

    def to_json(self) -> dict:
        out = {"steps": self.steps, "values": self.values, "higher_is_better": self.higher_is_better,
               "sudden_convergence_step": self.converged_at}
        if self._own and self.significance_possible(min(len(o) for o in self._own)):
            out.update({"shuffled_values": self.shuffled_values, "p_values": self.p_values,
                        "rule": f"own - shuffled > {self.margin} per image, one-sided paired test p < {self.alpha}, "
                                "at two validations in a row (fires at the first)"})
        elif self._own:
            out.update({"shuffled_values": self.shuffled_values, "p_values": self.p_values,
                        "rule": f"too few validation images for p < {self.alpha}: the curve's sudden rise"})
        if self._own:  # what `replay` feeds again
            out.update({"own_scores": [o.tolist() for o in self._own],
                        "shuffled_scores": [s.tolist() for s in self._shuffled]})
        return out

    @classmethod
    def replay(cls, record: dict, spacing: int) -> "ConvergenceTracker":
        """The tracker of a run that validated every `spacing` steps, from the per-image
        scores a finer run recorded (`to_json`): its validations at multiples of `spacing`,
        fed again. Exact, since validation draws from its own generator and leaves the
        training unchanged; so one run at a fine spacing answers for every multiple of it."""
        steps = record["steps"]
        if "own_scores" not in record:
            raise ValueError("the record holds no per-image scores (a run from before they were kept)")
        if spacing % validation_spacing(steps):
            raise ValueError(f"the run validated every {validation_spacing(steps)} steps: replay at a multiple of that")
        return cls(record["higher_is_better"]).restore(record, lambda step: step % spacing == 0)

    def restore(self, record: dict, keep: Callable[[int], bool] = lambda step: True) -> "ConvergenceTracker":
        """Feed again the validations of a saved record (`to_json`) whose step `keep`
        accepts: the per-image scores where it holds them, else the curve's means. A resumed
        run goes on from its record this way, keeping the steps up to its checkpoint."""
        if "own_scores" in record:
            for step, own, shuffled in zip(record["steps"], record["own_scores"], record["shuffled_scores"]):
                if keep(step):  # the scores as add_scores took them, higher is better
                    self.add_scores(step, own, shuffled)
        else:
            for step, value in zip(record["steps"], record["values"]):
                if keep(step):
                    self.add(step, value)
        return self

    def plot(self, path, title: str = "controllability") -> None:
        """A small line chart as PNG (PIL only: no plotting dependency)."""
        from PIL import Image, ImageDraw

        width, height, pad = 640, 320, 40
        image = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(image)
        draw.rectangle((pad, pad // 2, width - pad // 2, height - pad), outline="black")
        if self.steps:
            lo, hi = min(self.values), max(self.values)
            span_v = (hi - lo) or 1.0
            span_s = (max(self.steps) - min(self.steps)) or 1
            points = [(pad + (s - min(self.steps)) / span_s * (width - 1.5 * pad),
                       height - pad - (v - lo) / span_v * (height - 1.5 * pad)) for s, v in zip(self.steps, self.values)]
            if len(points) > 1:
                draw.line(points, fill="blue", width=2)
            for x, y in points:
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill="blue")
            if self.converged_at is not None:
                x = pad + (self.converged_at - min(self.steps)) / span_s * (width - 1.5 * pad)
                draw.line((x, pad // 2, x, height - pad), fill="red", width=1)
                draw.text((x + 4, pad // 2 + 4), f"sudden convergence: step {self.converged_at}", fill="red")
            draw.text((4, height - pad - 8), f"{lo:.3g}", fill="black")
            draw.text((4, pad // 2), f"{hi:.3g}", fill="black")
        draw.text((pad, height - pad + 8), f"{title} vs step", fill="black")
        image.save(path)

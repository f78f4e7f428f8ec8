"""report.md, plots and the contact sheet of a bench/reproduce.py run (PIL only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


class Axes:
    """A tiny chart: data coordinates -> pixels on a PIL image."""

    def __init__(self, xs: list[float], ys: list[float], size=(760, 380), pad=(56, 20, 20, 44), title=""):
        self.image = Image.new("RGB", size, "white")
        self.draw = ImageDraw.Draw(self.image)
        self.w, self.h = size
        self.left, self.top, self.right, self.bottom = pad
        self.x0, self.x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        self.y0, self.y1 = 0.0, max(1e-6, max(ys)) * 1.1
        d = self.draw
        d.rectangle((self.left, self.top, self.w - self.right, self.h - self.bottom), outline="black")
        for frac in np.linspace(0, 1, 6):
            y = self.y0 + frac * (self.y1 - self.y0)
            d.text((4, self.py(y) - 6), f"{y:.2f}", fill="black")
            d.line((self.left, self.py(y), self.w - self.right, self.py(y)), fill="#e6e6e6")
        for x in np.linspace(self.x0, self.x1, 7):
            d.text((self.px(x) - 12, self.h - self.bottom + 4), f"{x:.0f}", fill="black")
        d.text((self.left, self.h - 18), title, fill="black")

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.w - self.left - self.right)

    def py(self, y: float) -> float:
        return self.h - self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.h - self.top - self.bottom)

    def line(self, xs, ys, spread=None, colour="black", label="", index=0, dashed=False):
        points = [(self.px(x), self.py(y)) for x, y in zip(xs, ys)]
        if dashed:
            for (ax, ay), (bx, by) in zip(points, points[1:]):
                for t in np.arange(0, 1, 0.1)[::2]:
                    self.draw.line((ax + (bx - ax) * t, ay + (by - ay) * t, ax + (bx - ax) * (t + 0.1),
                                    ay + (by - ay) * (t + 0.1)), fill=colour, width=2)
        elif len(points) > 1:
            self.draw.line(points, fill=colour, width=2)
        for i, (x, y) in enumerate(points):
            self.draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
            if spread is not None and spread[i]:
                lo, hi = self.py(ys[i] - spread[i]), self.py(ys[i] + spread[i])
                self.draw.line((x, lo, x, hi), fill=colour, width=1)
        self.draw.text((self.left + 8, self.top + 6 + 14 * index), f"- {label}", fill=colour)

    def vline(self, x: float, colour: str, label: str):
        self.draw.line((self.px(x), self.top, self.px(x), self.h - self.bottom), fill=colour, width=1)
        self.draw.text((self.px(x) + 4, self.h - self.bottom - 16), label, fill=colour)


def _final_dropout_lines(ab: list[dict]) -> list[str]:
    """The prompt-dropout ablation at the final checkpoint (full mode): without prompts, and
    with them (is prompt following kept?)."""
    if "final_step" not in ab[0]:
        return []
    rows = [("50 % (paper), no prompt", "dropout_50_no_prompt_final"), ("0 %, no prompt", "dropout_0_no_prompt_final"),
            ("50 % (paper), with the caption", "dropout_50_final"), ("0 %, with the caption", "dropout_0_final")]
    return [f"At the final checkpoint (step {ab[0]['final_step']}):", "",
            "| prompt dropout | edge F1 | colours right (vs the held-out caption) |", "| --- | --- | --- |",
            *[f"| {label} | {_fmt(_ms([x[key]['f1'] for x in ab]))} | "
              f"{_fmt(_ms([x[key]['colour_accuracy'] for x in ab]))} |" for label, key in rows], ""]


def curve_plot(path: Path, results: dict) -> None:
    seeds = list(results["seeds"].values())
    steps = [0] + sorted(int(k) for k in seeds[0]["curve"])
    base = results["base"]

    def series(key):
        rows = [[base[key]] + [s["curve"][str(k)][key] if str(k) in s["curve"] else s["curve"][k][key]
                               for k in steps[1:]] for s in seeds]
        return np.mean(rows, 0), np.std(rows, 0)

    own, own_sd = series("f1")
    shuffled, shuffled_sd = series("f1_shuffled")
    trainer = seeds[0]["convergence"]
    ys = [*own + own_sd, *shuffled, *(trainer["values"] or [0])]
    axes = Axes(steps, ys, title="edge F1 (2 px) on held-out conditions vs ControlNet steps (step 0 = the base model)")
    axes.line(steps, own, own_sd, COLOURS[0], f"own condition (mean ± sd, {len(seeds)} seed(s))", 0)
    axes.line(steps, shuffled, shuffled_sd, COLOURS[1], "shuffled conditions (chance)", 1)
    if trainer["steps"]:
        axes.line(trainer["steps"], trainer["values"], None, COLOURS[2],
                  "trainer's own validation (16 held-out conditions)", 2, dashed=True)
    fired = trainer["sudden_convergence_step"]
    if fired is not None:
        axes.vline(fired, COLOURS[3], f"sudden convergence detected: step {fired}")
    axes.image.save(path)


def bar_plot(path: Path, labels: list[str], values: list[float], spreads: list[float], title: str) -> None:
    axes = Axes([0, len(labels)], [v + s for v, s in zip(values, spreads)], size=(760, 360), pad=(56, 20, 20, 90),
                title=title)
    d = axes.draw
    width = (axes.w - axes.left - axes.right) / len(labels)
    for i, (label, value, spread) in enumerate(zip(labels, values, spreads)):
        x0 = axes.left + i * width + width * 0.2
        x1 = x0 + width * 0.6
        d.rectangle((x0, axes.py(value), x1, axes.py(0)), fill=COLOURS[i % len(COLOURS)])
        if spread:
            d.line(((x0 + x1) / 2, axes.py(value - spread), (x0 + x1) / 2, axes.py(value + spread)), fill="black")
        d.text((x0, axes.py(value) - 14), f"{value:.2f}", fill="black")
        for j, part in enumerate(_wrap(label, 16)):
            d.text((x0 - 4, axes.h - axes.bottom + 6 + 12 * j), part, fill="black")
    axes.image.save(path)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)[:4]


def contact_sheet(path: Path, controlnet: Path, base: Path, n: int = 16, cell: int = 128) -> None:
    """Rows of condition | base | ControlNet (same prompt and seed), four triplets a row."""
    n = min(n, len(list(controlnet.glob("[0-9][0-9][0-9][0-9]_condition.png"))))
    per_row, gap = 4, 8
    rows = (n + per_row - 1) // per_row
    head = 18
    sheet = Image.new("RGB", (per_row * (3 * cell + gap), head + rows * (cell + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for c in range(per_row):
        for k, name in enumerate(("condition", "base", "ControlNet")):
            draw.text((c * (3 * cell + gap) + k * cell + 4, 3), name, fill="black")
    for i in range(n):
        x, y = (i % per_row) * (3 * cell + gap), head + (i // per_row) * (cell + gap)
        for k, image in enumerate((controlnet / f"{i:04d}_condition.png", base / f"{i:04d}.png",
                                   controlnet / f"{i:04d}.png")):
            sheet.paste(Image.open(image).convert("RGB").resize((cell, cell), Image.Resampling.NEAREST),
                        (x + k * cell, y))
    sheet.save(path)


def _fmt(entry: dict) -> str:
    return f"{entry['mean']:.3f} ± {entry['spread']:.3f}" if entry["n"] > 1 else f"{entry['mean']:.3f}"


def _ms(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "spread": float(np.std(values)), "n": len(values)}


def write_report(out: Path, results: dict) -> None:
    results = json.loads(json.dumps(results))  # the same keys (strings) whether fresh or read from results.json
    seeds = list(results["seeds"].values())
    summary = results["summary"]
    s = results["settings"]
    curve_plot(out / "curve.png", results)
    contact_sheet(out / "contact_sheet.png", out / "samples" / "controlnet", out / "samples" / "base")
    names = list(seeds[0]["guidance"])
    guidance = {n: _ms([sd["guidance"][n]["f1"] for sd in seeds]) for n in names}
    bar_plot(out / "guidance.png", names, [guidance[n]["mean"] for n in names], [guidance[n]["spread"] for n in names],
             "edge F1 (2 px) per guidance mode, final checkpoint")
    a = seeds[0]["ablation_step"]
    lines = [f"# Does the trainer learn? ({results['mode']} run)", "",
             f"Circles task (bench/circles.py), {s['train_images']} training images, {s['heldout']} held-out "
             f"conditions, 64 px; base model `{Path(results['base_model']).name}`; ControlNet batch {s['batch']}, "
             f"lr {s['learning_rate']}, {s['steps']} steps, {len(seeds)} seed(s). Sampling: DDIM "
             f"{s['sampling']['steps']} steps, CFG {s['sampling']['guidance_scale']}, mode {s['sampling']['mode']}. "
             f"Edge F1: Canny of each generated image (OpenCV, per channel) against its condition, 2-pixel "
             f"tolerance (`controlforge eval --shuffled`). Machine: {json.dumps(results['machine'])}; "
             f"{results['minutes_wall']} minutes of wall time in all"
             + "".join(f"; extended with {', '.join(e['added'])}, {e['minutes_wall_since']} minutes of it since"
                       for e in results.get("extended", [])) + ".", "",
             "![condition | base | ControlNet](contact_sheet.png)", "",
             "## Result on the held-out set", "",
             "| | edge F1 | against shuffled conditions |", "| --- | --- | --- |",
             f"| ControlNet (final) | {_fmt(summary['controlnet_f1'])} | {_fmt(summary['controlnet_f1_shuffled'])} |",
             f"| base model (same prompts, seeds) | {summary['base_f1']:.3f} | {summary['base_f1_shuffled']:.3f} |",
             f"| the VAE's reconstructions of the held-out images (the ceiling) | "
             f"{results['vae_reconstruction']['f1']:.3f} | |", "",
             f"Ratios: ControlNet / base = **{summary['ratio_over_base']:.2f}**, ControlNet / shuffled = "
             f"**{summary['ratio_over_shuffled']:.2f}**. Targets ({results['mode']}): F1 ≥ {summary['targets']['f1']}, "
             f"≥ {summary['targets']['over_base']}× base, ≥ {summary['targets']['over_shuffled']}× shuffled: "
             f"{'met' if all(summary['targets_met'].values()) else 'NOT met: ' + json.dumps(summary['targets_met'])}.", "",
             "## Controllability over training", "", "![curve](curve.png)", "",
             "| step | F1 own | F1 shuffled | colours right |", "| --- | --- | --- | --- |",
             f"| 0 (base) | {results['base']['f1']:.3f} | {results['base']['f1_shuffled']:.3f} | "
             f"{results['base']['colour_accuracy']:.2f} |"]
    for step in sorted(seeds[0]["curve"], key=int):
        rows = [sd["curve"][step] for sd in seeds]
        lines.append(f"| {step} | {_fmt(_ms([r['f1'] for r in rows]))} | {_fmt(_ms([r['f1_shuffled'] for r in rows]))} "
                     f"| {_fmt(_ms([r['colour_accuracy'] for r in rows]))} |")
    fired = [sd["convergence"]["sudden_convergence_step"] for sd in seeds]
    lines += ["", "Sudden convergence (the trainer's detector on its own validation curve, 16 held-out conditions "
              f"every {s['validation_steps']} steps): " + ", ".join(
                  f"seed {k}: {'step ' + str(v) if v is not None else 'did not fire'}" for k, v in zip(results['seeds'], fired)),
              ""]
    if any(v is None for v in fired):
        lines += ["Where it did not fire: its rule asks F1 against the samples' own conditions to exceed F1 against "
                  "shuffled conditions by more than 0.05, significantly over the validation images (one-sided paired "
                  "Wilcoxon, p < 0.01), at two validations in a row (with fewer than 7 validation images, the earlier "
                  "largest-rise rule decides); see controllability.json for each validation's p-value.", ""]
    ab = [sd["ablations"] for sd in seeds]
    lines += [f"## Ablations (step {a})", "",
              "| run | edge F1 | colours right |", "| --- | --- | --- |",
              f"| base model | {results['base']['f1']:.3f} | {results['base']['colour_accuracy']:.2f} |",
              f"| zero convolutions (paper) | {_fmt(_ms([x['zero_init']['f1'] for x in ab]))} | "
              f"{_fmt(_ms([x['zero_init']['colour_accuracy'] for x in ab]))} |",
              f"| random init of the output layers | {_fmt(_ms([x['random_init']['f1'] for x in ab]))} | "
              f"{_fmt(_ms([x['random_init']['colour_accuracy'] for x in ab]))} |", "",
              "Colours right: share of samples whose most common colour is the prompt's background and second most "
              "common its circle colour (prompt-following, whatever the position).", "",
              "| prompt dropout, sampled with no prompt | edge F1 | colours right (vs the held-out caption) |",
              "| --- | --- | --- |",
              f"| base model, no prompt | {results['base_no_prompt']['f1']:.3f} | "
              f"{results['base_no_prompt']['colour_accuracy']:.2f} |",
              f"| 50 % (paper) | {_fmt(_ms([x['dropout_50_no_prompt']['f1'] for x in ab]))} | "
              f"{_fmt(_ms([x['dropout_50_no_prompt']['colour_accuracy'] for x in ab]))} |",
              f"| 0 % | {_fmt(_ms([x['dropout_0_no_prompt']['f1'] for x in ab]))} | "
              f"{_fmt(_ms([x['dropout_0_no_prompt']['colour_accuracy'] for x in ab]))} |", "",
              *_final_dropout_lines(ab),
              "## Guidance modes (final checkpoint)", "", "![guidance](guidance.png)", "",
              "| mode | edge F1 | F1 shuffled | colours right |", "| --- | --- | --- | --- |"]
    for n in names:
        rows = [sd["guidance"][n] for sd in seeds]
        lines.append(f"| {n} | {_fmt(guidance[n])} | {_fmt(_ms([r['f1_shuffled'] for r in rows]))} | "
                     f"{_fmt(_ms([r['colour_accuracy'] for r in rows]))} |")
    lines += ["", "## Time per phase (s)", "", "| phase | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in results["seconds"].items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")

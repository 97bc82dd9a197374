"""
tools/outputs.py: a run's files, and the numbers and lines it reports (docs/outputs.md). The
pictures (PIL only, no matplotlib): curves.png, interference.png, rollouts.gif (tools/compare.py's
compare.png uses the same palette); the numbers: the VLM watch and the curve summed up, one summary
over seeds, strict JSON, the lines printed per seed and over seeds. Imported by train_toy.py and
tools/compare.py.
"""

import json
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# one colour per row of a figure (variants, losses, rates), in this order everywhere
PALETTE = [(30, 150, 60), (200, 60, 40), (40, 90, 200), (150, 60, 160), (120, 200, 130),
           (240, 150, 130)]
GREEN, RED, BLUE = PALETTE[:3]


def color(i):
    return PALETTE[i % len(PALETTE)]


def draw_curves(history, path, size=(760, 320)):
    """Left: CE and flow loss (log scale, moving average of 10 logs); right: success, teacher-forced
    FAST token accuracy and first-action error on held-out states vs step."""
    img = Image.new("RGB", size, "white")
    dr = ImageDraw.Draw(img)
    W, H, L, T, B = size[0] // 2, size[1], 42, 24, 28  # panel width, height; left, top, bottom
    xmax = max([r["step"] for r in history["train"] + history["eval"]] + [1])
    tr, ev = history["train"], history["eval"]
    k = max(1, min(10, len(tr) // 4))  # moving average over k logs (a short run: still a line)

    def smooth(key):
        if not tr:
            return [], np.ones(0)
        ys = np.convolve([max(r[key], 1e-4) for r in tr], np.ones(k) / k, "valid")
        return [r["step"] for r in tr][k - 1:], ys

    def rate(key):
        ok = [r for r in ev if np.isfinite(r[key])]
        return [r["step"] for r in ok], [min(r[key], 1.0) for r in ok]

    series = [[("ce_loss", RED, *smooth("ce_loss")), ("flow_loss", BLUE, *smooth("flow_loss"))],
              [(key, c, *rate(key)) for key, c in (("success", GREEN), ("fast_token_acc", RED),
                                                   ("first_action_mse", BLUE))]]
    for p, panel in enumerate(series):
        x0, log = p * W, p == 0
        vals = np.concatenate([np.log10(v) if log else np.asarray(v, float) for *_, v in panel]
                              + [[0.0]])
        lo, hi = (math.floor(vals.min()), math.ceil(vals.max() + 1e-9)) if log else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1
        X = lambda s: x0 + L + s / xmax * (W - L - 10)  # noqa: E731
        Y = lambda v: T + (hi - v) / (hi - lo) * (H - T - B)  # noqa: E731
        dr.rectangle([x0 + L, T, x0 + W - 10, H - B], outline=(150, 150, 150))
        for tick in range(int(lo), int(hi) + 1) if log else (0.0, 0.5, 1.0):
            dr.text((x0 + 4, Y(tick) - 6), f"1e{tick}" if log else f"{tick:.1f}", fill="black")
        dr.text((x0 + L, 6), "training loss (log)" if log
                else "held-out: success, FAST acc, 1st-action err", fill="black")
        dr.text((x0 + W - 90, H - B + 8), f"step {xmax}", fill="black")
        for i, (name, c, steps, v) in enumerate(panel):
            ys = np.log10(v) if log else np.asarray(v, float)
            pts = [(X(s), Y(y)) for s, y in zip(steps, ys)]
            if len(pts) > 1:
                dr.line(pts, fill=c, width=2)
            for q in pts if not log else []:
                dr.ellipse([q[0] - 2, q[1] - 2, q[0] + 2, q[1] + 2], fill=c)
            legend_y = T + 6 + (14 * i if log else 0.3 * (H - T - B) + 14 * i)  # rates: mid-height
            dr.text((x0 + W - 120, legend_y), name, fill=c)
    img.save(path)


def draw_interference(rows, path, size=(900, 560)):
    """interference.png: what the flow loss does to the VLM, rows side by side (mean over seeds).
    rows: [(name, [history["vlm"] of each seed])]. Top: the gradient norms the flow term (thick) and
    the CE (thin) send into the VLM (log; an exact 0, ki's stop-gradient, sits on the floor), and
    their cosine. Bottom: the training weights' VQA accuracy and linear-probe accuracy (the
    knowledge the flow term could erode)."""
    img = Image.new("RGB", size, "white")
    dr = ImageDraw.Draw(img)
    W, H, L, T, B = size[0] // 2, (size[1] - 20) // 2, 46, 22, 24
    xmax = max([r["step"] for _, hs in rows for h in hs for r in h] + [1])
    mean = lambda hs, k: np.mean([[r[k] for r in h] for h in hs], 0)  # noqa: E731  (same steps)
    floor = -5.0  # log10 of the smallest norm drawn; 0 is drawn there
    panels = [("gradient norm into the VLM: flow (thick), CE (thin); log", ("flow_grad", "ce_grad"),
               True),
              ("cosine(CE gradient, flow gradient)", ("grad_cos",), False),
              ("VQA accuracy (training weights)", ("vqa_acc",), False),
              ("linear-probe accuracy (training weights)", ("probe_acc",), False)]
    for p, (title, keys, log) in enumerate(panels):
        x0, y0 = (p % 2) * W, 20 + (p // 2) * H
        if log:
            vals = [np.log10(np.maximum(mean(hs, k), 10 ** floor)) for _, hs in rows for k in keys]
            lo, hi = floor, max(math.ceil(max(v.max() for v in vals) + 1e-9), floor + 1)
        else:
            lo, hi = (-1.0, 1.0) if keys == ("grad_cos",) else (0.0, 1.0)
        X = lambda st: x0 + L + st / xmax * (W - L - 10)  # noqa: E731
        Y = lambda v: y0 + T + (hi - v) / (hi - lo) * (H - T - B)  # noqa: E731
        dr.rectangle([x0 + L, y0 + T, x0 + W - 10, y0 + H - B], outline=(150, 150, 150))
        for tick in range(int(lo), int(hi) + 1, 2) if log else (lo, (lo + hi) / 2, hi):
            label = ("0" if tick == floor else f"1e{tick}") if log else f"{tick:.1f}"
            dr.text((x0 + 4, Y(tick) - 6), label, fill="black")
        dr.text((x0 + L, y0 + 6), title, fill="black")
        dr.text((x0 + W - 90, y0 + H - B + 8), f"step {xmax}", fill="black")
        for i, (name, hs) in enumerate(rows):
            steps = [r["step"] for r in hs[0]]
            for j, k in enumerate(keys):
                v = mean(hs, k)
                v = np.log10(np.maximum(v, 10 ** floor)) if log else v
                pts = [(X(st), Y(y)) for st, y in zip(steps, v)]
                if len(pts) > 1:
                    dr.line(pts, fill=color(i), width=3 if j == 0 else 1)
                for q in pts:
                    dr.ellipse([q[0] - 2, q[1] - 2, q[0] + 2, q[1] + 2], fill=color(i))
    head = "what the flow loss sends into the VLM, and what the VLM keeps (mean over seeds):"
    dr.text((8, 4), head, fill="black")
    x = 8 + dr.textlength(head) + 8
    for i, (name, _) in enumerate(rows):  # the legend: each row's name in its colour
        dr.text((x, 4), name, fill=color(i))
        x += dr.textlength(name) + 12
    img.save(path)


def write_gif(episodes, path):
    """rollouts.gif: [(frames, instruction, success)] one after another, each captioned with its
    instruction and, on its last frame, SUCCESS or failed."""
    if not episodes:
        return
    frames, font = [], ImageFont.load_default()  # once: each new ImageDraw would load it again
    for ep_frames, instruction, success in episodes:
        for t, f in enumerate(ep_frames):
            img = Image.fromarray(f).convert("RGB")
            dr = ImageDraw.Draw(img)
            dr.rectangle([0, 0, img.width, 14], fill="white")
            dr.text((3, 2), instruction, fill="black", font=font)
            if t == len(ep_frames) - 1:
                dr.text((3, img.height - 14), "SUCCESS" if success else "failed",
                        fill=(0, 140, 0) if success else (200, 0, 0), font=font)
            frames.append(img.quantize(method=Image.Quantize.FASTOCTREE))  # faster than save()'s
        frames.extend([frames[-1]] * 5)  # hold the last frame
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0)


# --------------------------------------------------------------------------------------------------
# the numbers: the watch and the curve in a few numbers each, one summary over seeds, strict JSON,
# the lines printed

# keys of train_toy.run_variant's metrics that get a std over seeds (docs/outputs.md lists them)
SPREAD = ("success", "heldout_success", "unseen_color_success", "unseen_wording_success",
          "vqa_acc_after", "probe_acc_after", "steps_to_50pct", "steps_to_80pct", "fast_token_acc",
          "first_action_mse", "malformed_fast", "flow_to_ce_grad", "grad_cos", "vqa_acc_min_train",
          "probe_acc_min_train")
SHOWN = (("success", "success"), ("heldout_success", "held-out combos"),  # per seed, over seeds
         ("unseen_color_success", "unseen colour"), ("unseen_wording_success", "unseen wording"))


def steps_to(history, level=0.5):
    """First step the curve's success reaches `level`, interpolated; NaN if it never does."""
    s0, v0 = 0, 0.0
    for r in history["eval"]:
        if r["success"] >= level:
            return s0 + (level - v0) / max(r["success"] - v0, 1e-9) * (r["step"] - s0)
        s0, v0 = r["step"], r["success"]
    return float("nan")


def watch_summary(watched):
    """The watched steps in four numbers (docs/outputs.md, flow_to_ce_grad and below)."""
    w = [r for r in watched if r["step"] > 0] or watched
    ratio = [r["flow_grad"] / max(r["ce_grad"], 1e-12) for r in w]
    return {"flow_to_ce_grad": float(np.mean(ratio)),
            "grad_cos": float(np.mean([r["grad_cos"] for r in w])),
            "vqa_acc_min_train": min(r["vqa_acc"] for r in watched),
            "probe_acc_min_train": min(r["probe_acc"] for r in watched)}


def summarize(runs):
    """Per-seed metrics -> one dict: every number's mean, the std of the SPREAD ones, every run;
    what is not a number (the curve, the watch) is the first seed's."""
    out = {k: v for k, v in runs[0].items() if k != "seed"}  # what every run shares stays as it is
    for k, v in out.items():
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if number and len({r[k] for r in runs}) > 1:
            out[k] = float(np.mean([r[k] for r in runs]))
    out.update({f"{k}_std": float(np.std([r[k] for r in runs])) for k in SPREAD})
    out.update(seeds=[r["seed"] for r in runs], n_seeds=len(runs), runs=runs)
    return out


def write_json(obj, path, indent=2):
    """Strict JSON: a number that is not finite (NaN: a split or measure a run lacks) -> null.
    -> obj, as given."""
    def strict(x):
        if isinstance(x, dict):
            return {k: strict(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [strict(v) for v in x]
        return None if isinstance(x, float) and not math.isfinite(x) else x
    with open(path, "w") as f:
        json.dump(strict(obj), f, indent=indent, allow_nan=False)
    return obj


def print_seed(m):
    """One seed's line, as it finishes."""
    print(f"{m['row']:5s} seed {m['seed']} | " + " | ".join(f"{n} {m[k]:.3f}" for k, n in SHOWN)
          + f" | FAST acc {m['fast_token_acc']:.2f} | 1st-action err {m['first_action_mse']:.3f}"
          f" | VQA {m['vqa_acc_before']:.2f} -> {m['vqa_acc_after']:.2f}"
          f" | {m['latency_ms_per_chunk_b1']:.1f} ms/chunk")


def print_spread(r):
    """A summary's line: mean ± std (worst seed) of the SHOWN numbers."""
    print(f"{r['row']:5s} over {r['n_seeds']} seeds: " + " | ".join(
        f"{n} {r[k]:.3f} ± {r[k + '_std']:.3f} (worst {min(x[k] for x in r['runs']):.3f})"
        for k, n in SHOWN))

"""
tools/compare.py: every variant from one pretrained VLM, plus ki and joint without VQA co-training
(which separates the stop-gradient's effect from co-training's), for --seeds seeds each: compare.md
(mean ± std per row), compare.png (success vs step) and interference.png (every row with a flow
term), beside each run's own files (tagged _<row>_seed<k>). --merge pools several such folders.

  python tools/compare.py --seeds=3 --init_from=out/pretrained.pt  # every row, 3 seeds, one VLM
  python tools/compare.py --quick                                   # the whole table, a few minutes
  python tools/compare.py --variants=ki,joint --out_dir=out_a       # some rows (merged later)
  python tools/compare.py --merge=out_a,out_b --out_dir=out_all     # one compare.md from several

Every setting of train_toy.py applies to each row (python tools/compare.py --help), but --variant
(each row sets its own; --variants picks rows), --vqa_frac in the no-VQA rows (0) and --eval_only.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
import kivla  # noqa: E402
import train_toy  # noqa: E402
from tools import cli, outputs, speed  # noqa: E402

# (name, variant, setting overrides), in the table's order
ROWS = [("ki", "ki", {}), ("joint", "joint", {}), ("pi0", "pi0", {}), ("fast", "fast", {}),
        ("ki_noVQA", "ki", {"vqa_frac": 0.0}), ("joint_noVQA", "joint", {"vqa_frac": 0.0})]
# compare.md: (metric, column header, the paper's claim it measures)
COLUMNS = [("success", "success in-dist", ""), ("heldout_success", "held-out combos", "generalize"),
           ("unseen_color_success", "unseen colour", "generalize"),
           ("unseen_wording_success", "unseen wording", "generalize"),
           ("vqa_acc_after", "VQA after (before {vqa_acc_before:.2f})", "retention: head"),
           ("probe_acc_after", "VQA probe after (before {probe_acc_before:.2f})",
            "retention: features"),
           ("steps_to_50pct", "steps to 50%", "train fast"),
           ("steps_to_80pct", "steps to 80%", "train fast"),
           ("flow_to_ce_grad", "flow / CE gradient into the VLM", "insulation"),
           ("vqa_acc_min_train", "lowest VQA while training", "retention: head"),
           ("latency_ms_per_chunk_b1", "ms/chunk, batch 1", "run fast"),
           ("malformed_fast", "malformed FAST decodes", "")]


def rows(names):
    unknown = [r for r in names.split(",") if r and r not in [name for name, _, _ in ROWS]]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown rows {unknown}; choose from "
                                         f"{', '.join(name for name, _, _ in ROWS)}")
    return names


def make_parser():
    p = train_toy.make_parser(prog="tools/compare.py", description=__doc__)
    g = p.add_argument_group("compare", "which rows, or merge finished comparisons")
    cli.add(g, "variants", "", "only these rows, comma-separated (e.g. ki,joint); '' = every "
            f"row: {', '.join(name for name, _, _ in ROWS)}", rows)
    cli.add(g, "merge", "", "comma-separated folders of finished runs -> one compare.md")
    return p


def main(argv):
    cli.refuse_a_student_copy(argv)  # the course's copy runs once its exercises are written
    for flag, why in (("variant", "choose rows with --variants"), ("eval_only", "evaluate with "
                      "python train_toy.py --eval_only"), ("instruction", "it is --eval_only's")):
        if any(a == f"--{flag}" or a.startswith(f"--{flag}=") for a in argv):
            raise SystemExit(f"error: tools/compare.py has no --{flag}: {why}")
    s, cfg = train_toy.start(argv, make_parser())
    if s["merge"]:
        return merge(s)
    picked = [r for r in s["variants"].split(",") if r]
    picked = [r for r in ROWS if r[0] in picked] if picked else ROWS
    with speed.only_rank0_prints(s):
        tok, data = train_toy.prepare(s, cfg)
        if s["rank"] == 0:
            estimate_time(s, cfg, tok, data, len(picked) * s["seeds"])
        results = []
        for name, variant, override in picked:  # every row from the one VLM
            c = kivla.Config(**{**asdict(cfg), "variant": variant})
            results.append(train_toy.run_seeds({**s, **override}, c, tok, data, name))
        return train_toy.finish(s, data, results, lambda results: write(s, results))


def write(s, results):
    """metrics.json ({"compare": the rows' summaries}), compare.md, compare.png, interference.png"""
    out = {"compare": results}
    outputs.write_json(out, os.path.join(s["out_dir"], "metrics.json"))
    write_compare(results, s, os.path.join(s["out_dir"], "compare.md"),
                  os.path.join(s["out_dir"], "compare.png"))
    print(open(os.path.join(s["out_dir"], "compare.md")).read())
    return out


def estimate_time(s, cfg, tok, data, n_runs):
    """Print the expected wall clock before starting: training steps/s and the cost of an evaluation
    episode (worst case: a policy that never succeeds), both measured on a throwaway model."""
    torch.manual_seed(0)
    s = {**s, "seed": 0, "rank": 0, "world": 1}  # this process alone
    m = train_toy.build_model(s, cfg, tok).to(s["device"])
    robot = m.make_batch(*[x[:256] for x in data.demos])
    train_toy.train(m, s, robot, data.vqa, 2, s["vqa_frac"], "estimate")  # warm-up
    t0 = time.perf_counter()
    train_toy.train(m, s, robot, data.vqa, 5, s["vqa_frac"], "estimate")
    sps = 5 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    train_toy.rollouts(m, "train", range(2), s["replan"], s["num_steps"], graph=s["cuda_graph"])
    per_episode = (time.perf_counter() - t0) / 2 / 4  # in lockstep: ~4x cheaper at 100 episodes
    n_eval = 4 * s["eval_episodes"] + min(50, s["eval_episodes"]) * ((s["train_steps"] - 1)
                                                                     // s["eval_interval"])
    minutes = n_runs * (s["train_steps"] / sps + n_eval * per_episode) / 60
    print(f"compare: {n_runs} runs of {s['train_steps']} steps at {sps:.1f} steps/s + {n_eval} "
          f"evaluation episodes each -> about {minutes:.0f} min on this machine")


def fmt(vals, key):
    vals = np.array(vals, float)
    if key.startswith("steps_to"):
        ok = vals[np.isfinite(vals)]
        if len(ok) == 0:
            return "not reached"
        return (f"{ok.mean():.0f} ± {ok.std():.0f}"
                + (f" ({len(ok)}/{len(vals)} reached)" if len(ok) < len(vals) else ""))
    if not np.isfinite(vals).any():
        return "-"
    return (f"{vals.mean():.1f} ± {vals.std():.1f}" if key.startswith("latency")
            else f"{vals.mean():.3f} ± {vals.std():.3f}")


def write_compare(results, s, path_md, path_png):
    """compare.md: one row per variant, mean ± std over seeds; compare.png: success vs step, the
    spread as a band; interference.png: every row with a flow term, on shared axes."""
    r0 = results[0]
    head = [h.format(**r0) for _, h, _ in COLUMNS]
    lines = [f"Robot training from one pretrained toy VLM, {s['train_steps']} steps, "
             f"{s['eval_episodes']} held-out evaluation episodes per split, unseen colour "
             f"{r0['runs'][0]['unseen_color'] or 'none'}; mean ± std over the training seeds of "
             "each row.", "", "| variant | seeds | " + " | ".join(head) + " |",
             "|---" * (len(head) + 2) + "|",
             "| claim | | " + " | ".join(c for _, _, c in COLUMNS) + " |"]
    for r in results:
        lines.append(f"| {r['runs'][0]['row']} | {','.join(map(str, r['seeds']))} | "
                     + " | ".join(fmt([x[k] for x in r["runs"]], k) for k, _, _ in COLUMNS) + " |")
    with open(path_md, "w") as f:
        f.write("\n".join(lines) + "\n")
    flows = [(r["runs"][0]["row"], [x["vlm_watch"] for x in r["runs"]]) for r in results
             if r["runs"][0]["variant"] != "fast" and all("vlm_watch" in x for x in r["runs"])]
    if flows:
        outputs.draw_interference(flows, os.path.join(os.path.dirname(path_md), "interference.png"))
    draw_success(results, path_png)


def draw_success(results, path, size=(760, 360)):
    """compare.png: success (the curve's seeds) vs robot-training step, mean line, min..max band."""
    L, T, B, R = 46, 28, 30, 150
    img = Image.new("RGB", size, "white")
    dr = ImageDraw.Draw(img)
    xmax = max(st for r in results for x in r["runs"] for st, _ in x["curve"])
    X = lambda st: L + st / xmax * (size[0] - L - R)  # noqa: E731
    Y = lambda v: T + (1 - v) * (size[1] - T - B)  # noqa: E731
    dr.rectangle([L, T, size[0] - R, size[1] - B], outline=(150, 150, 150))
    for v in (0.0, 0.5, 1.0):
        dr.text((8, Y(v) - 6), f"{v:.1f}", fill="black")
    dr.text((L, 8), "success (curve seeds) vs robot-training step: mean over seeds, band: min..max",
            fill="black")
    dr.text((size[0] - R - 60, size[1] - B + 8), f"step {xmax}", fill="black")
    curves = [([st for st, _ in r["runs"][0]["curve"]],
               np.array([[val for _, val in x["curve"]] for x in r["runs"]])) for r in results]
    for i, (steps, v) in enumerate(curves):  # the bands first, the lines on top
        light = tuple(int(255 - 0.25 * (255 - ch)) for ch in outputs.color(i))
        if len(steps) > 1:
            top = [(X(st), Y(hi)) for st, hi in zip(steps, v.max(0))]
            dr.polygon(top + [(X(st), Y(lo)) for st, lo in zip(steps[::-1], v.min(0)[::-1])],
                       fill=light)
    for i, ((steps, v), r) in enumerate(zip(curves, results)):
        pts = [(X(st), Y(val)) for st, val in zip(steps, v.mean(0))]
        if len(pts) > 1:
            dr.line(pts, fill=outputs.color(i), width=2)
        for x, y in pts:
            dr.ellipse([x - 2, y - 2, x + 2, y + 2], fill=outputs.color(i))
        dr.text((size[0] - R + 10, T + 16 * i), r["runs"][0]["row"], fill=outputs.color(i))
    img.save(path)


def read_json(path):
    """outputs.write_json's inverse for metrics: null -> NaN (the tables expect numbers)."""
    def loose(x):
        if isinstance(x, dict):
            return {k: loose(v) for k, v in x.items()}
        return [loose(v) for v in x] if isinstance(x, list) else float("nan") if x is None else x
    with open(path) as f:
        return loose(json.load(f))


def merge(s):
    """--merge=DIR,DIR,...: the per-seed metrics of several runs (comparisons, with any --variants,
    or single runs) -> one compare.md and compare.png in --out_dir, so a comparison can be built
    over several sittings or machines. The runs of one row are pooled; the same row and seed twice,
    or different budgets, is an error; runs at several flow weights (alpha) make a row per alpha."""
    rows = {}
    for d in s["merge"].split(","):
        path = os.path.join(d, "metrics.json")
        if not os.path.isfile(path):
            raise SystemExit(f"error: --merge: no {path}")
        m = read_json(path)
        for run in [x for r in (m["compare"] if "compare" in m else [m]) for x in r["runs"]]:
            runs = rows.setdefault((run["row"], run.get("flow_weight", 1.0)), [])
            if any(x["seed"] == run["seed"] for x in runs):
                raise SystemExit(f"error: --merge: row {run['row']} seed {run['seed']} is in more "
                                 "than one run")
            runs.append({**run, "from": d})
    budgets = {(x["train_steps"], x["eval_episodes"], x["unseen_color"]) for runs in rows.values()
               for x in runs}
    if len(budgets) > 1:
        raise SystemExit("error: --merge: the runs differ in (train_steps, eval_episodes, "
                         f"unseen_color): {sorted(budgets)}")
    if len({fw for _, fw in rows}) > 1:  # several flow weights: each (row, alpha) a row of its own
        for (name, fw), runs in rows.items():
            for x in runs:
                x["row"] = f"{name} alpha={fw:g}"
    order = [name for name, _, _ in ROWS]
    results = [outputs.summarize(rows[k]) for k in sorted(rows, key=lambda k: (
        k[1], order.index(k[0]) if k[0] in order else len(order), k[0]))]
    (steps, episodes, _), = budgets
    write({**s, "train_steps": steps, "eval_episodes": episodes}, results)
    return {"compare": results}


if __name__ == "__main__":
    main(sys.argv[1:])

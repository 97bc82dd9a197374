"""
train_toy.py: the whole KI recipe on the toy push task, end to end, on a CPU or one GPU.

  1. demonstrations from the scripted policy (noisy execution, clean labels)
  2. fit the FAST tokenizer on the demo action chunks
  3. toy "VLM pretraining": VQA about random scenes (the knowledge a real VLM would bring)
  4. robot training with knowledge insulation, co-trained with VQA
  5. closed-loop evaluation: in-distribution, held-out combinations, unseen colour, unseen wording; what the VLM
     keeps (VQA, a linear probe) and the gradients each loss term sends into it (interference)
  6. outputs in --out_dir: ckpt.pt, pretrained.pt, metrics.json, history.json, curves.png, interference.png,
     rollouts.gif

Read it top to bottom as `python train_toy.py` runs: settings, 1) data, 2) the model and 3) VLM pretraining,
4) robot training, 5) evaluation, 6) outputs, 7) the main job (run). Below the TOOLS line: --eval_only,
--compare / --merge, --bench / --figures.

  python train_toy.py                                  # default run (see README for time and numbers)
  python train_toy.py --seeds=3                        # 3 robot-training seeds from one pretraining: mean ± std
  python train_toy.py --quick                          # the whole pipeline in about half a minute (success 0)
  python train_toy.py --variant=pi0 --init_from=out/pretrained.pt --out_dir=out_pi0
  python train_toy.py --compare --seeds=3 --init_from=out/pretrained.pt   # every variant + no-VQA ablations: compare.md
  python train_toy.py --compare --variants=ki,joint --out_dir=out_a         # a subset of the rows, merged later with
  python train_toy.py --merge=out_a,out_b --out_dir=out_all                 # --merge: one compare.md from several runs
  python train_toy.py --eval_only --init_from=out/ckpt.pt --instruction="push the blue block to the top right corner"
  python train_toy.py --bench                                    # training steps/s vs matmul, FAST, env, flow vs AR
  python train_toy.py --figures                                  # attention.png and fast_tokens.png
  python train_toy.py --backbone=hf-tiny --quick                 # a tiny random HuggingFace PaliGemma as the VLM
  torchrun --standalone --nproc_per_node=2 train_toy.py --quick  # DistributedDataParallel, one process per device
"""

import contextlib
import copy
import difflib
import inspect
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import kivla


# --------------------------------------------------------------------------------------------------
# settings: every one (and every kivla.Config field but those the toy fixes) can be overridden as --key=value
# (or --key value); --help prints them under the "# --" group lines below, each with its comment


SETTINGS = dict(
    # -- run: what this run is and where it writes
    out_dir="out",          # where checkpoints, metrics and pictures go
    seed=0,                 # seeds the demos, the VLM pretraining and the first robot-training seed
    quick=False,            # shrink everything: the whole pipeline in about half a minute (a smoke test: success 0),
                            # into out_quick/ unless --out_dir is given (a real run's out/ stays)
    seeds=1,                # robot-training seeds seed, seed+1, ... (one shared VLM pretraining): mean ± std
    init_from="",           # pretrained.pt (skip VLM pretraining) or ckpt.pt (with --eval_only)
    # -- method: the model (the kivla.Config settings below) and its VLM
    backbone="toy",         # toy: the from-scratch toy VLM | hf-tiny: a tiny random HuggingFace PaliGemma
                            # (transformers)
    scale="cpu",            # cpu: the toy sizes | gpu: sized for one GPU (more image tokens, wider, bigger batch)
    # -- data: demonstrations, FAST, VQA
    n_demos=1200,           # scripted-policy episodes (on the training colour x corner pairs only)
    unseen_color="purple",  # never a demo's target (VQA only): the "unseen concept" split; "" = none
    demo_noise=0.3,         # std of the noise added to executed scripted actions (labels stay clean)
    fast_scale=4.0,         # FAST: DCT coefficients * scale, rounded (coarser = fewer, easier tokens)
    fast_vocab=512,         # FAST: BPE vocabulary size (ids), base symbols included
    n_vqa=30000,            # VQA questions in the pool for pretraining and co-training
    # -- training: toy VLM pretraining, then robot training
    pretrain_steps=1000,    # toy VLM pretraining steps (VQA only), per block
    pretrain_min_vqa=0.7,   # a VLM under this held-out VQA accuracy grounds words poorly: restart (README)
    pretrain_blocks=4,      # at most this many pretraining blocks (the first + restarts)
    train_steps=3000,       # robot training steps
    batch_size=64,          # rows per training step (robot + VQA)
    vqa_frac=0.125,         # co-training: fraction of each robot batch that is VQA
    lr=3e-3,                # robot training's peak learning rate (AdamW)
    warmup_steps=200,       # linear warm-up steps of every training phase
    weight_decay=0.01,      # AdamW's, on matrices only
    grad_clip=1.0,          # the gradient's global norm is clipped to this
    ema=0.998,              # EMA of the weights, used for evaluation
    # -- evaluation: closed-loop rollouts on held-out seeds
    eval_interval=500,      # steps between the curve's evaluations (50 episodes, own RNG; the last point is the
                            # final one)
    eval_episodes=200,      # final evaluation: episodes per split, on held-out seeds
    replan=2,               # execute the first `replan` of H actions, then re-plan (closed loop)
    num_steps=10,           # Euler steps of the flow at inference
    gif_episodes=4,         # episodes per split drawn into rollouts.gif
    # -- speed: where and how the step runs
    device="auto",          # auto | cpu | cuda | mps
    amp=True,               # bf16 autocast on cuda (ignored elsewhere); --amp=false trains in fp32
    cuda_graph=True,        # cuda, one process: capture the whole training step once as a CUDA graph and replay it
    compile=False,          # torch.compile the training loss (instead of a CUDA graph)
    # -- tools: instead of (or around) the main run
    compare=False,          # every variant + ki/joint without VQA from one pretraining: compare.md, compare.png
    variants="",            # --compare: only these rows, comma-separated (e.g. ki,joint); "" = every row
    merge="",               # comma-separated out_dirs of --compare runs: one compare.md / compare.png in --out_dir
    eval_only=False,        # just evaluate --init_from (a ckpt.pt) and write a GIF
    instruction="",         # --eval_only: run this instruction instead of the env's own
    figures=False,          # write attention.png and fast_tokens.png into --out_dir and exit (--bench does too)
    bench=False,            # print the benchmarks (training steps/s vs matmul, FAST, env, flow vs AR) and exit
)


PRETRAIN_LR = 1e-3  # toy VLM pretraining: constant after the warm-up (why: pretrain_vlm)
MIN_LR_FRAC = 0.05  # robot training: the cosine decays to lr * MIN_LR_FRAC
QUICK = dict(out_dir="out_quick", n_demos=40, n_vqa=2000, pretrain_steps=60, train_steps=80, batch_size=32, eval_interval=40,
             eval_episodes=16, gif_episodes=2, warmup_steps=10, pretrain_min_vqa=0.0)  # one pretraining block
# --scale=gpu: one GPU's worth: 64 image tokens instead of 16, a 4x wider backbone, 4x the batch. --quick still
# shrinks the schedule.
SCALE_GPU = dict(batch_size=256, patch_size=8, vit_width=128, vit_layers=4, d_model=256, n_layer=6,
                 n_head=8, head_dim=32, expert_width=128)
# kivla.Config fields the toy fixes (its env's image, action and state; the vocabulary; RoPE's base): not settings
FIXED_BY_THE_TOY = ("action_dim", "image_size", "state_dim", "text_len", "state_bins", "rope_theta")
CHOICES = dict(backbone=("toy", "hf-tiny"), scale=("cpu", "gpu"), unseen_color=("", *kivla.COLORS))
EVAL_SEED, CURVE_SEED, VQA_EVAL_SEED, DIAG_SEED, PROBE_SEED = 1_000_000, 2_000_000, 3_000_000, 4_000_000, 5_000_000
INTERFERENCE_SEED = 6_000_000
# --compare: every variant from the same pretrained VLM, plus ki and joint without VQA co-training, which
# separates the effect of the stop-gradient from the effect of co-training. (name, variant, setting overrides)
COMPARE_ROWS = [("ki", "ki", {}), ("joint", "joint", {}), ("pi0", "pi0", {}), ("fast", "fast", {}),
                ("ki_noVQA", "ki", {"vqa_frac": 0.0}), ("joint_noVQA", "joint", {"vqa_frac": 0.0})]


def parse_args(argv):
    """nanoGPT-style --key=value (or --key value) over SETTINGS and kivla.Config. -> (settings dict, Config).
    Anything it cannot use ends the program with one line that says why (SystemExit), never a traceback."""
    cfg_fields = {f.name: f for f in fields(kivla.Config) if f.name not in FIXED_BY_THE_TOY}
    defaults = {**{k: f.default for k, f in cfg_fields.items()}, **SETTINGS}
    if "--help" in argv or "-h" in argv:
        print(__doc__ + help_text())
        sys.exit(0)
    given, args = {}, list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise SystemExit(f"error: expected --key=value, got {arg!r} (see --help)")
        key, eq, val = arg[2:].partition("=")
        if key in FIXED_BY_THE_TOY:
            raise SystemExit(f"error: --{key} is fixed by the toy (its env, vocabulary or RoPE); for your own "
                             "robot, set it in kivla.Config")
        if key not in defaults:
            near = difflib.get_close_matches(key, defaults, n=1)
            raise SystemExit(f"error: unknown setting --{key}" + (f"; did you mean --{near[0]}?" if near else "")
                             + " (python train_toy.py --help lists them all)")
        if not eq:  # --key value, as argparse; a bare --flag is true
            is_bool = isinstance(defaults[key], bool)
            if args and not args[0].startswith("--") and (not is_bool or args[0].lower() in BOOLS):
                val = args.pop(0)
            elif is_bool:
                val = "true"
            else:
                raise SystemExit(f"error: --{key} needs a value: --{key}=VALUE (default: {defaults[key]!r})")
        given[key] = _cast(key, val, defaults[key])
    for k, options in CHOICES.items():
        if k in given and given[k] not in options:
            raise SystemExit(f"error: --{k} must be one of {', '.join(options)}, got {given[k]!r}")
    # defaults < --quick < --scale=gpu < what was given
    given = {**(QUICK if given.get("quick") else {}), **(SCALE_GPU if given.get("scale") == "gpu" else {}), **given}
    s = {**SETTINGS, **{k: v for k, v in given.items() if k in SETTINGS}}
    check_settings(s)
    try:
        cfg = kivla.Config(**{k: v for k, v in given.items() if k in cfg_fields})
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return s, cfg


BOOLS = ("true", "false", "1", "0")


def _cast(key, val, default):
    try:
        if isinstance(default, bool):
            if val.lower() not in BOOLS:
                raise ValueError
            return val.lower() in ("true", "1")
        return type(default)(val)
    except ValueError:
        raise SystemExit(f"error: --{key}={val!r} is not a valid {type(default).__name__} (default: {default!r})")


def check_settings(s):
    """The combinations and ranges a run cannot use, each refused with the reason."""
    if s["init_from"] and not os.path.isfile(s["init_from"]):
        raise SystemExit(f"error: --init_from={s['init_from']}: no such file")
    if s["eval_only"] and not s["init_from"]:
        raise SystemExit("error: --eval_only evaluates a trained model: add --init_from=out/ckpt.pt")
    if s["init_from"]:
        load_checkpoint(s["init_from"], trained=s["eval_only"])  # now, not after minutes of data and pretraining
    if s["instruction"] and not s["eval_only"]:
        raise SystemExit("error: --instruction is for --eval_only (training uses the env's own instructions)")
    rows = [r for r in s["variants"].split(",") if r]
    unknown = [r for r in rows if r not in [name for name, _, _ in COMPARE_ROWS]]
    if unknown:
        raise SystemExit(f"error: --variants: unknown rows {unknown}; "
                         f"choose from {', '.join(n for n, _, _ in COMPARE_ROWS)}")
    if rows and not s["compare"]:
        raise SystemExit("error: --variants picks rows of --compare: add --compare (or use --variant=NAME for one run)")
    for k in ("seeds", "pretrain_blocks", "n_demos", "n_vqa", "pretrain_steps", "train_steps", "batch_size",
              "eval_interval", "eval_episodes", "replan", "num_steps"):
        if s[k] < 1:
            raise SystemExit(f"error: --{k} must be >= 1, got {s[k]}")
    for k in ("vqa_frac", "ema"):
        if not 0 <= s[k] <= 1:
            raise SystemExit(f"error: --{k} must be in [0, 1], got {s[k]}")
    for k in ("pretrain_min_vqa", "lr", "demo_noise", "fast_scale", "grad_clip", "weight_decay", "warmup_steps",
              "gif_episodes"):
        if not s[k] >= 0:
            raise SystemExit(f"error: --{k} must be >= 0, got {s[k]}")


def load_checkpoint(path, trained=False):
    """torch.load (weights only) with one clear line for what cannot be used: a file that is not a kivla
    checkpoint, or (trained=True) pretrained.pt, whose action expert never trained."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise SystemExit(f"error: {path} is not a kivla checkpoint (torch.load cannot read it with weights_only=True)"
                         ) from None
    if not isinstance(ck, dict) or not {"model", "config", "fast_tokenizer"} <= ck.keys():
        raise SystemExit(f"error: {path} is not a kivla checkpoint (no model, config and FAST tokenizer in it)")
    if trained and "settings" not in ck:
        raise SystemExit(f"error: {path} is a VLM-only checkpoint (pretrained.pt: VQA pretraining, no robot "
                         "training, its action expert is random): evaluate a ckpt.pt from a training run")
    return ck


def help_text():
    """--help: every setting with its default and its comment (from SETTINGS above and kivla.Config), grouped."""
    out, group = [], None
    src = inspect.getsource(sys.modules[__name__]).split("SETTINGS = dict(\n", 1)[1].split("\n)\n", 1)[0]
    config = inspect.getsource(kivla.Config).split("\n")
    for line in src.split("\n"):
        code, _, comment = line.partition("#")
        name = code.split("=")[0].strip()
        if comment.startswith(" -- "):
            group = comment[4:].split(":")[0]
            out.append(f"\n{comment[4:].strip()}")
            if group == "method":  # every kivla.Config field, with its comment in kivla.py
                out += _help_lines(config, ":", {f.name: f.default for f in fields(kivla.Config)
                                                 if f.name not in FIXED_BY_THE_TOY})
        elif name:
            out += _help_lines([line], "=", SETTINGS)
        elif comment and len(code) > 12:
            out[-1] += " " + comment.strip()  # a comment continued on the next line, aligned under it
    return "\nsettings, as --key=value (default), grouped:" + "\n".join(out)


def _help_lines(lines, sep, defaults):
    out = []
    for line in lines:
        code, _, comment = line.partition("#")
        name = code.split(sep)[0].strip()
        if name in defaults:
            out.append(f"  --{name}={defaults[name]}".ljust(28) + " " + comment.strip())
        elif out and not code.strip() and comment and len(code) > 12:
            out[-1] += " " + comment.strip()
    return out


# --------------------------------------------------------------------------------------------------
# 1) data: demonstrations from the scripted policy, VQA, the held-out sets


def collect_demos(n, H, noise, seed, tasks="train"):
    """Scripted-policy rollouts on the training tasks -> observations, (N, H, A) clean action chunks, task per sample.
    A chunk that runs past the episode's end is padded with zeros: after success the pusher stays put."""
    env, rng = kivla.PushEnv(tasks=tasks), np.random.default_rng(seed)
    obs_all, chunks, sample_tasks, success = [], [], [], 0
    for ep in tqdm(range(n), desc="demos", leave=False):
        obs, _ = env.reset(seed=seed + ep)
        episode, acts = [], []
        while True:
            a = kivla.scripted_action(env)
            episode.append(obs)
            acts.append(a)
            obs, _, term, trunc, info = env.step(kivla.dart(a, noise, rng))  # DART: execute a noisy action
            if term or trunc:
                break
        success += info["success"]
        acts = np.concatenate([np.array(acts), np.zeros((H, acts[0].shape[0]), np.float32)])
        for t, o in enumerate(episode):
            obs_all.append(o)
            chunks.append(acts[t:t + H])
            sample_tasks.append((env.color, env.corner))
    return obs_all, np.array(chunks, np.float32), sample_tasks, success / n


def make_vqa_set(n, seed):
    """n (question, answer) observations about varied scenes: random resets, then a few random-length
    expert pushes so blocks also sit near corners and walls."""
    env, rng, out = kivla.PushEnv(tasks="all"), np.random.default_rng(seed), []
    while len(out) < n:
        env.reset(seed=int(rng.integers(2**31)))
        for _ in range(int(rng.integers(0, 40))):  # physics only: the frames in between are never looked at
            env.simulate(kivla.scripted_action(env, noise=0.5, rng=rng) * env.speed)
        obs = env.observe()
        for _ in range(4):  # several questions per scene
            q, a = kivla.make_vqa(env, rng)
            out.append({**obs, "instruction": q, "answer": a})
    return out[:n]


def held_out_sets(quick, H, tasks):
    """Data no training step sees: clean scripted episodes (the diagnostics' states), VQA for the probe and for
    the VQA accuracy."""
    d_obs, d_chunks, _, _ = collect_demos(4 if quick else 40, H, 0.0, DIAG_SEED, tasks)
    return (d_obs, d_chunks, make_vqa_set(200 if quick else 2000, PROBE_SEED),
            make_vqa_set(200 if quick else 1000, VQA_EVAL_SEED))


def index(batch, idx):
    return {k: v[idx] for k, v in batch.items()}


def cat(*batches):
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


@dataclass
class Data:
    """What every robot-training run shares, made once (under torchrun, the same on every rank)."""
    demos: tuple         # scripted-policy demos: (observations, (N, H, A) clean action chunks)
    diag: tuple          # held-out clean demo states for the diagnostics: (observations, chunks)
    vqa: dict            # the VQA pool as one batch: pretraining and co-training
    vqa_eval: dict       # held-out VQA as one batch: VQA accuracy, and the probe's test rows
    probe: tuple         # the linear probe's ((train batch, kinds, labels), (test batch, kinds, labels))
    probe_iters: int     # LBFGS iterations of each probe fit
    probe_before: float = float("nan")  # the pretrained VLM's probe accuracy


# --------------------------------------------------------------------------------------------------
# 2) the model (the FAST tokenizer is fit in run(): one line) and 3) toy VLM pretraining


def build_model(s, cfg, tok):
    """The toy VLM, or (--backbone=hf-tiny) a tiny random HuggingFace PaliGemma behind the same interface."""
    if s["backbone"] == "toy":
        return kivla.KIVLA(cfg, tok)
    try:
        hf = kivla.tiny_paligemma(cfg, tok.vocab_size)
    except ImportError:
        raise SystemExit("error: --backbone=hf-tiny needs transformers >= 5: pip install transformers")
    return kivla.KIVLA(cfg, tok, backbone=kivla.HFBackbone(hf))


def load_vlm_weights(model, weights):
    """Every VLM weight, strictly; the action expert keeps its fresh init (pretraining never trains it)."""
    try:
        missing, unexpected = model.load_state_dict(
            {k: v for k, v in weights.items() if not k.startswith("action_expert.")}, strict=False)
    except RuntimeError as e:  # a shape differs: e.g. weights built with another toy vocabulary (WORDS)
        raise SystemExit("error: the VLM weights do not fit this model (from an older kivla?): "
                         f"{str(e)[:300]}") from None
    if unexpected or any(not k.startswith("action_expert.") for k in missing):
        raise SystemExit(f"error: the VLM weights do not fit this model (from an older kivla, or another --backbone?); "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")


def pretrain_vlm(s, cfg, tok, vqa, vqa_eval):
    """Toy VLM pretraining: VQA only, ViT + backbone (cross-entropy only: there are no actions, so the variant
    "fast" and no action expert work). In blocks of pretrain_steps, each with its own warm-up, then a constant
    learning rate: off the grounding plateau a VLM climbs at the learning rate's pace, and a cosine would slow that
    climb just when it starts (README, "Why the bar is 0.7").
    A VLM whose held-out VQA accuracy is under pretrain_min_vqa cannot yet reliably tell where the block a word
    names is (on the grounding plateau, or only just off it), and robot training on such a VLM fails, crawls or
    falls short. Which draw of the init is slow is luck, so it is dropped, and the next block starts again from
    a fresh random init (seed + 1000 * block) on new batches: a restart, up to pretrain_blocks in all; the best
    VLM is kept."""
    for block in range(s["pretrain_blocks"]):
        torch.manual_seed(s["seed"] + 1000 * block)
        model = build_model(s, kivla.Config(**{**asdict(cfg), "variant": "fast"}), tok).to(s["device"])
        desc = "VLM pretraining (VQA)" + (f", restart {block}" if block else "")
        s_pre = {**s, "lr": PRETRAIN_LR, "seed": s["seed"] + block}
        ema = train(model, s_pre, robot=None, vqa=vqa, steps=s["pretrain_steps"], vqa_frac=1.0, desc=desc,
                    min_lr_frac=1.0)  # no decay
        acc = vqa_accuracy(ema, vqa_eval)  # on every rank (the same weights): they agree on going on
        if block == 0 or acc > best[1]:
            best = ema, acc
        if acc >= s["pretrain_min_vqa"]:
            break
        if block + 1 < s["pretrain_blocks"]:
            print(f"VLM pretraining: VQA accuracy {acc:.3f} < {s['pretrain_min_vqa']} "
                  "(grounds words poorly): restarting from a fresh init")
    ema, acc = best  # the best VLM if none reached the bar
    if s["rank"] == 0:
        ema.save(os.path.join(s["out_dir"], "pretrained.pt"), vqa_acc=acc)
    return {k: v.cpu() for k, v in ema.state_dict().items()}, acc


# --------------------------------------------------------------------------------------------------
# 4) robot training: AdamW, warm-up + cosine, clipping, EMA; the VLM watched at fixed steps


def lr_at(step, steps, lr, warmup, min_frac):
    """Learning rate at `step` of `steps`: 1) linear warm-up over `warmup` steps, 2) cosine decay to lr * min_frac
    (min_frac = 1: constant after the warm-up)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def trim_suffix(*datasets):
    """Drop the suffix columns that no row of any of these datasets uses (None = no dataset). make_batch pads the
    suffix to the worst case, one FAST token per coefficient (21 tokens); the toy's chunks need at most ~12, so
    the backbone's sequence gets ~15% shorter, and every batch drawn from the datasets still has one shape."""
    used = max(int((d["suffix_loss"].any(0) * torch.arange(1, d["suffix_loss"].shape[1] + 1)).max())
               for d in datasets if d is not None)  # the last used column + 1 (0 if none)
    cut = ("suffix", "suffix_target", "suffix_loss")
    return [None if d is None else {k: v[:, :used] if k in cut else v for k, v in d.items()} for d in datasets]


def train(model, s, robot, vqa, steps, vqa_frac, desc, curve=None, history=None, watch=None,
          min_lr_frac=MIN_LR_FRAC):
    """AdamW + warmup/cosine (lr_at) + grad clipping + EMA. robot/vqa: datasets (dicts of tensors) to sample batches
    from. Under torchrun every rank draws its own batch_size / world rows. curve(ema, step): every eval_interval
    steps; watch(model, step): the training weights at watch_steps (before the step; `steps` after the last).
    Returns the EMA model (for evaluation)."""
    dev = model.device
    robot, vqa = trim_suffix(robot, vqa)
    robot = {k: v.to(dev) for k, v in robot.items()} if robot is not None else None  # batches are drawn on the device
    vqa = {k: v.to(dev) for k, v in vqa.items()}
    g = torch.Generator(dev).manual_seed(s["seed"] + 1_000_003 * s["rank"])  # each rank its own batch rows
    bs = s["batch_size"] // s["world"]
    n_vqa = round(bs * vqa_frac) if robot is not None else bs
    n_rob = bs - n_vqa
    net = model
    if s["world"] > 1:  # DDP averages the gradients inside backward (and first copies rank 0's weights to all)
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=not model.cfg.use_flow)
    elif s["compile"]:
        net = torch.compile(model, dynamic=False)  # a recompile per suffix length, not symbolic shapes
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    # the learning rate and the EMA's weight are tensors: a captured CUDA graph reads their current values
    lr, ema_w = torch.tensor(s["lr"], device=dev), torch.zeros((), device=dev)
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": s["weight_decay"]},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr,
                            betas=(0.9, 0.95), fused=dev.type in ("cpu", "cuda"), capturable=dev.type == "cuda")
    amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda" and s["amp"], cache_enabled=False)

    def step_fn(batch):  # forward, backward, clipping, AdamW, EMA: one training step, no host syncs
        with torch.autocast(**amp):
            loss, m = net(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s["grad_clip"])
        opt.step()
        with torch.no_grad():  # ema += (1 - decay) * (params - ema); (_foreach_lerp_ would read ema_w back to Python)
            diff = torch._foreach_sub(params, ema_params)
            torch._foreach_mul_(diff, ema_w)
            torch._foreach_add_(ema_params, diff)
        return m

    # (not for a HuggingFace backbone: its forward is not checked for what capture forbids)
    graphed = dev.type == "cuda" and s["cuda_graph"] and s["world"] == 1 and not s["compile"] and s["backbone"] == "toy"
    run_step = (cuda_graphed(step_fn, dev, warmup=3, before=lambda: opt.zero_grad(set_to_none=True),
                             name="the training step") if graphed else None)
    model.train()
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True, disable=s["rank"] > 0)
    watch_at = watch_steps(steps, s["eval_interval"]) if watch is not None else ()
    for step in bar:
        if step in watch_at:
            watch(model, step)
        parts = [index(robot, torch.randint(len(robot["text"]), (n_rob,), generator=g, device=dev))] if n_rob else []
        parts += [index(vqa, torch.randint(len(vqa["text"]), (n_vqa,), generator=g, device=dev))] if n_vqa else []
        batch = cat(*parts)
        lr.fill_(lr_at(step, steps, s["lr"], s["warmup_steps"], min_lr_frac))
        # ema_w = 1 - decay; the decay ramps 0.1 -> s["ema"], so early on the EMA follows the model, not its random init
        ema_w.fill_(1 - min(s["ema"], (1 + step) / (10 + step)))
        if run_step is not None:
            m = run_step(batch)
        else:
            opt.zero_grad(set_to_none=True)
            m = step_fn(batch)
        if step % 10 == 0:  # reading a number back waits for the device: every 10 steps only
            m = {k: v.item() for k, v in m.items()}
            bar.set_postfix(ce=f"{m['ce_loss']:.3f}", flow=f"{m['flow_loss']:.3f}")
            if history is not None:
                history["train"].append({"step": step, **m})
        # no curve point at the last step: the curve's last point is the final evaluation
        if curve is not None and (step + 1) % s["eval_interval"] == 0 and step + 1 < steps:
            e = curve(ema, step + 1)
            tqdm.write(f"step {step + 1:6d} | success {e['success']:.2f} | FAST acc {e['fast_token_acc']:.2f} "
                       f"| 1st-action err {e['first_action_mse']:.3f}")
    if steps in watch_at:
        watch(model, steps)
    if s["world"] > 1:
        check_ranks_in_sync(model, s)
    return ema


def watch_steps(steps, interval):
    """Where the VLM is watched for damage: every interval / 5 steps over the first 2 intervals (the expert is
    new and its gradients largest: steps 0, 100, ..., 1000 by default), then every interval, and at the end."""
    fine = max(1, interval // 5)
    return sorted({*range(0, min(steps, 2 * interval) + 1, fine), *range(0, steps + 1, interval), steps})


def cuda_graphed(fn, device, warmup=2, before=None, name=None):
    """Speed trick for CUDA, the one CUDA-graph helper: a training step of the toy is ~1,700 small kernels and a
    batch-1 flow chunk ~300, each launched from Python, so the GPU would sit idle most of the time. -> run(batch,
    *tensors): fn(batch, *tensors), captured once as a CUDA graph and replayed with one launch. The first `warmup`
    calls run eagerly on a side stream, as capture requires (their results are real: training steps count); the
    next captures; every later call copies its inputs (CPU or GPU) into the graph's and replays. before() runs
    before each eager call and the capture (training: the optimizer's zero_grad, so the graph allocates the
    gradients in its own memory pool). If capture fails, it says so and stays eager. The outputs are the graph's
    own tensors: the next replay overwrites them."""
    static, extra, out, graph, calls, side = {}, [], None, None, 0, torch.cuda.Stream()
    before = before or (lambda: None)

    def run(batch, *tensors):
        nonlocal out, graph, calls
        calls += 1
        if calls <= warmup or graph is False:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                before()
                out = fn(batch, *tensors)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if graph is None:
            t0, graph = time.perf_counter(), torch.cuda.CUDAGraph()
            static.update({k: v.to(device).clone() for k, v in batch.items()})  # the graph's inputs, on the GPU
            extra.extend(x.to(device).clone() for x in tensors)
            before()
            try:
                with torch.cuda.graph(graph):
                    out = fn(static, *extra)
            except Exception as e:  # e.g. an op that reads a value back to Python inside fn
                graph = False
                tqdm.write(f"warning: CUDA graph capture failed ({type(e).__name__}: {str(e)[:300]}); running eagerly")
                return run(batch, *tensors)
            if name:
                tqdm.write(f"CUDA graph: {name} captured in {time.perf_counter() - t0:.2f} s")
        for k, v in batch.items():
            static[k].copy_(v)
        for x, v in zip(extra, tensors):
            x.copy_(v)
        graph.replay()
        return out
    return run


def check_ranks_in_sync(model, s):
    """Averaged gradients keep every rank's parameters identical; check it bit for bit at the end of training."""
    flat = torch.cat([p.detach().flatten().float().cpu() for p in model.parameters()])
    everyone = [torch.zeros_like(flat) for _ in range(s["world"])]
    torch.distributed.all_gather(everyone, flat)
    if not all(torch.equal(everyone[0], x) for x in everyone):
        raise RuntimeError("data parallel: ranks ended with different parameters")
    if s["rank"] == 0:
        print(f"data parallel: parameters identical on all {s['world']} ranks")


# --------------------------------------------------------------------------------------------------
# 5) evaluation: closed-loop rollouts, diagnostics, what the VLM keeps (VQA, probe), gradient interference


@torch.no_grad()
def vqa_accuracy(model, vqa_batch, bs=500):
    """Exact match of every answer token under teacher forcing (= greedy decoding's exact match)."""
    model.eval()
    right = []
    for i in range(0, len(vqa_batch["text"]), bs):
        b = {k: v.to(model.device) for k, v in index(vqa_batch, slice(i, i + bs)).items()}
        h, _, _ = model.forward_vlm(b)
        ok = (model.backbone.lm_head(h).argmax(-1) == b["suffix_target"]) | ~b["suffix_loss"]
        right.append(ok.all(1).cpu())
    return torch.cat(right).float().mean().item()


@torch.inference_mode()  # a little less bookkeeping per op than no_grad: rollouts are many small model calls
def rollouts(model, tasks, seeds, replan, num_steps, instruction=None, record=0, reword=False, seed=0, graph=True):
    """Closed-loop episodes, all envs in lockstep so each model call is batched. reword: every episode's
    instruction said with SYNONYMS (the unseen-wording split), fixed per episode by its seed. The flow's noise
    comes from a generator of its own (seed): evaluating never moves the random stream that training draws from.
    graph (CUDA, flow variants): every call samples all envs' rows, finished ones ignored, so one shape serves the
    whole rollout and flow sampling runs as one captured CUDA graph (graphed_sampler).
    -> success per episode, seconds per action chunk, frames of the first `record` episodes."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    H, A = model.cfg.action_horizon, model.cfg.action_dim
    envs = [kivla.PushEnv(tasks=tasks, render_mode="rgb_array") for _ in seeds]
    record = min(record, len(envs))  # e.g. --gif_episodes above a rank's share of --eval_episodes
    obs = [e.reset(seed=s)[0] for e, s in zip(envs, seeds)]
    if reword:
        instruction = [kivla.paraphrase(e.instruction, np.random.default_rng(s)) for e, s in zip(envs, seeds)]
    elif instruction:
        instruction = [instruction] * len(envs)
    for o, text in zip(obs, instruction or []):
        o["instruction"] = text
    done, success = [False] * len(envs), [False] * len(envs)
    frames = [[e.render()] for e in envs[:record]]
    chunk_time, chunks = 0.0, 0
    all_rows = graph and model.device.type == "cuda" and model.cfg.use_flow
    sample = graphed_sampler(model, model.make_batch(obs), num_steps) if all_rows else None
    while not all(done):
        live = [i for i in range(len(envs)) if not done[i]]
        t0 = time.perf_counter()
        noise = torch.randn(len(live), H, A, generator=g)
        if all_rows:
            z = torch.zeros(len(envs), H, A)
            z[live] = noise  # the live rows get the noise they would get alone
            actions = sample(model.make_batch(obs), z)[live].cpu().numpy()
        else:
            actions = model.predict_actions(model.make_batch([obs[i] for i in live]), num_steps, noise).cpu().numpy()
        chunk_time, chunks = chunk_time + time.perf_counter() - t0, chunks + 1
        for j, i in enumerate(live):
            for a in actions[j, :replan]:
                o, _, term, trunc, info = envs[i].step(a)
                obs[i] = {**o, "instruction": instruction[i]} if instruction else o
                if i < record:
                    frames[i].append(envs[i].render())
                if term or trunc:
                    done[i], success[i] = True, info["success"]
                    break
    for i in range(record):
        frames[i] = (frames[i], envs[i].instruction if not instruction else instruction[i], success[i])
    return np.array(success), chunk_time / max(chunks, 1), frames[:record]


def graphed_sampler(model, batch, num_steps=10):
    """-> sample(batch, noise=None): model.sample_actions (the prefix pass and the Euler steps) for batches of this
    one shape, as a CUDA graph on CUDA; elsewhere (and for a HuggingFace backbone) the plain call."""
    dev = model.device
    if dev.type != "cuda" or isinstance(model.backbone, kivla.HFBackbone):
        return lambda b, noise=None: model.sample_actions(b, num_steps, noise)
    shape = (len(batch["text"]), model.cfg.action_horizon, model.cfg.action_dim)
    run = cuda_graphed(lambda b, z: model.sample_actions(b, num_steps, z), dev)
    return lambda b, noise=None: run(b, torch.randn(shape, device=dev) if noise is None else noise.to(dev)).clone()


@torch.no_grad()
def diagnostics(model, diag, num_steps, seed=0):
    """Three cheap measures on held-out demo states (clean expert labels), to steer training by:
    teacher-forced FAST token accuracy (what the backbone learned about actions; NaN for pi0) and the
    policy's first-action mean squared error (what the robot will do next; 0.47 for always predicting 0),
    and the share of greedy AR FAST decodes that needed fixing (wrong length, stray ids, no "|"): the `fast`
    policy's own failure mode; ki and joint train the same head, so it is measured for them too."""
    model.eval()
    b = {k: v.to(model.device) for k, v in diag.items()}
    N, H, A = len(b["text"]), model.cfg.action_horizon, model.cfg.action_dim
    out = {"fast_token_acc": float("nan"), "malformed_fast": float("nan")}
    if model.cfg.use_fast:
        h, _, _ = model.forward_vlm(b)
        m = b["suffix_loss"]
        out["fast_token_acc"] = (model.backbone.lm_head(h[m]).argmax(-1) == b["suffix_target"][m]).float().mean().item()
        out["malformed_fast"] = (~model.generate_fast_actions(b)[1]).float().mean().item()
    noise = torch.randn(N, H, A, generator=torch.Generator().manual_seed(seed))  # its own stream, as rollouts
    first = model.predict_actions(b, num_steps, noise)[:, 0]  # (N, A)
    out["first_action_mse"] = ((first - b["actions"][:, 0]) ** 2).mean().item()
    return out


def probe_labels(vqa_obs):
    """Question type (0 where, 1 which corner, 2 colour nearest a corner, 3 which moves) and class label per
    VQA row: an 8 x 8 cell, a corner or a colour."""
    kinds, labels = [], []
    for o in vqa_obs:
        word, a = o["instruction"].split()[0], o["answer"]
        kind = {"where": 0, "push": 0, "which": 1, "what": 2, "you": 3}[word]
        kinds.append(kind)
        labels.append((a[0] * 8 // 256) * 8 + a[1] * 8 // 256 if kind == 0 else
                      list(kivla.CORNERS).index(a) if kind == 1 else list(kivla.COLORS).index(a))
    return torch.tensor(kinds), torch.tensor(labels)


@torch.no_grad()
def prefix_features(model, batch, bs=500):
    """(N, D): the backbone's last-layer states averaged over the valid prefix tokens (image | question | state)."""
    model.eval()
    out = []
    for i in range(0, len(batch["text"]), bs):
        b = {k: v.to(model.device) for k, v in index(batch, slice(i, i + bs)).items()}
        h, _, valid = model.encode_prefix(b)
        m = valid.unsqueeze(-1).to(h.dtype)
        out.append(((h * m).sum(1) / m.sum(1)).float().cpu())
    return torch.cat(out)


def probe_accuracy(model, probe, iters=50):
    """Knowledge in the features, not the LM head: a linear classifier per question type on frozen prefix
    features (fit on one VQA set, scored on the held-out one), mean accuracy over the types."""
    (tr_batch, tr_kind, tr_y), (te_batch, te_kind, te_y) = probe
    ftr, fte = prefix_features(model, tr_batch), prefix_features(model, te_batch)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    accs = []
    for k in range(4):
        a, b = tr_kind == k, te_kind == k
        if not a.any() or not b.any():
            continue
        # zeros, not nn.Linear's random init: probing during training must not draw from its random stream
        w, bias = torch.zeros(int(tr_y.max()) + 1, ftr.shape[1], requires_grad=True), torch.zeros(
            int(tr_y.max()) + 1, requires_grad=True)
        lin = lambda f: torch.nn.functional.linear(f, w, bias)  # noqa: E731
        opt = torch.optim.LBFGS([w, bias], max_iter=iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(lin(ftr[a]), tr_y[a]) + 1e-3 * w.pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        with torch.no_grad():
            accs.append((lin(fte[b]).argmax(-1) == te_y[b]).float().mean().item())
    return float(np.mean(accs))


def interference_batch(robot, vqa, n, vqa_frac, cfg, seed=INTERFERENCE_SEED):
    """One fixed batch in training's mix (n rows, vqa_frac of them VQA) and its flow noise and time, drawn
    with a generator of its own: the batch `interference` measures on at every watched step."""
    g = torch.Generator().manual_seed(seed)
    n_vqa = round(n * vqa_frac)
    pick = lambda d, k: index(d, torch.randint(len(d["text"]), (k,), generator=g))  # noqa: E731
    batch = cat(*([pick(robot, n - n_vqa)] if n > n_vqa else []), *([pick(vqa, n_vqa)] if n_vqa else []))
    noise = torch.randn(n, cfg.action_horizon, cfg.action_dim, generator=g)
    time = kivla.sample_tau(n, generator=g)  # as in training
    return batch, noise, time


def interference(model, batch, noise, time):
    """Gradient interference, the problem knowledge insulation solves [1]: on one fixed batch, the gradient each
    term of the loss sends into the VLM's parameters (ViT + backbone): ce_grad = |d CE / d VLM|, flow_grad =
    |d (flow_weight * flow) / d VLM| (exactly 0 for ki: the stop-gradient), and their cosine (0 if either is 0).
    noise and time are given, so no random number is drawn: training's random stream never notices."""
    model.train()
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    ce, flow = model.loss_terms(batch, noise, time)
    flat = lambda gs: torch.cat([g.flatten().float() for g in gs])  # noqa: E731
    g_ce = flat(torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True, materialize_grads=True))
    g_flow = torch.zeros_like(g_ce)
    if model.cfg.use_flow and model.cfg.flow_weight > 0:
        g_flow = flat(torch.autograd.grad(model.cfg.flow_weight * flow, params, allow_unused=True,
                                          materialize_grads=True))
    n_ce, n_flow = g_ce.norm(), g_flow.norm()
    cos = (g_ce @ g_flow) / (n_ce * n_flow) if n_ce > 0 and n_flow > 0 else torch.zeros(())
    return {"ce_grad": n_ce.item(), "flow_grad": n_flow.item(), "grad_cos": cos.item()}


def watch_summary(watched):
    """The watched steps in four numbers: the flow term's gradient into the VLM relative to the CE's and their
    cosine (means over the watched steps after step 0), and the lowest VQA and probe accuracy of the training
    weights (what damage would lower)."""
    w = [r for r in watched if r["step"] > 0] or watched
    return {"flow_to_ce_grad": float(np.mean([r["flow_grad"] / max(r["ce_grad"], 1e-12) for r in w])),
            "grad_cos": float(np.mean([r["grad_cos"] for r in w])),
            "vqa_acc_min_train": min(r["vqa_acc"] for r in watched),
            "probe_acc_min_train": min(r["probe_acc"] for r in watched)}


def steps_to(history, level=0.5):
    """First step the curve's success reaches `level`, linearly interpolated between evaluations; NaN if never."""
    s0, v0 = 0, 0.0
    for r in history["eval"]:
        if r["success"] >= level:
            return s0 + (level - v0) / max(r["success"] - v0, 1e-9) * (r["step"] - s0)
        s0, v0 = r["step"], r["success"]
    return float("nan")


def scripted_success(seeds, tasks="train"):
    """The scripted policy's (noise-free) success rate on the evaluation seeds, for comparison."""
    env, ok = kivla.PushEnv(tasks=tasks), []
    for seed in seeds:
        env.reset(seed=seed)
        while True:
            _, _, term, trunc, info = env.step(kivla.scripted_action(env))
            if term or trunc:
                break
        ok.append(info["success"])
    return float(np.mean(ok))


def _median_time(fn, reps=15):
    """Median seconds of fn(), waiting for the GPU to finish each call (its kernels run asynchronously)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def latency(model, obs, num_steps, reps=20):
    """Median seconds per action chunk at batch 1 (prefix encode + the variant's own decoding; on CUDA both
    replayed as a CUDA graph: the flow's Euler steps, or AR decoding of as many tokens as this chunk takes)."""
    b = model.make_batch([obs])
    if model.cfg.variant == "fast":
        n = model.generate_fast_tokens(b).shape[1]  # greedy decoding up to and including "|"
        decode = graphed_fast(model, b, n)
        return _median_time(lambda: decode(b), reps=reps)
    sample = graphed_sampler(model, b, num_steps)
    return _median_time(lambda: sample(b), reps=reps)


def _sample_obs():
    return kivla.PushEnv().reset(seed=EVAL_SEED)[0]


# --------------------------------------------------------------------------------------------------
# 6) outputs: checkpoints, metrics (strict JSON), curves.png, interference.png, rollouts.gif


def write_run(s, tag, ema, metrics, history, episodes):
    """One robot-training run's outputs: ckpt.pt (the EMA weights + settings + metrics), curves.png,
    interference.png, history.json and rollouts.gif (tag: "_<row>" under --compare, "_seed<k>" for --seeds)."""
    out = s["out_dir"]
    ema.cpu().save(os.path.join(out, f"ckpt{tag}.pt"), settings={k: v for k, v in s.items() if k != "device"},
                   metrics=metrics)
    draw_curves(history, os.path.join(out, f"curves{tag}.png"))
    draw_interference([(metrics["variant"], [history["vlm"]])], os.path.join(out, f"interference{tag}.png"))
    write_json(history, os.path.join(out, f"history{tag}.json"), indent=None)
    write_gif(episodes, os.path.join(out, f"rollouts{tag}.gif"))


def write_results(s, results):
    """The whole job's metrics.json (one run's summary, or every row's under --compare: then compare.md,
    compare.png and interference.png too). -> what metrics.json holds."""
    out = results[0] if not s["compare"] else {"compare": results}
    write_json(out, os.path.join(s["out_dir"], "metrics.json"))
    if s["compare"]:
        write_compare(results, s, os.path.join(s["out_dir"], "compare.md"), os.path.join(s["out_dir"], "compare.png"))
        print(open(os.path.join(s["out_dir"], "compare.md")).read())
    return out


SPREAD = ("success", "heldout_success", "unseen_color_success", "unseen_wording_success", "vqa_acc_after",
          "probe_acc_after", "steps_to_50pct", "steps_to_80pct", "fast_token_acc", "first_action_mse", "malformed_fast",
          "flow_to_ce_grad", "grad_cos", "vqa_acc_min_train", "probe_acc_min_train")


def summarize(runs):
    """Per-seed metrics -> one dict: the mean of every number, the std of the headline ones, every run."""
    out = {k: v for k, v in runs[0].items() if k != "seed"}  # settings shared by every run stay as they are
    for k, v in out.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and len({r[k] for r in runs}) > 1:
            out[k] = float(np.mean([r[k] for r in runs]))
    out.update({f"{k}_std": float(np.std([r[k] for r in runs])) for k in SPREAD})
    out.update(seeds=[r["seed"] for r in runs], n_seeds=len(runs), runs=runs)
    return out


def write_json(obj, path, indent=2):
    """Strict JSON: a number that is not finite (NaN: a split or measure a run does not have) is written as null."""
    def strict(x):
        if isinstance(x, dict):
            return {k: strict(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [strict(v) for v in x]
        return None if isinstance(x, float) and not math.isfinite(x) else x
    with open(path, "w") as f:
        json.dump(strict(obj), f, indent=indent, allow_nan=False)


def read_json(path):
    """write_json's inverse for metrics: null -> NaN (the summaries and tables expect numbers)."""
    def loose(x):
        if isinstance(x, dict):
            return {k: loose(v) for k, v in x.items()}
        return [loose(v) for v in x] if isinstance(x, list) else float("nan") if x is None else x
    with open(path) as f:
        return loose(json.load(f))


def draw_curves(history, path, size=(760, 320)):
    """Left: CE and flow loss (log scale, moving average of 10 logs); right: success, teacher-forced FAST
    token accuracy and first-action error on held-out states vs step."""
    img = Image.new("RGB", size, "white")
    dr = ImageDraw.Draw(img)
    W, H, L, T, B = size[0] // 2, size[1], 42, 24, 28  # panel width, height, left/top/bottom margins
    xmax = max([r["step"] for r in history["train"] + history["eval"]] + [1])
    tr, ev = history["train"], history["eval"]
    k = max(1, min(10, len(tr) // 4))  # moving average over k logged steps (fewer in a short run: still a line)

    def smooth(key):
        if not tr:
            return [], np.ones(0)
        return [r["step"] for r in tr][k - 1:], np.convolve([max(r[key], 1e-4) for r in tr], np.ones(k) / k, "valid")

    series = [[("ce_loss", (200, 60, 40), *smooth("ce_loss")), ("flow_loss", (40, 90, 200), *smooth("flow_loss"))],
              [(k, c, [r["step"] for r in ev if np.isfinite(r[k])], [min(r[k], 1.0) for r in ev if np.isfinite(r[k])])
               for k, c in (("success", (30, 150, 60)), ("fast_token_acc", (200, 60, 40)),
                            ("first_action_mse", (40, 90, 200)))]]
    for p, panel in enumerate(series):
        x0, log = p * W, p == 0
        vals = np.concatenate([np.log10(v) if log else np.asarray(v, float) for _, _, _, v in panel] + [[0.0]])
        lo, hi = (math.floor(vals.min()), math.ceil(vals.max() + 1e-9)) if log else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1
        X = lambda s: x0 + L + s / xmax * (W - L - 10)  # noqa: E731
        Y = lambda v: T + (hi - v) / (hi - lo) * (H - T - B)  # noqa: E731
        dr.rectangle([x0 + L, T, x0 + W - 10, H - B], outline=(150, 150, 150))
        for tick in range(int(lo), int(hi) + 1) if log else (0.0, 0.5, 1.0):
            dr.text((x0 + 4, Y(tick) - 6), f"1e{tick}" if log else f"{tick:.1f}", fill="black")
        dr.text((x0 + L, 6), "training loss (log)" if log else "held-out: success, FAST acc, 1st-action err",
                fill="black")
        dr.text((x0 + W - 90, H - B + 8), f"step {xmax}", fill="black")
        for i, (name, color, steps, v) in enumerate(panel):
            ys = np.log10(v) if log else np.asarray(v, float)
            pts = [(X(s), Y(y)) for s, y in zip(steps, ys)]
            if len(pts) > 1:
                dr.line(pts, fill=color, width=2)
            for q in pts if not log else []:
                dr.ellipse([q[0] - 2, q[1] - 2, q[0] + 2, q[1] + 2], fill=color)
            legend = (x0 + W - 120, T + 6 + (14 * i if log else 0.3 * (H - T - B) + 14 * i))  # rates: mid-height
            dr.text(legend, name, fill=color)
    img.save(path)


def draw_interference(rows, path, size=(900, 560)):
    """interference.png: what the flow loss does to the VLM, rows side by side (mean over seeds).
    rows: [(name, [history["vlm"] of each seed])]. Top: the gradient norms the flow term (thick) and the CE
    (thin) send into the VLM (log; an exact 0, ki's stop-gradient, sits on the floor), and their cosine. Bottom:
    the training weights' VQA accuracy and linear-probe accuracy (the knowledge the flow term could erode)."""
    img = Image.new("RGB", size, "white")
    dr = ImageDraw.Draw(img)
    palette = [(30, 150, 60), (200, 60, 40), (40, 90, 200), (150, 60, 160), (120, 200, 130), (240, 150, 130)]
    W, H, L, T, B = size[0] // 2, (size[1] - 20) // 2, 46, 22, 24
    xmax = max([r["step"] for _, hs in rows for h in hs for r in h] + [1])
    mean = lambda hs, k: np.mean([[r[k] for r in h] for h in hs], 0)  # noqa: E731  (seeds share the steps)
    floor = -5.0  # log10 of the smallest norm drawn; 0 is drawn there
    panels = [("gradient norm into the VLM: flow (thick), CE (thin); log", ("flow_grad", "ce_grad"), True),
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
        ticks = range(int(lo), int(hi) + 1, 2) if log else (lo, (lo + hi) / 2, hi)
        for tick in ticks:
            dr.text((x0 + 4, Y(tick) - 6), ("0" if tick == floor else f"1e{tick}") if log else f"{tick:.1f}",
                    fill="black")
        dr.text((x0 + L, y0 + 6), title, fill="black")
        dr.text((x0 + W - 90, y0 + H - B + 8), f"step {xmax}", fill="black")
        for i, (name, hs) in enumerate(rows):
            steps = [r["step"] for r in hs[0]]
            for j, k in enumerate(keys):
                v = mean(hs, k)
                v = np.log10(np.maximum(v, 10 ** floor)) if log else v
                pts = [(X(st), Y(y)) for st, y in zip(steps, v)]
                if len(pts) > 1:
                    dr.line(pts, fill=palette[i % len(palette)], width=3 if j == 0 else 1)
                for q in pts:
                    dr.ellipse([q[0] - 2, q[1] - 2, q[0] + 2, q[1] + 2], fill=palette[i % len(palette)])
    head = "what the flow loss sends into the VLM, and what the VLM keeps (mean over seeds):"
    dr.text((8, 4), head, fill="black")
    x = 8 + dr.textlength(head) + 8
    for i, (name, _) in enumerate(rows):  # the legend: each row's name in its colour
        dr.text((x, 4), name, fill=palette[i % len(palette)])
        x += dr.textlength(name) + 12
    img.save(path)


def write_gif(episodes, path):
    if not episodes:
        return
    frames = []
    for ep_frames, instruction, success in episodes:
        for t, f in enumerate(ep_frames):
            img = Image.fromarray(f).convert("RGB")
            dr = ImageDraw.Draw(img)
            dr.rectangle([0, 0, img.width, 14], fill="white")
            dr.text((3, 2), instruction, fill="black")
            if t == len(ep_frames) - 1:
                dr.text((3, img.height - 14), "SUCCESS" if success else "failed",
                        fill=(0, 140, 0) if success else (200, 0, 0))
            frames.append(img.quantize(method=Image.Quantize.FASTOCTREE))  # a faster quantizer than save()'s
        frames.extend([frames[-1]] * 5)  # hold the last frame
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0)


# --------------------------------------------------------------------------------------------------
# 7) the main job: python train_toy.py


def main(argv):
    s, cfg = parse_args(argv)
    s["device"] = pick_device(s["device"])
    s["rank"], s["world"] = setup_distributed(s)
    if s["rank"] > 0:  # under torchrun only rank 0 prints (and writes outputs; see run_variant)
        with contextlib.redirect_stdout(io.StringIO()):
            return run(s, cfg)
    return run(s, cfg)


def deterministic(s):
    """Same seed, same numbers (on one CPU): deterministic algorithms only, but without also filling every new
    tensor with NaN (fill_uninitialized_memory), which no correct op reads and which costs ~2.5% of a CPU step."""
    torch.use_deterministic_algorithms(s["device"] == "cpu")  # reset too: a CUDA run after a CPU one
    torch.utils.deterministic.fill_uninitialized_memory = False


def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    ok = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not ok.get(name, False):
        raise SystemExit(f"error: --device={name} is not available here (choose from auto, cpu, cuda, mps)")
    return name


def setup_distributed(s):
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK: one process per GPU (nccl) or per CPU share (gloo).
    -> rank, world size. Without torchrun: 0, 1 and nothing changes."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if s["batch_size"] % world:
        raise SystemExit(f"error: --batch_size={s['batch_size']} must be a multiple of the {world} processes")
    if s["device"] == "cuda":
        local, n_gpu = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local >= n_gpu:
            raise SystemExit(f"error: torchrun started process {local} but this machine has {n_gpu} GPU(s): "
                             f"use --nproc_per_node<={n_gpu}, or --device=cpu for gloo on CPU shares")
        s["device"] = f"cuda:{local}"
        torch.cuda.set_device(s["device"])
    torch.distributed.init_process_group("nccl" if s["device"].startswith("cuda") else "gloo")
    return torch.distributed.get_rank(), world


def run(s, cfg):
    torch.manual_seed(s["seed"])
    deterministic(s)
    if s["eval_only"]:
        return eval_only(s)
    if s["merge"]:
        return merge(s)
    if s["bench"] or s["figures"]:
        return bench(s, cfg)
    t_start = time.time()
    os.makedirs(s["out_dir"], exist_ok=True)
    # 1) demonstrations, the VQA pool and the held-out sets (under torchrun every rank makes the same)
    train_tasks = kivla.task_splits(s["unseen_color"])["train"]
    obs, chunks, tasks, scripted_rate = collect_demos(s["n_demos"], cfg.action_horizon, s["demo_noise"],
                                                      s["seed"], train_tasks)
    vqa_pool = make_vqa_set(s["n_vqa"], s["seed"])
    d_obs, d_chunks, vqa_probe, vqa_eval = held_out_sets(s["quick"], cfg.action_horizon, train_tasks)
    print(f"demos: {s['n_demos']} episodes, {len(obs)} samples, scripted-policy success {scripted_rate:.2f} "
          "(noisy execution)")
    pick = np.random.default_rng(0).permutation(len(d_obs))[:400]
    # 2) FAST tokenizer (deterministic: the same demos give the same tokenizer as a cached pretraining run's)
    init = load_checkpoint(s["init_from"]) if s["init_from"] else None
    tok = kivla.FASTTokenizer(s["fast_scale"], s["fast_vocab"]).fit(chunks)
    if init and init["fast_tokenizer"]["vocab_size"] != tok.vocab_size:
        raise SystemExit(f"error: {s['init_from']} has fast_vocab={init['fast_tokenizer']['vocab_size']}, "
                         f"not {tok.vocab_size}")
    n_fast = np.mean([len(tok.encode(c)) for c in chunks[:2000]])
    print(f"FAST: {n_fast:.1f} tokens/chunk vs {chunks.shape[1] * chunks.shape[2]} for per-dimension binning")
    # 3) the VLM every robot run starts from: it makes the batches now, and gets its weights from the toy
    # VLM pretraining (or --init_from) below
    vlm = build_model(s, cfg, tok)
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in vlm.num_params().items()))
    if init:
        load_vlm_weights(vlm, init["model"])  # fail now, not after minutes of work
    eval_batch = vlm.make_batch(vqa_eval)
    data = Data(demos=(obs, chunks), diag=([d_obs[i] for i in pick], d_chunks[pick]),
                vqa=vlm.make_batch(vqa_pool), vqa_eval=eval_batch,
                probe=((vlm.make_batch(vqa_probe), *probe_labels(vqa_probe)), (eval_batch, *probe_labels(vqa_eval))),
                probe_iters=50 if not s["quick"] else 10)
    if init:
        weights, vqa_before = init["model"], init.get("vqa_acc", float("nan"))
        print(f"VLM weights from {s['init_from']} (VQA accuracy {vqa_before:.3f})")
    else:
        weights, vqa_before = pretrain_vlm(s, cfg, tok, data.vqa, data.vqa_eval)
        print(f"VLM pretraining: VQA accuracy {vqa_before:.3f} on held-out scenes "
              f"({time.time() - t_start:.0f} s so far)")
        load_vlm_weights(vlm, weights)  # (--init_from's weights are in it already)
    data.probe_before = probe_accuracy(vlm.to(s["device"]), data.probe, data.probe_iters)
    # 4) + 5) robot training and evaluation: one variant or all of them, for --seeds training seeds each
    picked = s["variants"].split(",") if s["variants"] else [name for name, _, _ in COMPARE_ROWS]
    rows = [r for r in COMPARE_ROWS if r[0] in picked] if s["compare"] else [(cfg.variant, cfg.variant, {})]
    seeds = [s["seed"] + i for i in range(s["seeds"])]
    if s["compare"] and s["rank"] == 0:
        estimate_compare_time(s, cfg, tok, data, len(rows) * len(seeds))
    results = []
    for name, v, override in rows:
        c = kivla.Config(**{**asdict(cfg), "variant": v})
        runs = []
        for seed in seeds:
            tag = (f"_{name}" if s["compare"] else "") + (f"_seed{seed}" if len(seeds) > 1 else "")
            m = run_variant({**s, **override}, c, tok, data, weights, vqa_before, seed, tag)
            if m is None:  # not rank 0
                continue
            m.update(row=name, fast_tokens_per_chunk=float(n_fast), demo_samples=len(obs))
            runs.append(m)
            print(f"{name:5s} seed {seed} | success {m['success']:.3f} | held-out combos {m['heldout_success']:.3f} | "
                  f"unseen colour {m['unseen_color_success']:.3f} | unseen wording {m['unseen_wording_success']:.3f} | "
                  f"FAST acc {m['fast_token_acc']:.2f} | 1st-action err {m['first_action_mse']:.3f} | "
                  f"VQA {m['vqa_acc_before']:.2f} -> {m['vqa_acc_after']:.2f} | "
                  f"{m['latency_ms_per_chunk_b1']:.1f} ms/chunk")
        results.append(summarize(runs) if runs else None)
    if s["rank"] > 0:
        torch.distributed.barrier()  # until rank 0 has written everything
        torch.distributed.destroy_process_group()
        return None
    scripted_ok = scripted_success(range(EVAL_SEED, EVAL_SEED + s["eval_episodes"]), train_tasks)
    wall = time.time() - t_start
    for r in results:
        r.update(scripted_success=scripted_ok, wall_time_s=wall)
        if len(seeds) > 1:
            print(f"{r['runs'][0]['row']:5s} over {len(seeds)} seeds: " + " | ".join(
                f"{name} {r[k]:.3f} ± {r[k + '_std']:.3f} (worst {min(x[k] for x in r['runs']):.3f})" for k, name in
                (("success", "success"), ("heldout_success", "held-out combos"),
                 ("unseen_color_success", "unseen colour"), ("unseen_wording_success", "unseen wording"))))
    out = write_results(s, results)
    print(f"scripted policy on the same seeds: {scripted_ok:.2f}; wall {wall / 60:.1f} min; wrote {s['out_dir']}/")
    if s["quick"]:
        print("--quick is a smoke test of the whole pipeline: its 80 robot steps are too few to learn the task, so "
              "success 0.000 is expected; the default run (python train_toy.py) learns it")
    if s["world"] > 1:
        torch.distributed.barrier()  # the other ranks may go now
        torch.distributed.destroy_process_group()
    return out


def run_variant(s, cfg, tok, data, init, vqa_before, seed, tag=""):
    """Robot training of one variant and one seed from the pretrained VLM weights, then the full evaluation.
    The action expert starts from a fresh random init per seed (the pretrained checkpoint has none worth keeping)."""
    t_start = time.time()
    torch.manual_seed(seed)
    model = build_model(s, cfg, tok).to(s["device"])
    load_vlm_weights(model, init)
    robot, diag = model.make_batch(*data.demos), model.make_batch(*data.diag)  # per variant: pi0 has no FAST
    history = {"train": [], "eval": [], "vlm": []}
    n_curve, splits = min(50, s["eval_episodes"]), kivla.task_splits(s["unseen_color"])
    fixed = interference_batch(robot, data.vqa, s["batch_size"], s["vqa_frac"], cfg)
    # the watch's VQA and probe sets: half of the final evaluation's (1000 / 500 rows by default), so that the
    # 15 watched steps stay a small part of a run's time
    (tr, tr_kind, tr_y), (te, te_kind, te_y) = data.probe
    n_tr, n_te = len(tr_y) // 2, len(te_y) // 2
    probe = ((index(tr, slice(n_tr)), tr_kind[:n_tr], tr_y[:n_tr]), (index(te, slice(n_te)), te_kind[:n_te], te_y[:n_te]))

    watch_time = [0.0]

    def watch(model, step):  # the training weights (the EMA would hide early damage): gradients, VQA, probe
        t0 = time.perf_counter()
        history["vlm"].append({"step": step, **interference(model, *fixed), "vqa_acc": vqa_accuracy(model, probe[1][0]),
                               "probe_acc": probe_accuracy(model, probe, data.probe_iters)})
        model.train()
        watch_time[0] += time.perf_counter() - t0

    def curve(ema, step):  # the flow noise of its rollouts comes from its own generator: training never notices
        ok, _, _ = rollouts(ema, splits["train"], range(CURVE_SEED, CURVE_SEED + n_curve), s["replan"], s["num_steps"],
                            seed=CURVE_SEED, graph=s["cuda_graph"])
        history["eval"].append({"step": step, "success": float(ok.mean()), **diagnostics(ema, diag, s["num_steps"])})
        return history["eval"][-1]

    ema = train(model, {**s, "seed": seed}, robot, data.vqa, s["train_steps"], s["vqa_frac"],
                f"train {cfg.variant} seed {seed}", curve if s["rank"] == 0 else None, history,
                watch if s["rank"] == 0 else None)
    train_time = time.time() - t_start
    if s["rank"] > 0:  # evaluation and outputs: rank 0 only
        return None
    seeds, n_gif = range(EVAL_SEED, EVAL_SEED + s["eval_episodes"]), s["gif_episodes"]
    run = lambda tasks, record, reword=False: rollouts(ema, tasks, seeds, s["replan"], s["num_steps"],  # noqa: E731
                                                       record=record, reword=reword, seed=EVAL_SEED,
                                                       graph=s["cuda_graph"])
    ok_in, chunk_s, episodes = run(splits["train"], n_gif)  # the same seeds on every split
    ok_out, _, more = run(splits["heldout"], n_gif)
    ok_color, _, colored = (run(splits["unseen_color"], n_gif // 2) if splits["unseen_color"]
                            else (np.array([np.nan]), 0, []))
    ok_words, _, worded = run(splits["train"], n_gif // 2, reword=True)
    # the curve's last point is the final evaluation (its 200 episodes, not another 50 on the curve's seeds)
    history["eval"].append({"step": s["train_steps"], "success": float(ok_in.mean()),
                            **diagnostics(ema, diag, s["num_steps"])})
    metrics = {
        "variant": cfg.variant, "seed": seed, "vqa_frac": s["vqa_frac"], "flow_weight": cfg.flow_weight,
        "success": float(ok_in.mean()), "heldout_success": float(ok_out.mean()),
        "unseen_color_success": float(ok_color.mean()), "unseen_wording_success": float(ok_words.mean()),
        "unseen_color": s["unseen_color"], "eval_episodes": s["eval_episodes"],
        **{k: v for k, v in history["eval"][-1].items() if k not in ("step", "success")},
        "vqa_acc_before": vqa_before, "vqa_acc_after": vqa_accuracy(ema, data.vqa_eval),
        "probe_acc_before": data.probe_before,
        "probe_acc_after": probe_accuracy(ema, data.probe, data.probe_iters),
        "steps_to_50pct": steps_to(history, 0.5), "steps_to_80pct": steps_to(history, 0.8),
        "curve": [(r["step"], r["success"]) for r in history["eval"]],
        **watch_summary(history["vlm"]), "vlm_watch": history["vlm"],
        "latency_ms_per_chunk_b1": 1000 * latency(ema, _sample_obs(), s["num_steps"], 20 if not s["quick"] else 3),
        "batched_eval_ms_per_chunk": 1000 * chunk_s, "train_time_s": train_time, "watch_time_s": watch_time[0],
        "run_time_s": time.time() - t_start, "device": s["device"], "train_steps": s["train_steps"],
    }
    write_run(s, tag, ema, metrics, history, episodes + more + colored + worded)
    return metrics


# ==================================================================================================
# TOOLS: not needed to follow the main job. --eval_only; --compare and --merge (compare.md);
# --bench and --figures (timings, attention.png, fast_tokens.png)


def eval_only(s):
    model = kivla.KIVLA.from_checkpoint(s["init_from"], device=s["device"])
    tasks, text = "train", s["instruction"]
    if text:
        _, unknown = model.vocab.words(text)
        if unknown:
            print(f"warning: words the model has never seen (read as <unk>): {unknown}")
        color = [c for c in kivla.COLORS if c in text.split()]
        corner = [k for k in kivla.CORNERS if k in text]
        tasks = [(color[0], corner[0])] if color and corner else "all"  # success only means something if parsed
        print(f"instruction: {text!r} -> task {tasks if tasks != 'all' else '(not parsed: success not meaningful)'}")
    torch.manual_seed(s["seed"])
    n = s["gif_episodes"] * 2
    ok, _, eps = rollouts(model, tasks, range(EVAL_SEED, EVAL_SEED + n), s["replan"], s["num_steps"], text or None, n,
                          graph=s["cuda_graph"])
    os.makedirs(s["out_dir"], exist_ok=True)
    path = os.path.join(s["out_dir"], "try.gif")
    write_gif(eps, path)
    print(f"success {ok.mean():.2f} over {n} seeds; wrote {path}")
    return {"success": float(ok.mean())}


# compare.md: (metric, column header, the paper's claim it measures)
COMPARE_COLUMNS = [("success", "success in-dist", ""), ("heldout_success", "held-out combos", "generalize"),
                   ("unseen_color_success", "unseen colour", "generalize"),
                   ("unseen_wording_success", "unseen wording", "generalize"),
                   ("vqa_acc_after", "VQA after (before {vqa_acc_before:.2f})", "retention: head"),
                   ("probe_acc_after", "VQA probe after (before {probe_acc_before:.2f})", "retention: features"),
                   ("steps_to_50pct", "steps to 50%", "train fast"), ("steps_to_80pct", "steps to 80%", "train fast"),
                   ("flow_to_ce_grad", "flow / CE gradient into the VLM", "insulation"),
                   ("vqa_acc_min_train", "lowest VQA while training", "retention: head"),
                   ("latency_ms_per_chunk_b1", "ms/chunk, batch 1", "run fast"),
                   ("malformed_fast", "malformed FAST decodes", "")]


def estimate_compare_time(s, cfg, tok, data, n_runs):
    """Print the expected wall clock of --compare before starting it: training steps/s and the cost of an
    evaluation episode (worst case: a policy that never succeeds), both measured on a throwaway model."""
    torch.manual_seed(0)
    m = build_model(s, cfg, tok).to(s["device"])
    robot = m.make_batch(*[x[:256] for x in data.demos])
    train(m, {**s, "seed": 0}, robot, data.vqa, 2, s["vqa_frac"], "estimate")  # warm-up
    t0 = time.perf_counter()
    train(m, {**s, "seed": 0}, robot, data.vqa, 5, s["vqa_frac"], "estimate")
    sps = 5 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    rollouts(m, "train", range(2), s["replan"], s["num_steps"], graph=s["cuda_graph"])
    per_episode = (time.perf_counter() - t0) / 2 / 4  # episodes run in lockstep batches: ~4x cheaper at 100+
    n_eval = 4 * s["eval_episodes"] + min(50, s["eval_episodes"]) * ((s["train_steps"] - 1) // s["eval_interval"])
    minutes = n_runs * (s["train_steps"] / sps + n_eval * per_episode) / 60
    print(f"compare: {n_runs} runs of {s['train_steps']} steps at {sps:.1f} steps/s + {n_eval} evaluation "
          f"episodes each -> about {minutes:.0f} min on this machine")


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
    """compare.md: one row per variant, mean ± std over seeds; compare.png: success vs step with the spread."""
    r0 = results[0]
    head = [h.format(**r0) for _, h, _ in COMPARE_COLUMNS]
    lines = [f"Robot training from one pretrained toy VLM, {s['train_steps']} steps, {s['eval_episodes']} held-out "
             f"evaluation episodes per split, unseen colour {r0['runs'][0]['unseen_color'] or 'none'}; mean ± std "
             "over the training seeds of each row.", "",
             "| variant | seeds | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|",
             "| claim | | " + " | ".join(c for _, _, c in COMPARE_COLUMNS) + " |"]
    for r in results:
        lines.append(f"| {r['runs'][0]['row']} | {','.join(map(str, r['seeds']))} | "
                     + " | ".join(fmt([x[k] for x in r["runs"]], k) for k, _, _ in COMPARE_COLUMNS) + " |")
    with open(path_md, "w") as f:
        f.write("\n".join(lines) + "\n")
    flows = [(r["runs"][0]["row"], [x["vlm_watch"] for x in r["runs"]]) for r in results
             if r["runs"][0]["variant"] != "fast" and all("vlm_watch" in x for x in r["runs"])]
    if flows:  # every row with a flow term, on shared axes
        draw_interference(flows, os.path.join(os.path.dirname(path_md), "interference.png"))
    # success vs step: mean line, min..max band over seeds
    size, L, T, B, R = (760, 360), 46, 28, 30, 150
    img = Image.new("RGB", size, "white")
    dr = ImageDraw.Draw(img)
    xmax = max(st for r in results for x in r["runs"] for st, _ in x["curve"])
    X = lambda st: L + st / xmax * (size[0] - L - R)  # noqa: E731
    Y = lambda v: T + (1 - v) * (size[1] - T - B)  # noqa: E731
    dr.rectangle([L, T, size[0] - R, size[1] - B], outline=(150, 150, 150))
    for v in (0.0, 0.5, 1.0):
        dr.text((8, Y(v) - 6), f"{v:.1f}", fill="black")
    dr.text((L, 8), "success (curve seeds) vs robot-training step: mean over seeds, band = min..max", fill="black")
    dr.text((size[0] - R - 60, size[1] - B + 8), f"step {xmax}", fill="black")
    palette = [(30, 150, 60), (200, 60, 40), (40, 90, 200), (150, 60, 160), (120, 200, 130), (240, 150, 130)]
    for i, r in enumerate(results):
        steps = [st for st, _ in r["runs"][0]["curve"]]
        v = np.array([[val for _, val in x["curve"]] for x in r["runs"]])  # (seeds, points)
        c = palette[i % len(palette)]
        light = tuple(int(255 - 0.25 * (255 - ch)) for ch in c)
        if len(steps) > 1:
            band = ([(X(st), Y(hi)) for st, hi in zip(steps, v.max(0))]
                    + [(X(st), Y(lo)) for st, lo in zip(steps[::-1], v.min(0)[::-1])])
            dr.polygon(band, fill=light)
    for i, r in enumerate(results):
        steps = [st for st, _ in r["runs"][0]["curve"]]
        v = np.array([[val for _, val in x["curve"]] for x in r["runs"]]).mean(0)
        c = palette[i % len(palette)]
        pts = [(X(st), Y(val)) for st, val in zip(steps, v)]
        if len(pts) > 1:
            dr.line(pts, fill=c, width=2)
        for x, y in pts:
            dr.ellipse([x - 2, y - 2, x + 2, y + 2], fill=c)
        dr.text((size[0] - R + 10, T + 16 * i), r["runs"][0]["row"], fill=c)
    img.save(path_png)


def merge(s):
    """--merge=DIR,DIR,...: the per-seed metrics of several runs (--compare runs, with any --variants, or single
    runs) -> one compare.md and compare.png in --out_dir, so a comparison can be built over several sittings or
    machines. The runs of one row are pooled; the same row and seed twice, or different budgets, is an error."""
    rows = {}
    for d in s["merge"].split(","):
        path = os.path.join(d, "metrics.json")
        if not os.path.isfile(path):
            raise SystemExit(f"error: --merge: no {path}")
        m = read_json(path)
        for run in [x for r in (m["compare"] if "compare" in m else [m]) for x in r["runs"]]:
            runs = rows.setdefault((run["row"], run.get("flow_weight", 1.0)), [])
            if any(x["seed"] == run["seed"] for x in runs):
                raise SystemExit(f"error: --merge: row {run['row']} seed {run['seed']} is in more than one run")
            runs.append({**run, "from": d})
    budgets = {(x["train_steps"], x["eval_episodes"], x["unseen_color"]) for runs in rows.values() for x in runs}
    if len(budgets) > 1:
        raise SystemExit(f"error: --merge: the runs differ in (train_steps, eval_episodes, unseen_color): "
                         f"{sorted(budgets)}")
    if len({fw for _, fw in rows}) > 1:  # runs at several flow weights (alpha): each (row, alpha) a row of its own
        for (name, fw), runs in rows.items():
            for x in runs:
                x["row"] = f"{name} alpha={fw:g}"
    order = [name for name, _, _ in COMPARE_ROWS]
    results = [summarize(rows[k]) for k in sorted(rows, key=lambda k: (k[1], order.index(k[0]) if k[0] in order
                                                                       else len(order), k[0]))]
    (steps, episodes, _), = budgets
    os.makedirs(s["out_dir"], exist_ok=True)
    write_compare(results, {**s, "train_steps": steps, "eval_episodes": episodes},
                  os.path.join(s["out_dir"], "compare.md"), os.path.join(s["out_dir"], "compare.png"))
    write_json({"compare": results}, os.path.join(s["out_dir"], "metrics.json"))
    print(open(os.path.join(s["out_dir"], "compare.md")).read())
    return {"compare": results}


def steady_time(run, n):
    """Seconds per step of run(steps) once warmed up: after one untimed call, (time of 2n steps - time of n steps) / n,
    so that what every call pays once (a CUDA graph's capture, the optimizer's first steps) cancels out."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    run(n)
    times = []
    for steps in (n, 2 * n):
        sync()
        t0 = time.perf_counter()
        run(steps)
        sync()
        times.append(time.perf_counter() - t0)
    return (times[1] - times[0]) / n


def train_speed(s, cfg, tok, obs, chunks, steps=40):
    """Robot-training steps per second with the real loop (batch, loss, backward, AdamW, EMA), as the default
    run trains (on CUDA: the captured step). -> steps/s, and the model and datasets it trained on."""
    torch.manual_seed(s["seed"])
    model = build_model(s, cfg, tok).to(s["device"])
    robot, vqa = model.make_batch(obs, chunks), model.make_batch(make_vqa_set(400, s["seed"]))
    sps = 1 / steady_time(lambda n: train(model, s, robot, vqa, n, s["vqa_frac"], "bench train"), steps)
    return sps, (model, robot, vqa)


def bench_gpu_step(s, model, robot, vqa, n=20):
    """On CUDA: kernels per training step and the share of the step's wall time that the GPU is busy
    (torch.profiler over 2n minus n steps), eager and captured; then samples/s at batch 64 and at the largest
    batch (doubling) whose step takes under 2x the batch-64 step."""
    from torch.profiler import ProfilerActivity, profile
    for graph in (False, True) if s["backbone"] == "toy" else (False,):  # train() captures the toy only
        counts = []
        for steps in (n, 2 * n):
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:  # the GPU's events only: less to parse
                t0 = time.perf_counter()
                train(model, {**s, "cuda_graph": graph}, robot, vqa, steps, s["vqa_frac"], "bench profile")
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            counts.append((len(kernels), sum(e.device_time for e in kernels) / 1e6, wall))
        (k1, b1, w1), (k2, b2, w2) = counts
        print(f"train step, {'CUDA graph' if graph else 'eager'}: {(k2 - k1) / n:.0f} kernels per step, GPU busy "
              f"{1000 * (b2 - b1) / n:.2f} ms of {1000 * (w2 - w1) / n:.2f} ms "
              f"({100 * (b2 - b1) / max(w2 - w1, 1e-9):.0f}%, "
              f"under the profiler), batch {s['batch_size']}")
    t64, bs, best = None, s["batch_size"], None
    while bs <= 16384:
        try:  # 200 steps a timing: a step is ~5 ms, what train() pays once must not drown it
            t = steady_time(lambda k: train(model, {**s, "batch_size": bs}, robot, vqa, k, s["vqa_frac"], "bench"), 200)
        except torch.OutOfMemoryError:
            break
        t64 = t64 or t
        print(f"batch {bs:5d}: {1000 * t:6.2f} ms/step, {bs / t:8.0f} samples/s")
        if t > 2 * t64:
            break
        best, bs = (bs, t), bs * 2
    if best:
        print(f"largest batch under 2x the batch-{s['batch_size']} step: {best[0]}, {best[0] / best[1]:.0f} samples/s "
              f"({best[0] / best[1] / (s['batch_size'] / t64):.1f}x batch {s['batch_size']}'s)")


def matmul_gflops(device, n=1024):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = _median_time(lambda: (a @ b, sync()), reps=20)
    return 2 * n ** 3 / t / 1e9


def bench(s, cfg):
    """The numbers in the README: FAST compression, env throughput, flow sampling vs AR FAST decoding."""
    obs, chunks, _, _ = collect_demos(300, cfg.action_horizon, s["demo_noise"], s["seed"],
                                      kivla.task_splits(s["unseen_color"])["train"])
    t0 = time.perf_counter()
    tok = kivla.FASTTokenizer(s["fast_scale"], s["fast_vocab"]).fit(
        np.tile(chunks, (10000 // len(chunks) + 1, 1, 1))[:10000])
    fit_s = time.perf_counter() - t0
    write_figures(s, cfg, tok, obs, chunks)
    if s["figures"]:
        return {}
    # training speed in the default job's conditions, next to a plain matmul on the same machine: the
    # steps/s vary 2-4x between machines of one kind; steps/s per matmul GFLOP/s should vary far less
    (sps, trained), gflops = train_speed(s, cfg, tok, obs, chunks), matmul_gflops(s["device"])
    graphed = s["device"] == "cuda" and s["cuda_graph"] and s["backbone"] == "toy"
    layout = "CUDA graph" if graphed else "eager" if s["device"] == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"train: {sps:.2f} steps/s ({cfg.variant}, batch {s['batch_size']}, {s['device']}, {layout}) | "
          f"matmul 1024^3 fp32 {gflops:.0f} GFLOP/s | {1000 * sps / gflops:.1f} "
          f"steps/s per TFLOP/s | {s['train_steps']} steps ~ {s['train_steps'] / sps / 60:.1f} min")
    if s["device"] == "cuda":
        bench_gpu_step(s, *trained)
    n_fast = np.mean([len(tok.encode(c)) for c in chunks])
    print(f"FAST: {n_fast:.2f} tokens/chunk vs {cfg.action_horizon * cfg.action_dim} with per-dimension 256-bin "
          f"tokens ({len(chunks)} expert chunks, H={cfg.action_horizon}); fit on 10k chunks {fit_s:.2f} s")
    env, n, t0 = kivla.PushEnv(), 0, time.perf_counter()
    env.reset(seed=0)
    while time.perf_counter() - t0 < 3.0:
        _, _, term, trunc, _ = env.step(kivla.scripted_action(env))
        n += 1
        if term or trunc:
            env.reset(seed=n)
    print(f"env: {n / (time.perf_counter() - t0):.0f} steps/s (step + {cfg.image_size} px render + expert), one core")
    if s["init_from"]:
        model = kivla.KIVLA.from_checkpoint(s["init_from"], device=s["device"])
        print(f"model: {s['init_from']}")
    else:
        torch.manual_seed(s["seed"])
        model = build_model(s, cfg, tok).to(s["device"]).eval()
        print("model: randomly initialised (AR decoding forced to the mean FAST length)")
    n_tok = int(round(n_fast)) + 1  # FAST tokens + "|"
    out = {}
    for bs in (1, 32):
        b = model.make_batch([obs[i % len(obs)] for i in range(bs)])
        t_flow = _median_time(lambda: model.sample_actions(b, num_steps=10))
        if s["device"] == "cuda":  # the prefix pass and the 10 Euler steps as one CUDA graph
            eager, sample = t_flow, graphed_sampler(model, b, 10)
            t_flow = _median_time(lambda: sample(b))
            print(f"batch {bs:2d}: flow (10 Euler steps) eager {1000 * eager:.2f} ms, "
                  f"CUDA graph {1000 * t_flow:.2f} ms")
        # the toy's own FAST length, then the lengths of real 1 s chunks of many-DoF robots (FAST: 30-60+)
        for n in (n_tok, 30, 60):
            decode = graphed_fast(model, b, n)  # on CUDA captured too: the ratio compares two graphs
            t_ar = _median_time(lambda: decode(b))
            out[(bs, n)] = (t_flow, t_ar)
            print(f"batch {bs:2d}: flow (10 Euler steps) {1000 * t_flow:6.1f} ms | AR FAST ({n:2d} tokens) "
                  f"{1000 * t_ar:6.1f} ms | AR / flow = {t_ar / t_flow:.1f}x")
    out["paper"] = bench_paper_proportions(s)
    return out


def smooth_trajectories(n, H, A, seed):
    """(n, H, A) smooth synthetic action chunks in [-1, 1]: per dim a few low-frequency cosines (a 1 s chunk
    of a many-DoF arm moves smoothly, which is what FAST compresses)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, H)[None, :, None]  # (1, H, 1)
    x = sum(rng.uniform(-0.5, 0.5, (n, 1, A)) * np.cos(np.pi * k * t + rng.uniform(0, 2 * np.pi, (n, 1, A)))
            for k in range(4))
    return np.clip(x, -1, 1).astype(np.float32)


def bench_paper_proportions(s, H=50, A=14, expert_width=80):
    """Flow vs AR FAST latency at batch 1 with the paper's proportions instead of the toy's: a backbone ~5x the
    expert's parameters, a 1 s chunk of a 14-DoF arm (H=50), and the FAST length this tokenizer gives such
    chunks (scale 10 as in the FAST paper). Random weights: only the timing matters."""
    tok = kivla.FASTTokenizer(10.0, 1024).fit(smooth_trajectories(2000, H, A, 0))
    n_tok = float(np.mean([len(tok.encode(c)) for c in smooth_trajectories(200, H, A, 1)]))
    cfg = kivla.Config(action_horizon=H, action_dim=A, state_dim=A, d_model=256, n_layer=6, n_head=8, head_dim=32,
                       vit_width=128, expert_width=expert_width)
    torch.manual_seed(0)
    model = kivla.KIVLA(cfg, tok).to(s["device"]).eval()
    p = model.num_params()
    obs = dict(_sample_obs(), state=np.full(A, 0.5))
    b = model.make_batch([obs])
    sample = graphed_sampler(model, b, 10)
    t_flow = _median_time(lambda: sample(b))
    decode = graphed_fast(model, b, round(n_tok) + 1)
    t_ar = _median_time(lambda: decode(b))
    print(f"paper proportions (random weights, batch 1): backbone {p['backbone (VLM)'] / 1e6:.1f}M vs expert "
          f"{p['action_expert'] / 1e6:.2f}M params ({p['backbone (VLM)'] / p['action_expert']:.1f}x), H={H} A={A}, "
          f"FAST {n_tok:.1f} tokens/chunk | flow (10 Euler steps) {1000 * t_flow:.1f} ms | AR FAST "
          f"({round(n_tok) + 1} tokens) {1000 * t_ar:.1f} ms | AR / flow = {t_ar / t_flow:.1f}x")
    return {"fast_tokens": n_tok, "flow_s": t_flow, "ar_s": t_ar,
            "param_ratio": p["backbone (VLM)"] / p["action_expert"]}


def graphed_fast(model, batch, n):
    """-> decode(batch): greedy AR decoding of exactly n FAST tokens and their FAST decode, the token loop as one
    CUDA graph on CUDA (so AR and flow are timed alike: both captured); elsewhere the plain call."""
    if model.device.type != "cuda" or isinstance(model.backbone, kivla.HFBackbone):
        return lambda b: model.generate_fast_actions(b, max_tokens=n, stop_at_eos=False)
    run = cuda_graphed(lambda b: model.generate_fast_tokens(b, n, stop_at_eos=False), model.device)
    return lambda b: model.decode_fast_tokens(run(b))


def write_figures(s, cfg, tok, obs, chunks, model=None):
    """attention.png and fast_tokens.png into --out_dir (from --bench and --figures)."""
    os.makedirs(s["out_dir"], exist_ok=True)
    i = int(np.argmax([len(tok.encode(c)) for c in chunks[:200]]))  # a chunk with a long FAST sequence
    if model is None:
        torch.manual_seed(s["seed"])
        model = build_model(s, cfg, tok)
    draw_attention(model.cpu(), obs[i], chunks[i], os.path.join(s["out_dir"], "attention.png"))
    draw_fast_tokens(tok, chunks[i], os.path.join(s["out_dir"], "fast_tokens.png"))
    print(f"wrote {s['out_dir']}/attention.png and {s['out_dir']}/fast_tokens.png")


def draw_attention(model, obs, chunk, path, cell=9):
    """The attention pattern of one real training row, from the mask tensors the model uses (prefix_lm_mask for
    the backbone, expert_mask for the action expert). Rows are queries, columns keys."""
    b = model.make_batch([obs], chunk[None])
    valid = model.backbone.embed_prefix(b)[1][0]  # (Tp,)
    Tp, Ts, H = len(valid), int(b["suffix_loss"][0].sum()), model.cfg.action_horizon
    vlm = kivla.prefix_lm_mask(valid[None], Ts)[0, 0]  # (Tp + Ts, Tp + Ts)
    exp = kivla.expert_mask(valid[None], H)[0, 0, 0]  # (Tp + H,)
    T, L, top = Tp + Ts + H, 92, 40
    img = Image.new("RGB", (L + T * cell + 250, top + T * cell + 10), "white")
    dr = ImageDraw.Draw(img)
    colors = {"vlm": (70, 110, 200), "sg": (240, 140, 30), "grad": (160, 60, 160), "exp": (40, 160, 80)}
    reads = "sg" if model.cfg.insulate else "grad"
    for q in range(T):
        for k in range(T):
            if q < Tp + Ts:  # backbone query: never sees the expert's tokens
                c = "vlm" if k < Tp + Ts and vlm[q, k] else None
            elif k < Tp:  # expert query -> prefix keys/values
                c = reads if exp[k] else None
            else:  # expert query -> suffix (never a key for it) or its own action tokens
                c = "exp" if k >= Tp + Ts and exp[Tp + k - Tp - Ts] else None
            x, y = L + k * cell, top + q * cell
            dr.rectangle([x, y, x + cell - 2, y + cell - 2], fill=colors[c] if c else (238, 238, 238))
    n_img = Tp - model.cfg.text_len - model.cfg.state_dim  # whatever the backbone's image tokenizer gives
    segments = [("image", n_img), ("instruction", model.cfg.text_len), ("state", model.cfg.state_dim),
                ("FAST", Ts), ("actions", H)]
    start = 0
    for name, n in segments:
        dr.text((4, top + (start + n / 2) * cell - 6), name, fill="black")
        dr.line([L - 4, top + start * cell, L - 4, top + (start + n) * cell - 2], fill="black")
        dr.text((L + start * cell, top - 14), name if n * cell > 40 else name[:1], fill="black")
        start += n
    dr.text((L, 4), "attention mask of one training row (rows = queries, columns = keys)", fill="black")
    legend = [("vlm", "backbone: prefix bidirectional, FAST causal"), (reads, "expert reads VLM keys/values" +
              (" through stop_gradient" if reads == "sg" else " (gradient flows)")),
              ("exp", "expert: its own action tokens"), (None, "masked (incl. padded text)")]
    for i, (c, text) in enumerate(legend):
        y = top + 10 + 28 * i
        dr.rectangle([L + T * cell + 12, y, L + T * cell + 22, y + 10], fill=colors[c] if c else (238, 238, 238))
        dr.text((L + T * cell + 28, y - 1), text[:36], fill="black")
        if len(text) > 36:
            dr.text((L + T * cell + 28, y + 9), text[36:], fill="black")
    img.save(path)


def draw_fast_tokens(tok, chunk, path):
    """One action chunk -> its DCT coefficients after scaling and rounding -> the BPE tokens it becomes."""
    H, A = chunk.shape
    syms = tok.symbols(chunk)  # base symbols, low frequency first: (freq 0: dim 0, dim 1, ...), (freq 1: ...)
    ids = tok.encode(chunk)
    W, cell = max(520, 24 * len(syms) + 20), 24
    img = Image.new("RGB", (W, 400), "white")
    dr = ImageDraw.Draw(img)
    dr.text((10, 4), f"1) the action chunk: H={H} steps x A={A} dims", fill="black")
    dim_colors = [(200, 60, 40), (40, 90, 200), (40, 150, 60), (150, 60, 160)]
    X = lambda t: 40 + t * (W - 80) / max(H - 1, 1)  # noqa: E731
    Y = lambda v: 70 - 45 * v  # noqa: E731
    dr.line([40, Y(0), W - 40, Y(0)], fill=(200, 200, 200))
    for d in range(A):
        dr.line([(X(t), Y(chunk[t, d])) for t in range(H)], fill=dim_colors[d % 4], width=2)
        dr.text((W - 120 + 55 * (d % 2), 4 + 12 * (d // 2)), f"dim {d}", fill=dim_colors[d % 4])
    dr.text((10, 128), "2) DCT per dim, x scale, rounded (rows = frequency, columns = dim): the integers FAST keeps",
            fill="black")
    q = np.array(syms).reshape(H, A) - tok.M
    for f in range(H):
        for d in range(A):
            x, y = 40 + d * 60, 146 + f * 13
            v = int(q[f, d])
            shade = 255 - min(200, 40 * abs(v))
            dr.rectangle([x, y, x + 56, y + 11],
                         fill=(255, shade, shade) if v > 0 else (shade, shade, 255) if v < 0 else (245, 245, 245))
            dr.text((x + 22, y), str(v), fill="black")
    y0 = 146 + H * 13 + 10
    dr.text((10, y0), f"3) flattened low-frequency first ({len(syms)} symbols) -> BPE: {len(ids)} tokens", fill="black")
    x = 10
    for t in ids:
        n = len(tok.expand[t])
        dr.rectangle([x, y0 + 18, x + n * cell - 3, y0 + 40], outline=(40, 90, 200), width=2)
        for j, s in enumerate(tok.expand[t]):
            dr.text((x + j * cell + 4, y0 + 23), str(s - tok.M), fill="black")
        dr.text((x + 2, y0 + 44), f"#{t}", fill=(40, 90, 200))
        x += n * cell
    img.save(path)


if __name__ == "__main__":
    main(sys.argv[1:])

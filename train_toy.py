"""
train_toy.py: the whole KI recipe on the toy push task, on a CPU or one GPU, in the order it runs:
settings (--help), 1) data, 2) the model (kivla.py), 3) toy VLM pretraining, 4) robot training with
knowledge insulation, co-trained with VQA, 5) evaluation: success on four splits, what the VLM
keeps, the gradients each loss sends into it, 6) outputs (docs/outputs.md), 7) main.

  python train_toy.py                  # the default run (README: time and numbers)
  python train_toy.py --quick          # the whole pipeline in about half a minute (success 0)
  python train_toy.py --seeds=3        # 3 robot-training seeds from one pretraining: mean ± std
  python train_toy.py --variant=pi0 --init_from=out/pretrained.pt --out_dir=out_pi0
  python train_toy.py --eval_only --init_from=out/ckpt.pt  # out/try.gif (your own: --instruction=)
  python train_toy.py --backbone=hf-tiny --quick                 # a tiny random HF PaliGemma as VLM
  torchrun --standalone --nproc_per_node=2 train_toy.py --quick  # data parallel: DDP, 2 processes

tools/: compare.py (every variant), bench.py, figures.py; imported here: cli.py (the command line's
plumbing: every bad input one line), outputs.py (a run's files and numbers), speed.py (CUDA graphs,
DDP, and AdamW and the EMA in forms a CUDA graph can replay).
"""

import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from tqdm import tqdm

import kivla
from tools import cli, outputs, speed

# --------------------------------------------------------------------------------------------------
# settings: argparse, grouped; every kivla.Config field but those the toy fixes is a setting too

PRETRAIN_LR = 1e-3  # toy VLM pretraining: constant after the warm-up (why: pretrain_vlm)
MIN_LR_FRAC = 0.05  # robot training: the cosine decays to lr * MIN_LR_FRAC
QUICK = dict(out_dir="out_quick", n_demos=40, n_vqa=2000, pretrain_steps=60, train_steps=80,
             batch_size=32, eval_interval=40, eval_episodes=16, gif_episodes=2, warmup_steps=10,
             pretrain_min_vqa=0.0)  # one pretraining block
# --scale=gpu: one GPU's worth: 64 image tokens instead of 16, a 4x wider backbone, 4x the batch
SCALE_GPU = dict(batch_size=256, patch_size=8, vit_width=128, vit_layers=4, d_model=256, n_layer=6,
                 n_head=8, head_dim=32, expert_width=128)
# kivla.Config fields the toy fixes (its env's image, action and state; the vocabulary; RoPE's base)
FIXED_BY_THE_TOY = ("action_dim", "image_size", "state_dim", "text_len", "state_bins", "rope_theta")
EVAL_SEED, CURVE_SEED, VQA_EVAL_SEED, DIAG_SEED = 1_000_000, 2_000_000, 3_000_000, 4_000_000
PROBE_SEED, INTERFERENCE_SEED = 5_000_000, 6_000_000


def make_parser(prog="train_toy.py", description=__doc__):
    """The settings of one run, grouped (the tools add groups of their own)."""
    p, add, one_of = cli.parser(prog, description), cli.add, cli.one_of
    C = kivla.Config()  # its defaults
    g = p.add_argument_group("run", "what this run is and where it writes")
    add(g, "out_dir", "out", "where checkpoints, metrics and pictures go (--quick: out_quick)")
    add(g, "seed", 0, "seeds the demos, the VLM pretraining and the first robot-training seed")
    add(g, "quick", False, "the whole pipeline in about half a minute: a smoke test (success 0)")
    add(g, "seeds", 1, "robot-training seeds seed, seed+1, ... from one VLM: mean ± std")
    add(g, "init_from", "", "pretrained.pt (skip VLM pretraining) or ckpt.pt (with --eval_only)")
    g = p.add_argument_group("method", "the model (kivla.Config) and its VLM")
    add(g, "backbone", "toy", "toy | hf-tiny: a tiny random HuggingFace PaliGemma (transformers)",
        one_of("toy", "hf-tiny"))
    add(g, "scale", "cpu", "cpu: the toy sizes | gpu: 64 image tokens, 4x wider, 4x the batch",
        one_of("cpu", "gpu"))
    add(g, "variant", C.variant, "ki: CE(FAST) + flow, stop-gradient | joint: the same without the "
        "stop-gradient | pi0: flow only | fast: CE(FAST) only, AR decoding",
        one_of(*kivla.VARIANTS))
    add(g, "flow_weight", C.flow_weight, "alpha in loss = CE + alpha * flow-MSE, as in pi0.5")
    add(g, "action_horizon", 5, "H, actions per chunk: the toy executes `replan` of them (kivla: 10)")
    add(g, "patch_size", C.patch_size, "-> (64 / patch)^2 image tokens: few keep the CPU budget")
    add(g, "vit_stem", C.vit_stem, "conv: 3x3 stride-2 convs | patchify: one conv",
        one_of("conv", "patchify"))
    add(g, "film_stem", C.film_stem, "toy-scale choice: the words FiLM-modulate the conv stem")
    add(g, "coord_stem", C.coord_stem, "toy-scale choice: x, y coordinate channels beside RGB")
    add(g, "qk_norm", C.qk_norm, "RMSNorm on every head's queries and keys (as in Gemma 3)")
    add(g, "vit_width", C.vit_width, "ViT width (SigLIP analog)")
    add(g, "vit_layers", C.vit_layers, "ViT transformer blocks after the conv stem")
    add(g, "d_model", C.d_model, "backbone width (Gemma analog)")
    add(g, "n_layer", C.n_layer, "layers, shared by the backbone and the action expert")
    add(g, "n_head", C.n_head, "heads, shared: the expert's queries read the backbone's keys")
    add(g, "n_kv_head", C.n_kv_head, "key/value heads, 0 = n_head; fewer: grouped-query attention")
    add(g, "head_dim", C.head_dim, "per attention head, shared by backbone and action expert")
    add(g, "expert_width", C.expert_width, "the action expert is narrower (pi0: 1024 vs 2048)")
    g = p.add_argument_group("data", "demonstrations, FAST, VQA")
    add(g, "n_demos", 1200, "scripted-policy episodes (on the training colour x corner pairs)")
    add(g, "unseen_color", "purple", "never a demo's target (VQA only): the unseen-concept split",
        one_of("", *kivla.COLORS))
    add(g, "demo_noise", 0.3, "std of the noise on executed scripted actions (labels stay clean)")
    add(g, "fast_scale", 4.0, "FAST: DCT coefficients * scale, rounded (coarser: fewer tokens)")
    add(g, "fast_vocab", 512, "FAST: BPE vocabulary size (ids), base symbols included")
    add(g, "n_vqa", 30000, "VQA questions in the pool for pretraining and co-training")
    g = p.add_argument_group("training", "toy VLM pretraining, then robot training")
    add(g, "pretrain_steps", 2000, "toy VLM pretraining steps (VQA only), per block")
    add(g, "pretrain_min_vqa", 0.7, "restart a VLM under this held-out VQA accuracy (pretrain_vlm)")
    add(g, "pretrain_blocks", 4, "at most this many pretraining blocks (the first + restarts)")
    add(g, "train_steps", 3000, "robot training steps")
    add(g, "batch_size", 64, "rows per training step (robot + VQA)")
    add(g, "vqa_frac", 0.125, "co-training: fraction of each robot batch that is VQA")
    add(g, "lr", 3e-3, "robot training's peak learning rate (AdamW)")
    add(g, "warmup_steps", 200, "linear warm-up steps of every training phase")
    add(g, "weight_decay", 0.01, "AdamW's, on matrices only")
    add(g, "grad_clip", 1.0, "the gradient's global norm is clipped to this")
    add(g, "ema", 0.998, "the evaluated weights' EMA: decay min(ema, (1+t)/(10+t)), 0.998 from t=4490")
    g = p.add_argument_group("evaluation", "closed-loop rollouts on held-out seeds")
    add(g, "eval_interval", 500, "steps between the curve's evaluations (50 episodes, own RNG)")
    add(g, "eval_episodes", 200, "final evaluation: episodes per split, on held-out seeds")
    add(g, "replan", 2, "execute the first `replan` of H actions, then re-plan (closed loop)")
    add(g, "num_steps", 10, "Euler steps of the flow at inference")
    add(g, "gif_episodes", 4, "episodes per split drawn into rollouts.gif")
    add(g, "eval_only", False, "evaluate --init_from (a ckpt.pt) on 2 x gif_episodes episodes: "
        "try.gif into its folder (or --out_dir)")
    add(g, "instruction", "", "--eval_only: run this instruction instead of the env's own")
    g = p.add_argument_group("speed", "where and how the step runs")
    add(g, "device", "auto", "auto | cpu | cuda | mps", one_of("auto", "cpu", "cuda", "mps"))
    add(g, "amp", True, "bf16 autocast on cuda (ignored elsewhere); false: fp32")
    add(g, "cuda_graph", True, "cuda, one process: capture the training step as a CUDA graph")
    add(g, "compile", False, "torch.compile the training loss (instead of a CUDA graph)")
    return p


def parse_args(argv, parser=None):
    """argv -> (settings dict, kivla.Config): defaults < --quick < --scale=gpu < what was given.
    Anything it cannot use ends the program with one line that says why (SystemExit)."""
    defaults, given = cli.parse(parser or make_parser(), argv, FIXED_BY_THE_TOY)
    s = {**defaults, **(QUICK if given.get("quick") else {}),
         **(SCALE_GPU if given.get("scale") == "gpu" else {}), **given}
    if s["eval_only"] and "out_dir" not in given:  # try.gif beside the checkpoint it evaluates
        s["out_dir"] = os.path.dirname(s["init_from"]) or "."
    cli.check_settings(s)
    is_cfg = {f.name for f in fields(kivla.Config)}.__contains__
    try:
        cfg = kivla.Config(**{k: v for k, v in s.items() if is_cfg(k)})
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    return {k: v for k, v in s.items() if not is_cfg(k)}, cfg


# --------------------------------------------------------------------------------------------------
# 1) data: demonstrations from the scripted policy, VQA, the held-out sets


def collect_demos(n, H, noise, seed, tasks="train"):
    """Scripted-policy episodes -> observations, (N, H, A) clean action chunks, task per sample,
    success rate. A chunk past the episode's end is zero-padded: after success the pusher stays."""
    env, rng = kivla.PushEnv(tasks=tasks), np.random.default_rng(seed)
    obs_all, chunks, sample_tasks, success = [], [], [], 0
    for ep in tqdm(range(n), desc="demos", leave=False):
        obs, _ = env.reset(seed=seed + ep)
        episode, acts = [], []
        while True:
            a = kivla.scripted_action(env)
            episode.append(obs)
            acts.append(a)
            obs, _, term, trunc, info = env.step(kivla.dart(a, noise, rng))  # DART: noisy execution
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
    """n (question, answer) observations about varied scenes: random resets, then a few noisy
    scripted pushes of random length, so blocks also sit near corners and walls."""
    env, rng, out = kivla.PushEnv(tasks="all"), np.random.default_rng(seed), []
    while len(out) < n:
        env.reset(seed=int(rng.integers(2**31)))
        for _ in range(int(rng.integers(0, 40))):  # physics only: no frame in between is looked at
            env.simulate(kivla.scripted_action(env, noise=0.5, rng=rng) * env.speed)
        obs = env.observe()
        for _ in range(4):  # several questions per scene
            q, a = kivla.make_vqa(env, rng)
            out.append({**obs, "instruction": q, "answer": a})
    return out[:n]


def index(batch, idx):
    return {k: v[idx] for k, v in batch.items()}


def mixed_batch(robot, vqa, n_rob, n_vqa, g):
    """n_rob random robot rows, then n_vqa random VQA rows, drawn with generator g on its device."""
    parts = [index(d, torch.randint(len(d["text"]), (k,), generator=g, device=g.device))
             for d, k in ((robot, n_rob), (vqa, n_vqa)) if k]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@dataclass
class Data:
    """What every robot-training run shares, made once (under torchrun, the same on every rank)."""
    demos: tuple         # scripted-policy demos: (observations, (N, H, A) clean action chunks)
    diag: tuple          # held-out clean demo states for the diagnostics: (observations, chunks)
    vqa: dict            # the VQA pool as one batch: pretraining and co-training
    vqa_eval: dict       # held-out VQA as one batch: VQA accuracy, and the probe's test rows
    probe: tuple         # the linear probe's ((train batch, kinds, labels), (test batch, ...))
    probe_iters: int     # LBFGS iterations of each probe fit
    train_tasks: list    # the (colour, corner) pairs of the robot data and of in-distribution
    fast_tokens: float   # mean FAST tokens per demo chunk
    t_start: float       # when the job started
    weights: dict = None              # the pretrained VLM's weights (CPU)
    vqa_before: float = float("nan")  # its held-out VQA accuracy
    probe_before: float = float("nan")  # its linear-probe accuracy


# --------------------------------------------------------------------------------------------------
# 2) the model and 3) toy VLM pretraining


def build_model(s, cfg, tok):
    """The toy VLM, or (--backbone=hf-tiny) a tiny random HuggingFace PaliGemma behind it."""
    hf = s["backbone"] == "hf-tiny"
    return kivla.KIVLA(cfg, tok, backbone=cli.hf_tiny(cfg, tok) if hf else None)


def pretrain_vlm(s, cfg, tok, vqa, vqa_eval):
    """VQA only (CE: the variant "fast"), a warm-up, then a constant learning rate: off the
    grounding plateau a VLM climbs at the learning rate's pace. A VLM under pretrain_min_vqa cannot
    yet tell where the block a word names is, and robot training on it fails or crawls; which init
    is slow is luck: restart from a fresh one (seed + 1000 * block), at most pretrain_blocks in all;
    the best VLM is kept (docs/results.md, "why a VLM under VQA 0.7 is redrawn")."""
    for block in range(s["pretrain_blocks"]):
        torch.manual_seed(s["seed"] + 1000 * block)
        c = kivla.Config(**{**asdict(cfg), "variant": "fast"})
        model = build_model(s, c, tok).to(s["device"])
        desc = "VLM pretraining (VQA)" + (f", restart {block}" if block else "")
        s_pre = {**s, "lr": PRETRAIN_LR, "seed": s["seed"] + block}
        ema = train(model, s_pre, robot=None, vqa=vqa, steps=s["pretrain_steps"], vqa_frac=1.0,
                    desc=desc, min_lr_frac=1.0)  # no decay
        acc = vqa_accuracy(ema, vqa_eval)  # on every rank (the same weights): they all go on
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
# 4) the training loop (VLM pretraining and robot training): AdamW, warm-up + cosine, clipping,
#    EMA (speed.adamw, speed.ema_update_); in robot training the VLM is watched at fixed steps


def lr_at(step, steps, lr, warmup, min_frac):
    """1) linear warm-up over `warmup` steps, 2) cosine decay to lr * min_frac (1: constant)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def train(model, s, robot, vqa, steps, vqa_frac, desc, curve=None, history=None, watch=None,
          min_lr_frac=MIN_LR_FRAC):
    """robot, vqa: datasets (dicts of tensors) to draw batches from (each torchrun rank its own
    batch_size / world rows). curve(ema, step) every eval_interval steps; watch(model, step) at
    watch_steps, on the training weights. -> the EMA model, for evaluation."""
    dev = model.device
    robot, vqa = [None if d is None else {k: v.to(dev) for k, v in d.items()}  # drawn on the device
                  for d in speed.trim_suffix(robot, vqa)]
    g = torch.Generator(dev).manual_seed(s["seed"] + 1_000_003 * s["rank"])  # each rank its rows
    bs = s["batch_size"] // s["world"]
    n_vqa = round(bs * vqa_frac) if robot is not None else bs
    net = speed.compiled_or_ddp(model, s)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    # the learning rate and the EMA's weight are tensors: a captured CUDA graph reads their values
    lr, ema_w = torch.tensor(s["lr"], device=dev), torch.zeros((), device=dev)
    opt = speed.adamw(params, s["weight_decay"], lr)

    def step_fn(batch):  # one training step, no host syncs (so a CUDA graph can replay it)
        with speed.autocast(dev, s["amp"]):
            loss, m = net(batch)  # the KI loss: kivla.KIVLA.compute_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s["grad_clip"])
        opt.step()
        speed.ema_update_(ema_params, params, ema_w)
        return m
    run_step = speed.graphed_step(step_fn, s, dev, lambda: opt.zero_grad(set_to_none=True))
    model.train()
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True, disable=s["rank"] > 0)
    watch_at = watch_steps(steps, s["eval_interval"]) if watch is not None else ()
    for step in bar:
        if step in watch_at:
            watch(model, step)
        batch = mixed_batch(robot, vqa, bs - n_vqa, n_vqa, g)
        lr.fill_(lr_at(step, steps, s["lr"], s["warmup_steps"], min_lr_frac))
        # ema_w = 1 - decay; the decay ramps 0.1 -> ema, so early on the EMA follows the model
        ema_w.fill_(1 - min(s["ema"], (1 + step) / (10 + step)))
        m = run_step(batch)  # zero_grad, forward, backward, clip, AdamW, EMA
        if step % 10 == 0:  # reading a number back waits for the device: every 10 steps only
            m = {k: v.item() for k, v in m.items()}
            bar.set_postfix(ce=f"{m['ce_loss']:.3f}", flow=f"{m['flow_loss']:.3f}")
            if history is not None:
                history["train"].append({"step": step, **m})
        # no curve point at the last step: the curve's last point is the final evaluation
        if curve is not None and (step + 1) % s["eval_interval"] == 0 and step + 1 < steps:
            e = curve(ema, step + 1)
            tqdm.write(f"step {step + 1:6d} | success {e['success']:.2f} | FAST acc "
                       f"{e['fast_token_acc']:.2f} | 1st-action err {e['first_action_mse']:.3f}")
    if steps in watch_at:
        watch(model, steps)
    speed.check_ranks_in_sync(model, s)
    return ema


def watch_steps(steps, interval):
    """Where the VLM is watched for damage: every interval / 5 steps over the first 2 intervals (the
    expert is new, its gradients largest), then every interval, and at the end."""
    fine = max(1, interval // 5)
    return sorted({*range(0, min(steps, 2 * interval) + 1, fine), *range(0, steps + 1, interval),
                   steps})


# --------------------------------------------------------------------------------------------------
# 5) evaluation: closed-loop rollouts, diagnostics, what the VLM keeps (VQA, probe), interference


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


@torch.inference_mode()  # less bookkeeping than no_grad: rollouts are many small model calls
def rollouts(model, tasks, seeds, replan, num_steps, instruction=None, record=0, reword=False,
             seed=0, graph=True):
    """Closed-loop episodes, all envs in lockstep so each model call is batched. reword: each
    instruction said with SYNONYMS (the unseen-wording split). The flow's noise comes from a
    generator of its own (seed): evaluating never moves training's random stream. -> success per
    episode, seconds per action chunk, frames of the first `record` episodes."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    H, A = model.cfg.action_horizon, model.cfg.action_dim
    envs = [kivla.PushEnv(tasks=tasks, render_mode="rgb_array") for _ in seeds]
    record = min(record, len(envs))  # e.g. --gif_episodes above --eval_episodes
    obs = [e.reset(seed=s)[0] for e, s in zip(envs, seeds)]
    if reword:
        instruction = [kivla.paraphrase(e.instruction, np.random.default_rng(s))
                       for e, s in zip(envs, seeds)]
    elif instruction:
        instruction = [instruction] * len(envs)
    for o, text in zip(obs, instruction or []):
        o["instruction"] = text
    done, success = [False] * len(envs), [False] * len(envs)
    frames = [[e.render()] for e in envs[:record]]
    chunk_time, chunks = 0.0, 0
    act = speed.rollout_policy(model, obs, num_steps, graph)  # (CUDA: one captured graph)
    while not all(done):
        live = [i for i in range(len(envs)) if not done[i]]
        t0 = time.perf_counter()
        actions = act(obs, live, torch.randn(len(live), H, A, generator=g)).cpu().numpy()
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
        frames[i] = (frames[i], instruction[i] if instruction else envs[i].instruction, success[i])
    return np.array(success), chunk_time / max(chunks, 1), frames[:record]


@torch.no_grad()
def diagnostics(model, diag, num_steps, seed=0):
    """Cheap measures on held-out demo states (clean scripted labels) to steer training by: the
    teacher-forced FAST token accuracy (NaN for pi0), the share of greedy FAST decodes that needed
    fixing (the `fast` policy's failure mode) and the first action's mean squared error."""
    model.eval()
    b = {k: v.to(model.device) for k, v in diag.items()}
    N, H, A = len(b["text"]), model.cfg.action_horizon, model.cfg.action_dim
    out = {"fast_token_acc": float("nan"), "malformed_fast": float("nan")}
    if model.cfg.use_fast:
        h, _, _ = model.forward_vlm(b)
        m = b["suffix_loss"]
        right = model.backbone.lm_head(h[m]).argmax(-1) == b["suffix_target"][m]
        out["fast_token_acc"] = right.float().mean().item()
        out["malformed_fast"] = (~model.generate_fast_actions(b)[1]).float().mean().item()
    noise = torch.randn(N, H, A, generator=torch.Generator().manual_seed(seed))  # its own stream
    first = model.predict_actions(b, num_steps, noise)[:, 0]  # (N, A)
    out["first_action_mse"] = ((first - b["actions"][:, 0]) ** 2).mean().item()
    return out


def probe_labels(vqa_obs):
    """Question type (0 where, 1 which corner, 2 colour nearest a corner, 3 which moves) and class
    label per VQA row: an 8 x 8 cell, a corner or a colour."""
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
    """(N, D): the backbone's last-layer states averaged over the valid prefix tokens."""
    model.eval()
    out = []
    for i in range(0, len(batch["text"]), bs):
        b = {k: v.to(model.device) for k, v in index(batch, slice(i, i + bs)).items()}
        h, _, valid = model.encode_prefix(b)
        m = valid.unsqueeze(-1).to(h.dtype)
        out.append(((h * m).sum(1) / m.sum(1)).float().cpu())
    return torch.cat(out)


def probe_accuracy(model, probe, iters=50):
    """Knowledge in the features, not the LM head: a linear classifier per question type on frozen
    prefix features (fit on one VQA set, scored on the held-out one), mean accuracy over types."""
    (tr_batch, tr_kind, tr_y), (te_batch, te_kind, te_y) = probe
    ftr, fte = prefix_features(model, tr_batch), prefix_features(model, te_batch)
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    linear, cross_entropy, accs = torch.nn.functional.linear, torch.nn.functional.cross_entropy, []
    for k in range(4):
        a, b = tr_kind == k, te_kind == k
        if not a.any() or not b.any():
            continue
        # zeros, not nn.Linear's random init: probing during training must draw no random number
        w = torch.zeros(int(tr_y.max()) + 1, ftr.shape[1], requires_grad=True)
        bias = torch.zeros(int(tr_y.max()) + 1, requires_grad=True)
        opt = torch.optim.LBFGS([w, bias], max_iter=iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = cross_entropy(linear(ftr[a], w, bias), tr_y[a]) + 1e-3 * w.pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        with torch.no_grad():
            accs.append((linear(fte[b], w, bias).argmax(-1) == te_y[b]).float().mean().item())
    return float(np.mean(accs))


def interference_batch(robot, vqa, n, vqa_frac, cfg, seed=INTERFERENCE_SEED):
    """One fixed batch in training's mix (n rows, vqa_frac of them VQA), its flow noise and time,
    from a generator of its own: what `interference` measures on at every watched step."""
    g = torch.Generator().manual_seed(seed)
    n_vqa = round(n * vqa_frac)
    batch = mixed_batch(robot, vqa, n - n_vqa, n_vqa, g)
    noise = torch.randn(n, cfg.action_horizon, cfg.action_dim, generator=g)
    return batch, noise, kivla.sample_tau(n, generator=g)  # tau as in training


def interference(model, batch, noise, time):
    """Gradient interference, what knowledge insulation prevents [1]: the gradient each loss term
    sends into the VLM (ViT + backbone) on one fixed batch: ce_grad = |d CE / d VLM|, flow_grad = |d
    (alpha * flow) / d VLM| (exactly 0 for ki: the stop-gradient), their cosine (0 if either is)."""
    model.train()
    params = [p for p in model.backbone.parameters() if p.requires_grad]
    ce, flow = model.loss_terms(batch, noise, time)
    grad = lambda loss, **kw: torch.cat([g.flatten().float() for g in torch.autograd.grad(  # noqa
        loss, params, allow_unused=True, materialize_grads=True, **kw)])
    g_ce = grad(ce, retain_graph=True)
    g_flow = torch.zeros_like(g_ce)
    if model.cfg.use_flow and model.cfg.flow_weight > 0:
        g_flow = grad(model.cfg.flow_weight * flow)
    n_ce, n_flow = g_ce.norm(), g_flow.norm()
    cos = (g_ce @ g_flow) / (n_ce * n_flow) if n_ce > 0 and n_flow > 0 else torch.zeros(())
    return {"ce_grad": n_ce.item(), "flow_grad": n_flow.item(), "grad_cos": cos.item()}


# --------------------------------------------------------------------------------------------------
# 6) outputs in --out_dir (every file and key: docs/outputs.md; the helpers: tools/outputs.py)

def write_run(s, tag, ema, metrics, history, episodes):
    """One robot-training run's files: ckpt, curves, interference, history, rollouts."""
    path = lambda name, ext: os.path.join(s["out_dir"], f"{name}{tag}.{ext}")  # noqa: E731
    ema.cpu().save(path("ckpt", "pt"), settings={k: v for k, v in s.items() if k != "device"},
                   metrics=metrics)
    outputs.draw_curves(history, path("curves", "png"))
    outputs.draw_interference([(metrics["variant"], [history["vlm"]])], path("interference", "png"))
    outputs.write_json(history, path("history", "json"), indent=None)
    outputs.write_gif(episodes, path("rollouts", "gif"))


# --------------------------------------------------------------------------------------------------
# 7) the main job: python train_toy.py


def prepare(s, cfg):
    """1) the data, 2) the FAST tokenizer and the model, 3) the VLM every robot run starts from (toy
    pretraining or --init_from). -> tok, Data. Under torchrun every rank makes the same."""
    t_start, train_tasks = time.time(), kivla.task_splits(s["unseen_color"])["train"]
    obs, chunks, _, scripted_rate = collect_demos(s["n_demos"], cfg.action_horizon, s["demo_noise"],
                                                  s["seed"], train_tasks)
    vqa_pool = make_vqa_set(s["n_vqa"], s["seed"])
    # held out: clean scripted episodes (the diagnostics' states), VQA for the probe and accuracy
    d_obs, d_chunks, _, _ = collect_demos(4 if s["quick"] else 40, cfg.action_horizon, 0.0,
                                          DIAG_SEED, train_tasks)
    vqa_probe = make_vqa_set(200 if s["quick"] else 2000, PROBE_SEED)
    vqa_eval = make_vqa_set(200 if s["quick"] else 1000, VQA_EVAL_SEED)
    print(f"demos: {s['n_demos']} episodes, {len(obs)} samples, scripted-policy success "
          f"{scripted_rate:.2f} (noisy execution)")
    pick = np.random.default_rng(0).permutation(len(d_obs))[:400]
    tok = kivla.FASTTokenizer(s["fast_scale"], s["fast_vocab"]).fit(chunks)  # deterministic
    init = s["init_from"] and cli.load_checkpoint(s["init_from"], fast_vocab=tok.vocab_size)
    n_fast = np.mean([len(ids) for ids in tok.encode_batch(chunks[:2000])])  # all at once
    print(f"FAST: {n_fast:.1f} tokens/chunk vs {chunks.shape[1] * chunks.shape[2]} for "
          "per-dimension binning")
    vlm = build_model(s, cfg, tok)  # makes the batches; its weights: pretraining or --init_from
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in vlm.num_params().items()))
    if init:
        cli.load_vlm_weights(vlm, init["model"])  # fail now, not after minutes of work
    eval_batch = vlm.make_batch(vqa_eval)
    data = Data(demos=(obs, chunks), diag=([d_obs[i] for i in pick], d_chunks[pick]),
                vqa=vlm.make_batch(vqa_pool), vqa_eval=eval_batch,
                probe=((vlm.make_batch(vqa_probe), *probe_labels(vqa_probe)),
                       (eval_batch, *probe_labels(vqa_eval))),
                probe_iters=50 if not s["quick"] else 10, train_tasks=train_tasks,
                fast_tokens=float(n_fast), t_start=t_start)
    if init:
        data.weights, data.vqa_before = init["model"], init.get("vqa_acc", float("nan"))
        print(f"VLM weights from {s['init_from']} (VQA accuracy {data.vqa_before:.3f})")
    else:
        data.weights, data.vqa_before = pretrain_vlm(s, cfg, tok, data.vqa, data.vqa_eval)
        print(f"VLM pretraining: VQA accuracy {data.vqa_before:.3f} on held-out scenes "
              f"({time.time() - t_start:.0f} s so far)")
        cli.load_vlm_weights(vlm, data.weights)
    data.probe_before = probe_accuracy(vlm.to(s["device"]), data.probe, data.probe_iters)
    return tok, data


def run_variant(s, cfg, tok, data, seed, tag=""):
    """4) robot training of one variant and seed from the VLM (the action expert: a fresh init per
    seed), 5) the whole evaluation, 6) its files. -> its metrics (None on a rank > 0)."""
    t_start = time.time()
    torch.manual_seed(seed)
    model = build_model(s, cfg, tok).to(s["device"])
    cli.load_vlm_weights(model, data.weights)
    robot, diag = model.make_batch(*data.demos), model.make_batch(*data.diag)  # pi0 has no FAST
    history, watch_time = {"train": [], "eval": [], "vlm": []}, [0.0]
    n_curve, splits = min(50, s["eval_episodes"]), kivla.task_splits(s["unseen_color"])
    fixed = interference_batch(robot, data.vqa, s["batch_size"], s["vqa_frac"], cfg)
    # the watch's VQA and probe sets: half the final evaluation's, so 15 watched steps cost little
    (tr, tr_kind, tr_y), (te, te_kind, te_y) = data.probe
    n_tr, n_te = len(tr_y) // 2, len(te_y) // 2
    probe = ((index(tr, slice(n_tr)), tr_kind[:n_tr], tr_y[:n_tr]),
             (index(te, slice(n_te)), te_kind[:n_te], te_y[:n_te]))

    # the VLM watch: at watch_steps (train), measured here, summed up and drawn by tools/outputs.py
    def watch(model, step):  # the training weights (the EMA would hide early damage)
        t0 = time.perf_counter()
        history["vlm"].append({"step": step, **interference(model, *fixed),
                               "vqa_acc": vqa_accuracy(model, probe[1][0]),
                               "probe_acc": probe_accuracy(model, probe, data.probe_iters)})
        model.train()
        watch_time[0] += time.perf_counter() - t0

    def curve(ema, step):  # noise from its rollouts' own generator: training never notices
        ok, _, _ = rollouts(ema, splits["train"], range(CURVE_SEED, CURVE_SEED + n_curve),
                            s["replan"], s["num_steps"], seed=CURVE_SEED, graph=s["cuda_graph"])
        history["eval"].append({"step": step, "success": float(ok.mean()),
                                **diagnostics(ema, diag, s["num_steps"])})
        return history["eval"][-1]

    rank0 = s["rank"] == 0
    ema = train(model, {**s, "seed": seed}, robot, data.vqa, s["train_steps"], s["vqa_frac"],
                f"train {cfg.variant} seed {seed}", curve if rank0 else None, history,
                watch if rank0 else None)
    train_time = time.time() - t_start
    if not rank0:  # evaluation and outputs: rank 0 only
        return None
    n_gif = s["gif_episodes"]
    evaluate = lambda tasks, record, reword=False: rollouts(  # noqa: E731  (the same seeds)
        ema, tasks, range(EVAL_SEED, EVAL_SEED + s["eval_episodes"]), s["replan"], s["num_steps"],
        record=record, reword=reword, seed=EVAL_SEED, graph=s["cuda_graph"])
    ok_in, chunk_s, episodes = evaluate(splits["train"], n_gif)
    ok_out, _, more = evaluate(splits["heldout"], n_gif)
    ok_color, _, colored = (evaluate(splits["unseen_color"], n_gif // 2) if splits["unseen_color"]
                            else (np.array([np.nan]), 0, []))
    ok_words, _, worded = evaluate(splits["train"], n_gif // 2, reword=True)
    # the curve's last point is the final evaluation (not 50 more episodes on the curve's seeds)
    history["eval"].append({"step": s["train_steps"], "success": float(ok_in.mean()),
                            **diagnostics(ema, diag, s["num_steps"])})
    metrics = {
        "variant": cfg.variant, "seed": seed, "vqa_frac": s["vqa_frac"],
        "flow_weight": cfg.flow_weight, "success": float(ok_in.mean()),
        "heldout_success": float(ok_out.mean()), "unseen_color_success": float(ok_color.mean()),
        "unseen_wording_success": float(ok_words.mean()), "unseen_color": s["unseen_color"],
        "eval_episodes": s["eval_episodes"],
        **{k: v for k, v in history["eval"][-1].items() if k not in ("step", "success")},
        "vqa_acc_before": data.vqa_before, "vqa_acc_after": vqa_accuracy(ema, data.vqa_eval),
        "probe_acc_before": data.probe_before,
        "probe_acc_after": probe_accuracy(ema, data.probe, data.probe_iters),
        "steps_to_50pct": outputs.steps_to(history, 0.5),  # the curve and watch summed up
        "steps_to_80pct": outputs.steps_to(history, 0.8),
        "curve": [(r["step"], r["success"]) for r in history["eval"]],
        **outputs.watch_summary(history["vlm"]), "vlm_watch": history["vlm"],
        "latency_ms_per_chunk_b1": 1000 * speed.latency(  # batch 1, the first evaluation seed
            ema, kivla.PushEnv().reset(seed=EVAL_SEED)[0], s["num_steps"], 3 if s["quick"] else 20),
        "batched_eval_ms_per_chunk": 1000 * chunk_s, "train_time_s": train_time,
        "watch_time_s": watch_time[0], "run_time_s": time.time() - t_start, "device": s["device"],
        "train_steps": s["train_steps"]}
    write_run(s, tag, ema, metrics, history, episodes + more + colored + worded)
    return metrics


def run_seeds(s, cfg, tok, data, row=""):
    """--seeds robot-training seeds of one variant (tools/compare.py: of its row) from the one VLM.
    -> their summary (None on a rank > 0)."""
    runs = []
    for seed in range(s["seed"], s["seed"] + s["seeds"]):
        tag = (f"_{row}" if row else "") + (f"_seed{seed}" if s["seeds"] > 1 else "")
        m = run_variant(s, cfg, tok, data, seed, tag)
        if m is None:  # not rank 0
            continue
        m.update(row=row or cfg.variant, fast_tokens_per_chunk=data.fast_tokens,
                 demo_samples=len(data.demos[0]))
        runs.append(m)
        outputs.print_seed(m)
    return outputs.summarize(runs) if runs else None


def finish(s, data, results, write):
    """The scripted policy on the same seeds, the spread over seeds, then write(results) -> what
    metrics.json holds. Under torchrun the other ranks wait until rank 0 has written."""
    if s["rank"] > 0:
        return speed.end_distributed(s)
    # the scripted policy, noise-free, on the evaluation's seeds: the bar to compare against
    scripted_ok = collect_demos(s["eval_episodes"], 1, 0.0, EVAL_SEED, data.train_tasks)[3]
    wall = time.time() - data.t_start
    for r in results:
        r.update(scripted_success=scripted_ok, wall_time_s=wall)
        if s["seeds"] > 1:
            outputs.print_spread(r)
    out = write(results)
    print(f"scripted policy on the same seeds: {scripted_ok:.2f}; wall {wall / 60:.1f} min; "
          f"wrote {s['out_dir']}/")
    if s["quick"]:
        print(f"--quick is a smoke test of the whole pipeline: its {s['train_steps']} robot steps "
              "are too few to learn the task, so success 0.000 is expected; the default run learns")
    speed.end_distributed(s)
    return out


def eval_only(s):
    """--eval_only: closed-loop episodes of a trained checkpoint, the env's instructions or yours"""
    model = cli.load_trained(s["init_from"], s["device"])
    text, n = s["instruction"], s["gif_episodes"] * 2
    unseen = model.settings.get("unseen_color", kivla.UNSEEN_COLOR)  # the run's own split
    tasks = cli.instruction_task(model, text) if text else kivla.task_splits(unseen)["train"]
    ok, _, eps = rollouts(model, tasks, range(EVAL_SEED, EVAL_SEED + n), s["replan"],
                          s["num_steps"], text or None, n, seed=s["seed"], graph=s["cuda_graph"])
    outputs.write_gif(eps, os.path.join(s["out_dir"], "try.gif"))
    print(f"success {ok.mean():.2f} over {n} seeds; wrote {os.path.join(s['out_dir'], 'try.gif')}")
    return {"success": float(ok.mean()), "episodes": ok.tolist()}


def start(argv, parser=None):
    """-> (settings, Config) with the device picked, --out_dir made, torchrun's rank and world size,
    the seed set, and deterministic algorithms (same seed, same numbers on one CPU)."""
    s, cfg = parse_args(argv, parser)
    cli.device_and_out_dir(s)
    s["rank"], s["world"] = speed.setup_distributed(s)
    torch.manual_seed(s["seed"])
    torch.use_deterministic_algorithms(s["device"] == "cpu")  # reset: a CUDA run after a CPU one
    # without filling each new tensor with NaN, which no correct op reads (~2.5% of a CPU step)
    torch.utils.deterministic.fill_uninitialized_memory = False
    return s, cfg


def main(argv):
    """The main job: one variant for --seeds seeds from one VLM -> metrics.json (the summary)."""
    cli.refuse_a_student_copy(argv)  # the course's copy runs once its exercises are written
    s, cfg = start(argv)
    with speed.only_rank0_prints(s):  # under torchrun only rank 0 prints (and writes outputs)
        if s["eval_only"]:
            return eval_only(s)
        tok, data = prepare(s, cfg)
        path = os.path.join(s["out_dir"], "metrics.json")  # the summary of the one variant
        return finish(s, data, [run_seeds(s, cfg, tok, data)],
                      lambda results: outputs.write_json(results[0], path))


if __name__ == "__main__":
    main(sys.argv[1:])

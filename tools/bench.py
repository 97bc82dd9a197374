"""
tools/bench.py: the README's timings, printed: robot-training steps/s beside a plain matmul on the
same machine (on CUDA also kernels per step, GPU busy share and the largest useful batch), FAST
compression, env throughput, and flow sampling vs AR FAST decoding at batch 1 and 32 (with the toy's
proportions and with the paper's). Also writes attention.png and fast_tokens.png (tools/figures.py).

  python tools/bench.py                                  # on this machine's default device
  python tools/bench.py --init_from=out/ckpt.pt          # flow vs AR with a trained model's weights
"""

import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
import kivla  # noqa: E402
import train_toy  # noqa: E402
from tools import figures, speed  # noqa: E402


def steady_time(run, n):
    """Seconds per step of run(steps) once warmed up: after one untimed call, (time of 2n steps -
    time of n steps) / n, so what each call pays once (capture, AdamW's first step) cancels"""
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
    """Robot-training steps per second with the real loop (batch, loss, backward, AdamW, EMA), as
    the default run trains (on CUDA: the captured step). -> steps/s, and the model and datasets."""
    torch.manual_seed(s["seed"])
    model = train_toy.build_model(s, cfg, tok).to(s["device"])
    robot = model.make_batch(obs, chunks)
    vqa = model.make_batch(train_toy.make_vqa_set(400, s["seed"]))
    sps = 1 / steady_time(lambda n: train_toy.train(model, s, robot, vqa, n, s["vqa_frac"],
                                                    "bench train"), steps)
    return sps, (model, robot, vqa)


def bench_gpu_step(s, model, robot, vqa, n=20):
    """On CUDA: kernels per training step and the share of the step's wall time that the GPU is busy
    (torch.profiler over 2n minus n steps), eager and captured; then samples/s at the batch size and
    at the largest batch (doubling) whose step takes under 2x the first's."""
    from torch.profiler import ProfilerActivity, profile
    for graph in (False, True) if s["backbone"] == "toy" else (False,):  # only the toy is captured
        counts = []
        for steps in (n, 2 * n):
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:  # the GPU's events only
                t0 = time.perf_counter()
                train_toy.train(model, {**s, "cuda_graph": graph}, robot, vqa, steps, s["vqa_frac"],
                                "bench profile")
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            counts.append((len(kernels), sum(e.device_time for e in kernels) / 1e6, wall))
        (k1, b1, w1), (k2, b2, w2) = counts
        print(f"train step, {'CUDA graph' if graph else 'eager'}: {(k2 - k1) / n:.0f} kernels per "
              f"step, GPU busy {1000 * (b2 - b1) / n:.2f} ms of {1000 * (w2 - w1) / n:.2f} ms "
              f"({100 * (b2 - b1) / max(w2 - w1, 1e-9):.0f}%, under the profiler), "
              f"batch {s['batch_size']}")
    t64, bs, best = None, s["batch_size"], None
    while bs <= 16384:
        try:  # 200 steps a timing: a step is ~5 ms, what train() pays once must not drown it
            t = steady_time(lambda k: train_toy.train(model, {**s, "batch_size": bs}, robot, vqa, k,
                                                      s["vqa_frac"], "bench"), 200)
        except torch.OutOfMemoryError:
            break
        t64 = t64 or t
        print(f"batch {bs:5d}: {1000 * t:6.2f} ms/step, {bs / t:8.0f} samples/s")
        if t > 2 * t64:
            break
        best, bs = (bs, t), bs * 2
    if best:
        print(f"largest batch under 2x the batch-{s['batch_size']} step: {best[0]}, "
              f"{best[0] / best[1]:.0f} samples/s "
              f"({best[0] / best[1] / (s['batch_size'] / t64):.1f}x batch {s['batch_size']}'s)")


def matmul_gflops(device, n=1024):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = speed.median_time(lambda: (a @ b, sync()), reps=20)
    return 2 * n ** 3 / t / 1e9


def bench(s, cfg):
    """The README's numbers: training speed, FAST compression, env throughput, flow vs AR FAST."""
    obs, chunks, tok, fit_s = figures.demos_and_tokenizer(s, cfg)
    figures.write_figures(s, cfg, tok, obs, chunks)
    # training speed in the default job's conditions, beside a plain matmul on the same machine: the
    # steps/s vary 2-4x between machines of one kind; steps/s per matmul GFLOP/s far less
    (sps, trained), gflops = train_speed(s, cfg, tok, obs, chunks), matmul_gflops(s["device"])
    graphed = s["device"] == "cuda" and s["cuda_graph"] and s["backbone"] == "toy"
    layout = ("CUDA graph" if graphed else "eager" if s["device"] == "cuda"
              else f"{torch.get_num_threads()} threads")
    print(f"train: {sps:.2f} steps/s ({cfg.variant}, batch {s['batch_size']}, {s['device']}, "
          f"{layout}) | matmul 1024^3 fp32 {gflops:.0f} GFLOP/s | {1000 * sps / gflops:.1f} "
          f"steps/s per TFLOP/s | {s['train_steps']} steps ~ {s['train_steps'] / sps / 60:.1f} min")
    if s["device"] == "cuda":
        bench_gpu_step(s, *trained)
    n_fast = np.mean([len(ids) for ids in tok.encode_batch(chunks)])
    print(f"FAST: {n_fast:.2f} tokens/chunk vs {cfg.action_horizon * cfg.action_dim} with "
          f"per-dimension 256-bin tokens ({len(chunks)} scripted chunks, H={cfg.action_horizon}); "
          f"fit on 10k chunks {fit_s:.2f} s")
    env, n, t0 = kivla.PushEnv(), 0, time.perf_counter()
    env.reset(seed=0)
    while time.perf_counter() - t0 < 3.0:
        _, _, term, trunc, _ = env.step(kivla.scripted_action(env))
        n += 1
        if term or trunc:
            env.reset(seed=n)
    print(f"env: {n / (time.perf_counter() - t0):.0f} steps/s (step + {cfg.image_size} px render + "
          "scripted policy), one core")
    if s["init_from"]:
        model = kivla.KIVLA.from_checkpoint(s["init_from"], device=s["device"])
        print(f"model: {s['init_from']}")
    else:
        torch.manual_seed(s["seed"])
        model = train_toy.build_model(s, cfg, tok).to(s["device"]).eval()
        print("model: randomly initialised (AR decoding forced to the mean FAST length)")
    n_tok = int(round(n_fast)) + 1  # FAST tokens + "|"
    out = {}
    for bs in (1, 32):
        b = model.make_batch([obs[i % len(obs)] for i in range(bs)])
        t_flow = speed.median_time(lambda: model.sample_actions(b, num_steps=10))
        if s["device"] == "cuda":  # the prefix pass and the 10 Euler steps as one CUDA graph
            eager, sample = t_flow, speed.graphed_sampler(model, b, 10)
            t_flow = speed.median_time(lambda: sample(b))
            print(f"batch {bs:2d}: flow (10 Euler steps) eager {1000 * eager:.2f} ms, "
                  f"CUDA graph {1000 * t_flow:.2f} ms")
        # the toy's own FAST length, then the lengths of real 1 s chunks of many-DoF robots (30-60+)
        for n in (n_tok, 30, 60):
            decode = speed.graphed_fast(model, b, n)  # on CUDA captured too: two graphs compared
            t_ar = speed.median_time(lambda: decode(b))
            out[(bs, n)] = (t_flow, t_ar)
            print(f"batch {bs:2d}: flow (10 Euler steps) {1000 * t_flow:6.1f} ms | AR FAST ({n:2d} "
                  f"tokens) {1000 * t_ar:6.1f} ms | AR / flow = {t_ar / t_flow:.1f}x")
    out["paper"] = bench_paper_proportions(s)
    return out


def smooth_trajectories(n, H, A, seed):
    """(n, H, A) smooth synthetic action chunks in [-1, 1]: per dim a few low-frequency cosines (a 1
    s chunk of a many-DoF arm moves smoothly, which is what FAST compresses)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, H)[None, :, None]  # (1, H, 1)
    x = sum(rng.uniform(-0.5, 0.5, (n, 1, A))
            * np.cos(np.pi * k * t + rng.uniform(0, 2 * np.pi, (n, 1, A))) for k in range(4))
    return np.clip(x, -1, 1).astype(np.float32)


def bench_paper_proportions(s, H=50, A=14, expert_width=80):
    """Flow vs AR FAST latency at batch 1 with the paper's proportions instead of the toy's: a
    backbone ~5x the expert's parameters, a 1 s chunk of a 14-DoF arm (H=50), and the FAST length
    this tokenizer gives such chunks (scale 10 as in the FAST paper). Random weights: timing only"""
    tok = kivla.FASTTokenizer(10.0, 1024).fit(smooth_trajectories(2000, H, A, 0))
    n_tok = float(np.mean([len(tok.encode(c)) for c in smooth_trajectories(200, H, A, 1)]))
    cfg = kivla.Config(action_horizon=H, action_dim=A, state_dim=A, d_model=256, n_layer=6,
                       n_head=8, head_dim=32, vit_width=128, expert_width=expert_width)
    torch.manual_seed(0)
    model = kivla.KIVLA(cfg, tok).to(s["device"]).eval()
    p = model.num_params()
    obs = dict(kivla.PushEnv().reset(seed=train_toy.EVAL_SEED)[0], state=np.full(A, 0.5))
    b = model.make_batch([obs])
    sample = speed.graphed_sampler(model, b, 10)
    t_flow = speed.median_time(lambda: sample(b))
    decode = speed.graphed_fast(model, b, round(n_tok) + 1)
    t_ar = speed.median_time(lambda: decode(b))
    vlm, expert = p["backbone (VLM)"], p["action_expert"]
    print(f"paper proportions (random weights, batch 1): backbone {vlm / 1e6:.1f}M vs expert "
          f"{expert / 1e6:.2f}M params ({vlm / expert:.1f}x), H={H} A={A}, FAST {n_tok:.1f} "
          f"tokens/chunk | flow (10 Euler steps) {1000 * t_flow:.1f} ms | AR FAST "
          f"({round(n_tok) + 1} tokens) {1000 * t_ar:.1f} ms | AR / flow = {t_ar / t_flow:.1f}x")
    return {"fast_tokens": n_tok, "flow_s": t_flow, "ar_s": t_ar, "param_ratio": vlm / expert}


def make_parser():
    return train_toy.make_parser(prog="tools/bench.py", description=__doc__)


def main(argv):
    s, cfg = train_toy.start(argv, make_parser())
    return bench(s, cfg)


if __name__ == "__main__":
    main(sys.argv[1:])

"""
tools/speed.py: the speed machinery train_toy.py calls in one line each, out of the method's way.

  cuda_graphed      the CUDA-graph helper: run eagerly, capture once, replay (or stay eager)
  graphed_sampler   flow sampling (prefix pass + Euler steps) as one CUDA graph
  graphed_fast      greedy AR FAST decoding of a fixed token count as one CUDA graph
  graphed_step      the training step, captured (CUDA) or eager
  compiled_or_ddp   what the step calls: the model, DistributedDataParallel or torch.compile
  setup_distributed torchrun's rank and world; check_ranks_in_sync, end_distributed
  rollout_policy    batched closed-loop sampling; latency: seconds per chunk at batch 1
  median_time       seconds per call, waiting for the GPU
  autocast          bf16 on CUDA (--amp), a no-op elsewhere
  adamw, ema_update_  the optimizer and the EMA in forms a CUDA graph can replay (no host syncs)
  trim_suffix       drop the suffix columns no row uses (a shorter row: a cheaper step)
  only_rank0_prints under torchrun only rank 0 prints

On a CPU everything here is a no-op or the plain call, but for three pieces of the recipe written
for speed: AdamW's settings (betas 0.9 / 0.95, weight decay on matrices only), the EMA's update,
and trim_suffix (which drops only padding columns): the rest a reader can skip.
"""

import contextlib
import io
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import kivla


def cuda_graphed(fn, device, warmup=2, before=None, name=None):
    """Speed trick for CUDA: a training step of the toy is ~1,700 small kernels and a batch-1 flow
    chunk ~300, each launched from Python, so the GPU would sit idle most of the time. -> run(batch,
    *tensors): fn(batch, *tensors), captured once as a CUDA graph and replayed with one launch. The
    first `warmup` calls run eagerly on a side stream, as capture requires (their results are real:
    training steps count); the next captures; every later call copies its inputs (CPU or GPU) into
    the graph's and replays. before() runs before each eager call and the capture (training: the
    optimizer's zero_grad, so the graph allocates the gradients in its own memory pool). If capture
    fails, it says so in one line and stays eager: a GPU never stops on the speed machinery. The
    outputs are the graph's own tensors: the next replay overwrites them."""
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
            static.update({k: v.to(device).clone() for k, v in batch.items()})  # the graph's inputs
            extra.extend(x.to(device).clone() for x in tensors)
            before()
            try:
                with torch.cuda.graph(graph):
                    out = fn(static, *extra)
            except Exception as e:  # e.g. an op that reads a value back to Python inside fn
                graph, why = False, " ".join(f"{type(e).__name__}: {e}".split())[:200]
                tqdm.write(f"warning: CUDA graph capture of {name or 'a step'} failed ({why}); "
                           "running eagerly")
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


def graphed_sampler(model, batch, num_steps=10):
    """-> sample(batch, noise=None): model.sample_actions (the prefix pass and the Euler steps) for
    batches of this one shape, as a CUDA graph on CUDA; elsewhere (and for an HF backbone) the plain
    call."""
    dev = model.device
    if dev.type != "cuda" or isinstance(model.backbone, kivla.HFBackbone):
        return lambda b, noise=None: model.sample_actions(b, num_steps, noise)
    shape = (len(batch["text"]), model.cfg.action_horizon, model.cfg.action_dim)
    run = cuda_graphed(lambda b, z: model.sample_actions(b, num_steps, z), dev)
    return lambda b, noise=None: run(b, torch.randn(shape, device=dev) if noise is None
                                     else noise.to(dev)).clone()


def graphed_fast(model, batch, n):
    """-> decode(batch): greedy AR decoding of exactly n FAST tokens and their FAST decode, the
    token loop as one CUDA graph on CUDA (AR and flow timed alike); elsewhere the plain call."""
    if model.device.type != "cuda" or isinstance(model.backbone, kivla.HFBackbone):
        return lambda b: model.generate_fast_actions(b, max_tokens=n, stop_at_eos=False)
    run = cuda_graphed(lambda b: model.generate_fast_tokens(b, n, stop_at_eos=False), model.device)
    return lambda b: model.decode_fast_tokens(run(b))


def graphed_step(step_fn, s, dev, zero_grad):
    """The training step as train() calls it: one CUDA graph on CUDA, one process, the toy
    VLM (a HuggingFace backbone's forward is not checked for what capture forbids); else eager."""
    if dev.type == "cuda" and s["cuda_graph"] and s["world"] == 1 and not s["compile"] \
            and s["backbone"] == "toy":
        return cuda_graphed(step_fn, dev, warmup=3, before=zero_grad, name="the training step")

    def eager(batch):
        zero_grad()
        return step_fn(batch)
    return eager


def compiled_or_ddp(model, s):
    """What the training step calls. Under torchrun: DistributedDataParallel, which averages the
    gradients inside backward (and first copies rank 0's weights to all); or torch.compile."""
    if s["world"] > 1:
        return torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=not model.cfg.use_flow)
    if s["compile"]:
        return torch.compile(model, dynamic=False)  # a recompile per suffix length
    return model


def setup_distributed(s):
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK: one process per GPU (nccl) or per CPU share
    (gloo). -> rank, world size. Without torchrun: 0, 1 and nothing changes."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    if s["batch_size"] % world:
        raise SystemExit(f"error: --batch_size={s['batch_size']} must be a multiple of the {world} "
                         "processes")
    if s["device"] == "cuda":
        local, n_gpu = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local >= n_gpu:
            raise SystemExit(f"error: torchrun started process {local} but this machine has "
                             f"{n_gpu} GPU(s): use --nproc_per_node<={n_gpu}, or --device=cpu")
        s["device"] = f"cuda:{local}"
        torch.cuda.set_device(s["device"])
    torch.distributed.init_process_group("nccl" if s["device"].startswith("cuda") else "gloo")
    return torch.distributed.get_rank(), world


def check_ranks_in_sync(model, s):
    """Averaged gradients keep the ranks' weights identical: checked bit for bit after training."""
    if s["world"] == 1:
        return
    flat = torch.cat([p.detach().flatten().float().cpu() for p in model.parameters()])
    everyone = [torch.zeros_like(flat) for _ in range(s["world"])]
    torch.distributed.all_gather(everyone, flat)
    if not all(torch.equal(everyone[0], x) for x in everyone):
        raise RuntimeError("data parallel: ranks ended with different parameters")
    if s["rank"] == 0:
        print(f"data parallel: parameters identical on all {s['world']} ranks")


def end_distributed(s):
    """Under torchrun: wait until rank 0 has written everything, then leave the process group."""
    if s["world"] > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def median_time(fn, reps=15):
    """Median seconds of fn(), waiting for the GPU to finish each call (its kernels run async)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def rollout_policy(model, obs, num_steps, graph=True):
    """-> act(obs, live, noise): actions (len(live), H, A) for the live envs. On CUDA (flow,
    graph=True) every call samples all envs' rows, finished ones ignored, so one shape serves the
    whole rollout and flow sampling replays one CUDA graph; elsewhere the live rows are sampled."""
    if not (graph and model.device.type == "cuda" and model.cfg.use_flow):
        return lambda obs, live, noise: model.predict_actions(
            model.make_batch([obs[i] for i in live]), num_steps, noise)
    sample = graphed_sampler(model, model.make_batch(obs), num_steps)

    def act(obs, live, noise):
        z = torch.zeros(len(obs), *noise.shape[1:])
        z[live] = noise  # the live rows get the noise they would get alone
        return sample(model.make_batch(obs), z)[live]
    return act


def latency(model, obs, num_steps, reps=20):
    """Median seconds per action chunk at batch 1 for one observation: the prefix pass + the flow's
    Euler steps, or AR decoding of the FAST tokens this chunk takes (on CUDA: replayed graphs)."""
    b = model.make_batch([obs])
    if model.cfg.variant == "fast":
        decode = graphed_fast(model, b, model.generate_fast_tokens(b).shape[1])  # up to "|"
        return median_time(lambda: decode(b), reps=reps)
    sample = graphed_sampler(model, b, num_steps)
    return median_time(lambda: sample(b), reps=reps)


def autocast(device, amp=True):
    """bf16 autocast on CUDA with --amp, a no-op elsewhere (no weight cache: a graph replays it)."""
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16,
                          enabled=device.type == "cuda" and amp, cache_enabled=False)


def adamw(params, weight_decay, lr):
    """AdamW, weight decay on matrices only; fused on CPU and CUDA; capturable on CUDA (the step
    count stays on the GPU, so a CUDA graph can replay it; lr is a tensor for the same reason)."""
    dev = params[0].device
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), fused=dev.type in ("cpu", "cuda"), capturable=dev.type == "cuda")


@torch.no_grad()
def ema_update_(ema_params, params, w):
    """ema += w * (params - ema), w = 1 - decay (foreach; _foreach_lerp_ would sync the host)."""
    diff = torch._foreach_sub(params, ema_params)
    torch._foreach_mul_(diff, w)
    torch._foreach_add_(ema_params, diff)


def trim_suffix(*datasets):
    """Drop the suffix columns no row of these datasets (None: none) uses. make_batch pads the
    suffix to one FAST token per coefficient (21); the toy's chunks need ~12: a ~15% shorter row."""
    used = max(int((d["suffix_loss"].any(0) * torch.arange(1, d["suffix_loss"].shape[1] + 1)).max())
               for d in datasets if d is not None)  # the last used column + 1 (0 if none)
    cut = ("suffix", "suffix_target", "suffix_loss")
    return [None if d is None else {k: v[:, :used] if k in cut else v for k, v in d.items()}
            for d in datasets]


def only_rank0_prints(s):
    """Under torchrun the other ranks' stdout goes nowhere (rank 0 prints and writes outputs)."""
    return contextlib.redirect_stdout(io.StringIO()) if s["rank"] > 0 else contextlib.nullcontext()

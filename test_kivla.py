"""Tests for kivla: tokenizer, environment, model properties (insulation, masking, caches), training script.
Tiny dimensions, CPU only, no network; the whole file runs in well under a minute."""

import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import warnings
import contextlib
import dataclasses
from dataclasses import asdict

import gymnasium
import numpy as np
import pytest
import torch
from PIL import Image

import kivla
import train_toy
from tools import cli, compare, figures, outputs, speed
from train_toy import EVAL_SEED

# ------------------------------------------------------------------------------------------------
# FAST tokenizer


def smooth_chunks(n, H=10, D=2, seed=0):
    """Random smooth chunks in [-1, 1]: sums of a few low-frequency cosines, sinusoids and steps."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, H)[:, None]
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            x = sum(rng.uniform(-0.4, 0.4, D) * np.cos(np.pi * k * t + rng.uniform(0, 6, D)) for k in range(3))
        elif kind == 1:
            x = 0.9 * np.sin(2 * np.pi * rng.uniform(0.2, 2, D) * t + rng.uniform(0, 6, D))
        else:
            x = np.where(t < rng.uniform(0, 1, D), rng.uniform(-1, 1, D), rng.uniform(-1, 1, D))
        out.append(np.clip(x, -1, 1))
    return np.array(out, np.float32)


@pytest.fixture(scope="module")
def tok():
    return kivla.FASTTokenizer(scale=10.0, vocab_size=256).fit(smooth_chunks(600))


def test_dct_matrix_is_orthonormal_and_constant_signal_has_only_dc():
    """DCT-II ortho of a constant c over H samples: coef_0 = c * sqrt(H), every other coef 0."""
    C = kivla.dct_matrix(10)
    assert np.allclose(C @ C.T, np.eye(10), atol=1e-12)
    coef = C @ np.full(10, 0.5)
    assert coef[0] == pytest.approx(0.5 * math.sqrt(10)) and np.allclose(coef[1:], 0, atol=1e-12)


def test_round_trip_error_bound(tok):
    chunks = smooth_chunks(300, seed=1)
    for x in chunks:
        ids = tok.encode(x)
        assert all(0 <= i < tok.vocab_size for i in ids)
        rms = np.sqrt(np.mean((tok.decode(ids) - x) ** 2))
        assert rms <= 0.5 / tok.scale + 1e-6


def test_extreme_chunks_are_not_clamped(tok):
    """All +1 puts the DC coefficient at scale*sqrt(H), the edge of the alphabet: still exact."""
    for x in [np.ones((10, 2)), -np.ones((10, 2)), np.tile([[1.0], [-1.0]], (5, 2))]:
        assert np.sqrt(np.mean((tok.decode(tok.encode(x)) - x) ** 2)) <= 0.5 / tok.scale + 1e-6


def test_out_of_range_inputs_are_clipped(tok):
    x = smooth_chunks(1, seed=2)[0]
    big = x * 3.0
    assert tok.encode(big) == tok.encode(np.clip(big, -1, 1))
    with pytest.raises(ValueError, match="NaN"):
        tok.encode(np.full((10, 2), np.nan))
    with pytest.raises(ValueError, match="shape"):
        tok.encode(np.zeros((9, 2)))


def test_symbols_are_low_frequency_first(tok):
    """Dim 0 constant 0.5, dim 1 zero: symbols = [dc0, dc1, f1_d0, f1_d1, ...] = [M+16, M, M, M, ...]."""
    x = np.zeros((10, 2))
    x[:, 0] = 0.5
    syms = tok.symbols(x[None])[0].tolist()
    M = tok.M
    assert syms[0] == M + round(10 * 0.5 * math.sqrt(10)) and syms[1:] == [M] * 19
    x = np.zeros((10, 2))
    x[:, 1] = np.cos(np.pi * (np.arange(10) + 0.5) / 10)  # pure frequency 1 in dim 1
    syms = tok.symbols(x[None])[0] - M
    assert np.flatnonzero(syms).tolist() == [3]  # index = freq * D + dim = 1 * 2 + 1


def test_decode_never_raises_on_garbage(tok):
    rng = np.random.default_rng(0)
    cases = [[], [10**9], [-5, 3], list(rng.integers(-1000, 1000, 50)), [0] * 100, ["a", None, 3.5]]
    for ids in cases:
        out, valid = tok.decode(ids, return_valid=True)
        assert out.shape == (10, 2) and out.dtype == np.float32 and np.all(np.isfinite(out))
        assert not valid
    out, valid = tok.decode(tok.encode(smooth_chunks(1)[0]), return_valid=True)
    assert valid


def test_state_dict_round_trip_and_fit_is_deterministic(tok):
    tok2 = kivla.FASTTokenizer.from_state_dict(tok.state_dict())
    tok3 = kivla.FASTTokenizer(scale=10.0, vocab_size=256).fit(smooth_chunks(600))
    assert tok3.merges == tok.merges
    for x in smooth_chunks(20, seed=5):
        assert tok2.encode(x) == tok.encode(x)
        assert np.array_equal(tok2.decode(tok.encode(x)), tok.decode(tok.encode(x)))


def test_bpe_compresses_and_merges_runs_correctly():
    """A run 'aaa' merges into [aa, a] (left to right), both in fit and encode."""
    arr = np.array([5, 5, 5, -1, 5, 5, -1])
    assert kivla.FASTTokenizer._merge_array(arr, 5, 5, 99).tolist() == [99, 5, -1, 99, -1]
    t = kivla.FASTTokenizer(vocab_size=512).fit(smooth_chunks(600))
    assert np.mean([len(t.encode(x)) for x in smooth_chunks(100, seed=9)]) < 20
    # the batched encoder (merge by merge over all chunks at once) gives minbpe's ids, chunk for chunk
    test = np.concatenate([smooth_chunks(300, seed=9), np.random.default_rng(0).uniform(-1.5, 1.5, (100, 10, 2))])
    assert t.encode_batch(test) == [minbpe_encode(t, x) for x in test] and t.encode_batch([]) == []


def minbpe_encode(tok, chunk):
    """minbpe's encode: merge the lowest-rank pair present, left to right, until no pair has a merge."""
    seq, ranks = tok.symbols(chunk[None])[0].tolist(), {p: tok.n_base + i for i, p in enumerate(tok.merges)}
    while len(seq) > 1:
        pair = min(zip(seq, seq[1:]), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            return seq
        out, i = [], 0
        while i < len(seq):
            hit = i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair
            out.append(ranks[pair] if hit else seq[i])
            i += 2 if hit else 1
        seq = out
    return seq


# ------------------------------------------------------------------------------------------------
# Toy environment and scripted policy


def rollout(env, seed, actions):
    obs, _ = env.reset(seed=seed)
    out = [obs["image"].copy()]
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        out.append((obs["image"].copy(), obs["state"].copy(), r, term, trunc))
    return out


def test_env_determinism_and_spaces():
    env = gymnasium.make("kivla/Push-v0")
    acts = np.random.default_rng(0).uniform(-1, 1, (30, 2))
    a, b = rollout(env, 7, acts), rollout(env, 7, acts)
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a[1:], b[1:])) and np.array_equal(a[0], b[0])
    assert not np.array_equal(rollout(env, 8, acts)[0], a[0])
    obs, info = env.reset(seed=1)
    assert env.observation_space.contains(obs) and "success" in info
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert obs["instruction"].startswith("push the ")


def test_check_env_passes_without_warnings():
    from gymnasium.utils.env_checker import check_env
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        check_env(gymnasium.make("kivla/Push-v0").unwrapped)
    assert not [str(x.message) for x in w]


def test_scripted_policy_success_rate():
    assert kivla.expert_action is kivla.scripted_action  # the earlier name stays importable
    env = kivla.PushEnv(tasks="all")
    ok = 0
    for seed in range(60):
        env.reset(seed=10_000 + seed)
        while True:
            _, _, term, trunc, info = env.step(kivla.scripted_action(env))
            if term or trunc:
                break
        ok += info["success"]
    assert ok / 60 >= 0.98


def test_bad_actions_and_clipping():
    env = kivla.PushEnv()
    env.reset(seed=0)
    for bad in ([np.nan, 0], [0, np.inf], [1, 2, 3]):
        with pytest.raises(ValueError, match="finite"):
            env.step(np.array(bad, dtype=np.float64))
    a = rollout(kivla.PushEnv(), 3, [[5.0, -7.0]] * 5)
    b = rollout(kivla.PushEnv(), 3, [[1.0, -1.0]] * 5)
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a[1:], b[1:]))


def test_success_detection_and_truncation():
    env = kivla.PushEnv(max_episode_steps=3)
    env.reset(seed=0)
    env.blocks[0] = env.goal + [0.01, 0.0]
    _, r, term, trunc, info = env.step([0.0, 0.0])
    assert term and info["success"] and not trunc and r > -0.06
    env.reset(seed=0)
    env.blocks[0] = np.array([0.5, 0.5])
    env.pusher = np.array([0.9, 0.1])
    results = [env.step([0.0, 0.0]) for _ in range(3)]
    assert [x[3] for x in results] == [False, False, True] and not any(x[2] for x in results)


@pytest.mark.parametrize("unseen", ["purple", "green", ""])
def test_evaluation_splits_are_disjoint_and_the_unseen_ones_are_what_they_say(unseen):
    sp = kivla.task_splits(unseen)
    assert not set(sp["train"]) & set(sp["heldout"]) and not set(sp["train"]) & set(sp["unseen_color"])
    assert ({c for c, _ in sp["train"]} == set(kivla.COLORS) - {unseen}
            and {k for _, k in sp["train"]} == set(kivla.CORNERS))
    assert ({c for c, _ in sp["heldout"] + sp["train"]}
            <= set(kivla.COLORS) - {unseen}), "held-out combos recombine seen words"
    assert sp["unseen_color"] == [(unseen, k) for k in kivla.CORNERS] if unseen else sp["unseen_color"] == []
    env = kivla.PushEnv(tasks="heldout")
    for s in range(20):
        env.reset(seed=s)
        assert (env.color, env.corner) in kivla.HELDOUT_TASKS and env.color != kivla.UNSEEN_COLOR
    env = kivla.PushEnv(tasks=[("red", "top left")])
    assert env.reset(seed=0)[0]["instruction"] == "push the red block to the top left corner"
    assert env.reset(seed=0, options={"task": ("blue", "bottom right")})[0]["instruction"].startswith("push the blue")
    with pytest.raises(ValueError, match="tasks"):
        kivla.PushEnv(tasks="everything")


# ------------------------------------------------------------------------------------------------
# Model

TINY = dict(d_model=32, n_layer=2, n_head=2, head_dim=8, expert_width=16, vit_width=16, vit_layers=1)


@pytest.fixture(scope="module")
def demo():
    obs, chunks, tasks, _ = train_toy.collect_demos(6, 10, 0.3, seed=0)
    tok = kivla.FASTTokenizer(vocab_size=256).fit(chunks)
    vqa = train_toy.make_vqa_set(4, seed=0)
    return obs[:6] + vqa, np.concatenate([chunks[:6], np.zeros((4, 10, 2), np.float32)]), tok


def tiny(tok, variant="ki", seed=0, **kw):
    torch.manual_seed(seed)
    return kivla.KIVLA(kivla.Config(variant=variant, **{**TINY, **kw}), tok)


def fixed(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch["actions"].shape, generator=g), torch.rand(len(batch["actions"]), generator=g)


def flow_only_grads(model, batch):
    """Gradient of the flow loss alone: run with a CE that cannot backprop (suffix_loss all False)."""
    b = dict(batch, suffix_loss=torch.zeros_like(batch["suffix_loss"]))
    model.zero_grad()
    loss, m = model.compute_loss(b, *fixed(batch))
    assert m["ce_loss"] == 0 and m["flow_loss"] > 0
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def ce_only_grads(model, batch):
    model.zero_grad()
    alpha, model.cfg.flow_weight = model.cfg.flow_weight, 0.0
    loss, m = model.compute_loss(batch, *fixed(batch))
    model.cfg.flow_weight = alpha
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def is_zero(g):
    return g is None or not g.any()


def test_knowledge_insulation_blocks_flow_gradients(demo):
    obs, chunks, tok = demo
    ki = tiny(tok, "ki")
    batch = ki.make_batch(obs, chunks)
    g = flow_only_grads(ki, batch)
    assert all(is_zero(v) for n, v in g.items() if n.startswith("backbone.")), "flow leaked into the VLM"
    assert any(not is_zero(v) for n, v in g.items() if n.startswith("action_expert."))
    joint = tiny(tok, "joint")
    g = flow_only_grads(joint, batch)
    assert all(not is_zero(v) for n, v in g.items()
               if n.startswith("backbone.vit.")), "joint: every ViT weight feeds the expert"
    for i in range(TINY["n_layer"]):  # every layer's keys/values feed the expert
        assert not is_zero(g[f"backbone.blocks.{i}.qkv.weight"])


def test_ce_loss_never_reaches_the_action_expert(demo):
    obs, chunks, tok = demo
    for variant in ("ki", "joint"):
        m = tiny(tok, variant)
        g = ce_only_grads(m, m.make_batch(obs, chunks))
        assert all(is_zero(v) for n, v in g.items() if n.startswith("action_expert."))
        assert not is_zero(g["backbone.embed.weight"])


def test_flow_ignores_fast_tokens_and_backbone_ignores_the_expert(demo):
    obs, chunks, tok = demo
    m = tiny(tok, "ki").eval()
    batch = m.make_batch(obs, chunks)
    noise, time = fixed(batch)
    _, a = m.compute_loss(batch, noise, time)
    scrambled = batch["suffix"].clone()
    fast = scrambled >= m.vocab.fast_offset
    scrambled[fast] = m.vocab.fast_offset + (scrambled[fast] * 7 + 3) % tok.vocab_size
    _, b = m.compute_loss(dict(batch, suffix=scrambled), noise, time)
    assert b["flow_loss"] == a["flow_loss"] and b["ce_loss"] != a["ce_loss"]
    # actions (the expert's input) and noise change -> the backbone's CE is bit-identical
    _, c = m.compute_loss(dict(batch, actions=torch.randn_like(batch["actions"])), torch.randn_like(noise), time * 0.5)
    assert c["ce_loss"] == a["ce_loss"] and c["flow_loss"] != a["flow_loss"]


def test_expert_positions_do_not_depend_on_fast_tokens(demo):
    """The same weights as `pi0` (no FAST tokens in the sequence at all) give the same flow loss."""
    obs, chunks, tok = demo
    ki = tiny(tok, "ki").eval()
    pi0 = tiny(tok, "pi0").eval()
    pi0.load_state_dict(ki.state_dict())
    b_ki, b_pi0 = ki.make_batch(obs, chunks), pi0.make_batch(obs, chunks)
    assert (b_ki["suffix"] >= ki.vocab.fast_offset).any()
    assert not (b_pi0["suffix"] >= pi0.vocab.fast_offset).any(), "pi0 batches carry no FAST tokens"
    noise, time = fixed(b_ki)
    assert torch.allclose(ki.compute_loss(b_ki, noise, time)[1]["flow_loss"],
                          pi0.compute_loss(b_pi0, noise, time)[1]["flow_loss"], rtol=1e-5)


def test_attention_mask_prefix_bidirectional_suffix_causal(demo):
    obs, chunks, tok = demo
    m = tiny(tok, "ki").eval()
    batch = m.make_batch(obs[:2], chunks[:2])
    mask = kivla.prefix_lm_mask(torch.tensor([[True, True, True]]), 2)[0, 0].int().tolist()
    assert mask == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]

    def logits(b):  # logits over the whole sequence, prefix positions included
        x, valid = m.backbone.embed_prefix(b)
        Tp, Ts = x.shape[1], b["suffix"].shape[1]
        x = torch.cat([x, m.backbone.embed(b["suffix"])], 1)
        return m.backbone.lm_head(m.backbone(x, torch.arange(Tp + Ts), kivla.prefix_lm_mask(valid, Ts))[0]), Tp

    base, Tp = logits(batch)
    state = batch["state"].clone()
    state[:, 1] = m.vocab.state_offset + (state[:, 1] - m.vocab.state_offset + 50) % 256
    other, _ = logits(dict(batch, state=state))
    assert not torch.allclose(base[:, 0], other[:, 0]), "the first prefix token must see the last (bidirectional)"
    suffix = batch["suffix"].clone()
    suffix[:, 3] = m.vocab.fast_offset + 1
    other, _ = logits(dict(batch, suffix=suffix))
    assert torch.equal(base[:, :Tp + 3], other[:, :Tp + 3]), "FAST tokens are causal"
    assert not torch.equal(base[:, Tp + 3:], other[:, Tp + 3:])


def test_kv_cached_flow_sampling_equals_recomputation(demo):
    obs, chunks, tok = demo
    m = tiny(tok, "ki").eval()
    batch = m.make_batch(obs, chunks)
    noise = torch.randn(len(obs), 10, 2)
    cached = m.sample_actions(batch, num_steps=5, noise=noise)
    x = noise.clone()
    with torch.no_grad():
        for i in range(5):  # no cache: re-run the whole backbone, suffix included, at every step
            _, kv, valid = m.forward_vlm(batch)
            Tp = valid.shape[1]
            kv = [(k[:, :, :Tp], v[:, :, :Tp]) for k, v in kv]
            x = x - 0.2 * m._expert(x, torch.full((len(obs),), 1 - 0.2 * i), kv, valid)
    assert cached.shape == (len(obs), 10, 2) and cached.dtype == torch.float32
    assert torch.allclose(cached, x, atol=1e-5)


def test_ar_decoding_with_cache_equals_without(demo):
    obs, chunks, tok = demo
    m = tiny(tok, "fast").eval()
    batch = m.make_batch(obs)
    with torch.no_grad():  # bias the model towards FAST ids so decoding runs many steps
        m.backbone.embed.weight[:m.vocab.fast_offset] *= 0.1
    a, va = m.generate_fast_actions(batch, max_tokens=8, use_cache=True)
    b, vb = m.generate_fast_actions(batch, max_tokens=8, use_cache=False)
    assert a.shape == (len(obs), 10, 2) and va.dtype == torch.bool
    assert torch.allclose(a, b, atol=1e-6) and torch.equal(va, vb)
    # the fixed-length loop (what a CUDA graph captures) decodes the same tokens, then goes on to exactly n
    early, fixed_n = m.generate_fast_tokens(batch, 8), m.generate_fast_tokens(batch, 8, stop_at_eos=False)
    assert fixed_n.shape == (len(obs), 8) and torch.equal(fixed_n[:, :early.shape[1]], early)


def test_a_rows_actions_do_not_depend_on_the_other_rows(demo):
    """What the CUDA rollouts rely on when they sample every env's row, the finished ones' included: the live
    rows get the actions they would get alone (same noise)."""
    obs, chunks, tok = demo
    m = tiny(tok).eval()
    noise = torch.randn(len(obs), 10, 2, generator=torch.Generator().manual_seed(0))
    live = [0, 3, 7]
    alone = m.sample_actions(m.make_batch([obs[i] for i in live]), 2, noise[live])
    assert torch.allclose(m.sample_actions(m.make_batch(obs), 2, noise)[live], alone, atol=1e-5)


def test_grouped_query_attention_equals_mha_with_shared_kv_heads(demo):
    """n_kv_head=1 (Gemma 2B's layout) is multi-head attention whose key/value heads are all one head:
    copying the single k/v head into every head of an MHA model gives the same flow loss and samples."""
    obs, chunks, tok = demo
    nh, hs = TINY["n_head"], TINY["head_dim"]
    gqa, mha = tiny(tok, n_kv_head=1).eval(), tiny(tok).eval()
    sd = gqa.state_dict()
    for name, w in sd.items():
        if name.endswith("qkv.weight") and w.shape != mha.state_dict()[name].shape:
            q, k, v = w.split([nh * hs, hs, hs])
            sd[name] = torch.cat([q, k.repeat(nh, 1), v.repeat(nh, 1)])
    mha.load_state_dict(sd)
    batch = gqa.make_batch(obs, chunks)
    kv, valid = gqa.backbone_prefix_kv(batch)
    assert kv[0][0].shape == (len(obs), 1, valid.shape[1], hs), "the cache holds one key/value head"
    noise, time = fixed(batch)
    got, want = gqa.compute_loss(batch, noise, time)[1], mha.compute_loss(batch, noise, time)[1]
    assert {k: v.item() for k, v in got.items()} == pytest.approx({k: v.item() for k, v in want.items()}, rel=1e-5)
    assert torch.allclose(gqa.sample_actions(batch, 3, noise), mha.sample_actions(batch, 3, noise), atol=1e-5)
    g = flow_only_grads(tiny(tok, n_kv_head=1), batch)  # insulation holds with grouped heads too
    assert all(is_zero(v) for n, v in g.items() if n.startswith("backbone."))
    with pytest.raises(ValueError, match="n_kv_head"):
        kivla.Config(n_head=4, n_kv_head=3)


def test_quantile_normalisation_is_invertible_and_travels_with_the_checkpoint(demo, tmp_path):
    """Robot data far outside [-1, 1]: make_batch normalises it, the samplers return the original units."""
    obs, chunks, tok = demo
    wide = chunks * np.array([40.0, 0.5]) + np.array([100.0, -3.0])  # (N, H, 2): [60, 140] and [-3.5, -2.5]
    norm = kivla.QuantileNorm.fit(wide)
    z = norm(wide).reshape(-1, 2)
    assert np.allclose(np.quantile(z, [0.01, 0.99], axis=0), [[-1, -1], [1, 1]], atol=1e-5)
    assert np.allclose(norm.inverse(norm(wide)), wide, atol=1e-4)
    far = [dict(o, state=o["state"] * 300 + 20) for o in obs]  # states in [20, 320]
    snorm = kivla.QuantileNorm.fit([o["state"] for o in far])
    m = kivla.KIVLA(kivla.Config(**TINY), tok, action_norm=norm, state_norm=snorm).eval()
    plain = kivla.KIVLA(kivla.Config(**TINY), tok).eval()
    plain.load_state_dict(m.state_dict())
    batch = m.make_batch(far, wide)
    r = batch["has_actions"]  # the demo fixture's VQA rows carry no actions
    assert r.sum() == 6 and torch.allclose(batch["actions"][r], torch.from_numpy(norm(wide)).float()[r], atol=1e-5)
    assert (batch["state"] - m.vocab.state_offset).float().std() > 20, "states spread over the bins, not clipped"
    noise = torch.randn(len(obs), 10, 2)
    a = m.sample_actions(batch, 3, noise)
    assert torch.allclose(a, torch.from_numpy(norm.inverse(plain.sample_actions(batch, 3, noise).numpy())))
    m.save(tmp_path / "n.pt")
    m2 = kivla.KIVLA.from_checkpoint(tmp_path / "n.pt")
    assert np.allclose(m2.action_norm.lo, norm.lo) and np.allclose(m2.state_norm.hi, snorm.hi)
    assert torch.equal(m2.sample_actions(m2.make_batch(far), 3, noise), m.sample_actions(m.make_batch(far), 3, noise))
    with pytest.raises(ValueError, match="NaN"):
        kivla.QuantileNorm.fit(np.full((4, 2), np.nan))


def test_variants_losses(demo):
    obs, chunks, tok = demo
    m = tiny(tok, "fast")
    loss, metrics = m.compute_loss(m.make_batch(obs, chunks))
    assert metrics["flow_loss"] == 0 and metrics["ce_loss"] > 0
    loss.backward()
    assert all(is_zero(p.grad) for p in m.action_expert.parameters())
    m = tiny(tok, "pi0")
    _, metrics = m.compute_loss(m.make_batch(obs[:6], chunks[:6]))  # robot rows only: no CE at all
    assert metrics["ce_loss"] == 0 and metrics["flow_loss"] > 0
    with pytest.raises(ValueError, match="without FAST tokens"):  # a ki batch fed to pi0 is refused
        m.compute_loss(tiny(tok, "ki").make_batch(obs[:6], chunks[:6]))
    m = tiny(tok, "ki", flow_weight=0.0)
    loss, metrics = m.compute_loss(m.make_batch(obs, chunks))
    assert loss.item() == pytest.approx(metrics["ce_loss"].item()) and metrics["flow_loss"] > 0


def test_make_batch_shapes_and_errors(demo):
    obs, chunks, tok = demo
    m = tiny(tok)
    b = m.make_batch(obs, chunks)
    B, cfg = len(obs), m.cfg
    assert b["image"].shape == (B, 64, 64, 3) and b["image"].dtype == torch.uint8
    assert b["text"].shape == (B, cfg.text_len) and b["suffix"].shape == (B, cfg.suffix_len)
    assert b["has_actions"].tolist() == [True] * 6 + [False] * 4
    assert (b["suffix"][:6, 0] == m.vocab.action).all() and (b["suffix"][6:, 0] == m.vocab.answer).all()
    with pytest.raises(ValueError, match="actions must be"):
        m.make_batch(obs, chunks[:, :5])
    with pytest.raises(ValueError, match="text_len"):
        m.make_batch([dict(obs[0], instruction="push " * 20)])
    ids, unknown = m.vocab.words("push the magenta block")
    assert unknown == ["magenta"] and ids[2] == m.vocab.unk
    with pytest.raises(ValueError, match="state_dim=2"):
        m.make_batch([dict(obs[0], state=np.zeros(3))])
    arm = tiny(tok, state_dim=7).eval()  # a robot with 7 proprioception numbers: 7 state tokens in the prefix
    b = arm.make_batch([dict(o, state=np.linspace(0, 1, 7)) for o in obs[:2]])
    assert b["state"].shape == (2, 7) and arm.backbone_prefix_kv(b)[1].shape == (2, arm.cfg.prefix_len)
    assert arm.sample_actions(b, 2).shape == (2, 10, 2)
    with pytest.raises(ValueError, match="variant"):
        kivla.Config(variant="bogus")


def overfit(m, batch, lr, steps):
    """-> flow and CE loss at fixed noise and time, before and after `steps` AdamW steps on one batch."""
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    noise, time = fixed(batch)
    first = m.compute_loss(batch, noise, time)[1]
    for step in range(steps):
        loss, _ = m(batch)  # calling the model = its training loss (what DDP and torch.compile wrap)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, m.compute_loss(batch, noise, time)[1]


def test_overfit_a_handful_of_samples(demo):
    obs, chunks, tok = demo
    m = tiny(tok, "ki")
    first, last = overfit(m, m.make_batch(obs, chunks), 1e-2, 70)
    assert last["ce_loss"] < first["ce_loss"] / 10 and last["flow_loss"] < first["flow_loss"] / 4


def test_checkpoint_round_trip(demo, tmp_path):
    obs, chunks, tok = demo
    m = tiny(tok).eval()
    m.save(tmp_path / "ck.pt")
    m2 = kivla.KIVLA.from_checkpoint(tmp_path / "ck.pt")
    batch = m.make_batch(obs)
    noise = torch.randn(len(obs), 10, 2)
    assert torch.equal(m.sample_actions(batch, noise=noise), m2.sample_actions(batch, noise=noise))
    assert m2.fast_tokenizer.merges == tok.merges


# ------------------------------------------------------------------------------------------------
# HFBackbone: a tiny, randomly initialised HuggingFace PaliGemma behind the same interface
# (skipped where transformers is missing; .ci/run installs it, so CI runs them)

# Gemma-2B-like grouped-query attention with the env's image size; multi-head, deeper, SigLIP at 32 px (resized)
HF_SHAPES = [dict(n_layer=2, n_head=4, n_kv_head=1), dict(n_layer=3, n_head=2, n_kv_head=2, vision_size=32)]


def hf(tok, variant="ki", seed=0, n_layer=2, n_head=4, n_kv_head=1, vision_size=64):
    pytest.importorskip("transformers", minversion="5")
    torch.manual_seed(seed)
    cfg = kivla.Config(variant=variant, **{**TINY, "n_layer": n_layer, "n_head": n_head, "n_kv_head": n_kv_head,
                                           "image_size": vision_size, "patch_size": vision_size // 4})
    toy_shaped = kivla.Config(**{**TINY, "n_layer": 1, "n_head": 2, "head_dim": 8})  # the expert must not keep these
    hf_model = kivla.tiny_paligemma(cfg, tok.vocab_size)
    return kivla.KIVLA(toy_shaped if variant == "ki" else kivla.Config(variant=variant, **TINY), tok,
                       backbone=kivla.HFBackbone(hf_model))


def grads(model, batch, flow_weight):
    model.zero_grad()
    alpha, model.cfg.flow_weight = model.cfg.flow_weight, flow_weight
    loss, m = model.compute_loss(batch, *fixed(batch))
    model.cfg.flow_weight = alpha
    loss.backward()
    assert m["flow_loss"] > 0
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


@pytest.mark.parametrize("shape", HF_SHAPES)
def test_hf_backbone_knowledge_insulation(demo, shape):
    """ki: adding the flow loss changes no gradient of any HF parameter (same noise and time); the CE reaches
    every Gemma layer and the vision tower. joint: the flow loss alone reaches every layer's keys and values."""
    obs, chunks, tok = demo
    m = hf(tok, "ki", **shape)
    assert (m.cfg.n_layer, m.cfg.n_head, m.cfg.n_kv_head) == (shape["n_layer"], shape["n_head"], shape["n_kv_head"])
    batch = m.make_batch(obs, chunks)
    with_flow, without = grads(m, batch, 1.0), grads(m, batch, 0.0)
    hf_params = [n for n in with_flow if n.startswith("backbone.")]
    assert len(hf_params) > 20 and all(torch.equal(with_flow[n], without[n])
                                       for n in hf_params), "flow leaked into the VLM"
    assert not is_zero(with_flow["action_expert.out_proj.weight"]) and is_zero(without["action_expert.out_proj.weight"])
    for i in range(shape["n_layer"]):
        assert not is_zero(without[f"backbone.hf.model.language_model.layers.{i}.self_attn.k_proj.weight"])
    assert not is_zero(without["backbone.hf.model.vision_tower.embeddings.patch_embedding.weight"])
    joint = hf(tok, "joint", **shape)
    g = flow_only_grads(joint, batch)
    for i in range(shape["n_layer"]):
        for proj in ("k_proj", "v_proj"):
            assert not is_zero(g[f"backbone.hf.model.language_model.layers.{i}.self_attn.{proj}.weight"])
    assert not is_zero(g["backbone.hf.model.vision_tower.embeddings.patch_embedding.weight"])


@pytest.mark.parametrize("shape", HF_SHAPES)
def test_hf_backbone_caches_equal_recomputation_and_checkpoint_round_trip(demo, tmp_path, shape):
    obs, chunks, tok = demo
    m = hf(tok, "ki", **shape).eval()
    batch = m.make_batch(obs, chunks)
    noise = torch.randn(len(obs), 10, 2)
    cached = m.sample_actions(batch, num_steps=4, noise=noise)
    x = noise.clone()
    with torch.no_grad():
        for i in range(4):  # no cache: the whole VLM, suffix included, at every step
            _, kv, valid = m.forward_vlm(batch)
            kv = [(k[:, :, :valid.shape[1]], v[:, :, :valid.shape[1]]) for k, v in kv]
            x = x - 0.25 * m._expert(x, torch.full((len(obs),), 1 - 0.25 * i), kv, valid)
    assert torch.allclose(cached, x, atol=1e-5)
    with torch.no_grad():  # bias the VLM towards FAST ids so decoding runs many steps
        m.backbone.hf.model.language_model.embed_tokens.weight[:m.vocab.fast_offset] *= 0.1
    a, va = m.generate_fast_actions(batch, max_tokens=6, use_cache=True)
    b, vb = m.generate_fast_actions(batch, max_tokens=6, use_cache=False)
    assert torch.allclose(a, b, atol=1e-5) and torch.equal(va, vb)
    m.save(tmp_path / "hf.pt")  # the architecture travels with the weights: no hub, no download
    m2 = kivla.KIVLA.from_checkpoint(tmp_path / "hf.pt")
    assert isinstance(m2.backbone, kivla.HFBackbone) and m2.cfg == m.cfg
    assert torch.equal(m2.sample_actions(batch, 4, noise), m.sample_actions(batch, 4, noise))


def test_hf_backbone_ids_masks_and_rope_match_the_expert(demo):
    """FAST ids sit below the VLM's last 128 ids (never on its image token); the prefix is bidirectional and
    the suffix causal through HF's attention; Gemma's keys carry the same RoPE as the expert's rope()."""
    obs, chunks, tok = demo
    m = hf(tok, "ki").eval()
    from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb
    V, v = m.backbone.vocab_size, m.vocab
    assert v.fast_offset + tok.vocab_size == V - 128 and m.backbone.hf.config.image_token_id >= V - 128
    assert (len(kivla.SPECIALS + kivla.WORDS) <= v.state_offset < v.state_offset + 256 <= v.action < v.eos
            < v.fast_offset)
    batch = m.make_batch(obs[:2], chunks[:2])
    assert batch["suffix"][:, 0].eq(v.action).all() and (batch["suffix"] < V - 128).all()

    class Tokenizer:  # the part of a HuggingFace tokenizer that Vocab uses
        pad_token_id, unk_token_id = 0, 3

        def encode(self, text, add_special_tokens=True):
            return [10 + len(w) for w in text.split()]
    real = kivla.Vocab.inside(V, tok.vocab_size, tokenizer=Tokenizer())
    assert real.words("push the red block") == ([14, 13, 13, 15], []) and (real.pad, real.unk) == (0, 3)
    assert real.fast_offset == v.fast_offset and real.state_offset == v.state_offset

    def hidden(b):
        x, valid = m.backbone.embed_prefix(b)
        Tp, Ts = x.shape[1], b["suffix"].shape[1]
        x = torch.cat([x, m.backbone.embed(b["suffix"])], 1)
        return m.backbone(x, torch.arange(Tp + Ts), kivla.prefix_lm_mask(valid, Ts))[0], Tp

    with torch.no_grad():
        base, Tp = hidden(batch)
        state = batch["state"].clone()
        state[:, 1] = v.state_offset + (state[:, 1] - v.state_offset + 50) % 256
        assert not torch.allclose(base[:, 0], hidden(dict(batch, state=state))[0][:, 0]), "prefix is bidirectional"
        suffix = batch["suffix"].clone()
        suffix[:, 3] = v.fast_offset + 1
        other, _ = hidden(dict(batch, suffix=suffix))
    assert torch.allclose(base[:, :Tp + 3], other[:, :Tp + 3], atol=1e-6), "FAST tokens are causal"
    pos, hs = torch.arange(40), m.cfg.head_dim
    cos, sin = m.backbone.hf.model.language_model.rotary_emb(torch.zeros(1, 40, hs), pos[None])  # (1, T, hs)
    q = torch.randn(1, 2, 40, hs)
    assert torch.allclose(apply_rotary_pos_emb(q, q, cos, sin)[0],
                          kivla.rope(q, *kivla.rope_angles(pos, hs, m.cfg.rope_theta)), atol=1e-5)


def test_hf_backbone_overfits_a_handful_of_samples(demo):
    obs, chunks, tok = demo
    m = hf(tok, "ki")
    first, last = overfit(m, m.make_batch(obs, chunks), 5e-3, 100)
    assert last["ce_loss"] < first["ce_loss"] / 10 and last["flow_loss"] < first["flow_loss"] / 3


# ------------------------------------------------------------------------------------------------
# train_toy.py

TINY_RUN = ["--quick", "--n_demos=8", "--n_vqa=200", "--pretrain_steps=6", "--train_steps=6", "--eval_episodes=2",
            "--eval_interval=30", "--gif_episodes=1", "--batch_size=8", "--d_model=32", "--n_layer=2", "--n_head=2",
            "--head_dim=8", "--expert_width=16", "--vit_width=16", "--vit_layers=1", "--action_horizon=10",
            "--replan=10", "--num_steps=2", "--device=cpu"]  # same seed, same numbers: on one CPU


TIMING = ("latency_ms_per_chunk_b1", "batched_eval_ms_per_chunk", "train_time_s", "run_time_s", "wall_time_s",
          "watch_time_s")


def untimed(m):
    """metrics without the wall-clock numbers (which differ between identical runs)."""
    if isinstance(m, dict):
        return {k: untimed(v) for k, v in m.items() if k not in TIMING}
    if isinstance(m, float) and math.isnan(m):
        return "nan"  # NaN != NaN, but two NaNs here are the same result
    return [untimed(v) for v in m] if isinstance(m, (list, tuple)) else m


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Run once for the tests below: a comparison (every row, seed 0), the plain run of seed 0, and 2 rows
    of seeds 1 and 2 from the comparison's VLM (merged below).
    -> (folder, comparison, plain run, seeds 1-2, and the printout of each of the three)."""
    d, out = tmp_path_factory.mktemp("compare"), []
    for main, args in ((compare.main, ["--gif_episodes=0", f"--out_dir={d / 'a'}"]),
                       (train_toy.main, [f"--out_dir={d / 'b'}"]),
                       (compare.main, ["--variants=pi0,ki", "--seed=1", "--seeds=2", "--gif_episodes=0",
                                       f"--out_dir={d / 'c'}", f"--init_from={d / 'a' / 'pretrained.pt'}"])):
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            out.append((main(TINY_RUN + args), printed.getvalue()))
    (a, pa), (b, pb), (c, pc) = out
    return d, a, b, c, pa, pb, pc


def test_a_comparison_trains_every_row_for_every_seed_from_one_vlm(compared):
    """tools/compare.py: one shared pretraining, every variant and both no-VQA ablations; more seeds of
    some rows later, from the same VLM (--init_from)."""
    _, a, _, c, printed, _, printed_c = compared
    assert [r["runs"][0]["row"] for r in a["compare"]] == [name for name, _, _ in compare.ROWS]
    assert [r["vqa_frac"] for r in a["compare"]] == [0.125] * 4 + [0.0] * 2
    assert all(r["seeds"] == [0] and [x["seed"] for x in r["runs"]] == [0] for r in a["compare"])
    assert all(r["seeds"] == [1, 2] and [x["seed"] for x in r["runs"]] == [1, 2] for r in c["compare"])
    runs = [x for m in (a, c) for r in m["compare"] for x in r["runs"]]  # one VLM: the same knowledge
    assert len({(x["vqa_acc_before"], x["probe_acc_before"]) for x in runs}) == 1 and len(runs) == 10
    assert printed.count("VLM pretraining: VQA accuracy") == 1 and "compare: 6 runs" in printed
    assert "VLM pretraining" not in printed_c and "over 2 seeds: success" in printed_c


def test_a_comparisons_row_is_the_plain_run_of_its_seed(compared):
    """Same seed, same numbers (timings aside): ki seed 0 of the comparison is the plain run."""
    _, a, b = compared[:3]
    assert untimed(a["compare"][0]["runs"][0]) == untimed(b["runs"][0])
    assert b["success"] == b["runs"][0]["success"] and b["seeds"] == [0]


def test_a_rows_summary_is_the_mean_and_std_over_its_seeds(compared):
    ki = compared[3]["compare"][0]
    for k in ("success", "heldout_success", "unseen_color_success", "fast_token_acc",
              "first_action_mse", "probe_acc_after"):
        vals = [x[k] for x in ki["runs"]]
        assert ki[k] == pytest.approx(np.mean(vals)) and ki[k + "_std"] == pytest.approx(np.std(vals))


def test_compare_md_has_every_row_and_column(compared):
    md = (compared[0] / "a" / "compare.md").read_text().splitlines()
    header, rows = md[2], [line for line in md
                           if line.startswith("| ") and not line.startswith(("| variant", "| claim"))]
    assert all(h.split(" (")[0] in header for _, h, _ in compare.COLUMNS)
    assert [r.split(" | ")[0][2:] for r in rows] == [name for name, _, _ in compare.ROWS]
    assert all(r.count(" | ") == len(compare.COLUMNS) + 1 for r in rows)  # + the seeds column


def test_a_comparison_writes_every_file_and_its_checkpoints_reload(compared):
    d, _, _, c = compared[:4]
    ki = c["compare"][0]
    for f in ("pretrained.pt", "metrics.json", "compare.png", "interference.png", "ckpt_ki.pt",
              "ckpt_joint_noVQA.pt", "curves_fast.png", "history_ki.json"):
        assert (d / "a" / f).stat().st_size > 0
    for f in ("ckpt_ki_seed1.pt", "ckpt_pi0_seed2.pt", "curves_pi0_seed2.png", "history_ki_seed1.json"):
        assert (d / "c" / f).stat().st_size > 0
    assert (json.loads((d / "c" / "metrics.json").read_text())["compare"][0]["runs"][1]["success"]
            == ki["runs"][1]["success"])
    e = json.loads((d / "c" / "history_ki_seed2.json").read_text())["eval"]
    assert [r["step"] for r in e] == [6] and e[-1]["fast_token_acc"] == ki["runs"][1]["fast_token_acc"]
    assert (d / "b" / "rollouts.gif").stat().st_size > 0
    ck = torch.load(d / "a" / "ckpt_ki.pt", weights_only=True)
    m = kivla.KIVLA(kivla.Config(**ck["config"]), kivla.FASTTokenizer.from_state_dict(ck["fast_tokenizer"]))
    m.load_state_dict(ck["model"])
    m2 = kivla.KIVLA.from_checkpoint(d / "a" / "ckpt_ki.pt")
    batch = m.make_batch([kivla.PushEnv().reset(seed=0)[0]])
    noise = torch.randn(1, 10, 2)
    assert torch.equal(m.eval().sample_actions(batch, noise=noise), m2.sample_actions(batch, noise=noise))


def test_every_metrics_key_written_is_explained_and_every_explained_key_written(compared):
    """docs/outputs.md explains each key of metrics.json (a run's, a summary's, a comparison's)."""
    def keys(x):
        if isinstance(x, dict):
            return {k for k in x} | {k2 for k, v in x.items() if k != "vlm_watch" for k2 in keys(v)}
        return {k for v in x for k in keys(v)} if isinstance(x, list) else set()
    d = compared[0]
    written = set().union(*(keys(json.loads((d / x / "metrics.json").read_text())) for x in "abc"))
    std = {k for k in written if k.endswith("_std")}
    assert {k[:-4] for k in std} == set(outputs.SPREAD)
    page = open(os.path.join(os.path.dirname(__file__), "docs", "outputs.md")).read()
    explained = set(re.findall(r"^\| `([^`]+)` \|", page.split("## metrics.json")[1], re.M))
    assert written - std == explained - {"<key>_std", "from"}


def test_quick_says_how_many_robot_steps_it_ran(compared):
    assert "its 6 robot steps are too few" in compared[5]  # the plain run (TINY_RUN: --quick --train_steps=6)


def test_merge_pools_the_seeds_of_several_comparisons(compared, tmp_path):
    """Built in pieces: one more seed of two rows, run on its own, merged with the whole comparison."""
    d, a, _, c = compared[:4]
    assert [r["runs"][0]["row"] for r in c["compare"]] == ["ki", "pi0"]  # in the table's order
    merged = compare.main([f"--merge={d / 'a'},{d / 'c'}", f"--out_dir={tmp_path}"])["compare"]
    assert [r["runs"][0]["row"] for r in merged] == [name for name, _, _ in compare.ROWS]
    assert merged[0]["seeds"] == [0, 1, 2] and merged[3]["seeds"] == [0]
    ki_runs = a["compare"][0]["runs"] + c["compare"][0]["runs"]
    assert merged[0]["success"] == pytest.approx(np.mean([x["success"] for x in ki_runs]))
    md = (tmp_path / "compare.md").read_text()
    assert "| ki | 0,1,2 |" in md and "unseen colour purple" in md and (tmp_path / "compare.png").exists()


def test_merge_refuses_a_seed_twice_and_runs_of_different_budgets(compared, tmp_path):
    d = compared[0]
    with pytest.raises(SystemExit, match="ki seed 1 is in more than one run"):
        compare.main([f"--merge={d / 'c'},{d / 'c'}", f"--out_dir={tmp_path / 'm'}"])
    green = json.loads((d / "c" / "metrics.json").read_text().replace('"purple"', '"green"'))
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "metrics.json").write_text(json.dumps(green))  # seed 2 again, held out green
    with pytest.raises(SystemExit, match="differ in .train_steps, eval_episodes, unseen_color"):
        compare.main([f"--merge={d / 'a'},{tmp_path / 'g'}", f"--out_dir={tmp_path / 'm'}"])


def test_merge_keeps_each_flow_weight_a_row_of_its_own(compared, tmp_path):
    """The same rows and seeds at another flow weight (alpha): each (row, alpha) a row of its own."""
    d = compared[0]
    one = (d / "c" / "metrics.json").read_text().replace('"flow_weight": 10.0', '"flow_weight": 1.0')
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "metrics.json").write_text(one)
    both = compare.main([f"--merge={d / 'c'},{tmp_path / 'w'}", f"--out_dir={tmp_path}"])["compare"]
    assert [r["runs"][0]["row"] for r in both] == ["ki alpha=1", "pi0 alpha=1", "ki alpha=10",
                                                   "pi0 alpha=10"]
    assert kivla.Config().flow_weight == 10.0  # the default: pi0.5's alpha
    assert (tmp_path / "interference.png").stat().st_size > 0  # every row with a flow term


def test_steps_to_interpolates_between_the_curves_points():
    assert outputs.steps_to({"eval": [{"step": 100, "success": 0.2}, {"step": 200, "success": 0.6}]}) == 175
    assert math.isnan(outputs.steps_to({"eval": [{"step": 100, "success": 0.2}]}))


def test_eval_only_names_unknown_words_and_writes_its_gif_beside_the_checkpoint(compared, tmp_path, capsys):
    """Try it yourself: an instruction with a word the model has never seen is reported, and the
    episodes (2 x gif_episodes) go into try.gif in the checkpoint's folder (--out_dir: there)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes((compared[0] / "b" / "ckpt.pt").read_bytes())
    fast = ["--eval_only", f"--init_from={tmp_path / 'run' / 'ckpt.pt'}", "--gif_episodes=1", "--replan=10",
            "--num_steps=2"]
    r = train_toy.main(fast + ["--instruction=push the magenta block to the top left corner"])
    out = capsys.readouterr().out
    assert "magenta" in out and "not parsed" in out and (tmp_path / "run" / "try.gif").stat().st_size > 0
    assert len(r["episodes"]) == 2 and r["success"] == np.mean(r["episodes"])
    train_toy.main(fast + [f"--out_dir={tmp_path / 'elsewhere'}"])
    assert (tmp_path / "elsewhere" / "try.gif").stat().st_size > 0
    for bad, why in (["--gif_episodes=0"], "give >= 1"), ([f"--instruction={' '.join(['push'] * 13)}"], "13 words"):
        with pytest.raises(SystemExit, match=f"^error: .*{why}"):
            train_toy.main(fast[:2] + bad)


def test_eval_only_tries_the_tasks_its_checkpoint_trained_on(compared, tmp_path, monkeypatch):
    """Without --instruction, --eval_only runs the training split of the checkpoint's own --unseen_color (not
    the default purple's), with --seed as the flow's noise seed."""
    ck = torch.load(compared[0] / "b" / "ckpt.pt", weights_only=True)
    ck["settings"]["unseen_color"] = "blue"
    torch.save(ck, tmp_path / "ckpt.pt")
    seen = []
    monkeypatch.setattr(train_toy, "rollouts", lambda m, tasks, *a, **kw: seen.append((tasks, kw["seed"])) or (
        np.zeros(2), 0.0, []))
    monkeypatch.setattr(outputs, "write_gif", lambda *a: None)
    train_toy.main(["--eval_only", f"--init_from={tmp_path / 'ckpt.pt'}", "--gif_episodes=1", "--seed=7"])
    (tasks, seed), = seen
    assert tasks == kivla.task_splits("blue")["train"] and seed == 7
    assert not any(c == "blue" for c, _ in tasks) and any(c == "purple" for c, _ in tasks)


def test_the_curve_ends_with_the_final_evaluation_and_never_changes_training(compared, tmp_path):
    """Curve points every eval_interval steps; the last point is the final evaluation's (no second evaluation of
    the same model), with the final diagnostics. The curve draws its noise from its own generator: measuring it
    more often leaves the trained weights exactly as they were."""
    often = train_toy.main(TINY_RUN + ["--eval_interval=2", f"--out_dir={tmp_path / 'a'}"])["runs"][0]
    assert [st for st, _ in often["curve"]] == [2, 4, 6] and often["curve"][-1][1] == often["success"]
    last = json.loads((tmp_path / "a" / "history.json").read_text())["eval"][-1]
    assert last["first_action_mse"] == often["first_action_mse"] and last["fast_token_acc"] == often["fast_token_acc"]
    never = compared[2]["runs"][0]  # the fixture's plain run: TINY_RUN's eval_interval (30) > its 6 steps
    assert [st for st, _ in never["curve"]] == [6]
    a, b = (torch.load(d / "ckpt.pt", weights_only=True)["model"] for d in (tmp_path / "a", compared[0] / "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_ddp_with_the_hf_tiny_backbone(tmp_path):
    """torchrun + DistributedDataParallel (gloo, 2 CPU processes) on the whole --backbone=hf-tiny pipeline (VQA
    pretraining, KI training, evaluation with a tiny random PaliGemma). Each rank draws half the batch; train()
    checks bit for bit that both ranks end with the same parameters; only rank 0 prints and writes outputs.
    The checkpoint rebuilds the HF model from its stored architecture (no hub, no download)."""
    pytest.importorskip("transformers", minversion="5")
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train_toy.py", *TINY_RUN, "--backbone=hf-tiny", "--device=cpu", f"--out_dir={out}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    # after pretraining and robot training
    assert r.stdout.count("data parallel: parameters identical on all 2 ranks") == 2
    assert r.stdout.count("ki    seed 0 | success") == 1 and r.stdout.count("parameters: backbone") == 1
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "curves.png", "history.json", "interference.png",
                                                     "metrics.json", "pretrained.pt", "rollouts.gif"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["curve"][-1][1] == m["success"] == m["runs"][0]["success"] and np.isfinite(m["first_action_mse"])
    ck = kivla.KIVLA.from_checkpoint(out / "ckpt.pt")  # what --eval_only loads
    assert isinstance(ck.backbone, kivla.HFBackbone) and ck.cfg.n_kv_head == 1  # Gemma 2B's layout
    ok, _, frames = train_toy.rollouts(ck, "train", [EVAL_SEED], 10, 3, record=2)  # more GIF episodes than episodes
    assert ok.shape == (1,) and ok.dtype == bool and len(frames) == 1 and len(frames[0][0]) >= 2
    with pytest.raises(SystemExit, match="VLM weights do not fit"):  # HF weights into the toy VLM: refused
        train_toy.main(TINY_RUN + [f"--init_from={out / 'pretrained.pt'}", f"--out_dir={tmp_path / 'x'}"])


def test_scale_gpu_setting_has_the_promised_shapes_and_trains_on_cpu():
    s, cfg = train_toy.parse_args(["--scale=gpu", "--batch_size=4"])
    assert s["batch_size"] == 4 and not s["compile"] and train_toy.parse_args(["--scale=gpu"])[0]["batch_size"] == 256
    assert cfg.n_image_tokens == 64 and cfg.d_model == 256 and cfg.n_layer == 6
    obs, chunks, _, _ = train_toy.collect_demos(2, cfg.action_horizon, 0.3, seed=0)
    tok = kivla.FASTTokenizer(s["fast_scale"], s["fast_vocab"]).fit(chunks)
    m = kivla.KIVLA(cfg, tok)
    s.update(device="cpu", rank=0, world=1)
    robot, vqa = m.make_batch(obs, chunks), m.make_batch(train_toy.make_vqa_set(8, seed=0))
    before = m.backbone.blocks[0].qkv.weight.clone()
    ema = train_toy.train(m, s, robot, vqa, 2, s["vqa_frac"], "gpu-scale shapes")
    kv, valid = ema.backbone_prefix_kv(m.make_batch(obs[:2]))
    assert (kv[0][0].shape == (2, 8, 64 + cfg.text_len + 2, 32)
            and not torch.equal(before, m.backbone.blocks[0].qkv.weight))


def test_figures_are_written_from_the_model_and_are_not_blank(demo, tmp_path):
    """attention.png draws the masks the model uses: check a few cells by colour; fast_tokens.png is not blank."""
    from PIL import Image
    obs, chunks, tok = demo
    m = tiny(tok, "ki")
    figures.draw_attention(m, obs[0], chunks[0], tmp_path / "a.png", cell=9)
    figures.draw_fast_tokens(tok, chunks[0], tmp_path / "f.png")
    a = np.asarray(Image.open(tmp_path / "a.png").convert("RGB")).astype(int)
    Tp, Ts = m.cfg.prefix_len, len(tok.encode(chunks[0])) + 1
    px = lambda q, k: tuple(a[40 + q * 9 + 3, 92 + k * 9 + 3])  # noqa: E731  (row = query, column = key)
    blue, orange, green, grey = (70, 110, 200), (240, 140, 30), (40, 160, 80), (238, 238, 238)
    assert px(0, Tp - 1) == blue and px(0, Tp) == grey, "prefix bidirectional, never sees the suffix"
    assert px(Tp + 2, Tp + 2) == blue and px(Tp + 2, Tp + 3) == grey, "FAST tokens causal"
    assert px(Tp + Ts, 0) == orange and px(Tp + Ts, Tp) == grey and px(Tp + Ts, Tp + Ts + 9) == green
    assert px(0, Tp + Ts) == grey, "the backbone never attends to the expert"
    f = np.asarray(Image.open(tmp_path / "f.png").convert("L"))
    assert f.std() > 20 and (f < 128).mean() > 0.01


def test_robot_demos_never_contain_the_evaluation_splits_and_only_vqa_has_the_unseen_words():
    obs, chunks, tasks, rate = train_toy.collect_demos(30, 10, 0.3, seed=0)
    assert not set(tasks) & set(kivla.HELDOUT_TASKS) and rate >= 0.95
    assert kivla.UNSEEN_COLOR not in {c for c, _ in tasks}, "the unseen colour is never a demo's target"
    assert all(kivla.UNSEEN_COLOR not in o["instruction"].split() for o in obs)
    assert np.abs(chunks).max() <= 1.0
    synonyms = {w for ws in kivla.SYNONYMS.values() for w in ws}
    robot_words = {w for o in obs for w in o["instruction"].split()}
    vqa_words = {w for o in train_toy.make_vqa_set(400, seed=0) for w in o["instruction"].split()}
    assert not synonyms & robot_words and synonyms <= vqa_words and kivla.UNSEEN_COLOR in vqa_words
    assert set(kivla.SYNONYMS) <= robot_words, "the robot data says push / top / bottom"
    vocab = kivla.Vocab(256)
    rng = np.random.default_rng(0)
    said = kivla.paraphrase("push the red block to the top left corner", rng)
    assert said.split()[0] in kivla.SYNONYMS["push"] and said.endswith("the red block to the upper left corner")
    assert vocab.words(said)[1] == [], "every unseen word is in the vocabulary (VQA uses it), none is <unk>"


@pytest.mark.parametrize("args,msg", [
    (["--no_such_key=3"], "unknown setting --no_such_key"), (["--variant=bogus"], "--variant: must be one of ki,"),
    (["--unseen_color=orange"], f"--unseen_color: must be one of {', '.join(kivla.COLORS)}, or ''; got 'orange'"),
    (["--image_size=32"], "--image_size is fixed by the toy"), (["--quick", "x"], "expected true or false"),
    (["--compare"], "--compare moved: python tools/compare.py"), (["--bench"], "--bench moved: python tools/bench.py"),
    (["--figures"], "--figures moved: python tools/figures.py"), (["--variants=ki"], "--variants moved"),
    (["--merge=a,b"], "--merge moved: python tools/compare.py --merge="), (["--n_head=4", "--n_kv_head=3"], "n_kv_head"),
    (["--batch_size=abc"], "batch_size"), (["--quick=maybe"], "quick"), (["--seeds=0"], "seeds"),
    (["--backbone=llama"], "backbone"), (["--pretrain_blocks=0"], "pretrain_blocks"),
    (["--trian_steps=10"], "did you mean --train_steps?"), (["--flow_wieght", "10"], "did you mean --flow_weight?"),
    (["--train_steps"], "--train_steps: expected one argument"), (["stray"], "expected --key=value, got 'stray'"),
    (["--eval_only"], "--eval_only evaluates a trained model: add --init_from"),
    (["--instruction=push the red block"], "--instruction is for --eval_only"),
    (["--vqa_frac=1.5"], "vqa_frac must be in [0, 1]"), (["--train_steps=0"], "train_steps must be >= 1"),
    (["--lr=-1"], "lr must be >= 0"), (["--init_from=README.md"], "README.md is not a kivla checkpoint"),
    (["--init_from=docs"], "--init_from=docs: a folder: name the .pt in it"),
    (["--fast_scale=0"], "--fast_scale must be > 0"),
    (["--replan=6"], "--replan=6 executes more actions than a chunk holds (--action_horizon=5)"),
    (["--fast_vocab=10"], "--fast_vocab must be at least FAST's 19 base symbols at --fast_scale=4.0")])
def test_bad_cli_input(args, msg):
    with pytest.raises(SystemExit) as e:
        train_toy.parse_args(args)
    assert msg in str(e.value) and str(e.value).startswith("error:") and "\n" not in str(e.value)


@pytest.mark.parametrize("out_dir", ["README.md", "/proc/forbidden"])
def test_an_out_dir_that_cannot_be_made_is_one_line(out_dir):
    with pytest.raises(SystemExit, match=f"^error: --out_dir={out_dir}: cannot make that folder [^\n]*$"):
        train_toy.main(TINY_RUN + [f"--out_dir={out_dir}"])


def test_compare_refuses_an_unknown_row():
    with pytest.raises(SystemExit, match="unknown rows .'nope'.; choose from ki, joint, pi0, fast"):
        compare.main(["--variants=ki,nope"])


@pytest.mark.parametrize("flag, why", [("--variant=ki", "--variants"), ("--eval_only", "train_toy.py --eval_only"),
                                       ("--instruction=push", "--eval_only's")])
def test_compare_refuses_the_settings_it_would_ignore(flag, why):
    """Each row sets its own variant, and compare trains: a flag it would ignore (and then overwrite out/ with a
    comparison) is one line that names what to use."""
    with pytest.raises(SystemExit, match=f"^error: tools/compare.py has no {flag.split('=')[0]}: .*{why}"):
        compare.main([flag])


def test_key_space_value_reads_as_key_equals_value():
    """argparse habits work: --key value is --key=value; a bare --flag is true; a flag's value may follow it."""
    a, cfg_a = train_toy.parse_args(["--train_steps", "10", "--quick", "--flow_weight", "10", "--compile"])
    b, cfg_b = train_toy.parse_args(["--train_steps=10", "--quick=true", "--flow_weight=10", "--compile=1"])
    assert a == b and cfg_a == cfg_b and a["train_steps"] == 10 and cfg_a.flow_weight == 10 and a["compile"]
    assert train_toy.parse_args(["--film_stem=false"])[1].film_stem is False
    assert train_toy.parse_args(["--quick", "false"])[0]["quick"] is False
    assert train_toy.parse_args(["--quick"])[0]["out_dir"] == "out_quick", "a smoke test never overwrites out/"
    assert train_toy.parse_args(["--quick", "--out_dir=x"])[0]["out_dir"] == "x"


def test_a_vlm_only_checkpoint_is_refused_for_evaluation(demo, tmp_path):
    """pretrained.pt has a random action expert: --eval_only refuses it with the reason, and takes a ckpt.pt."""
    obs, chunks, tok = demo
    tiny(tok).save(tmp_path / "pretrained.pt", vqa_acc=0.5)
    tiny(tok).save(tmp_path / "ckpt.pt", settings={}, metrics={})
    with pytest.raises(SystemExit, match="is a VLM-only checkpoint .pretrained.pt"):
        train_toy.parse_args(["--eval_only", f"--init_from={tmp_path / 'pretrained.pt'}"])
    assert train_toy.parse_args(["--eval_only", f"--init_from={tmp_path / 'ckpt.pt'}"])[0]["eval_only"]
    assert train_toy.parse_args([f"--init_from={tmp_path / 'pretrained.pt'}"])[0]["init_from"]  # for training: fine


def test_help_groups_every_setting_with_its_meaning_within_100_columns(capsys):
    with pytest.raises(SystemExit) as e:
        train_toy.parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and max(len(line) for line in out.splitlines()) <= 100
    for group in ("run:", "method:", "data:", "training:", "evaluation:", "speed:"):
        assert f"\n{group}" in out
    s, cfg = train_toy.parse_args([])
    every = [*s, *(f.name for f in dataclasses.fields(kivla.Config) if f.name not in train_toy.FIXED_BY_THE_TOY)]
    assert set(every) == {a.dest for a in train_toy.make_parser()._actions} - {"help"}, "a Config field is no setting"
    blocks = {b.split()[0]: b.split("\n\n")[0] for b in re.split(r"\n(?=  --)", out) if b.startswith("  --")}
    for k in every:  # each with its meaning, then its default
        assert len(blocks[f"--{k}"].split()) >= 4 and blocks[f"--{k}"].rstrip().endswith("]"), blocks[f"--{k}"]
    assert "--image_size" not in out and "(transformers)" in out and "alpha in loss" in out
    assert out.index("--flow_weight") < out.index("\ndata:") < out.index("--n_demos")


def test_every_tool_answers_help_from_the_repository_root(capsys):
    for tool in (compare, figures, __import__("tools.bench").bench):
        with pytest.raises(SystemExit) as e:
            tool.main(["--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and "python tools/" in out and max(map(len, out.splitlines())) <= 100
    assert "--variants" in compare.make_parser().format_help()
    r = subprocess.run([sys.executable, "tools/compare.py", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--merge" in r.stdout  # as a script: it finds train_toy.py itself


def test_bad_cli_input_exits_with_a_message_not_a_traceback(tmp_path):
    """As a script (one process, importing torch, is enough: the rest in-process, through main)."""
    r = subprocess.run([sys.executable, "train_toy.py", "--variant=bogus", f"--out_dir={tmp_path}"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    for args in (["--compare"], ["--train_stesp", "5"]):
        with pytest.raises(SystemExit) as e:
            train_toy.main([*args, f"--out_dir={tmp_path}"])
        msg = str(e.value.code)
        assert msg.startswith("error:") and len(msg.splitlines()) == 1


def test_grounding_questions_ask_where_the_block_an_instruction_names_is():
    env = kivla.PushEnv()
    env.reset(seed=3)
    rng, vocab = np.random.default_rng(0), kivla.Vocab(256)
    qs = [kivla.make_vqa(env, rng) for _ in range(400)]
    grounding = [(q, a) for q, a in qs if q.startswith("push ")]
    assert 0.15 < len(grounding) / len(qs) < 0.3, "half of the 45% 'where' questions"
    for q, a in grounding:
        color, corner = q.split()[2], " ".join(q.split()[6:8])
        assert q == kivla.INSTRUCTION.format(color=color, corner=corner) + " where is it"
        assert a == kivla.position_bins(env.blocks[env.colors.index(color)]) and vocab.words(q)[1] == []
    kinds, labels = train_toy.probe_labels([{"instruction": q, "answer": a} for q, a in grounding])
    assert (kinds == 0).all() and (labels < 64).all()


def test_a_checkpoint_from_an_older_vocabulary_gives_a_clear_error(demo, tmp_path):
    obs, chunks, tok = demo
    m = tiny(tok)
    ck = {"model": m.state_dict(), "config": asdict(m.cfg), "fast_tokenizer": tok.state_dict()}
    for k in ("backbone.embed.weight", "backbone.lm_head.weight"):  # one word fewer, as before "it" was added
        ck["model"][k] = ck["model"][k][1:]
    torch.save(ck, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="does not fit"):
        kivla.KIVLA.from_checkpoint(tmp_path / "old.pt")
    with pytest.raises(SystemExit, match="^error: the VLM weights do not fit"):
        cli.load_vlm_weights(m, ck["model"])
    torch.save({**ck, "settings": {}}, tmp_path / "old_ckpt.pt")  # a trained one: --eval_only says it in one line
    with pytest.raises(SystemExit, match="^error: .*old_ckpt.pt does not fit"):
        train_toy.main(["--eval_only", f"--init_from={tmp_path / 'old_ckpt.pt'}", f"--out_dir={tmp_path}"])


def test_init_from_with_another_fast_vocab_is_refused_in_one_line(demo, tmp_path):
    obs, chunks, tok = demo
    tiny(tok).save(tmp_path / "pretrained.pt", vqa_acc=0.5)
    other = tok.vocab_size + 1
    with pytest.raises(SystemExit, match=f"^error: .*pretrained.pt has fast_vocab={tok.vocab_size}, not {other}$"):
        cli.load_checkpoint(tmp_path / "pretrained.pt", fast_vocab=other)  # what prepare asks, FAST fitted
    assert cli.load_checkpoint(tmp_path / "pretrained.pt", fast_vocab=tok.vocab_size)["fast_tokenizer"]


def test_hf_tiny_without_transformers_says_how_to_install_it_in_one_line(demo, monkeypatch):
    obs, chunks, tok = demo

    def missing(*a):
        raise ImportError("No module named 'transformers'")
    monkeypatch.setattr(kivla, "tiny_paligemma", missing)
    s, cfg = train_toy.parse_args(["--backbone=hf-tiny"])
    with pytest.raises(SystemExit, match="^error: hf-tiny needs transformers>=5: pip install transformers$"):
        train_toy.build_model(s, cfg, tok)


def test_vlm_pretraining_holds_its_learning_rate_after_the_warm_up_and_robot_training_decays(demo, tmp_path,
                                                                                             monkeypatch):
    """Pretraining: linear warm-up, then PRETRAIN_LR constant (a cosine slows the climb off the grounding plateau);
    robot training: warm-up, then a cosine down to lr * MIN_LR_FRAC."""
    obs, chunks, tok = demo
    s, cfg = train_toy.parse_args(TINY_RUN + [f"--out_dir={tmp_path}", "--pretrain_min_vqa=0"])
    s.update(rank=0, world=1, device="cpu")
    seen = []
    monkeypatch.setattr(train_toy, "train", lambda model, s_, **kw: seen.append((s_, kw)) or model.eval())
    train_toy.pretrain_vlm(s, kivla.Config(**{**asdict(cfg), **TINY}), tok, None, tiny(tok).make_batch(
        train_toy.make_vqa_set(8, 0)))
    (s_pre, kw), = seen
    assert kw["steps"] == s["pretrain_steps"] and s_pre["lr"] == train_toy.PRETRAIN_LR
    lr = [train_toy.lr_at(k, 1000, s_pre["lr"], 200, kw["min_lr_frac"]) for k in range(1000)]
    assert lr[0] < lr[100] < lr[199] == train_toy.PRETRAIN_LR and set(lr[199:]) == {train_toy.PRETRAIN_LR}
    robot = [train_toy.lr_at(k, 1000, s["lr"], 200, train_toy.MIN_LR_FRAC) for k in range(1001)]
    assert robot[199] == s["lr"] and robot[1000] == pytest.approx(s["lr"] * train_toy.MIN_LR_FRAC)
    assert all(a >= b for a, b in zip(robot[199:], robot[200:]))


@pytest.mark.parametrize("min_vqa, blocks", [(0.0, 1), (1.01, 2)])
def test_a_vlm_still_on_the_grounding_plateau_is_restarted_from_a_fresh_init(demo, tmp_path, monkeypatch, min_vqa,
                                                                             blocks):
    """While held-out VQA accuracy is under pretrain_min_vqa, pretraining starts again: a fresh random init (seed +
    1000 * block) on new batches, at most pretrain_blocks in all; the best VLM is kept. Above the bar: one block,
    from the run's own seed (so every run whose VLM passes is unchanged)."""
    obs, chunks, tok = demo
    s, cfg = train_toy.parse_args(TINY_RUN + [f"--out_dir={tmp_path}", f"--pretrain_min_vqa={min_vqa}",
                                              "--pretrain_blocks=2"])
    s.update(rank=0, world=1, device="cpu")
    calls, real_train = [], train_toy.train

    def spy(model, s_, *args, **kw):
        calls.append((s_["seed"], {k: v.clone() for k, v in model.state_dict().items()}))
        ema = real_train(model, s_, *args, **kw)
        calls[-1] += ({k: v.clone() for k, v in ema.state_dict().items()},)
        return ema
    monkeypatch.setattr(train_toy, "train", spy)
    vqa = tiny(tok).make_batch(train_toy.make_vqa_set(40, 0))
    c = kivla.Config(**{**asdict(cfg), **TINY})
    weights, acc = train_toy.pretrain_vlm(s, c, tok, vqa, vqa)
    assert [seed for seed, *_ in calls] == [s["seed"] + i for i in range(blocks)]
    for block, (_, init, _) in enumerate(calls):  # each block starts from the fresh init of seed + 1000 * block
        torch.manual_seed(s["seed"] + 1000 * block)
        fresh = kivla.KIVLA(c, tok).state_dict()
        assert all(torch.equal(init[k], fresh[k]) for k in fresh)
    accs = []
    for *_, ema in calls:
        m = kivla.KIVLA(c, tok)
        m.load_state_dict(ema)
        accs.append(train_toy.vqa_accuracy(m, vqa))
    kept = [i for i, (*_, ema) in enumerate(calls) if all(torch.equal(weights[k], ema[k]) for k in weights)]
    assert kept == [int(np.argmax(accs))] and acc == max(accs)
    assert torch.load(tmp_path / "pretrained.pt", weights_only=True)["vqa_acc"] == acc


@pytest.mark.parametrize("stem", ["conv", "patchify"])
def test_coord_stem_feeds_each_pixels_x_and_y_beside_rgb(stem):
    cfg = kivla.Config(vit_stem=stem)
    vit, seen = kivla.ViT(cfg, 50), []
    vit.stem.convs[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    img = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    text, valid = torch.zeros(2, 12, dtype=torch.long), torch.ones(2, 12, dtype=torch.bool)
    assert vit(img, text, valid).shape == (2, 16, cfg.d_model)
    x = seen[0]  # (B, 5, S, S)
    assert x.shape == (2, 5, 64, 64) and torch.equal(x[:, :3], img.permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert x.is_contiguous(memory_format=torch.channels_last), "the layout the CPU's conv kernels are fastest on"
    ramp = torch.linspace(-1, 1, 64)
    assert torch.equal(x[:, 3], ramp.expand(2, 64, 64)), "channel 3 is x: left (-1) to right (+1), as the env's x"
    assert torch.equal(x[:, 4], ramp[:, None].expand(2, 64, 64)), "channel 4 is y: top (-1) to bottom (+1)"
    plain = kivla.ViT(kivla.Config(vit_stem=stem, coord_stem=False), 50)
    assert plain.stem.convs[0].in_channels == 3 and plain(img, text, valid).shape == (2, 16, cfg.d_model)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys(tok):
    """QK-norm RMS-normalises every head's queries and keys: scaling the q and k rows of the projection
    (here 0.02 -> 10x) leaves the block's output unchanged. Without it the attention logits grow 100x."""
    torch.manual_seed(0)
    x, rot = torch.randn(2, 7, 64), kivla.rope_angles(torch.arange(7), 16)
    for qk_norm in (True, False):
        blk = kivla.Block(64, 4, 16, qk_norm=qk_norm)
        torch.nn.init.normal_(blk.qkv.weight, std=0.02)
        y0, _ = blk(x, rot)
        with torch.no_grad():
            blk.qkv.weight[:2 * 64] *= 10  # the q rows and the k rows (4 heads x 16 each); v unchanged
        y1, _ = blk(x, rot)
        assert torch.allclose(y0, y1, atol=1e-5) == qk_norm
    assert ([n for n, _ in kivla.Block(64, 4, 16, qk_norm=True).named_parameters() if "_norm" in n]
            == ["q_norm.weight", "k_norm.weight"])
    assert not any("q_norm" in n for n, _ in kivla.KIVLA(kivla.Config(qk_norm=False), tok).named_parameters())


@pytest.mark.slow
def test_the_training_step_and_flow_sampling_compile_without_graph_breaks(demo):
    """No data-dependent shapes and no host syncs in the step: for a batch that mixes robot and VQA rows,
    torch.compile traces compute_loss of every variant, sample_actions and fixed-length AR decoding as one graph
    each (what lets a GPU replay them as CUDA graphs). Checked with torch._dynamo.explain (tracing only)."""
    obs, chunks, tok = demo
    for variant in kivla.VARIANTS:
        m = tiny(tok, variant)
        batch = m.make_batch(obs[4:8], chunks[4:8])  # 2 robot rows, 2 VQA rows
        assert batch["has_actions"].tolist() == [True, True, False, False]
        e = torch._dynamo.explain(m.compute_loss)(batch)
        assert e.graph_break_count == 0 and e.graph_count == 1, (variant, e.break_reasons)
    e = torch._dynamo.explain(m.eval().sample_actions)(batch)  # (the last model: fast; its expert is untrained)
    assert e.graph_break_count == 0 and e.graph_count == 1, e.break_reasons
    # and AR decoding of a fixed token count (what --bench captures on CUDA): one graph too
    e = torch._dynamo.explain(lambda b: m.generate_fast_tokens(b, 4, stop_at_eos=False))(batch)
    assert e.graph_break_count == 0 and e.graph_count == 1, e.break_reasons


def test_a_batch_of_robot_rows_only_and_one_of_vqa_rows_only_give_the_losses_they_should(demo):
    """The masked losses: VQA rows add nothing to the flow loss, robot rows' FAST targets and VQA answers share
    one mean; a batch without robot rows has flow loss 0 (and no NaN from an empty mean)."""
    obs, chunks, tok = demo
    m = tiny(tok)
    mixed = m.make_batch(obs[4:8], chunks[4:8])
    noise, time = fixed(mixed)
    robot = {k: v[:2] for k, v in mixed.items()}
    _, both = m.compute_loss(mixed, noise, time)
    _, rob = m.compute_loss(robot, noise[:2], time[:2])
    _, vqa = m.compute_loss({k: v[2:] for k, v in mixed.items()}, noise[2:], time[2:])
    assert torch.allclose(both["flow_loss"], rob["flow_loss"]) and vqa["flow_loss"] == 0
    n_rob, n_vqa = int(robot["suffix_loss"].sum()), int(mixed["suffix_loss"][2:].sum())
    assert torch.allclose(both["ce_loss"], (rob["ce_loss"] * n_rob + vqa["ce_loss"] * n_vqa) / (n_rob + n_vqa))


class StandInGraph:
    replays = 0

    def replay(self):
        StandInGraph.replays += 1


def cuda_stand_ins(monkeypatch, graph=lambda g: contextlib.nullcontext()):
    """CUDA's stream and graph API as no-ops on a CPU, so cuda_graphed's protocol can be tested."""
    stream = type("Stream", (), {"wait_stream": lambda self, other: None})
    monkeypatch.setattr(torch.cuda, "Stream", stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", StandInGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    StandInGraph.replays = 0


def test_the_cuda_graph_helper_runs_eagerly_then_captures_then_copies_inputs_and_replays(monkeypatch):
    """cuda_graphed's protocol, on a CPU with stand-ins for CUDA's stream and graph: `warmup` eager calls on the
    caller's inputs (before() first), one capture on copies of them, then replays that copy each new input into
    the captured ones and return the captured outputs, without calling fn again."""
    cuda_stand_ins(monkeypatch)
    Graph = StandInGraph
    calls, befores = [], []
    run = speed.cuda_graphed(lambda b, z: calls.append((b["x"], z)) or b["x"] + z, "cpu", warmup=2,
                                 before=lambda: befores.append(len(calls)))
    ins = [({"x": torch.full((2,), float(i))}, torch.full((2,), 10.0 * i)) for i in range(5)]
    outs = [run(*i) for i in ins]
    assert [o[0].item() for o in outs[:3]] == [0.0, 11.0, 22.0] and befores == [0, 1, 2]  # eager, eager, capture
    assert calls[0][0] is ins[0][0]["x"] and calls[2][0] is not ins[2][0]["x"], "the capture runs on copies"
    # capturing records the kernels without running them: the capture's call replays too, as every later one
    assert len(calls) == 3 and Graph.replays == 3 and outs[4] is outs[2]  # replays: no Python call of fn
    static_x, static_z = calls[2]
    assert torch.equal(static_x, ins[4][0]["x"]) and torch.equal(static_z, ins[4][1]), "inputs copied in"


def test_a_failed_cuda_graph_capture_says_so_in_one_line_and_the_run_goes_on_eagerly(monkeypatch, capsys):
    """A GPU never stops on the speed machinery: when capture raises (e.g. an op that reads a value back to
    Python), cuda_graphed prints one line and from then on runs fn eagerly, on the caller's own inputs."""
    @contextlib.contextmanager
    def failing_capture(g):  # as CUDA's: the capture runs fn (on the graph's copies), then fails
        yield
        raise RuntimeError("operation not permitted when stream is capturing\n(a second line of detail)")
    cuda_stand_ins(monkeypatch, graph=failing_capture)
    calls = []
    run = speed.cuda_graphed(lambda b: calls.append(b["x"]) or b["x"] * 2, "cpu", warmup=1, name="the step")
    ins = [{"x": torch.full((2,), float(i))} for i in range(4)]
    outs = [run(b) for b in ins]
    assert [o[0].item() for o in outs] == [0.0, 2.0, 4.0, 6.0] and StandInGraph.replays == 0
    assert calls[0] is ins[0]["x"] and calls[1] is not ins[1]["x"], "eager, then the capture on copies"
    assert [c is b["x"] for c, b in zip(calls[2:], ins[1:])] == [True] * 3, "then eager on the caller's inputs"
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("warning: CUDA graph capture of the step failed (RuntimeError")
    assert out.rstrip().endswith("running eagerly")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_path_runs_on_cuda(tmp_path, capsys):
    """On a GPU: the comparison (every variant, the AR `fast` one included) trains with its step captured in a CUDA
    graph and evaluates; --eval_only, tools/figures.py, --scale=gpu and the HF backbone run; the samplers return tensors on
    the model's device; a captured step gives the eager step's loss."""
    cuda = [a for a in TINY_RUN if a != "--device=cpu"] + ["--device=cuda"]
    a = compare.main(cuda + [f"--out_dir={tmp_path / 'a'}"])
    assert "CUDA graph: the training step captured" in capsys.readouterr().out
    assert all(r["curve"][-1][1] == r["success"] and np.isfinite(r["first_action_mse"]) for r in a["compare"])
    m = kivla.KIVLA.from_checkpoint(tmp_path / "a" / "ckpt_ki.pt", device="cuda")
    b = m.make_batch([kivla.PushEnv().reset(seed=0)[0]])
    assert m.sample_actions(b).device.type == m.predict_actions(b).device.type == "cuda"
    assert all(t.device.type == "cuda" for t in m.generate_fast_actions(b))
    # the captured samplers compute what the eager ones compute
    b8 = m.make_batch([kivla.PushEnv().reset(seed=i)[0] for i in range(8)])
    z = torch.randn(8, m.cfg.action_horizon, m.cfg.action_dim, device="cuda")
    rng = torch.cuda.get_rng_state()
    sample = speed.graphed_sampler(m, b8, 3)
    for _ in range(4):  # 2 eager calls, the capture, a replay
        assert torch.allclose(sample(b8, z), m.sample_actions(b8, 3, z), atol=1e-4)
    assert torch.equal(torch.cuda.get_rng_state(), rng), "capturing for evaluation moved training's noise"
    normed = kivla.KIVLA(m.cfg, m.fast_tokenizer, action_norm=kivla.QuantileNorm([-5, 0], [5, 2])).to("cuda").eval()
    sample = speed.graphed_sampler(normed, b8, 3)
    for _ in range(4):
        assert torch.allclose(sample(b8, z), normed.sample_actions(b8, 3, z), atol=1e-4)
    fast = kivla.KIVLA.from_checkpoint(tmp_path / "a" / "ckpt_fast.pt", device="cuda")
    decode = speed.graphed_fast(fast, b8, 6)
    for _ in range(4):
        assert torch.allclose(decode(b8)[0], fast.generate_fast_actions(b8, max_tokens=6, stop_at_eos=False)[0],
                              atol=1e-4)
    train_toy.main(["--eval_only", f"--init_from={tmp_path / 'a' / 'ckpt_fast.pt'}", "--device=cuda",
                    f"--out_dir={tmp_path}"])
    figures.main(cuda + [f"--out_dir={tmp_path / 'f'}"])
    train_toy.main(cuda + ["--scale=gpu", "--batch_size=8", f"--out_dir={tmp_path / 'g'}"])
    try:
        import transformers  # noqa: F401
        train_toy.main(cuda + ["--backbone=hf-tiny", f"--out_dir={tmp_path / 'h'}"])
    except ImportError:
        pass
    # the captured step computes what the eager step computes (fp32, the same batches; `fast` draws no noise)
    s, cfg = train_toy.parse_args(cuda + ["--amp=false", "--variant=fast"])
    s.update(rank=0, world=1, device="cuda")
    obs, chunks, _, _ = train_toy.collect_demos(2, cfg.action_horizon, 0.3, 0)
    tok = kivla.FASTTokenizer(4.0, 64).fit(chunks)
    weights = []
    for graph in (False, True):
        torch.manual_seed(0)
        model = train_toy.build_model(s, cfg, tok).cuda()
        robot, vqa = model.make_batch(obs, chunks), model.make_batch(train_toy.make_vqa_set(8, 0))
        train_toy.train(model, {**s, "cuda_graph": graph}, robot, vqa, 8, 0.25, "graph" if graph else "eager")
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(weights[0], weights[1], atol=1e-4), (weights[0] - weights[1]).abs().max()


# ------------------------------------------------------------------------------------------------
# Exercises (docs/course.md): `python -m pytest -q -k exercise` grades them. Each check first calls
# its own exercise, then only earlier ones, so in the student's copy (tools/make_assignment.py) each
# test fails with its own NotImplementedError until it is written. The numbers below are derived by
# hand (in the docstrings) or stored from the reference: none is computed by the function it grades.


def exercise_data():
    """6 robot rows (an observation and the next 10 scripted actions) and 4 VQA rows; no train_toy."""
    env, rng, obs, chunks = kivla.PushEnv(), np.random.default_rng(0), [], []
    for seed in range(6):
        o, _ = env.reset(seed=seed)
        acts = []
        for _ in range(10):
            acts.append(kivla.scripted_action(env))
            env.step(acts[-1])
        obs.append(o)
        chunks.append(np.array(acts))
    vqa = []
    for seed in range(4):
        o, _ = env.reset(seed=100 + seed)
        q, a = kivla.make_vqa(env, rng)
        vqa.append({**o, "instruction": q, "answer": a})
    return obs, np.array(chunks, np.float32), vqa


def exercise_model(variant="ki"):
    obs, chunks, vqa = exercise_data()
    tok = kivla.FASTTokenizer(vocab_size=256).fit(chunks)
    m = tiny(tok, variant)
    batch = m.make_batch(obs + vqa, np.concatenate([chunks, np.zeros((4, 10, 2), np.float32)]))
    return m, batch


def bare_model(variant):
    """A tiny model whose FAST tokenizer is not fit: the first call of checks 5 and 6 needs no exercise before."""
    tok = kivla.FASTTokenizer(vocab_size=256)
    tok._setup(10, 2)
    tok._build_tables()
    return tiny(tok, variant)


def check_exercise_1():
    """FAST's front end. H = 4, D = 2, scale 10: M = round(10 * sqrt(4)) = 20. A constant c over 4 steps has
    DCT coefficient c * sqrt(4) at frequency 0 and nothing else: dimension 0 at 0.5 -> 1.0 -> q = 10 -> symbol
    30, dimension 1 at 0.25 -> 0.5 -> 5 -> 25. cos(pi (t + 0.5) / 4) has sqrt(4 / 2) = 1.41 at frequency 1:
    times 0.5 in dimension 0 -> q = round(7.07) = 7 -> symbol 27 at index 1 * D + 0 = 2."""
    tok = kivla.FASTTokenizer(scale=10.0, vocab_size=64)
    tok._setup(4, 2)
    x = np.zeros((2, 4, 2))
    x[0, :, 0], x[0, :, 1] = 0.5, 0.25
    x[1, :, 0] = 0.5 * np.cos(np.pi * (np.arange(4) + 0.5) / 4)
    syms = np.asarray(tok.symbols(x))
    assert syms.shape == (2, 8), f"symbols of (2, 4, 2) chunks must be (2, 8), got {syms.shape}"
    assert syms[0].tolist() == [30, 25, 20, 20, 20, 20, 20, 20], "frequency 0 of every dimension first"
    assert syms[1].tolist() == [20, 20, 27, 20, 20, 20, 20, 20], "then frequency 1 of every dimension"
    assert np.array_equal(tok.symbols(3 * x), tok.symbols(np.clip(3 * x, -1, 1))), "clip to [-1, 1] first"
    # the inverse: exact on a grid chunk, off by at most half a rounding step per coefficient otherwise
    assert np.allclose(tok.chunk_from_symbols(syms[0]), x[0], atol=1e-6)
    chunks = smooth_chunks(50, H=4, seed=3)
    for c in chunks:
        rms = np.sqrt(np.mean((tok.chunk_from_symbols(tok.symbols(c[None])[0]) - c) ** 2))
        assert rms <= 0.5 / tok.scale + 1e-6, "the inverse undoes the DCT and the scaling"
    # and through BPE: a fitted tokenizer round-trips every chunk within the same bound
    tok = kivla.FASTTokenizer(scale=10.0, vocab_size=256).fit(smooth_chunks(300))
    for c in smooth_chunks(30, seed=4):
        assert np.sqrt(np.mean((tok.decode(tok.encode(c)) - c) ** 2)) <= 0.5 / tok.scale + 1e-6


def check_exercise_2():
    """The masks. 3 prefix + 2 suffix tokens, rows = queries: the prefix sees the prefix, the suffix also
    itself and what came before it; a padded prefix key (the 2nd) is hidden from every query. The expert's 2
    queries see every valid prefix key and both action keys."""
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).bool()
    got = kivla.prefix_lm_mask(torch.ones(1, 3, dtype=torch.bool), 2)
    assert got.shape == (1, 1, 5, 5) and got.dtype == torch.bool, f"(B, 1, T, T) bool, got {got.shape} {got.dtype}"
    assert torch.equal(got[0, 0], want), f"want\n{want.int()}\ngot\n{got[0, 0].int()}"
    pad = kivla.prefix_lm_mask(torch.tensor([[True, False, True]]), 2)[0, 0]
    assert not pad[:, 1].any() and torch.equal(pad[:, [0, 2, 3, 4]], want[:, [0, 2, 3, 4]]), "hide padded keys"
    e = kivla.expert_mask(torch.tensor([[True, False, True], [True, True, True]]), 2)
    assert e.shape == (2, 1, 1, 5), f"(B, 1, 1, Tp + H), got {e.shape}"
    assert e[:, 0, 0].int().tolist() == [[1, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    # in the model: the prefix never sees the suffix, and a suffix token never sees a later one
    m, batch = exercise_model()
    h, _, _ = m.forward_vlm(batch)
    later = dict(batch, suffix=batch["suffix"].clone())
    later["suffix"][:, 3:] = m.vocab.fast_offset + 7
    h2, kv2, _ = m.forward_vlm(later)
    assert torch.allclose(h[:, :3], h2[:, :3], atol=1e-6), "a suffix token sees a later one"
    _, kv, _ = m.forward_vlm(batch)
    Tp = m.cfg.prefix_len
    assert torch.allclose(kv[-1][0][:, :, :Tp], kv2[-1][0][:, :, :Tp], atol=1e-6), "the prefix sees the suffix"


def check_exercise_3():
    """The stop-gradient: the same keys/values, no gradient back. In the model: the action expert's output
    through it sends exactly zero gradient into the backbone, and still trains the expert."""
    w = torch.ones(3, requires_grad=True)
    kv = [(w * 2, w * 3), (w * 4, w * 5)]
    out = list(kivla.stop_gradient(kv))
    assert len(out) == 2 and all(torch.equal(a, b) for (k, v), (k2, v2) in zip(kv, out) for a, b in ((k, k2), (v, v2)))
    assert not any(t.requires_grad for pair in out for t in pair), "what the expert reads must be detached"
    m, batch = exercise_model()
    batch = {k: v[:6] for k, v in batch.items()}  # the robot rows
    kv, valid = m.backbone_prefix_kv(batch)
    g = torch.Generator().manual_seed(0)
    x, tau = torch.randn(6, 10, 2, generator=g), torch.rand(6, generator=g)
    m.zero_grad()
    m._expert(x, tau, kivla.stop_gradient(kv), valid).pow(2).sum().backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert all(is_zero(v) for n, v in grads.items() if n.startswith("backbone.")), \
        "a gradient still flows: the expert would train the VLM"
    assert not all(is_zero(v) for n, v in grads.items() if n.startswith("action_expert."))


def check_exercise_4():
    """The flow pair. noise 1, actions 3, tau 0.25 -> x_tau = 0.25 * 1 + 0.75 * 3 = 2.5, u = 1 - 3 = -2.
    tau is per row: (B,) broadcast over (B, H, A)."""
    noise, actions = torch.ones(2, 3, 2), torch.full((2, 3, 2), 3.0)
    x, u = kivla.flow_target(noise, actions, torch.tensor([0.25, 1.0]))
    assert x.shape == u.shape == (2, 3, 2), f"x_tau and u are (B, H, A), got {x.shape}, {u.shape}"
    assert torch.allclose(x[0], torch.full((3, 2), 2.5)) and torch.allclose(x[1], noise[1]), "x_tau"
    assert torch.allclose(u, torch.full((2, 3, 2), -2.0)), "u points from the actions to the noise"
    g = torch.Generator().manual_seed(0)
    noise, actions = torch.randn(4, 10, 2, generator=g), torch.randn(4, 10, 2, generator=g)
    tau = torch.rand(4, generator=g, requires_grad=True)
    x, u = kivla.flow_target(noise, actions, tau)
    assert torch.allclose(kivla.flow_target(noise, actions, torch.zeros(4))[0], actions), "tau = 0: the actions"
    for i in range(4):  # u = d x_tau / d tau, row by row
        (dx,) = torch.autograd.grad(x[i].sum(), tau, retain_graph=True)
        assert torch.allclose(dx[i], u[i].sum(), atol=1e-5) and dx.count_nonzero() == 1


# the reference's loss (ki, flow_weight 10, tiny model, exercise_data, noise/time from fixed()) and its
# flow sample (10 Euler steps of the first two rows from fixed()'s noise for them), stored
KI_LOSS = dict(ce=6.298773765563965, flow=1.6181789636611938)
SAMPLE = ([[-1.586290955543518, -0.6392128467559814], [-0.7003066539764404, -1.5553834438323975],
           [-0.14441107213497162, -0.522636353969574]], [-0.0359121672809124, -0.7901255488395691])


def check_exercise_5():
    """The KI loss: CE on the FAST and answer tokens, alpha times the flow MSE on the robot rows only, the
    stop-gradient on the expert's path only: CE trains the VLM, never the expert; under ki the flow loss never
    reaches the VLM, under joint it does."""
    pi0 = bare_model("pi0")  # no FAST tokens: its CE is the VQA answers'
    obs, chunks, vqa = exercise_data()
    b = pi0.make_batch(obs + vqa, np.concatenate([chunks, np.zeros((4, 10, 2), np.float32)]))
    loss, parts = pi0.compute_loss(b, *fixed(b))
    assert loss.item() == pytest.approx(parts["ce_loss"].item() + 10 * parts["flow_loss"].item(), rel=1e-5)
    vqa_only = dict(b, suffix_loss=b["suffix_loss"] & ~b["has_actions"][:, None])
    assert pi0.compute_loss(vqa_only, *fixed(b))[1]["ce_loss"] == parts["ce_loss"], "pi0: CE on answers only"
    m, batch = exercise_model("ki")
    noise, time = fixed(batch)
    loss, parts = m.compute_loss(batch, noise, time)
    ce, flow = parts["ce_loss"].item(), parts["flow_loss"].item()
    assert ce == pytest.approx(KI_LOSS["ce"], rel=1e-4) and flow == pytest.approx(KI_LOSS["flow"], rel=1e-4), \
        f"ce {ce:.6f} flow {flow:.6f}; the reference gives {KI_LOSS}"
    assert loss.item() == pytest.approx(ce + 10 * flow, rel=1e-5), "loss = CE + flow_weight * flow"
    robot = {k: v[:6] for k, v in batch.items()}
    assert m.compute_loss(robot, noise[:6], time[:6])[1]["flow_loss"].item() == pytest.approx(flow, rel=1e-5), \
        "VQA rows have no actions: the flow loss is the robot rows' mean"
    g = flow_only_grads(m, batch)
    assert all(is_zero(v) for n, v in g.items() if n.startswith("backbone.")), "ki: stop_gradient on the expert's path"
    assert not all(is_zero(v) for n, v in ce_only_grads(m, batch).items() if n.startswith("backbone."))
    assert all(is_zero(v) for n, v in ce_only_grads(m, batch).items() if n.startswith("action_expert.")), \
        "the CE never reaches the action expert"
    joint, batch = exercise_model("joint")
    assert not all(is_zero(v) for n, v in flow_only_grads(joint, batch).items() if n.startswith("backbone.")), \
        "joint: no stop-gradient, the flow loss trains the VLM too"
    fast, batch = exercise_model("fast")
    loss, parts = fast.compute_loss(batch, *fixed(batch))
    assert parts["flow_loss"].item() == 0 and loss.item() == pytest.approx(parts["ce_loss"].item()), "fast: CE only"


def check_exercise_6():
    """Flow sampling. The backbone runs once; the expert num_steps times at tau = 1, 1 - dt, ..., dt. On the
    field v(x, tau) = (x - a) / tau (every path ends at a) Euler lands exactly on a: x_(tau - dt) - a =
    (x_tau - a)(1 - dt / tau), and the last factor, at tau = dt, is 0."""
    obs = exercise_data()[0][:2]
    bare = bare_model("ki")
    assert bare.sample_actions(bare.make_batch(obs), num_steps=2).shape == (2, 10, 2)
    m, batch = exercise_model()
    batch = {k: v[:2] for k, v in batch.items()}
    noise = fixed(batch)[0]
    calls, taus, real = [0], [], m._expert
    prefix = m.backbone_prefix_kv
    m.backbone_prefix_kv = lambda b: (calls.__setitem__(0, calls[0] + 1), prefix(b))[1]
    a = torch.tensor([[0.3, -0.2]]).expand(10, 2)
    m._expert = lambda x, tau, kv, valid: (taus.append(tau[0].item()), (x - a) / tau[:, None, None])[1]
    x = m.sample_actions(batch, num_steps=5, noise=noise)
    assert calls[0] == 1, f"the prefix is encoded once per sample, not {calls[0]} times"
    assert taus == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2]), f"Euler from tau = 1 down to dt, got {taus}"
    assert torch.allclose(x, a.expand(2, 10, 2), atol=1e-5), "x_(tau - dt) = x_tau - dt * v(x_tau, tau)"
    m._expert = real
    x = m.sample_actions(batch, noise=noise)
    assert torch.allclose(x[0, :3], torch.tensor(SAMPLE[0]), rtol=1e-3, atol=1e-4), "the model's own sample"
    assert torch.allclose(x[1, -1], torch.tensor(SAMPLE[1]), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("n", range(1, 7))
def test_exercise(n):
    """One test per exercise: `pytest -k exercise --junitxml=grades.xml` gives one pass/fail each."""
    [check_exercise_1, check_exercise_2, check_exercise_3, check_exercise_4, check_exercise_5,
     check_exercise_6][n - 1]()


def test_train_toy_stops_at_once_naming_the_lowest_unwritten_one_in_a_student_copy(tmp_path, monkeypatch, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tools"))
    import make_assignment
    assert cli.exercises_left() == []  # the reference: every body written
    student = tmp_path / "kivla.py"
    student.write_text(make_assignment.blank(open(kivla.__file__).read())[0])
    monkeypatch.setattr(kivla, "__file__", str(student))
    assert [n for n, _ in cli.exercises_left()] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(SystemExit, match=r"exercise 1 \(FAST's front end\) is not written yet \(6 left\)"):
        train_toy.main(["--quick", f"--out_dir={tmp_path}"])


### BEGIN HIDDEN TESTS
MISTAKES = {  # exercise -> (what, the attribute the model calls, a wrong version built from the right one)
    1: ("FAST's order reversed (dimension first)", (kivla.FASTTokenizer, "symbols"),
        lambda ref: lambda self, c: (lambda q: q.reshape(len(q), self.H, self.D).transpose(0, 2, 1)
                                     .reshape(len(q), -1))(ref(self, c))),
    2: ("an off-by-one causal mask (a token sees the next)", (kivla, "prefix_lm_mask"),
        lambda ref: lambda pv, n: ref(pv, n) | torch.ones_like(ref(pv, n)).triu(1).tril(1)),
    3: ("a stop-gradient that forgets to detach", (kivla, "stop_gradient"), lambda ref: lambda kv: kv),
    4: ("the velocity's sign swapped", (kivla, "flow_target"),
        lambda ref: lambda n, a, t: (ref(n, a, t)[0], -ref(n, a, t)[1])),
    5: ("alpha forgotten (loss = CE + flow)", (kivla.KIVLA, "compute_loss"),
        lambda ref: lambda self, b, noise=None, time=None: (lambda ce, fl: (
            ce + fl, {"loss": (ce + fl).detach(), "ce_loss": ce.detach(), "flow_loss": fl.detach()}))(
            *self.loss_terms(b, noise, time))),
    6: ("Euler run the wrong way (tau from 0 up)", (kivla.KIVLA, "sample_actions"),
        lambda ref: _euler_up),
}


@torch.no_grad()
def _euler_up(model, batch, num_steps=10, noise=None):
    kv, valid = model.backbone_prefix_kv(batch)
    x = torch.randn(len(valid), 10, 2) if noise is None else noise
    for i in range(num_steps):
        tau = torch.full((len(x),), i / num_steps)
        x = x - model._expert(x, tau, kv, valid) / num_steps
    return x


@pytest.mark.parametrize("n", range(1, 7))
def test_exercise_checks_catch_a_classic_mistake(n, monkeypatch):
    what, (owner, name), wrong = MISTAKES[n]
    monkeypatch.setattr(owner, name, wrong(getattr(owner, name)))
    with pytest.raises(AssertionError):
        [check_exercise_1, check_exercise_2, check_exercise_3, check_exercise_4, check_exercise_5,
         check_exercise_6][n - 1]()


def test_exercise_blanks_leave_no_answer_and_raise_their_own_error(tmp_path):
    """make_assignment: every marked body becomes its exercise's NotImplementedError, no marker remains."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tools"))
    import make_assignment
    text, found = make_assignment.blank(open(kivla.__file__).read())
    assert sorted(found) == [1, 2, 3, 4, 5, 6]
    assert "SOLUTION" not in text and "k.detach()" not in text and "noise - actions" not in text
    assert text.count('raise NotImplementedError("Exercise') == 9  # 3 exercises have two bodies
    ns = {}
    with warnings.catch_warnings():  # it registers kivla/Push-v0 a second time
        warnings.simplefilter("ignore")
        exec(compile(text, "student_kivla.py", "exec"), ns)
    with pytest.raises(NotImplementedError, match="Exercise 3: the stop-gradient"):
        ns["stop_gradient"]([])
    hidden = make_assignment.blank(open(__file__).read())[0]
    assert "MISTAKES" not in hidden and "HIDDEN" not in hidden and "def check_exercise_6" in hidden
### END HIDDEN TESTS


# ------------------------------------------------------------------------------------------------
# The README: every command runs as shown, every picture exists


def test_interference_is_exactly_zero_through_the_stop_gradient_and_scales_with_the_flow_weight(demo):
    """interference(): the flow term's gradient into the VLM is exactly 0 for ki (the stop-gradient) and not for
    joint, where it is the backbone part of the flow-only gradient, times alpha; the CE's is the same for both."""
    obs, chunks, tok = demo
    batch = tiny(tok).make_batch(obs, chunks)
    noise, time = fixed(batch)
    ki, joint = (train_toy.interference(tiny(tok, v, flow_weight=1.0), batch, noise, time) for v in ("ki", "joint"))
    assert ki["flow_grad"] == 0.0 and ki["grad_cos"] == 0.0 and ki["ce_grad"] > 0
    assert joint["flow_grad"] > 0 and joint["ce_grad"] == pytest.approx(ki["ce_grad"])
    m = tiny(tok, "joint", flow_weight=1.0)
    vlm = lambda g: torch.cat([(g[n] if g[n] is not None else torch.zeros_like(p)).flatten()  # noqa: E731
                               for n, p in m.named_parameters() if n.startswith("backbone.")])
    g_flow, g_ce = vlm(flow_only_grads(m, batch)), vlm(ce_only_grads(m, batch))
    assert joint["flow_grad"] == pytest.approx(g_flow.norm().item(), rel=1e-5)
    assert joint["grad_cos"] == pytest.approx((g_ce @ g_flow / g_ce.norm() / g_flow.norm()).item(), abs=1e-5)
    ten = train_toy.interference(tiny(tok, "joint", flow_weight=10.0), batch, noise, time)
    assert ten["flow_grad"] == pytest.approx(10 * joint["flow_grad"], rel=1e-5)
    assert ten["grad_cos"] == pytest.approx(joint["grad_cos"], abs=1e-5)
    assert train_toy.watch_steps(3000, 500) == [*range(0, 1001, 100), 1500, 2000, 2500, 3000]


def test_a_run_watches_its_vlm_writes_strict_json_and_draws_short_curves(tmp_path):
    """A run records the VLM's gradients and knowledge at the watched steps (ki's flow part exactly 0 at every
    one), writes interference.png, and metrics.json / history.json as strict JSON (null, not NaN); the loss
    curve of a run with few logged steps is still drawn."""
    m = train_toy.main(TINY_RUN + ["--train_steps=30", "--eval_interval=10", f"--out_dir={tmp_path}"])["runs"][0]
    h = json.loads((tmp_path / "history.json").read_text())
    assert [r["step"] for r in h["vlm"]] == [*range(0, 21, 2), 30] == [r["step"] for r in m["vlm_watch"]]
    assert all(r["flow_grad"] == 0 and r["ce_grad"] > 0 for r in h["vlm"])
    # at step 0 the training weights are the pretrained VLM: its accuracy on the watch's rows (half the held-out set)
    pre = kivla.KIVLA.from_checkpoint(tmp_path / "pretrained.pt")
    rows = train_toy.make_vqa_set(200, train_toy.VQA_EVAL_SEED)[:100]
    assert h["vlm"][0]["vqa_acc"] == pytest.approx(train_toy.vqa_accuracy(pre, pre.make_batch(rows)))
    assert m["flow_to_ce_grad"] == 0 and m["vqa_acc_min_train"] == min(r["vqa_acc"] for r in h["vlm"])
    for f in ("metrics.json", "history.json"):
        json.loads((tmp_path / f).read_text(), parse_constant=lambda c: pytest.fail(f"{f} holds {c}"))
    assert json.loads((tmp_path / "metrics.json").read_text())["steps_to_80pct"] is None  # never reached: null
    img = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB")).astype(int)
    loss_panel = img[:, : img.shape[1] // 2]
    red = (abs(loss_panel - [200, 60, 40]).sum(-1) < 30).sum()
    blue = (abs(loss_panel - [40, 90, 200]).sum(-1) < 30).sum()
    assert red > 100 and blue > 100, "the loss panel has no CE / flow line"
    assert (tmp_path / "interference.png").stat().st_size > 0


def test_every_readme_command_parses_and_every_picture_exists(demo, tmp_path, monkeypatch):
    text = open("README.md").read()
    for pic in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert os.path.isfile(pic), f"README links a missing picture: {pic}"
    commands = re.findall(r"(?:python |torchrun [^\n`]*)(train_toy\.py|tools/\w+\.py)([^\n`#]*)", text)
    parsers = {"train_toy.py": train_toy.make_parser(), "tools/compare.py": compare.make_parser(),
               "tools/figures.py": figures.make_parser(), "tools/bench.py": __import__("tools.bench").bench.make_parser()}
    assert len(commands) >= 10 and {script for script, _ in commands} >= {"train_toy.py", "tools/compare.py"}
    monkeypatch.chdir(tmp_path)  # the files the commands name, as a default run leaves them
    os.makedirs("out")
    obs, chunks, tok = demo
    tiny(tok).save("out/pretrained.pt", vqa_acc=0.5)
    tiny(tok).save("out/ckpt.pt", settings={}, metrics={})
    for script, c in commands:
        args = shlex.split(c.replace("\\", " "))
        if "--help" in args or script not in parsers:  # (other tools take other arguments)
            continue
        train_toy.parse_args(args, parsers[script])  # raises SystemExit with a message on anything unknown

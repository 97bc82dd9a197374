"""
tools/figures.py: the README's two explanatory pictures, into --out_dir:
  attention.png    the attention mask of one real training row, drawn from the model's mask tensors
                   (what each token may attend to, and where the stop-gradient sits)
  fast_tokens.png  one action chunk -> its DCT coefficients, scaled and rounded -> its BPE tokens

  python tools/figures.py                         # into out/ (from a randomly initialised model)
  python tools/figures.py --variant=joint --out_dir=pics  # the expert's reads, no stop-gradient
"""

import os
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
import kivla  # noqa: E402
import train_toy  # noqa: E402


def demos_and_tokenizer(s, cfg):
    """300 scripted-policy episodes and the FAST tokenizer fit on 10,000 of their chunks (tiled)
    -> observations, chunks, tokenizer, seconds the fit took."""
    obs, chunks, _, _ = train_toy.collect_demos(300, cfg.action_horizon, s["demo_noise"], s["seed"],
                                                kivla.task_splits(s["unseen_color"])["train"])
    t0 = time.perf_counter()
    tok = kivla.FASTTokenizer(s["fast_scale"], s["fast_vocab"]).fit(
        np.tile(chunks, (10000 // len(chunks) + 1, 1, 1))[:10000])
    return obs, chunks, tok, time.perf_counter() - t0


def write_figures(s, cfg, tok, obs, chunks):
    """attention.png and fast_tokens.png into --out_dir, from a chunk with a long FAST sequence."""
    i = int(np.argmax([len(tok.encode(c)) for c in chunks[:200]]))
    torch.manual_seed(s["seed"])
    model = train_toy.build_model(s, cfg, tok)
    draw_attention(model.cpu(), obs[i], chunks[i], os.path.join(s["out_dir"], "attention.png"))
    draw_fast_tokens(tok, chunks[i], os.path.join(s["out_dir"], "fast_tokens.png"))
    print(f"wrote {s['out_dir']}/attention.png and {s['out_dir']}/fast_tokens.png")


def draw_attention(model, obs, chunk, path, cell=9):
    """The attention pattern of one real training row, from the mask tensors the model uses
    (prefix_lm_mask for the backbone, expert_mask for the action expert). Rows are queries, columns
    keys."""
    b = model.make_batch([obs], chunk[None])
    valid = model.backbone.embed_prefix(b)[1][0]  # (Tp,)
    Tp, Ts, H = len(valid), int(b["suffix_loss"][0].sum()), model.cfg.action_horizon
    vlm = kivla.prefix_lm_mask(valid[None], Ts)[0, 0]  # (Tp + Ts, Tp + Ts)
    exp = kivla.expert_mask(valid[None], H)[0, 0, 0]  # (Tp + H,)
    T, L, top = Tp + Ts + H, 92, 40
    img = Image.new("RGB", (L + T * cell + 250, top + T * cell + 10), "white")
    dr = ImageDraw.Draw(img)
    colors = {"vlm": (70, 110, 200), "sg": (240, 140, 30), "grad": (160, 60, 160),
              "exp": (40, 160, 80)}
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
            dr.rectangle([x, y, x + cell - 2, y + cell - 2], fill=colors.get(c, (238, 238, 238)))
    n_img = Tp - model.cfg.text_len - model.cfg.state_dim  # what the image tokenizer gives
    segments = [("image", n_img), ("instruction", model.cfg.text_len),
                ("state", model.cfg.state_dim), ("FAST", Ts), ("actions", H)]
    start = 0
    for name, n in segments:
        dr.text((4, top + (start + n / 2) * cell - 6), name, fill="black")
        dr.line([L - 4, top + start * cell, L - 4, top + (start + n) * cell - 2], fill="black")
        dr.text((L + start * cell, top - 14), name if n * cell > 40 else name[:1], fill="black")
        start += n
    dr.text((L, 4), "attention mask of one training row (rows = queries, columns = keys)",
            fill="black")
    legend = [("vlm", "backbone: prefix bidirectional, FAST causal"),
              (reads, "expert reads VLM keys/values" + (" through stop_gradient" if reads == "sg"
                                                        else " (gradient flows)")),
              ("exp", "expert: its own action tokens"), (None, "masked (incl. padded text)")]
    for i, (c, text) in enumerate(legend):
        y = top + 10 + 28 * i
        dr.rectangle([L + T * cell + 12, y, L + T * cell + 22, y + 10],
                     fill=colors[c] if c else (238, 238, 238))
        dr.text((L + T * cell + 28, y - 1), text[:36], fill="black")
        if len(text) > 36:
            dr.text((L + T * cell + 28, y + 9), text[36:], fill="black")
    img.save(path)


def draw_fast_tokens(tok, chunk, path):
    """One action chunk -> its DCT coefficients after scaling and rounding -> the BPE tokens it
    becomes."""
    H, A = chunk.shape
    syms = tok.symbols(chunk[None])[0]  # base symbols, low frequency first: (freq 0: dim 0, 1), ...
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
    dr.text((10, 128), "2) DCT per dim, x scale, rounded (rows = frequency, columns = dim): the "
            "integers FAST keeps", fill="black")
    q = np.array(syms).reshape(H, A) - tok.M
    for f in range(H):
        for d in range(A):
            x, y = 40 + d * 60, 146 + f * 13
            v = int(q[f, d])
            shade = 255 - min(200, 40 * abs(v))
            dr.rectangle([x, y, x + 56, y + 11], fill=(255, shade, shade) if v > 0 else
                         (shade, shade, 255) if v < 0 else (245, 245, 245))
            dr.text((x + 22, y), str(v), fill="black")
    y0 = 146 + H * 13 + 10
    dr.text((10, y0), f"3) flattened low-frequency first ({len(syms)} symbols) -> BPE: {len(ids)} "
            "tokens", fill="black")
    x = 10
    for t in ids:
        n = len(tok.expand[t])
        dr.rectangle([x, y0 + 18, x + n * cell - 3, y0 + 40], outline=(40, 90, 200), width=2)
        for j, s in enumerate(tok.expand[t]):
            dr.text((x + j * cell + 4, y0 + 23), str(s - tok.M), fill="black")
        dr.text((x + 2, y0 + 44), f"#{t}", fill=(40, 90, 200))
        x += n * cell
    img.save(path)


def make_parser():
    return train_toy.make_parser(prog="tools/figures.py", description=__doc__)


def main(argv):
    s, cfg = train_toy.start(argv, make_parser())
    obs, chunks, tok, _ = demos_and_tokenizer(s, cfg)
    write_figures(s, cfg, tok, obs, chunks)


if __name__ == "__main__":
    main(sys.argv[1:])

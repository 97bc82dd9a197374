"""
kivla: a Knowledge-Insulated Vision-Language-Action model (Driess et al. 2025 [1]) in one file.

A VLM backbone (a small ViT + a decoder-only transformer) learns robot actions as FAST tokens [4]
by next-token cross-entropy; a smaller action expert learns continuous action chunks by flow
matching [5], reading the backbone's per-layer keys/values through a stop-gradient: the knowledge
insulation. At inference the prefix is encoded once and the expert takes 10 Euler steps.

      prefix: bidirectional                     suffix: causal
  [ image (Ti) | instruction (Tt) | state (2) ][ "Action:" fast_tokens ... "|" ]   <- backbone (VLM)
        ^ every backbone layer l exposes its keys/values K_l, V_l over the prefix
        |  stop_gradient(K_l, V_l)   <- knowledge insulation: the flow loss cannot reach the VLM
  [ noisy action chunk x_tau (H) ]                                                 <- action_expert
    attends to [prefix of the backbone] + [itself, bidirectional]; never to the suffix.

The file, top down (Python resolves names when a function runs, so the method comes first):
  1. Config                 one dataclass, stored in every checkpoint
  2. The KI method          stop_gradient, flow_target, sample_tau: what the loss calls
  3. KIVLA                  compute_loss (the KI loss), sample_actions (flow, prefix once),
                            generate_fast_actions (AR FAST), make_batch, checkpoints
  4. Backbone               the toy VLM (PaliGemma analog), prefix_lm_mask, expert_mask
  5. ViT                    the image encoder with its toy conv stem
  6. ActionExpert           the narrower transformer over the noisy action chunk
  7. Transformer pieces     Block (attention + GeGLU), AdaRMS, RMSNorm, RoPE
  8. FAST                   FASTTokenizer (DCT -> scale & round -> low frequency first -> BPE)
  9. The toy world          PushEnv (kivla/Push-v0), scripted_action, make_vqa, Vocab
 10. HFBackbone             a HuggingFace PaliGemma behind the same interface (optional)
Exercises (docs/course.md): nine marked bodies of six exercises; a student's copy raises there.

Notation: B batch, S image side, Ti image tokens, Tt text tokens, Tp prefix tokens (Ti + Tt +
state_dim), Ts suffix tokens, H action horizon, A action dim, D width, nh heads, nkv key/value
heads, hs head size, tau flow time (1 = pure noise, 0 = clean actions).

References
  [1] Driess et al. 2025, Knowledge Insulating Vision-Language-Action Models, arXiv 2505.23705.
  [2] Black et al. 2024, pi0: A Vision-Language-Action Flow Model, arXiv 2410.24164.
  [3] Physical Intelligence 2025, pi0.5, arXiv 2504.16054 (state tokens, adaRMSNorm on time).
  [4] Pertsch et al. 2025, FAST: Efficient Action Tokenization, arXiv 2501.09747.
  [5] Lipman et al. 2023, Flow Matching for Generative Modeling.
  [6] Xiao et al. 2021, Early Convolutions Help Transformers See Better (the conv stem).
  [7] Perez et al. 2018, FiLM: Visual Reasoning with a General Conditioning Layer.
  [8] Liu et al. 2018, An Intriguing Failing of CNNs and the CoordConv Solution.
  [9] QK-norm: Henry et al. 2020; Gemma Team 2025, Gemma 3 Technical Report, arXiv 2503.19786.
"""

import inspect
import math
import string
from dataclasses import dataclass, asdict, fields, replace

import numpy as np
import gymnasium
from gymnasium import spaces
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw


# ------------------------------------------------------------------------------------------------
# 1. Config: one dataclass, stored in every checkpoint
# ------------------------------------------------------------------------------------------------


VARIANTS = ("ki", "joint", "pi0", "fast")


@dataclass
class Config:
    variant: str = "ki"         # ki: CE(FAST)+flow, stop-gradient | joint: same, no stop-gradient
                                # pi0: flow only, no FAST tokens | fast: CE(FAST) only, AR decoding
    flow_weight: float = 10.0   # alpha in loss = CE + alpha * flow-MSE, as in pi0.5 [3] (0 allowed)
    action_horizon: int = 10    # H, actions per chunk
    action_dim: int = 2         # A
    image_size: int = 64        # S, must match the env's observation
    patch_size: int = 16        # -> (S / patch)^2 image tokens (16): few tokens keep the CPU budget
    vit_stem: str = "conv"      # "conv": 3x3 stride-2 convs [6] | "patchify": one conv
    film_stem: bool = True      # toy-scale deviation: instruction words FiLM-modulate the conv stem
    coord_stem: bool = True     # toy-scale deviation: x, y channels beside RGB (CoordConv)
    qk_norm: bool = True        # RMSNorm on every head's queries and keys (QK-norm, Gemma 3)
    vit_width: int = 64         # ViT width (SigLIP analog)
    vit_layers: int = 2         # ViT transformer blocks after the conv stem
    d_model: int = 64           # backbone width (Gemma analog)
    n_layer: int = 4            # shared by backbone and action expert (attention mixed per layer)
    n_head: int = 4             # shared too: the expert's queries read the backbone's keys per head
    n_kv_head: int = 0          # key/value heads, 0 = n_head; fewer: grouped-query (Gemma 2B: 1)
    head_dim: int = 16          # per attention head, shared by backbone and expert
    rope_theta: float = 10000.0  # RoPE base (a real VLM's expert takes its VLM's)
    expert_width: int = 48      # the action expert is narrower (pi0: 1024 vs Gemma's 2048)
    text_len: int = 12          # Tt, words of instruction / question (padded)
    state_bins: int = 256       # pi0.5: proprioception as discrete tokens
    state_dim: int = 2          # Ds, proprioception numbers (the toy: pusher x, y), a token each

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.n_kv_head < 0 or self.n_head % (self.n_kv_head or self.n_head):
            raise ValueError(f"n_head={self.n_head} must be a multiple of "
                             f"n_kv_head={self.n_kv_head}")
        if not self.flow_weight >= 0:
            raise ValueError(f"flow_weight must be >= 0, got {self.flow_weight}")
        if self.vit_stem not in ("conv", "patchify"):
            raise ValueError(f"vit_stem must be 'conv' or 'patchify', got {self.vit_stem!r}")
        if self.image_size % self.patch_size or (
                self.vit_stem == "conv" and self.patch_size & (self.patch_size - 1)):
            raise ValueError(f"image_size={self.image_size} must be a multiple of "
                             f"patch_size={self.patch_size} (a power of two for the conv stem)")

    # derived from `variant` only, never set twice
    @property
    def insulate(self):  # knowledge insulation: the expert reads the VLM through stop_gradient
        return self.variant == "ki"

    @property
    def use_fast(self):
        return self.variant in ("ki", "joint", "fast")

    @property
    def use_flow(self):
        return self.variant != "fast"

    @property
    def n_image_tokens(self):
        return (self.image_size // self.patch_size) ** 2

    @property
    def prefix_len(self):
        return self.n_image_tokens + self.text_len + self.state_dim  # Tp: image | text | state

    @property
    def suffix_len(self):  # Ts: "Action:" + worst case one id per coefficient
        return self.action_horizon * self.action_dim + 1


# ------------------------------------------------------------------------------------------------
# 2. The KI method: the stop-gradient and the flow pair the loss is made of
# ------------------------------------------------------------------------------------------------


def masked_mean(x, mask):
    """Mean of x over the places where mask is True (0 if none): x and mask of one shape."""
    m = mask.float()
    return (x * m).sum() / m.sum().clamp(min=1)


def sample_tau(n, device=None, generator=None):
    """Flow time tau ~ Beta(1.5, 1) on [0.001, 1], more weight on noisy times (pi0 [2]). Its CDF is
    tau^1.5, so tau = U^(1 / 1.5) for U uniform: one kernel, no sampler object inside the training
    step. -> (n,)"""
    return torch.rand(n, device=device, generator=generator) ** (1 / 1.5) * 0.999 + 0.001


def stop_gradient(kv):
    """KNOWLEDGE INSULATION [1]: what the action expert reads of the VLM, the per-layer keys/values
    [(k, v)], detached. The forward pass is unchanged; the flow loss just cannot push gradients into
    the VLM (the randomly initialised expert cannot damage what the VLM knows).
    Exercise 3: kv [(k, v)] per layer, each (B, nkv, Tp, hs) -> the same list, values unchanged."""
    ### BEGIN SOLUTION: exercise 3, the stop-gradient
    return [(k.detach(), v.detach()) for k, v in kv]
    ### END SOLUTION


def flow_target(noise, actions, tau):
    """Flow matching's training pair [5] (pi0's convention): x_tau on the straight path from the
    actions (tau = 0) to the noise (tau = 1), and its velocity u = d x_tau / d tau, the target the
    action expert learns. Exercise 4: noise, actions (B, H, A); tau (B,) -> x_tau, u, (B, H, A)
    each. e.g. noise 1, actions 3, tau 0.25 -> x_tau 2.5 (a quarter of the way to noise), u -2."""
    ### BEGIN SOLUTION: exercise 4, the flow pair
    t = tau[:, None, None]  # (B, 1, 1)
    return t * noise + (1 - t) * actions, noise - actions
    ### END SOLUTION


def _eager():
    """False while torch.compile traces or a CUDA graph captures (no host syncs then)."""
    return not torch.compiler.is_compiling() and not (
        torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


BATCH_KEYS = """
  image         uint8 (B, S, S, 3)   camera image, the only place block positions live
  text          long  (B, Tt)        instruction (robot rows) or question (VQA rows), <pad>-filled
  text_valid    bool  (B, Tt)        False at padding (hidden from attention)
  state         long  (B, Ds)        proprioception as state-bin token ids (the toy: pusher x, y)
  suffix        long  (B, Ts)        backbone input after the prefix: "Action:" fast_tokens...
                                     or "Answer:" words...
  suffix_target long  (B, Ts)        next-token targets for `suffix` (ends with "|")
  suffix_loss   bool  (B, Ts)        which suffix targets get cross-entropy
  actions       float (B, H, A)      clean action chunk (zeros on VQA rows)
  has_actions   bool  (B,)           robot rows (get the flow loss) vs VQA rows
"""


# ------------------------------------------------------------------------------------------------
# 3. KIVLA: the KI loss, flow sampling with the prefix encoded once, AR FAST, batches
# ------------------------------------------------------------------------------------------------


class KIVLA(nn.Module):
    __doc__ = "The KI vision-language-action model. Batch keys (from make_batch):\n" + BATCH_KEYS

    def __init__(self, cfg, fast_tokenizer, action_norm=None, state_norm=None, backbone=None):
        """action_norm / state_norm: QuantileNorm of the training data, or None if it is in range
        (the toy's): make_batch applies them, the samplers undo the action one, checkpoints too.
        backbone: None builds the toy VLM; an HFBackbone (a real VLM) sets the expert's shapes."""
        super().__init__()
        assert fast_tokenizer.H == cfg.action_horizon and fast_tokenizer.D == cfg.action_dim, (
            f"FAST tokenizer was fit on ({fast_tokenizer.H}, {fast_tokenizer.D}) chunks but the "
            f"config says ({cfg.action_horizon}, {cfg.action_dim})")
        if backbone is not None:
            cfg = replace(cfg, **{k: getattr(backbone, k) for k in
                                  ("n_layer", "n_head", "n_kv_head", "head_dim", "rope_theta")})
        self.cfg, self.fast_tokenizer = cfg, fast_tokenizer
        self.action_norm, self.state_norm = action_norm, state_norm
        if action_norm is not None:  # its inverse on the model's device (not saved: the norm is)
            mid = torch.tensor((action_norm.lo + action_norm.hi) / 2)  # (A,)
            self.register_buffer("action_mid", mid, persistent=False)
            self.register_buffer("action_scale", torch.tensor(action_norm.scale), persistent=False)
        if backbone is None:
            self.vocab = Vocab(fast_tokenizer.vocab_size, cfg.state_bins)
            self.backbone = Backbone(cfg, self.vocab)
        else:  # our ids inside the VLM's vocabulary (text from its tokenizer if it has one)
            self.vocab = Vocab.inside(backbone.vocab_size, fast_tokenizer.vocab_size,
                                      cfg.state_bins, backbone.tokenizer)
            self.backbone = backbone
        self.action_expert = ActionExpert(cfg)
        for m in (self.backbone, self.action_expert) if backbone is None else (self.action_expert,):
            m.apply(self._init_weights)  # a real VLM keeps its own (pre-trained) weights

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Conv2d):  # subtle: the default init shrinks the image layer by layer
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self):
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"backbone (VLM)": count(self.backbone), "action_expert": count(self.action_expert)}

    @property
    def device(self):
        return self.action_expert.out_proj.weight.device

    # -- training -------------------------------------------------------------------------------
    def compute_loss(self, batch, noise=None, time=None):
        """The KI loss [1]: loss = CE(FAST + VQA answer tokens) + flow_weight * flow-MSE, per
        cfg.variant. noise (B, H, A) and time (B,) may be given (tests); otherwise sampled.
        -> loss, {"loss", "ce_loss", "flow_loss"} as 0-d tensors (.item() waits for the device)."""
        ce, flow = self.loss_terms(batch, noise, time)
        ### BEGIN SOLUTION: exercise 5, the KI loss
        loss = ce + self.cfg.flow_weight * flow if self.cfg.use_flow else ce
        ### END SOLUTION
        return loss, {"loss": loss.detach(), "ce_loss": ce.detach(), "flow_loss": flow.detach()}

    def loss_terms(self, batch, noise=None, time=None):
        """The loss's two terms, each a 0-d tensor with its graph: -> ce, flow. Exercise 5:
          ce: the backbone's next-token cross-entropy (logits = lm_head(h)) on suffix_target,
            averaged over the targets where suffix_loss is True (FAST tokens, VQA answers).
          flow (0 if not cfg.use_flow): the action expert's squared velocity error against u at
            (x_tau, tau), averaged over H and A, then over the robot rows (has_actions). The
            expert reads the prefix part of kv only, through stop_gradient when cfg.insulate;
            noise and time are the given ones, else drawn (randn_like, sample_tau).
        Speed: every shape is the batch's, whatever its mix of robot and VQA rows (masks, not
        boolean indexing), so a training step runs as one graph with no host syncs."""
        cfg, batch = self.cfg, {k: v.to(self.device) for k, v in batch.items()}
        self._check_batch(batch)
        # 1) one backbone pass over [prefix | suffix]; the expert reads the prefix part of its KV
        ### BEGIN SOLUTION: exercise 5, the KI loss
        h, kv, prefix_valid = self.forward_vlm(batch)  # h: (B, Ts, D)
        # 2) next-token cross-entropy on FAST tokens and VQA answers: how the VLM learns actions
        logits = self.backbone.lm_head(h).float()  # (B, Ts, V)
        ce = F.cross_entropy(logits.flatten(0, 1), batch["suffix_target"].flatten(),
                             reduction="none")  # (B * Ts,)
        ce = masked_mean(ce, batch["suffix_loss"].flatten())  # over the real targets
        if not cfg.use_flow:
            return ce, h.new_zeros(())
        # 3) flow matching for the action expert [5], on the robot rows
        Tp = prefix_valid.shape[1]
        # the prefix only: the expert never sees FAST tokens
        kv = [(k[:, :, :Tp], v[:, :, :Tp]) for k, v in kv]
        if cfg.insulate:
            kv = stop_gradient(kv)  # KNOWLEDGE INSULATION [1]: the flow loss cannot reach the VLM
        actions = batch["actions"]  # (B, H, A)
        noise = torch.randn_like(actions) if noise is None else noise.to(actions.device)  # (B,H,A)
        tau = sample_tau(len(actions), actions.device) if time is None else time.to(actions.device)
        x_tau, u = flow_target(noise, actions, tau)  # (B, H, A) each: a point, its velocity
        velocity = self._expert(x_tau, tau, kv, prefix_valid)  # (B, H, A)
        # mean over the robot rows (VQA rows: no actions)
        flow = masked_mean(((velocity.float() - u) ** 2).mean((1, 2)), batch["has_actions"])
        return ce, flow
        ### END SOLUTION

    def forward(self, batch, noise=None, time=None):
        """Calling the model is its training loss (so that DDP and torch.compile can wrap it)."""
        return self.compute_loss(batch, noise, time)

    # -- the backbone boundary (see Backbone's docstring: the toy VLM and HFBackbone both fit it)
    def backbone_prefix_kv(self, batch):
        """What the action expert reads: per-layer [(k, v)] over the prefix, each (B, nkv, Tp, hs)
        with RoPE applied at positions 0..Tp-1, and prefix_valid (B, Tp)."""
        _, kv, valid = self.encode_prefix(batch)
        return kv, valid

    def encode_prefix(self, batch):
        """The backbone over the prefix alone -> hidden states (B, Tp, D), per-layer [(k, v)],
        prefix_valid (B, Tp)."""
        x, valid = self.backbone.embed_prefix(batch)
        h, kv = self.backbone(x, torch.arange(x.shape[1], device=x.device),
                              prefix_lm_mask(valid, 0))
        return h, kv, valid

    def forward_vlm(self, batch):
        """The backbone over [prefix | suffix] (training and VQA scoring). -> suffix hidden states
        (B, Ts, D), per-layer [(k, v)] over all Tp + Ts tokens, prefix_valid (B, Tp)."""
        x, prefix_valid = self.backbone.embed_prefix(batch)  # (B, Tp, D)
        Tp, Ts = x.shape[1], batch["suffix"].shape[1]
        x = torch.cat([x, self.backbone.embed(batch["suffix"])], 1)  # (B, Tp + Ts, D)
        h, kv = self.backbone(x, torch.arange(Tp + Ts, device=x.device),
                              prefix_lm_mask(prefix_valid, Ts))
        return h[:, Tp:], kv, prefix_valid

    def _expert(self, x_tau, tau, kv, prefix_valid):
        Tp, H = prefix_valid.shape[1], x_tau.shape[1]
        # subtle: the positions follow the prefix as if no FAST token existed (at inference none do)
        pos = torch.arange(Tp, Tp + H, device=x_tau.device)
        return self.action_expert(x_tau, tau, kv, prefix_valid, pos)

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_actions(self, batch, num_steps=10, noise=None):
        """Encode the prefix once (the KV cache), then integrate the flow from tau=1 (noise) to
        tau=0 with num_steps Euler steps of the action expert alone. noise (B, H, A): the starting
        point (drawn if None). -> (B, H, A) actions, on the model's device. Exercise 6: the
        backbone runs once (backbone_prefix_kv), then num_steps calls of self._expert(x, tau, kv,
        valid), at tau = 1, 1 - dt, ..., dt (dt = 1 / num_steps), each moving x against the
        predicted velocity: x_(tau - dt) = x_tau - dt * v."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        B, H, A = len(batch["text"]), self.cfg.action_horizon, self.cfg.action_dim
        # (B, H, A): the starting point, tau = 1
        x = torch.randn(B, H, A, device=self.device) if noise is None else noise.to(self.device)
        ### BEGIN SOLUTION: exercise 6, flow sampling
        kv, valid = self.backbone_prefix_kv(batch)  # computed once, read by every Euler step
        dt = 1.0 / num_steps
        for i in range(num_steps):
            tau = torch.full((B,), 1.0 - i * dt, device=self.device)
            x = x - dt * self._expert(x, tau, kv, valid).float()  # x_(tau - dt) = x_tau - dt * v
        ### END SOLUTION
        return self._unnormalize(x)

    def _unnormalize(self, actions):
        if self.action_norm is None:
            return actions
        # QuantileNorm.inverse, in float64
        return (actions.double() * self.action_scale + self.action_mid).float()

    @torch.no_grad()
    def generate_fast_actions(self, batch, max_tokens=None, use_cache=True, stop_at_eos=True):
        """pi0-FAST inference on the same model: greedy AR decoding of FAST tokens after "Action:",
        then FAST's decode -> actions (B, H, A), valid (B,). stop_at_eos=False: max_tokens."""
        return self.decode_fast_tokens(
            self.generate_fast_tokens(batch, max_tokens, use_cache, stop_at_eos))

    @torch.no_grad()
    def generate_fast_tokens(self, batch, max_tokens=None, use_cache=True, stop_at_eos=True):
        """The greedy decoding loop alone -> token ids (B, n). With stop_at_eos=False its shapes are
        fixed and it never syncs the host: one CUDA graph can capture it (tools/speed.py)."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        vocab, dev = self.vocab, self.device
        max_tokens = max_tokens or self.cfg.suffix_len
        x, valid = self.backbone.embed_prefix(batch)
        B, Tp = valid.shape
        act = torch.full((B, 1), vocab.action, device=dev)
        x = torch.cat([x, self.backbone.embed(act)], 1)  # (B, Tp + 1, D)
        h, cache = self.backbone(x, torch.arange(Tp + 1, device=dev), prefix_lm_mask(valid, 1))
        out = torch.zeros(B, 0, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        for t in range(max_tokens):
            nxt = self.backbone.lm_head(h[:, -1]).argmax(-1)  # (B,)
            out = torch.cat([out, nxt[:, None]], 1)
            done |= nxt == vocab.eos
            if (stop_at_eos and done.all()) or t == max_tokens - 1:
                break
            if use_cache:  # one new token attends to everything before it
                T = Tp + 1 + out.shape[1]
                mask = expert_mask(valid, T - Tp)  # (B, 1, 1, T): the prefix and every token
                h, cache = self.backbone(self.backbone.embed(nxt[:, None]),
                                         torch.full((1,), T - 1, device=dev), mask, cache)
            else:  # recompute the whole sequence: the reference the cache must match
                seq = torch.cat([act, out], 1)
                xs = torch.cat([x[:, :Tp], self.backbone.embed(seq)], 1)
                h, _ = self.backbone(xs, torch.arange(xs.shape[1], device=dev),
                                     prefix_lm_mask(valid, seq.shape[1]))
        return out

    def decode_fast_tokens(self, tokens):
        """(B, n) generated ids -> actions (B, H, A), valid (B,): up to "|", FAST-decoded."""
        acts, oks = [], []
        for row in tokens.tolist():
            ended = self.vocab.eos in row  # no "|" within max_tokens: malformed
            row = row[:row.index(self.vocab.eos)] if ended else row
            # words -> invalid
            ids = [t - self.vocab.fast_offset if t >= self.vocab.fast_offset else -1 for t in row]
            a, ok = self.fast_tokenizer.decode(ids, return_valid=True)
            acts.append(a)
            oks.append(ok and ended)
        actions = torch.from_numpy(np.stack(acts)).to(tokens.device)  # (B, H, A)
        return self._unnormalize(actions), torch.tensor(oks, device=tokens.device)

    @torch.no_grad()
    def predict_actions(self, batch, num_steps=10, noise=None):
        """The variant's own inference: AR FAST decoding for `fast`, flow sampling otherwise."""
        if self.cfg.variant == "fast":
            return self.generate_fast_actions(batch)[0]
        return self.sample_actions(batch, num_steps, noise)

    # -- data -----------------------------------------------------------------------------------
    def make_batch(self, observations, actions=None):
        """Env observation dicts (+ (B, H, A) action chunks) -> dict of CPU tensors (BATCH_KEYS).
        A row with an "answer" (words, or state-bin ints) is VQA: the answer is its suffix."""
        cfg, vocab = self.cfg, self.vocab
        B, Tt, Ts = len(observations), cfg.text_len, cfg.suffix_len
        if actions is not None:
            actions = np.asarray(actions, dtype=np.float32)
            if actions.shape != (B, cfg.action_horizon, cfg.action_dim):
                raise ValueError(f"actions must be ({B}, {cfg.action_horizon}, {cfg.action_dim}), "
                                 f"got {actions.shape}")
            actions = self.action_norm(actions) if self.action_norm else actions  # -> about [-1, 1]
        out = {"image": np.stack([o["image"] for o in observations]),
               "text": np.full((B, Tt), vocab.pad),
               "state": np.zeros((B, cfg.state_dim), np.int64),
               "suffix": np.full((B, Ts), vocab.pad), "suffix_target": np.full((B, Ts), vocab.pad),
               "actions": np.zeros((B, cfg.action_horizon, cfg.action_dim), np.float32),
               "has_actions": np.zeros(B, bool)}
        fast = (self.fast_tokenizer.encode_batch(actions) if actions is not None and cfg.use_fast
                else None)
        if out["image"].shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"images must be ({cfg.image_size}, {cfg.image_size}, 3), "
                             f"got {out['image'].shape[1:]}")
        for i, o in enumerate(observations):
            words, _ = vocab.words(o["instruction"])
            if len(words) > Tt:
                raise ValueError(f"instruction has {len(words)} words, more than text_len={Tt}: "
                                 f"{o['instruction']!r}")
            out["text"][i, :len(words)] = words
            if np.shape(o["state"]) != (cfg.state_dim,):
                raise ValueError(f"state must have state_dim={cfg.state_dim} numbers, "
                                 f"got shape {np.shape(o['state'])}")
            # -> about [0, 1]
            xy = o["state"] if self.state_norm is None else (self.state_norm(o["state"]) + 1) / 2
            out["state"][i] = vocab.state(xy)
            seq = []
            if "answer" in o:  # VQA row: "Answer:" answer... "|"
                ans = o["answer"]
                ans = ([vocab.state_offset + int(a) for a in ans] if isinstance(ans, (list, tuple))
                       else vocab.words(ans)[0])
                seq = [vocab.answer] + ans + [vocab.eos]
            elif actions is not None:
                out["actions"][i], out["has_actions"][i] = actions[i], True
                if cfg.use_fast:  # "Action:" fast_tokens "|"   (pi0 has no FAST tokens at all)
                    seq = [vocab.action] + [vocab.fast_offset + t for t in fast[i]] + [vocab.eos]
            # next-token prediction: inputs seq[:-1], targets seq[1:] ("Action:" in, "|" out)
            if seq:
                out["suffix"][i, :len(seq) - 1] = seq[:-1]
                out["suffix_target"][i, :len(seq) - 1] = seq[1:]
        batch = {k: torch.from_numpy(np.asarray(v)) for k, v in out.items()}
        batch["text_valid"] = batch["text"] != vocab.pad
        batch["suffix_loss"] = batch["suffix_target"] != vocab.pad
        return batch

    def _check_batch(self, batch):
        """pi0 trains without FAST tokens: another variant's batch is refused (eager mode only)."""
        if not self.cfg.use_fast and _eager() and (batch["suffix"] >= self.vocab.fast_offset).any():
            raise ValueError(f"variant {self.cfg.variant!r} trains without FAST tokens, but the "
                             "batch has some: build batches with this model's make_batch")

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, path, **extra):
        norms = {k: n.state_dict() for k, n in (("action_norm", self.action_norm),
                                                ("state_norm", self.state_norm)) if n}
        if isinstance(self.backbone, HFBackbone):  # its architecture; the weights are in "model"
            extra["hf_backbone"] = self.backbone.architecture()
        torch.save({"model": self.state_dict(), "config": asdict(self.cfg),
                    "fast_tokenizer": self.fast_tokenizer.state_dict(), **norms, **extra}, path)

    @classmethod
    def from_checkpoint(cls, path, device="cpu", tokenizer=None, **overrides):
        """Rebuild a model, tokenizers included, from a checkpoint (weights_only=True). tokenizer:
        the VLM's text tokenizer, for a checkpoint trained with one (it is not stored)."""
        ck = torch.load(path, map_location=device, weights_only=True)
        norms = {k: QuantileNorm(**ck[k]) for k in ("action_norm", "state_norm") if k in ck}
        backbone = (HFBackbone.from_architecture(ck["hf_backbone"], tokenizer)
                    if "hf_backbone" in ck else None)
        # settings this Config does not have are dropped, so an older checkpoint still loads
        known = {f.name for f in fields(Config)}
        cfg = Config(**{**{k: v for k, v in ck["config"].items() if k in known}, **overrides})
        model = cls(cfg, FASTTokenizer.from_state_dict(ck["fast_tokenizer"]),
                    **norms, backbone=backbone)
        try:
            model.load_state_dict(ck["model"])
        except RuntimeError as e:
            # a shape differs: e.g. a checkpoint built with another toy vocabulary (WORDS)
            raise ValueError(f"{path} does not fit this kivla's model (from an older version?): "
                             f"{str(e)[:300]}") from None
        return model.to(device).eval()


# ------------------------------------------------------------------------------------------------
# 4. Backbone (Gemma analog): a decoder-only transformer over [prefix | suffix]
# ------------------------------------------------------------------------------------------------


def prefix_lm_mask(prefix_valid, n_suffix):
    """Bool (B, 1, T, T), True = query may attend key. The prefix is bidirectional, the suffix
    causal, the prefix never sees the suffix; padded text keys are hidden.
    e.g. 3 prefix + 2 suffix tokens (rows = queries):
    1 1 1 0 0 / 1 1 1 0 0 / 1 1 1 0 0 / 1 1 1 1 0 / 1 1 1 1 1   (exercise 2)"""
    ### BEGIN SOLUTION: exercise 2, the attention masks
    B, Tp = prefix_valid.shape
    i = torch.arange(Tp + n_suffix, device=prefix_valid.device)
    allowed = (i[None, :] <= i[:, None]) | (i[None, :] < Tp)  # (T, T)
    key_valid = torch.cat([prefix_valid, prefix_valid.new_ones(B, n_suffix)], 1)  # (B, T)
    return (allowed[None] & key_valid[:, None, :]).unsqueeze(1)
    ### END SOLUTION


def expert_mask(prefix_valid, H):
    """Bool (B, 1, 1, Tp + H) for the action expert's H queries: every valid prefix key and all H
    action keys (bidirectional among themselves). The suffix (FAST tokens) is not even among its
    keys. (exercise 2)"""
    ### BEGIN SOLUTION: exercise 2, the attention masks
    return torch.cat([prefix_valid,
                      prefix_valid.new_ones(len(prefix_valid), H)], 1)[:, None, None, :]
    ### END SOLUTION


class Backbone(nn.Module):
    """The toy VLM (PaliGemma analog): the ViT + a decoder-only transformer over [prefix | suffix].

    This is THE interface between the VLM and the rest of kivla; `HFBackbone` (section 10)
    implements the same five things for a HuggingFace PaliGemma, and nothing else in KIVLA looks
    inside either:
      embed_prefix(batch) -> [image | text | state] embeddings (B, Tp, D), prefix_valid (B, Tp)
      embed(ids)          -> token embeddings (B, T, D) (suffix tokens)
      forward(x, pos, mask, cache=None)
                          -> hidden (B, T, D), per-layer [(k, v)] (HF: past_key_values)
      lm_head(hidden)     -> logits (B, T, V)
      n_layer, n_head, n_kv_head, head_dim, rope_theta: the shapes the action expert must match
    """

    def __init__(self, cfg, vocab):
        super().__init__()
        self.n_layer, self.n_head, self.n_kv_head = (cfg.n_layer, cfg.n_head,
                                                     cfg.n_kv_head or cfg.n_head)
        self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta
        self.vit = ViT(cfg, vocab.state_offset)  # FiLM reads word ids only
        self.embed = nn.Embedding(vocab.size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.head_dim,
                                          n_kv_head=cfg.n_kv_head, qk_norm=cfg.qk_norm)
                                    for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, vocab.size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as in Gemma

    def embed_prefix(self, batch):
        """[image | text | state] -> (B, Tp, D) and which prefix tokens are real (B, Tp)."""
        img = self.vit(batch["image"], batch["text"], batch["text_valid"])  # (B, Ti, D)
        x = torch.cat([img, self.embed(batch["text"]), self.embed(batch["state"])], 1)
        return x, prefix_valid(batch, img.shape[1])

    def forward(self, x, pos, mask, cache=None):
        """x (B, T, D) embeddings, pos (T,) -> hidden states (B, T, D) (the caller applies lm_head
        where it needs logits), per-layer [(k, v)] with the cache, each (B, nkv, Tpast + T, hs)."""
        kv, rot = [], rope_angles(pos, self.head_dim, self.rope_theta)
        for i, blk in enumerate(self.blocks):
            x, (k, v) = blk(x, rot, mask, None if cache is None else cache[i])
            if cache is not None:
                k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
            kv.append((k, v))
        return self.norm(x), kv


def prefix_valid(batch, n_image_tokens):
    """(B, Tp) bool: every image and state token is real, text padding is not."""
    img = batch["text_valid"].new_ones(len(batch["text_valid"]), n_image_tokens)
    return torch.cat([img, batch["text_valid"],
                      torch.ones_like(batch["state"], dtype=torch.bool)], 1)


# ------------------------------------------------------------------------------------------------
# 5. ViT image encoder (SigLIP analog): conv stem -> patch tokens -> transformer
# ------------------------------------------------------------------------------------------------


class ToyStem(nn.Module):
    """The ViT's conv stem [6] with the toy's two TOY-SCALE CHOICES (README "Toy-scale
    choices"), both switchable. A real VLA's SigLIP arrives pre-trained; this one learns from
    scratch in a few thousand steps, so:
      - CoordConv [8] (coord_stem): two input channels hold each pixel's x and y. Convs are
        translation-equivariant, but every answer and action here needs absolute position
        ("the top left corner").
      - FiLM [7] (film_stem): the instruction's words scale and shift the hidden stem channels
        (early fusion). Without it the ViT learns far more slowly which blob a colour word such
        as "red" names.
    image uint8 (B, S, S, 3), text ids (B, Tt) -> feature map (B, W, S / patch, S / patch)."""

    def __init__(self, cfg, n_words):
        super().__init__()
        w, self.coord = cfg.vit_width, cfg.coord_stem
        c_in = 5 if cfg.coord_stem else 3
        # "conv": 3x3 stride-2 convs [6], each halving the resolution, down to the patch grid
        if cfg.vit_stem == "conv":
            n = int(math.log2(cfg.patch_size))
            chans = [c_in] + [min(w, 16 * 2 ** i) for i in range(n - 1)] + [w]
            self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, 2, 1)
                                       for a, b in zip(chans[:-1], chans[1:]))
        else:  # one patchify conv, as SigLIP
            chans = [c_in, w]
            self.convs = nn.ModuleList([nn.Conv2d(c_in, w, cfg.patch_size, cfg.patch_size)])
        self.hidden = chans[1:-1]  # the channels FiLM modulates (every conv's output but the last)
        # (n_words, 2 * sum(hidden)): a (gain, bias) per channel; a Parameter, not an nn.Embedding:
        # the std-0.02 init leaves it, and a strong FiLM (std 0.3) lets colour words act at once
        self.film = nn.Parameter(0.3 * torch.randn(n_words, 2 * sum(self.hidden))) \
            if cfg.film_stem and self.hidden else None

    def forward(self, image, text, text_valid):
        x = image.float() / 127.5 - 1.0  # (B, S, S, 3) in [-1, 1]
        if self.coord:
            B, S = x.shape[:2]
            c = torch.linspace(-1, 1, S, device=x.device)
            xy = torch.stack(torch.meshgrid(c, c, indexing="xy"), -1)  # (S, S, 2): x, y
            x = torch.cat([x, xy.expand(B, S, S, 2)], -1)  # (B, S, S, 5): RGB | x | y
        # a view of the (B, S, S, C) memory: "channels last", what CPU conv kernels run fastest
        x = x.permute(0, 3, 1, 2)  # (B, C, S, S), C = 5 (or 3 without CoordConv)
        if self.film is not None:
            # (B, Tt, 1): the mean of the real words' FiLM vectors
            m = text_valid.unsqueeze(-1).float()
            film = ((F.embedding(text, self.film) * m).sum(1)
                    / m.sum(1).clamp(min=1)).split([2 * c for c in self.hidden], -1)
        for i, conv in enumerate(self.convs):
            x = conv(x)  # (B, C_i, S / 2^(i+1), ...)
            if i < len(self.convs) - 1:
                if self.film is not None:
                    g, b = film[i][:, :, None, None].chunk(2, dim=1)  # (B, C_i, 1, 1) each
                    x = x * (1 + g) + b
                x = F.gelu(x)
        return x


class ViT(nn.Module):
    def __init__(self, cfg, n_words):
        super().__init__()
        w = cfg.vit_width
        self.stem = ToyStem(cfg, n_words)
        # learned 2-D positions, flattened
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.n_image_tokens, w))
        self.blocks = nn.ModuleList(Block(w, 4, w // 4, qk_norm=cfg.qk_norm)
                                    for _ in range(cfg.vit_layers))
        self.norm = RMSNorm(w)
        self.proj = nn.Linear(w, cfg.d_model)  # to backbone width, like PaliGemma's projector

    def forward(self, image, text, text_valid):
        """image uint8 (B, S, S, 3), text ids (B, Tt) (the stem's FiLM reads them)
        -> image tokens (B, Ti, D)."""
        # (B, Ti, W)
        x = self.stem(image, text, text_valid).flatten(2).transpose(1, 2) + self.pos_emb
        for blk in self.blocks:
            x, _ = blk(x)
        return self.proj(self.norm(x))  # (B, Ti, D)


# ------------------------------------------------------------------------------------------------
# 6. Action expert: a narrower transformer over the noisy action chunk, conditioned on tau
# ------------------------------------------------------------------------------------------------


class ActionExpert(nn.Module):
    """Same depth, heads and head size as the backbone (so layer l's queries can read layer l's
    keys), its own, narrower weights: pi0's mixture of transformers. Flow time enters through
    adaRMSNorm (pi0.5) rather than pi0's concat-with-action MLP: it conditions every layer, not
    just the input."""

    def __init__(self, cfg):
        super().__init__()
        w = cfg.expert_width
        self.in_proj = nn.Linear(cfg.action_dim, w)
        self.time_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w), nn.SiLU())
        self.blocks = nn.ModuleList(Block(w, cfg.n_head, cfg.head_dim, cond_dim=w,
                                          n_kv_head=cfg.n_kv_head, qk_norm=cfg.qk_norm)
                                    for _ in range(cfg.n_layer))
        self.norm = RMSNorm(w)
        self.out_proj = nn.Linear(w, cfg.action_dim)
        self.rope_theta = cfg.rope_theta

    def time_embedding(self, tau):
        """tau (B,) in [0, 1] -> sinusoidal features (B, W), periods 4e-3 to 4 (as in openpi)."""
        half = self.in_proj.out_features // 2
        period = 4e-3 * (4.0 / 4e-3) ** torch.linspace(0, 1, half, device=tau.device)
        ang = 2 * math.pi * tau[:, None].float() / period[None]
        return torch.cat([ang.sin(), ang.cos()], -1)

    def forward(self, x_tau, tau, prefix_kv, prefix_valid, pos):
        """x_tau (B, H, A), tau (B,), prefix_kv: per-layer (k, v) (B, nkv, Tp, hs),
        prefix_valid (B, Tp), pos (H,) -> predicted velocity (B, H, A)."""
        B, H, _ = x_tau.shape
        x = self.in_proj(x_tau)  # (B, H, W)
        cond = self.time_mlp(self.time_embedding(tau))  # (B, W)
        mask = expert_mask(prefix_valid, H)  # (B, 1, 1, Tp + H)
        rot = rope_angles(pos, self.blocks[0].head_dim, self.rope_theta)
        for blk, kv in zip(self.blocks, prefix_kv):
            x, _ = blk(x, rot, mask, past_kv=kv, cond=cond)  # layer l reads the backbone's layer l
        return self.out_proj(self.norm(x))  # (B, H, A)


# ------------------------------------------------------------------------------------------------
# 7. Transformer pieces shared by the ViT, the backbone and the action expert
# ------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight)


def rms_norm(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def rope_angles(pos, head_dim, theta=10000.0):
    """Rotary position embedding (RoFormer) for positions (T,) -> cos, sin, each (T, hs), shared by
    every layer; HF Gemma's frequencies. sin carries the sign ([-sin | sin])."""
    half = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(half, device=pos.device, dtype=torch.float32) / half))
    ang = pos.to(torch.float32)[:, None] * freqs[None]  # (T, hs/2)
    cos, sin = ang.cos(), ang.sin()
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)  # (T, hs) each


def rope(x, cos, sin):
    """Rotate (..., T, hs) by the angles (T, hs): the pair (x[i], x[i + hs/2]) turns by angle i,
    i.e. [x1 cos - x2 sin | x2 cos + x1 sin], written as x * cos + [x2 | x1] * [-sin | sin]."""
    half = x.shape[-1] // 2
    return x * cos.to(x.dtype) + torch.cat([x[..., half:], x[..., :half]], -1) * sin.to(x.dtype)


class Block(nn.Module):
    """Pre-norm transformer block: attention + gated MLP. Used three ways:
    ViT (no positions, no mask), backbone (RoPE, prefix-LM mask, KV cache), action expert
    (RoPE, keys = [backbone prefix keys; own keys], adaRMSNorm conditioned on the flow time)."""

    def __init__(self, width, n_head, head_dim, cond_dim=0, n_kv_head=0, qk_norm=False):
        super().__init__()
        self.n_head, self.head_dim, self.n_kv_head = n_head, head_dim, n_kv_head or n_head
        assert n_head % self.n_kv_head == 0, (
            f"n_head={n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        self.norm1, self.norm2 = RMSNorm(width), RMSNorm(width)
        # [q | k | v] rows
        self.qkv = nn.Linear(width, (n_head + 2 * self.n_kv_head) * head_dim, bias=False)
        self.proj = nn.Linear(n_head * head_dim, width, bias=False)
        self.fc_gate = nn.Linear(width, 4 * width, bias=False)
        self.fc_up = nn.Linear(width, 4 * width, bias=False)
        self.fc_down = nn.Linear(4 * width, width, bias=False)
        # the action expert's: conditioned on tau
        self.ada = AdaRMS(cond_dim, width) if cond_dim else None
        # QK-norm [9]: each head's queries and keys are RMS-normalised, so attention logits start at
        # about unit size instead of ~0 (std-0.02 weights). Without it a from-scratch toy VLM's
        # attention can stay uniform all pretraining: the grounding plateau (VQA at chance).
        self.q_norm, self.k_norm = ((RMSNorm(head_dim), RMSNorm(head_dim)) if qk_norm
                                    else (None, None))

    def norm_and_rotate(self, qk, rot=None):
        """QK-norm, then RoPE, on the queries and keys (B, nh + nkv, T, hs) at once (fewer ops)."""
        if self.q_norm is not None:
            nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
            qk = rms_norm(qk, torch.cat([self.q_norm.weight.expand(nh, 1, hs),
                                         self.k_norm.weight.expand(nkv, 1, hs)]))
        return qk if rot is None else rope(qk, *rot)

    def forward(self, x, rot=None, mask=None, past_kv=None, cond=None):
        """x (B, T, W) -> x (B, T, W), and (k, v) of these T tokens, each (B, nkv, T, hs).
        rot: (cos, sin) from rope_angles, or None (the ViT: no positions).
        mask: bool (B, 1, T or 1, Tpast + T), True = may attend.
        past_kv: keys/values before this block's own: the backbone's KV cache, or, for the action
        expert, the backbone's prefix keys/values of the same layer (the mixture of transformers).
        cond: (B, C) adaRMSNorm condition (the expert's flow time), or None (plain RMSNorm)."""
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        # adaRMSNorm: the expert only
        ada1, ada2 = self.ada(cond) if cond is not None else (None, None)
        # 1) attention
        h = modulate(self.norm1(x), ada1)
        # (B, heads, T, hs)
        qk, v = self.qkv(h).view(B, T, nh + 2 * nkv, hs).transpose(1, 2).split([nh + nkv, nkv], 1)
        q, k = self.norm_and_rotate(qk, rot).split([nh, nkv], 1)  # QK-norm [9] and RoPE
        keys, values = k, v
        # the expert: its keys = [backbone's prefix K_l ; own K] (and the same for V)
        if past_kv is not None:  # (B, nkv, Tpast + T, hs)
            keys, values = torch.cat([past_kv[0], k], 2), torch.cat([past_kv[1], v], 2)
        # (B, nh, T, hs); grouped-query attention when nkv < nh (Gemma 2B: 8 query heads, 1 kv)
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=nkv < nh)
        a = self.proj(a.transpose(1, 2).reshape(B, T, nh * hs))  # (B, T, W)
        x = x + gate(a, ada1)
        # 2) gated MLP (GeGLU, as in Gemma)
        h = modulate(self.norm2(x), ada2)
        m = self.fc_down(F.gelu(self.fc_gate(h)) * self.fc_up(h))  # (B, T, W)
        x = x + gate(m, ada2)
        return x, (k, v)


class AdaRMS(nn.Linear):
    """pi0.5's adaRMSNorm [3]: the condition (the action expert's flow time) predicts, for each of
    a block's two sub-blocks, a scale and a shift of its RMSNorm's output and a gate on its residual
    branch. All three enter as (1 + scale), shift, (1 + gate): zero is a plain pre-norm block.
    cond (B, C) -> two (scale, shift, gate)."""

    def __init__(self, cond_dim, width):
        super().__init__(cond_dim, 6 * width)

    def forward(self, cond):
        s1, b1, g1, s2, b2, g2 = super().forward(cond)[:, None].chunk(6, dim=-1)  # (B, 1, W) each
        return (s1, b1, g1), (s2, b2, g2)


def modulate(h, ada):
    """RMSNorm's output h, scaled and shifted by adaRMSNorm (ada = (scale, shift, gate))."""
    return h if ada is None else h * (1 + ada[0]) + ada[1]


def gate(branch, ada):
    """A residual branch's output, gated by adaRMSNorm; unchanged without."""
    return branch if ada is None else (1 + ada[2]) * branch


# ------------------------------------------------------------------------------------------------
# 8. FAST action tokenizer [4]: DCT per dimension -> scale & round -> low-freq-first -> BPE
# ------------------------------------------------------------------------------------------------


def dct_matrix(n):
    """Orthonormal DCT-II as an (n, n) matrix C: coef = C @ x (scipy's norm="ortho")."""
    k = np.arange(n)[:, None]
    t = np.arange(n)[None, :]
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (t + 0.5) * k / n)
    c[0] /= np.sqrt(2.0)  # row 0 (the mean) gets sqrt(1/n) so every row has unit norm
    return c


class FASTTokenizer:
    """Frequency-space Action Sequence Tokenizer [4], in numpy. Actions are clipped to [-1, 1]
    before the DCT. Because the DCT is orthonormal, |coef| <= sqrt(H) * max|x| <= sqrt(H),
    so the base alphabet [-M, M] with M = round(scale * sqrt(H)) holds every coefficient of every
    in-range chunk: nothing in range is ever clamped, even coefficients never seen in `fit`.
    Ids: [0, 2M] are base symbols (coefficient q -> q + M), then one id per learned BPE merge.
    """

    def __init__(self, scale=10.0, vocab_size=512):
        self.scale, self.vocab_size = float(scale), int(vocab_size)
        self.H = self.D = None
        self.merges = []  # list of (a, b): merge i creates id n_base + i

    # -- the deterministic front end: chunk <-> integer symbols ------------------------------
    def _setup(self, H, D):
        self.H, self.D = int(H), int(D)
        self.M = int(round(self.scale * math.sqrt(self.H)))
        self.n_base = 2 * self.M + 1
        assert self.n_base <= self.vocab_size, (
            f"vocab_size={self.vocab_size} is smaller than the {self.n_base} base symbols "
            f"needed for scale={self.scale}, H={self.H}; raise vocab_size or lower scale")
        self.C = dct_matrix(self.H)  # (H, H)

    def symbols(self, chunks):
        """chunks (N, H, D) -> FAST's base symbols before BPE, (N, H * D) int64. Exercise 1:
        clip to [-1, 1], DCT-II along time per dimension (coef = C @ x with C = self.C, (H, H)),
        scale and round (q = rint(scale * coef), in [-M, M]), low frequency first (frequency 0 of
        every dimension, then frequency 1, ...), shifted by M so that ids are >= 0. e.g. H = 4,
        D = 2, scale 10 (M = 20): dimension 0 constant at 0.5, dimension 1 at 0.25 -> coef 0.5 * 2
        = 1 and 0.5 at frequency 0, nothing else -> [30, 25, 20, 20, 20, 20, 20, 20]."""
        ### BEGIN SOLUTION: exercise 1, FAST's front end
        x = np.clip(np.asarray(chunks, dtype=np.float64), -1.0, 1.0)  # (N, H, D)
        coef = np.einsum("th,nhd->ntd", self.C, x)  # (N, H, D) DCT-II along time, per dimension
        q = np.rint(coef * self.scale).astype(np.int64)  # (N, H, D) integers in [-M, M]
        return q.reshape(len(q), -1) + self.M  # row-major = all dims' frequency 0, then 1, ...
        ### END SOLUTION

    def chunk_from_symbols(self, syms):
        """(H * D,) base symbols -> the (H, D) float32 chunk: symbols' inverse, up to its rounding
        (each coefficient off by at most 0.5 / scale). Exercise 1."""
        ### BEGIN SOLUTION: exercise 1, FAST's front end
        coef = (np.asarray(syms, np.float64) - self.M).reshape(self.H, self.D) / self.scale
        return (self.C.T @ coef).astype(np.float32)  # (H, D) inverse DCT: C is orthonormal
        ### END SOLUTION

    def _check_chunk(self, chunk):
        assert self.H is not None, "FASTTokenizer: call fit(chunks) before encode/decode"
        chunk = np.asarray(chunk)
        if chunk.shape != (self.H, self.D):
            raise ValueError(f"FASTTokenizer: expected a chunk of shape ({self.H}, {self.D}), "
                             f"got {chunk.shape}")
        if not np.all(np.isfinite(chunk)):
            raise ValueError("FASTTokenizer: chunk contains NaN or inf")
        return chunk

    # -- BPE over the symbol sequences -------------------------------------------------------
    def fit(self, chunks):
        """Learn BPE merges on (N, H, D) chunks. Pair counting is vectorised over the whole corpus
        (all sequences concatenated with -1 separators; one bincount per merge): the Python loop
        runs over merges, not over chunks."""
        chunks = np.asarray(chunks, dtype=np.float64)
        if chunks.ndim != 3 or len(chunks) == 0:
            raise ValueError("FASTTokenizer.fit: expected chunks of shape (N, H, D), "
                             f"got {chunks.shape}")
        self._setup(chunks.shape[1], chunks.shape[2])
        q = self.symbols(chunks)  # (N, H * D): every chunk's symbols at once
        seqs = np.concatenate([q, -np.ones((len(q), 1), np.int64)], axis=1)
        arr = seqs.reshape(-1)  # one long int array, -1 separates chunks
        self.merges = []
        for new_id in range(self.n_base, self.vocab_size):
            a, b = arr[:-1], arr[1:]
            ok = (a >= 0) & (b >= 0)
            keys = a[ok] * self.vocab_size + b[ok]
            if len(keys) == 0:
                break
            # pair key -> count (keys < vocab_size^2: a small table, no sort)
            counts = np.bincount(keys)
            best = int(np.argmax(counts))  # ties -> smallest pair key: deterministic
            if counts[best] < 2:
                break  # a merge seen once compresses nothing that generalises
            pa, pb = divmod(best, self.vocab_size)
            arr = self._merge_array(arr, pa, pb, new_id)
            self.merges.append((pa, pb))
        self._build_tables()
        return self

    @staticmethod
    def _merge_array(arr, pa, pb, new_id):
        hit = np.flatnonzero((arr[:-1] == pa) & (arr[1:] == pb))
        if len(hit) == 0:
            return arr
        if pa == pb and len(hit) > 1:  # subtle: in a run "aaa" only the first pair merges
            keep, last = [], -2
            for i in hit.tolist():
                if i != last + 1:
                    keep.append(i)
                    last = i
                else:
                    last = -2
            hit = np.array(keep, dtype=np.int64)
        arr = arr.copy()
        arr[hit] = new_id
        return np.delete(arr, hit + 1)

    def _build_tables(self):
        self.expand = [[i] for i in range(self.n_base)]  # id -> base symbols
        for a, b in self.merges:
            self.expand.append(self.expand[a] + self.expand[b])

    def encode(self, chunk):
        """(H, D) float chunk -> list of ids in [0, vocab_size)."""
        return self.encode_batch([chunk])[0]

    def encode_batch(self, chunks):
        """(N, H, D) chunks -> N lists of ids: the merges applied in the order fit learned them,
        each to all chunks at once (numpy, as in fit). minbpe applies the lowest-rank pair first,
        chunk by chunk: the same ids, since a merge only ever creates pairs of higher rank."""
        if len(chunks) == 0:
            return []
        q = self.symbols(np.stack([self._check_chunk(c) for c in chunks]))  # (N, H * D)
        # one long int array, -1 separates chunks
        arr = np.concatenate([q, -np.ones((len(q), 1), np.int64)], axis=1).reshape(-1)
        for i, (pa, pb) in enumerate(self.merges):
            arr = self._merge_array(arr, pa, pb, self.n_base + i)
        # one list per chunk, each without its -1
        return [x[:-1].tolist() for x in np.split(arr, np.flatnonzero(arr < 0) + 1)[:-1]]

    def decode(self, ids, return_valid=False):
        """ids -> (H, D) float32. Never raises (an AR model can emit anything): unknown ids are
        dropped, missing coefficients are 0, extra ones cut; valid = nothing had to be fixed."""
        assert self.H is not None, "FASTTokenizer: call fit(chunks) before encode/decode"
        syms, valid = [], True
        for i in ids:
            try:
                i = int(i)
            except (TypeError, ValueError, OverflowError):
                valid = False
                continue
            if 0 <= i < len(self.expand):
                syms.extend(self.expand[i])
            else:
                valid = False
        n = self.H * self.D
        if len(syms) != n:
            valid = False
            syms = (syms + [self.M] * n)[:n]  # symbol M is coefficient 0
        chunk = self.chunk_from_symbols(syms)
        return (chunk, valid) if return_valid else chunk

    def state_dict(self):
        return {"scale": self.scale, "vocab_size": self.vocab_size, "H": self.H, "D": self.D,
                "merges": [list(p) for p in self.merges]}

    @classmethod
    def from_state_dict(cls, d):
        tok = cls(scale=d["scale"], vocab_size=d["vocab_size"])
        tok._setup(d["H"], d["D"])
        tok.merges = [tuple(int(v) for v in p) for p in d["merges"]]
        tok._build_tables()
        return tok


class QuantileNorm:
    """Invertible per-dimension normalisation (openpi, FAST [4]): the training data's 1st..99th
    percentile maps to [-1, 1], for real robot data (the toy's is in range). Nothing is clipped, so
    `inverse` undoes it exactly; a constant dimension is only shifted."""

    def __init__(self, lo, hi):
        self.lo, self.hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)  # (D,) each
        self.scale = np.where(self.hi - self.lo > 1e-8, (self.hi - self.lo) / 2, 1.0)

    @classmethod
    def fit(cls, x, q=0.01):
        # (N, D): every time step of every chunk
        x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
        if not np.all(np.isfinite(x)):
            raise ValueError("QuantileNorm.fit: data contains NaN or inf")
        return cls(np.quantile(x, q, axis=0), np.quantile(x, 1 - q, axis=0))

    def __call__(self, x):
        return ((np.asarray(x, np.float64) - (self.lo + self.hi) / 2)
                / self.scale).astype(np.float32)

    def inverse(self, y):
        return (np.asarray(y, np.float64) * self.scale + (self.lo + self.hi) / 2).astype(np.float32)

    def state_dict(self):
        return {"lo": self.lo.tolist(), "hi": self.hi.tolist()}


# ------------------------------------------------------------------------------------------------
# 9. The toy world: push the <colour> block to the <corner> corner (a gymnasium env)
# ------------------------------------------------------------------------------------------------


COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230),
          "yellow": (235, 200, 30), "purple": (150, 60, 200)}
CORNERS = {"top left": (0.15, 0.15), "top right": (0.85, 0.15),
           "bottom left": (0.15, 0.85), "bottom right": (0.85, 0.85)}  # (x, y), y grows downwards
INSTRUCTION = "push the {color} block to the {corner} corner"
ALL_TASKS = [(c, k) for c in COLORS for k in CORNERS]
# The evaluation splits: fixed constants, never tuned on results (that would bias every number).
# 1) held-out combinations: colour x corner pairs never in robot demos, every word of them is
HELDOUT_TASKS = [("red", "bottom right"), ("green", "top left"), ("blue", "bottom left"),
                 ("yellow", "top right"), ("purple", "top left")]
# 2) an unseen concept: this colour is never a demo's target (it may be a distractor); only the VQA
#    data says which blob it names: the toy analogue of knowledge only the VLM has
UNSEEN_COLOR = "purple"  # train_toy.py --unseen_color ("" = none)
# 3) unseen wording: words only the VQA data uses, never a robot instruction (push/top/bottom)
SYNONYMS = {"push": ("shove", "nudge"), "top": ("upper",), "bottom": ("lower",)}


def task_splits(unseen_color=UNSEEN_COLOR):
    """(colour, corner) tasks per split. "train" = what robot demos cover (and in-distribution
    evaluation); unseen wording evaluates the "train" tasks with `paraphrase`d instructions."""
    return {"train": [t for t in ALL_TASKS if t not in HELDOUT_TASKS and t[0] != unseen_color],
            "heldout": [t for t in HELDOUT_TASKS if t[0] != unseen_color],
            "unseen_color": [t for t in ALL_TASKS if t[0] == unseen_color]}


def paraphrase(text, rng):
    """Replace every word that has synonyms by one of them:
    "push ... top left" -> "shove ... upper left"."""
    return " ".join(SYNONYMS[w][rng.integers(len(SYNONYMS[w]))] if w in SYNONYMS else w
                    for w in text.split())


class PushEnv(gymnasium.Env):
    """A 2-D tabletop in [0, 1]^2: a round pusher, 3 coloured round blocks, 4 corner goal pads.

    Block positions are only in the image, the task only in the words: a policy needs vision and
    language. Action: pusher velocity in [-1, 1]^2 (times `speed` per step), clipped. Kinematic,
    deterministic physics. `tasks`: the (colour, corner) pairs reset samples (or options={"task":
    ...}). Reward: minus the target's distance to its goal; terminated: the target's centre on its
    goal pad; truncated: after max_episode_steps.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    pusher_radius, block_radius, speed, success_tol = 0.05, 0.06, 0.05, 0.1  # tol = half the pad

    def __init__(self, image_size=64, max_episode_steps=100, tasks="train", render_mode=None,
                 render_size=256):
        named = {**task_splits(), "all": ALL_TASKS}
        if not (tasks in named if isinstance(tasks, str) else isinstance(tasks, (list, tuple))):
            raise ValueError(f"tasks must be one of {', '.join(named)} or a list of "
                             f"(colour, corner), got {tasks!r}")
        self.tasks = named[tasks] if isinstance(tasks, str) else [tuple(t) for t in tasks]
        for c, k in self.tasks:
            assert c in COLORS and k in CORNERS, f"unknown task ({c!r}, {k!r})"
        self.image_size, self.max_episode_steps = image_size, max_episode_steps
        self.render_mode, self.render_size = render_mode, render_size
        self.observation_space = spaces.Dict({
            "image": spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
            "state": spaces.Box(0.0, 1.0, (2,), np.float32),
            "instruction": spaces.Text(max_length=64, charset=string.ascii_lowercase + " "),
        })
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)

    # -- state ---------------------------------------------------------------------------------
    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        rng = self.np_random
        task = (options or {}).get("task")
        if task is None:
            task = self.tasks[rng.integers(len(self.tasks))]
        self.color, self.corner = task
        others = [c for c in COLORS if c != self.color]
        self.colors = [self.color] + [others[i] for i in rng.choice(len(others), 2, replace=False)]
        self.blocks = self._place(rng, 3, self.block_radius * 2 + 0.02, lo=0.25, hi=0.75)  # (3, 2)
        while True:  # pusher anywhere not touching a block
            p = rng.uniform(0.1, 0.9, 2)
            if (np.min(np.linalg.norm(self.blocks - p, axis=1))
                    > self.pusher_radius + self.block_radius + 0.02):
                break
        self.pusher, self.goal = p, np.array(CORNERS[self.corner])
        self.instruction = INSTRUCTION.format(color=self.color, corner=self.corner)
        self.steps = 0
        return self.observe(), {"success": False}

    @staticmethod
    def _place(rng, n, min_dist, lo, hi):
        while True:
            pts = rng.uniform(lo, hi, (n, 2))
            d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(n)
            if d.min() > min_dist:
                return pts

    def step(self, action):
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (2,) or not np.all(np.isfinite(a)):
            raise ValueError(f"PushEnv.step: action must be 2 finite numbers, got {action!r}")
        a = np.clip(a, -1.0, 1.0)  # out-of-range velocities are clipped, like a real motor limit
        self.simulate(a * self.speed)
        self.steps += 1
        dist = float(np.linalg.norm(self.blocks[0] - self.goal))
        # centre on the drawn pad
        success = bool(np.all(np.abs(self.blocks[0] - self.goal) < self.success_tol))
        truncated = self.steps >= self.max_episode_steps and not success
        return self.observe(), -dist, success, truncated, {"success": success}

    def simulate(self, dp):
        """The physics of one step: the pusher moves by dp (2,), pushing what it touches. In plain
        Python floats: on 2-vectors numpy's per-call overhead would be most of the time."""
        rp, rb, clip = self.pusher_radius, self.block_radius, lambda v, r: min(max(v, r), 1 - r)
        p = [clip(v + d, rp) for v, d in zip(self.pusher.tolist(), dp.tolist())]
        bs = self.blocks.tolist()  # 3 x [x, y]
        for _ in range(4):  # a few relaxation sweeps resolve chains (pusher -> block -> block)
            for b in bs:
                dx, dy = b[0] - p[0], b[1] - p[1]
                n = math.hypot(dx, dy)
                if n < rp + rb:
                    b[0], b[1] = (p[0] + dx / max(n, 1e-9) * (rp + rb),
                                  p[1] + dy / max(n, 1e-9) * (rp + rb))
            for i in range(3):
                for j in range(i + 1, 3):
                    dx, dy = bs[j][0] - bs[i][0], bs[j][1] - bs[i][1]
                    n = math.hypot(dx, dy)
                    if n < 2 * rb:
                        sx, sy = (dx / max(n, 1e-9) * (2 * rb - n) / 2,
                                  dy / max(n, 1e-9) * (2 * rb - n) / 2)
                        bs[i] = [bs[i][0] - sx, bs[i][1] - sy]
                        bs[j] = [bs[j][0] + sx, bs[j][1] + sy]
            bs = [[clip(x, rb), clip(y, rb)] for x, y in bs]
        for b in bs:  # a block stuck at a wall pushes the pusher back instead
            dx, dy = p[0] - b[0], p[1] - b[1]
            n = math.hypot(dx, dy)
            if n < rp + rb:
                p = [clip(b[0] + dx / max(n, 1e-9) * (rp + rb), rp),
                     clip(b[1] + dy / max(n, 1e-9) * (rp + rb), rp)]
        self.pusher, self.blocks = np.array(p), np.array(bs)

    # -- observation and rendering ---------------------------------------------------------------
    def observe(self):
        """The current observation: {"image" (S, S, 3) uint8, "state" (2,): pusher x, y,
        "instruction"}."""
        return {"image": self._draw(self.image_size), "state": self.pusher.astype(np.float32),
                "instruction": self.instruction}

    def _draw(self, size):
        img = Image.new("RGB", (size, size), (205, 205, 200))
        dr = ImageDraw.Draw(img)
        # goal pads: the four corners look alike, only the words say which one
        g = self.success_tol * size
        for gx, gy in CORNERS.values():
            dr.rectangle([gx * size - g, gy * size - g, gx * size + g, gy * size + g],
                         fill=(165, 165, 160))
        r = self.block_radius * size
        for (x, y), c in zip(self.blocks, self.colors):
            dr.ellipse([x * size - r, y * size - r, x * size + r, y * size + r], fill=COLORS[c])
        r = self.pusher_radius * size
        x, y = self.pusher
        dr.ellipse([x * size - r, y * size - r, x * size + r, y * size + r], fill=(30, 30, 30))
        return np.asarray(img)

    def render(self):
        return self._draw(self.render_size)


gymnasium.register(id="kivla/Push-v0", entry_point=PushEnv)


def scripted_action(env, noise=0.0, rng=None):
    """The scripted policy that demonstrates the task (a pushing oracle on the env's true state, not
    the action expert): get behind the block, then push it to the goal. Proportional control
    saturating at speed 1 keeps the actions smooth (so the DCT compresses them). noise > 0: the
    action through `dart`."""
    b, g, p = env.blocks[0], env.goal, env.pusher
    reach = env.pusher_radius + env.block_radius
    to_goal = g - b
    dist = np.linalg.norm(to_goal)
    u = to_goal / max(dist, 1e-9)  # push direction
    rel = p - b
    along = rel @ u  # < 0: pusher is behind the block
    lateral = rel - along * u
    lat = np.linalg.norm(lateral)
    if along < -0.5 * reach and lat < 0.025:
        # push phase: drive along u, steer back onto the line behind the block, slow near the goal
        target = b - u * reach * 0.8 + u * min(dist, 0.1)
    elif along < 0 or lat > reach + 0.02:
        target = b - u * (reach + 0.015)  # go to the pre-push point
    else:
        # on the wrong side of the block: go around it, sideways first
        side = lateral / lat if lat > 1e-6 else np.array([-u[1], u[0]])
        target = b + side * (reach + 0.04) - u * 0.03
    v = (target - p) / env.speed
    n = np.linalg.norm(v)
    v = v / n if n > 1.0 else v
    if noise > 0:
        rng = rng if rng is not None else np.random.default_rng()
        return dart(v, noise, rng).astype(np.float32)
    return np.clip(v, -1.0, 1.0).astype(np.float32)


def dart(action, noise, rng):
    """DART (Laskey et al. 2017): the action plus Gaussian noise of std `noise`, clipped to [-1, 1].
    Demos execute the noisy action and record the clean one, so they visit the states a learned
    policy's errors lead to and show how to recover from them."""
    return np.clip(action + noise * rng.standard_normal(2), -1.0, 1.0)


expert_action = scripted_action  # an alias: external checks and course material use this name


# -- the toy world's vision-language data: scene questions covering every instruction word ---------
# A real VLA starts from a VLM that already knows what "red" and "top left" mean. Our stand-in for
# that knowledge: toy VQA on the same scenes; the backbone is pre-trained and co-trained on it.


def position_bins(xy, grid=8, bins=256):
    """Coarse (x, y) answer as two state-bin tokens: the centre bin of an 8x8 grid cell."""
    cell = np.clip((np.asarray(xy) * grid).astype(int), 0, grid - 1)
    return ((cell + 0.5) * bins / grid).astype(int).tolist()


def make_vqa(env, rng):
    """One (question, answer) about the env's current scene. Answers are word strings, except
    "where is" whose answer is a list of two state-bin ints (x, y). Half of the "where" questions
    name the block the way a robot instruction does ("push the red block to the top left corner
    where is it"), as pointing data does. Corners and verbs are said both ways ("upper left",
    "shove"): the only place the unseen wording (SYNONYMS) appears, as web text for a real VLM."""
    # "where" carries the most grounding signal per question
    kind = rng.choice(4, p=[0.45, 0.2, 0.2, 0.15])
    i = int(rng.integers(3))
    color, pos = env.colors[i], env.blocks[i]
    if kind == 0:
        # grounding in the robot's own words: the VLM learns to find the block an instruction names
        if rng.random() < 0.5:
            said = INSTRUCTION.format(color=color, corner=list(CORNERS)[rng.integers(4)])
            return f"{said} where is it", position_bins(pos)
        return f"where is the {color} block", position_bins(pos)
    if kind == 1:
        corner = min(CORNERS, key=lambda k: np.linalg.norm(pos - np.array(CORNERS[k])))
        return f"which corner is the {color} block nearest", corner
    corner = list(CORNERS)[rng.integers(4)]
    said = paraphrase(corner, rng) if rng.random() < 0.5 else corner
    if kind == 2:
        j = int(np.argmin(np.linalg.norm(env.blocks - np.array(CORNERS[corner]), axis=1)))
        return f"what colour is the block nearest the {said} corner", env.colors[j]
    verb = ["push", *SYNONYMS["push"]][rng.integers(3)]
    return f"you {verb} the {color} block to the {said} corner which moves", color


# -- one backbone vocabulary: specials | words | 256 state bins | FAST ids (last, as openpi) -------

SPECIALS = ["<pad>", "<unk>", "Action:", "Answer:", "|"]
WORDS = sorted(set(" ".join([INSTRUCTION,
                             "where is it the which corner nearest what colour you moves",
                             *COLORS, *CORNERS, *(w for ws in SYNONYMS.values() for w in ws)])
                   .replace("{color}", "").replace("{corner}", "").split()))


class Vocab:
    """Word-level text tokens + discretised state + FAST ids, mapped into one id space.
    Vocab(...) is the toy's own table: [specials][words][state bins 0..255][FAST 0..V-1].
    Vocab.inside(size, ...) places the same pieces inside a real VLM's vocabulary (HFBackbone).
    """

    def __init__(self, fast_vocab_size, state_bins=256):
        self.itos = SPECIALS + WORDS
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.state_bins, self.tokenizer = state_bins, None
        self.pad, self.unk, self.action, self.answer, self.eos = range(5)
        self.state_offset = len(self.itos)
        self.fast_offset = self.state_offset + state_bins
        self.size = self.fast_offset + fast_vocab_size

    @classmethod
    def inside(cls, size, fast_vocab_size, state_bins=256, tokenizer=None, reserved=128):
        """Inside a real VLM's vocabulary of `size` ids: words keep the low ids (or come from its
        `tokenizer`); [state bins]["Action:" "Answer:" "|"][FAST] sit just below the last `reserved`
        ids, as openpi skips PaliGemma's final 128 (special tokens): none is overwritten."""
        v = cls(fast_vocab_size, state_bins)
        v.size, v.tokenizer, v.fast_offset = size, tokenizer, size - reserved - fast_vocab_size
        v.action, v.answer, v.eos = range(v.fast_offset - 3, v.fast_offset)
        v.state_offset = v.action - state_bins
        if tokenizer is not None:  # a real tokenizer's rarest ids get repurposed, as openpi does
            v.pad, v.unk = tokenizer.pad_token_id, tokenizer.unk_token_id
        elif len(v.itos) > v.state_offset:  # the toy words must all fit below the state bins
            raise ValueError(f"a vocabulary of {size} ids cannot hold {len(v.itos)} words + "
                             f"{state_bins} state bins + 3 markers + {fast_vocab_size} FAST ids + "
                             f"{reserved} reserved ids")
        return v

    def words(self, text):
        """-> (ids, unknown_words). Unknown words become <unk> and are reported, never dropped.
        With a real tokenizer: its subword ids, nothing unknown."""
        if self.tokenizer is not None:
            return self.tokenizer.encode(text, add_special_tokens=False), []
        toks = text.lower().split()
        return [self.stoi.get(w, self.unk) for w in toks], [w for w in toks if w not in self.stoi]

    def state(self, xy):
        """pi0.5 feeds proprioception as text: each coordinate in [0, 1] -> one of 256 bin
        tokens."""
        b = np.clip((np.asarray(xy, dtype=np.float64) * self.state_bins).astype(int),
                    0, self.state_bins - 1)
        return (b + self.state_offset).tolist()


# ------------------------------------------------------------------------------------------------
# 10. A real VLM behind the same interface: HuggingFace PaliGemma (SigLIP + Gemma)
# ------------------------------------------------------------------------------------------------


# Optional: `pip install transformers` (>= 5), imported only here (README: "A real VLM").

class HFBackbone(nn.Module):
    """PaliGemma as the VLM backbone: SigLIP image tokens + Gemma over [prefix | suffix], its own
    LM head. The expert is built from Gemma's config and reads its per-layer keys/values as it
    reads the toy's: HF caches keys after RoPE, with `rope`'s convention and frequencies, at the
    positions we pass (PaliGemma's own forward counts from 1: no relative position tells)."""

    def __init__(self, hf_model, tokenizer=None):
        super().__init__()
        import transformers  # noqa: F401  (the optional dependency, only here)
        if int(transformers.__version__.split(".")[0]) < 5:
            raise ImportError("HFBackbone needs transformers >= 5 "
                              f"(found {transformers.__version__}): pip install -U transformers")
        self.hf, self.tokenizer = hf_model, tokenizer
        tc = hf_model.config.text_config
        rope = getattr(tc, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"HFBackbone: RoPE scaling {rope.get('rope_type')!r} "
                             "is not supported by the expert's rope()")
        if getattr(tc, "_attn_implementation", "sdpa") not in ("sdpa", None):
            raise ValueError("HFBackbone passes boolean attention masks: "
                             "load the model with attn_implementation='sdpa'")
        self.n_layer, self.n_head, self.n_kv_head = (
            tc.num_hidden_layers, tc.num_attention_heads, tc.num_key_value_heads)
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        self.rope_theta = float(rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0)))
        self.vocab_size, self.image_size = tc.vocab_size, hf_model.config.vision_config.image_size
        # newer transformers (5.24) call the KV cache `cache`, older ones (5.17) `past_key_values`
        # (argument and output)
        lm_args = inspect.signature(hf_model.model.language_model.forward).parameters
        self.cache_name = "cache" if "cache" in lm_args else "past_key_values"

    def architecture(self):
        """What from_architecture needs to rebuild this model with random weights (a checkpoint
        has the rest)."""
        return {"class": type(self.hf).__name__, "config": self.hf.config.to_json_string()}

    @staticmethod
    def from_architecture(arch, tokenizer=None):
        import json
        import transformers
        cls = getattr(transformers, arch["class"])
        return HFBackbone(cls(cls.config_class.from_dict(json.loads(arch["config"]))), tokenizer)

    def embed(self, ids):
        """Gemma's token embedding; it multiplies by sqrt(hidden size) itself (the model's own
        scaling)."""
        return self.hf.model.language_model.embed_tokens(ids)  # (B, T, D)

    def lm_head(self, hidden):
        return self.hf.lm_head(hidden)  # (B, T, V), tied to the embedding as in Gemma

    def embed_prefix(self, batch):
        """uint8 images -> what SigLIP expects (its size; mean 0.5, std 0.5, i.e. [-1, 1]) -> image
        tokens, then [image | text | state] as the toy. Image tokens enter unscaled, as in
        PaliGemma's own forward."""
        x = batch["image"].permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, S, S)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False)
        img = self.hf.model.get_image_features(x.to(self.hf.dtype)).pooler_output  # (B, Ti, D)
        x = torch.cat([img.to(self.hf.dtype), self.embed(batch["text"]),
                       self.embed(batch["state"])], 1)
        return x, prefix_valid(batch, img.shape[1])

    def forward(self, x, pos, mask, cache=None):
        """Same contract as Backbone.forward: the prefix-LM mask goes in as a 4-D boolean mask (HF
        uses a 4-D mask as given), the cache as a list of per-layer (k, v), and the keys/values come
        back the same way."""
        from transformers import DynamicCache
        past = DynamicCache() if cache is None else DynamicCache(ddp_cache_data=cache)
        out = self.hf.model.language_model(inputs_embeds=x, attention_mask=mask,
                                           position_ids=pos[None], use_cache=True,
                                           **{self.cache_name: past})
        return out.last_hidden_state, [(layer.keys, layer.values)
                                       for layer in getattr(out, self.cache_name).layers]


def tiny_paligemma(cfg, fast_vocab_size):
    """A small random PaliGemma built in code (no hub), shaped like the toy's cfg, with Gemma 2B's
    single key/value head unless cfg.n_kv_head says otherwise, and a vocabulary just big enough."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    V = len(SPECIALS) + len(WORDS) + cfg.state_bins + 3 + fast_vocab_size + 128
    vision = dict(model_type="siglip_vision_model", hidden_size=cfg.vit_width,
                  intermediate_size=4 * cfg.vit_width, num_hidden_layers=cfg.vit_layers,
                  num_attention_heads=4, image_size=cfg.image_size, patch_size=cfg.patch_size,
                  projection_dim=cfg.d_model, vision_use_head=False)  # as PaliGemma
    text = dict(model_type="gemma", hidden_size=cfg.d_model, intermediate_size=4 * cfg.d_model,
                num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                num_key_value_heads=cfg.n_kv_head or 1, head_dim=cfg.head_dim, vocab_size=V)
    return PaliGemmaForConditionalGeneration(PaliGemmaConfig(
        vision_config=vision, text_config=text, projection_dim=cfg.d_model,
        image_token_index=V - 1))

"""
tools/cli.py: the command line's plumbing, kept beside the job as nanoGPT keeps configurator.py
beside train.py. The settings themselves (names, defaults, help) are listed in train_toy.py's
make_parser; this file makes argparse behave: --flag, --key=value and --key value, groups in 100
columns with each default after its help, did-you-mean, and every bad input one line (rc 1): an
unknown or moved setting (parse), a range or combination a run cannot use (check_settings), a
device that is not here or an --out_dir that cannot be made (device_and_out_dir), a file that is
not a checkpoint or weights that do not fit (load_checkpoint, load_trained, load_vlm_weights), an
--instruction too long (instruction_task), --backbone=hf-tiny without transformers (hf_tiny), and a
student copy of kivla.py with exercises left (refuse_a_student_copy).
"""

import argparse
import difflib
import os
import re

import torch

import kivla

# flags that became their own tools: the old flag answers with the new command
MOVED = {"compare": "python tools/compare.py [settings] [--variants=ki,joint]",
         "variants": "python tools/compare.py --variants=ki,joint [settings]",
         "merge": "python tools/compare.py --merge=DIR,DIR --out_dir=DIR",
         "bench": "python tools/bench.py [settings]",
         "figures": "python tools/figures.py [settings]"}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # every bad input: one line, never the usage block or a traceback
        raise SystemExit(f"error: {message.removeprefix('argument ')}")


class Help(argparse.RawDescriptionHelpFormatter):  # 100 columns, each default after its help
    def __init__(self, prog):
        super().__init__(prog, max_help_position=24, width=100)

    def _get_help_string(self, action):
        default = action.default
        return action.help + ("" if default == argparse.SUPPRESS else f" [{default!r}]")


def parser(prog, description):
    return Parser(prog=prog, description=description, formatter_class=Help, allow_abbrev=False,
                  usage=f"python {prog} [--key=value ...]  (every setting is listed below)")


def boolean(v):
    if v.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")
    return v.lower() in ("true", "1")


def one_of(*options):
    def check(v):
        if v not in options:
            names = ", ".join(o for o in options if o) + (", or ''" if "" in options else "")
            raise argparse.ArgumentTypeError(f"must be one of {names}; got {v!r}")
        return v
    return check


def add(group, name, default, help, kind=None):
    """One setting: --name, its type from the default (or kind), its help beside it."""
    kind = kind or type(default)
    if kind is bool:  # --flag, --flag=true, --flag false
        return group.add_argument(f"--{name}", type=boolean, nargs="?", const=True, default=default,
                                  metavar="BOOL", help=help)
    meta = {int: "N", float: "X"}.get(kind, "S")
    group.add_argument(f"--{name}", type=kind, default=default, metavar=meta, help=help)


def parse(parser, argv, fixed=()):
    """-> (every default, only what argv gave). An unknown key ends the program with one line: the
    new command if it moved, why if it is one of `fixed`, else the nearest setting."""
    defaults, unset = vars(parser.parse_args([])), object()
    ns, extra = parser.parse_known_args(argv, argparse.Namespace(**dict.fromkeys(defaults, unset)))
    if extra:
        key = extra[0][2:].split("=")[0] if extra[0].startswith("--") else None
        near = difflib.get_close_matches(key or "", defaults, n=1)
        raise SystemExit(
            f"error: --{key} moved: {MOVED[key]}" if key in MOVED else
            f"error: --{key} is fixed by the toy (its env, vocabulary or RoPE); for your own "
            "robot, set it in kivla.Config" if key in fixed else
            f"error: expected --key=value, got {extra[0]!r}" if key is None else
            f"error: unknown setting --{key}" + (f"; did you mean --{near[0]}?" if near else ""))
    return defaults, {k: v for k, v in vars(ns).items() if v is not unset}


def check_settings(s):
    """The combinations and ranges a run cannot use, each refused with the reason."""
    if s["init_from"] and not os.path.isfile(s["init_from"]):
        why = "a folder: name the .pt in it" if os.path.isdir(s["init_from"]) else "no such file"
        raise SystemExit(f"error: --init_from={s['init_from']}: {why}")
    if s["eval_only"] and not s["init_from"]:
        raise SystemExit("error: --eval_only evaluates a trained model: add --init_from=ckpt.pt")
    if s["init_from"]:  # now, not after minutes of data and pretraining
        load_checkpoint(s["init_from"], trained=s["eval_only"])
    if s["eval_only"] and s["gif_episodes"] < 1:
        raise SystemExit("error: --eval_only evaluates 2 x --gif_episodes episodes: give >= 1")
    if s["instruction"] and not s["eval_only"]:
        raise SystemExit("error: --instruction is for --eval_only (training uses the env's own)")
    for keys, ok, want in (
            (("seeds", "pretrain_blocks", "n_demos", "n_vqa", "pretrain_steps", "train_steps",
              "batch_size", "eval_interval", "eval_episodes", "replan", "num_steps"), 1, ">= 1"),
            (("vqa_frac", "ema"), 0, "in [0, 1]"),
            (("pretrain_min_vqa", "lr", "demo_noise", "grad_clip", "weight_decay",
              "warmup_steps", "gif_episodes"), 0, ">= 0")):
        for k in keys:
            if not s[k] >= ok or (want == "in [0, 1]" and not s[k] <= 1):
                raise SystemExit(f"error: --{k} must be {want}, got {s[k]}")
    if s["replan"] > s["action_horizon"] and not s["eval_only"]:  # (--eval_only: the checkpoint's H)
        raise SystemExit(f"error: --replan={s['replan']} executes more actions than a chunk holds "
                         f"(--action_horizon={s['action_horizon']})")
    if not s["fast_scale"] > 0:
        raise SystemExit(f"error: --fast_scale must be > 0, got {s['fast_scale']}")
    base = 2 * round(s["fast_scale"] * s["action_horizon"] ** 0.5) + 1  # FAST's symbols (kivla.py)
    if s["fast_vocab"] < base:
        raise SystemExit(f"error: --fast_vocab must be at least FAST's {base} base symbols at "
                         f"--fast_scale={s['fast_scale']}, got {s['fast_vocab']}")


def device_and_out_dir(s):
    """--device=auto -> the best one here; a device not here, or an --out_dir that cannot be made:
    one line that says why."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if s["device"] == "auto":
        s["device"] = "cuda" if cuda else "mps" if mps else "cpu"
    if not {"cpu": True, "cuda": cuda, "mps": mps}[s["device"]]:
        raise SystemExit(f"error: --device={s['device']} is not available here")
    try:
        os.makedirs(s["out_dir"], exist_ok=True)
    except OSError as e:
        why = "a file has that name" if os.path.isfile(s["out_dir"]) else e.strerror
        raise SystemExit(f"error: --out_dir={s['out_dir']}: cannot make that folder ({why})")


def instruction_task(model, text):
    """--eval_only --instruction: warn about words the model never saw; -> the task the text names,
    [(colour, corner)], or "all" if it names none (then success means nothing)."""
    words, unknown = model.vocab.words(text)
    if len(words) > model.cfg.text_len:
        raise SystemExit(f"error: --instruction has {len(words)} words; the model reads at most "
                         f"{model.cfg.text_len}")
    if unknown:
        print(f"warning: words the model has never seen (read as <unk>): {unknown}")
    color = [c for c in kivla.COLORS if c in text.split()]
    corner = [k for k in kivla.CORNERS if k in text]
    tasks = [(color[0], corner[0])] if color and corner else "all"
    print(f"instruction: {text!r} -> task "
          f"{tasks if tasks != 'all' else '(not parsed: success not meaningful)'}")
    return tasks


def hf_tiny(cfg, tok):
    """--backbone=hf-tiny: a tiny random HuggingFace PaliGemma as the VLM backbone; without
    transformers, one line that says how to install it."""
    try:
        return kivla.HFBackbone(kivla.tiny_paligemma(cfg, tok.vocab_size))
    except ImportError:
        raise SystemExit("error: hf-tiny needs transformers>=5: pip install transformers") from None


def load_checkpoint(path, trained=False, fast_vocab=None):
    """torch.load (weights only) with one clear line for what cannot be used: a file that is not a
    kivla checkpoint, (trained=True) pretrained.pt, whose action expert never trained, or one whose
    FAST vocabulary is not `fast_vocab`."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        why = "it holds no model, config and FAST tokenizer"
    except Exception as e:  # not a torch file, truncated, unreadable, ...
        ck, why = None, f"torch.load(weights_only=True) raised {type(e).__name__}"
    if not isinstance(ck, dict) or not {"model", "config", "fast_tokenizer"} <= ck.keys():
        raise SystemExit(f"error: {path} is not a kivla checkpoint ({why})")
    if trained and "settings" not in ck:
        raise SystemExit(f"error: {path} is a VLM-only checkpoint (pretrained.pt: its action "
                         "expert is random): evaluate a ckpt.pt from a training run")
    if fast_vocab is not None and ck["fast_tokenizer"]["vocab_size"] != fast_vocab:
        raise SystemExit(f"error: {path} has fast_vocab={ck['fast_tokenizer']['vocab_size']}, "
                         f"not {fast_vocab}")
    return ck


def load_trained(path, device):
    """--eval_only's model: KIVLA.from_checkpoint, its settings kept as model.settings; weights
    that do not fit this kivla end in one line."""
    try:
        model = kivla.KIVLA.from_checkpoint(path, device=device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    model.settings = load_checkpoint(path, trained=True)["settings"]
    return model


def load_vlm_weights(model, weights):
    """Every VLM weight, strictly; the action expert keeps its fresh init (pretraining skips it)."""
    try:
        missing, unexpected = model.load_state_dict(
            {k: v for k, v in weights.items() if not k.startswith("action_expert.")}, strict=False)
    except RuntimeError as e:  # a shape differs: e.g. weights built with another toy vocabulary
        why = " ".join(str(e).split())[:300]
        raise SystemExit("error: the VLM weights do not fit this model (other model settings, e.g. "
                         f"--scale or --d_model, or an older kivla?): {why}") from None
    if unexpected or any(not k.startswith("action_expert.") for k in missing):
        raise SystemExit("error: the VLM weights do not fit this model (other model settings, e.g. "
                         f"--qk_norm or --backbone, or an older kivla?); missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")


def exercises_left():
    """The course's student copy (tools/make_assignment.py): the exercises still to write in
    kivla.py, [(number, title)], lowest first. The reference has none."""
    with open(kivla.__file__, encoding="utf-8") as f:
        left = re.findall(r'NotImplementedError\("Exercise (\d+): (.+?) \(docs/course', f.read())
    return sorted({(int(n), title) for n, title in left})


def refuse_a_student_copy(argv):
    """A student copy of kivla.py (tools/make_assignment.py) stops here, naming the lowest exercise
    left, unless only --help was asked for."""
    left = exercises_left()
    if left and not {"-h", "--help"} & set(argv):
        (n, title), check = left[0], "python -m pytest -q -k exercise"
        raise SystemExit(f"error: kivla.py's exercise {n} ({title}) is not written yet "
                         f"({len(left)} left): docs/course.md; check: {check}")

"""Open-Sora v1.3 as a resident server: test-time fine-tuning of STDiT3, then v2v_head extension.

Run by the resident runner with the Open-Sora environment's own interpreter (Python >= 3.10: at
tag v1.3, opensora/utils/ckpt_utils.py:245 writes `torch.device | str`, which 3.9 cannot import):

    runner:
      name: resident
      command: [/envs/opensora/bin/python, "{servers}/opensora_v1_3.py", --opensora, /src/Open-Sora,
                --model, /ckpt/OpenSora-STDiT-v4, --vae, /ckpt/OpenSora-VAE-v1.3, --t5, /ckpt/t5-v1_1-xxl]

Per worker it loads, once, T5, the v1.3 VAE and STDiT3 through Open-Sora's own registry, exactly as
scripts/inference_i2v.py:81-114 builds them. Per task (docs/opensora.md has the code references):

1. the conditioning frames: the largest 4j+1 prefix of the `condition_frames` given
   (`--cond-encode prefix4`, the default; 5 -> 5 frames, 2 latents; 11 -> 9, 3; 17 -> 17, 5;
   22 -> 21, 7; 28 -> 25, 8), encoded by the VAE's own `encode`, whose micro-frames of 17 with
   one frame of overlap keep these latents aligned with the generated video's; or, with
   `--cond-encode opensora`, Open-Sora's own reference truncation (collect_references_batch:
   1 or 16k+1 frames, so 5 and 11 become 1 frame and 22 and 28 become 17);
2. fine-tuning (fine-tune rows): `finetune_steps` AdamW steps at `lr` on Open-Sora's own
   rectified-flow training loss (RFLOW.training_losses, with the timestep sampling and the
   condition dropping of a v1.3 training config, default adapt_i2v.py) and the v2v_head mask of
   scripts/train.py, the caption as prompt; fp32 master weights when the model is bf16/fp16;
3. generation with `v2v_head` conditioning through prep_ref_and_mask and RFLOW.sample with the
   arguments of inference_i2v.py:316-333, then `vae.decode`;
4. the base weights restored from a snapshot taken at load (checked exactly).

The output is the whole video, (num_frames, H, W, 3) float32 in [0, 1], the conditioning frames
included as given. CPU: STDiT3 as released cannot run on a CPU (its cross-attention always calls
xformers' memory_efficient_attention, which has no CPU operator, and CaptionEmbedder.token_drop
calls .cuda()); with --device cpu two process-local fallbacks are installed (`cpu_fallbacks`),
never on CUDA. Standard library at import; torch and Open-Sora are imported when the model loads.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os

import hparray_serve as hs
import opensora_v1_3_model
from opensora_v1_3_model import OpenSoraV13, condition_plan, generated_frames, latent_frames

__all__ = ["OpenSoraV13", "condition_plan", "generated_frames", "latent_frames", "identity", "main"]

SERVER_VERSION = "opensora-v1.3-server-1"


# ------------------------------------------------------------------------------------ identity (cheap)


def _digest_files(path, digest):
    """Names, sizes and mtimes of a checkpoint's files: a changed checkpoint is another identity."""
    if path is None or not os.path.exists(path):
        digest.update(f"<missing:{path}>".encode())
        return
    if os.path.isfile(path):
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        return
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            stat = os.stat(full)
            digest.update(f"{os.path.relpath(full, path)}:{stat.st_size}:{stat.st_mtime_ns};".encode())


def git_head(repo):
    """The checkout's commit, read from .git without running git."""
    try:
        git = os.path.join(repo, ".git")
        if os.path.isfile(git):
            with open(git) as fh:
                git = fh.read().split(":", 1)[1].strip()
        with open(os.path.join(git, "HEAD")) as fh:
            head = fh.read().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(" ", 1)[1]
        if os.path.exists(os.path.join(git, ref)):
            with open(os.path.join(git, ref)) as fh:
                return fh.read().strip()
        with open(os.path.join(git, "packed-refs")) as fh:
            for line in fh:
                if line.strip().endswith(ref):
                    return line.split()[0]
    except (OSError, IndexError):
        pass
    return "unknown"


def config_checkpoints(config_path):
    """The from_pretrained paths of model / vae / text_encoder in an Open-Sora .py config (by ast)."""
    found = {}
    try:
        with open(config_path) as fh:
            tree = ast.parse(fh.read())
    except (OSError, SyntaxError):
        return found
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in ("model", "vae", "text_encoder") and isinstance(node.value, ast.Call)):
            for keyword in node.value.keywords:
                if keyword.arg == "from_pretrained" and isinstance(keyword.value, ast.Constant):
                    found[node.targets[0].id] = keyword.value.value
    return found


def _sha(path):
    if not path or not os.path.exists(path):
        return "none"
    with open(path, "rb") as fh:
        return hashlib.sha1(fh.read()).hexdigest()[:12]


def identity(args):
    """Server version, Open-Sora commit, configs, checkpoints and knobs: what decides the results."""
    listed = config_checkpoints(args.config)
    paths = {"model": args.model or listed.get("model"), "vae": args.vae or listed.get("vae"),
             "t5": args.t5 or listed.get("text_encoder")}
    digest = hashlib.sha1()
    for key in ("model", "vae", "t5"):
        digest.update(key.encode())
        _digest_files(paths[key], digest)
    knobs = (f"dtype={args.dtype},steps={args.inference_steps},cond={args.cond_encode},accel={args.accel},"
             f"t5dtype={args.t5_dtype},gc={args.grad_checkpoint},ftmask={args.ft_mask},"
             f"ftdrop={args.ft_drop_condition}")
    return (f"{SERVER_VERSION};opensora={git_head(args.opensora)[:12]};"
            f"config={os.path.basename(args.config)}@{_sha(args.config)};"
            f"train={os.path.basename(args.train_config or 'none')}@{_sha(args.train_config)};"
            f"checkpoints={digest.hexdigest()[:16]};{knobs};server@{_sha(__file__)}+{_sha(opensora_v1_3_model.__file__)}")


# ------------------------------------------------------------------------------------ main


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--opensora", required=True, help="the Open-Sora checkout at tag v1.3")
    parser.add_argument("--config", help="inference config (default <opensora>/configs/opensora-v1-3/inference/v2v.py)")
    parser.add_argument("--train-config", help="training config for the loss and optimizer (default "
                                               "<opensora>/configs/opensora-v1-3/train/adapt_i2v.py; 'none': defaults)")
    parser.add_argument("--model", help="STDiT3 checkpoint folder (overrides the config)")
    parser.add_argument("--vae", help="v1.3 VAE checkpoint folder (overrides the config)")
    parser.add_argument("--t5", help="T5 folder (overrides the config)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                        help="STDiT3 and VAE dtype (default: the config's)")
    parser.add_argument("--t5-dtype", default="config", choices=["config", "bf16", "fp16", "fp32"],
                        help="'config': as inference_i2v.py builds T5 (float32)")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: HPARRAY_DEVICE, else cuda if available)")
    parser.add_argument("--inference-steps", type=int, help="sampling steps (default: the config's)")
    parser.add_argument("--accel", default="auto", choices=["auto", "config", "off"],
                        help="flash-attn, apex layernorm, T5 shardformer: auto keeps them on CUDA where installed")
    parser.add_argument("--cond-encode", default="prefix4", choices=["prefix4", "opensora"],
                        help="which given frames condition: the largest 4j+1 prefix, or Open-Sora's truncation "
                             "(1 or 16k+1 frames)")
    parser.add_argument("--ft-mask", default="v2v_head", choices=["v2v_head", "none"])
    parser.add_argument("--ft-drop-condition", default="config", choices=["config", "keep"],
                        help="the training config's random text/condition dropping, or never drop")
    parser.add_argument("--grad-checkpoint", default="config", choices=["config", "on", "off"])
    args = parser.parse_args(argv)
    args.opensora = os.path.abspath(args.opensora)
    args.config = args.config or os.path.join(args.opensora, "configs/opensora-v1-3/inference/v2v.py")
    if args.train_config is None:
        args.train_config = os.path.join(args.opensora, "configs/opensora-v1-3/train/adapt_i2v.py")
    elif args.train_config == "none":
        args.train_config = None
    return args


def main(argv=None):
    args = parse(argv)
    state = {}

    def load():
        state["model"] = OpenSoraV13(args)

    hs.serve(identity(args), load=load,
             baseline=lambda task: state["model"].run(task, finetune=False),
             finetune_and_generate=lambda task: state["model"].run(task, finetune=task.finetune_steps > 0))


if __name__ == "__main__":
    main()

"""Proof that fine-tuning learns, at tiny scale on real photos (CPU, a few minutes).

Run ``python -m benchmarks.finetune_proof --out out/finetune_proof``. What it does:

1. **Data.** Seeded random crops of real photos — three ``scripts/samples`` photos
   (``--crops`` each, captioned "an astronaut", "a cup of coffee", "a rocket") —
   are encoded with ``encode_dataset`` at ``--size`` px into a Zarr store. The encoder is
   the *tiny random* EfficientNet of ``codec.tiny`` (no trained weights exist offline) with
   its final BatchNorm re-standardised on these crops (per-channel mean 0, variance 1, the
   scale a trained BatchNorm gives), so the latents are a fixed random but deterministic
   function of the pixels. Text: the tiny random CLIP text encoder of ``codec.tiny``.
2. **Stage C.** A tiny Stage C (``TINY_STAGE_C``, official training init) is trained with
   ``cascade train stage-c`` semantics for ``--steps`` updates. Reported: the training loss
   (epsilon MSE, first vs last ``--window`` updates) and an *evaluation* loss on every
   sample of the store at 10 fixed t (0.05…0.95) with fixed noise and no dropout, before
   and after training.
3. **LoRA + new token.** On that trained Stage C, a rank-4 LoRA with the new token
   ``[sks]`` (initialised from ``a</w>``) is trained for ``--lora-steps`` updates on
   ``--concept`` (10) crops of the fourth photo (the cat ``chelsea.jpg``), which Stage C never
   saw, all captioned "a photo of [sks]". Then Stage C samples (20 steps, cfg 4, shift 2, seeds
   0…3) are drawn with and without the LoRA for prompts with the token and for the three
   training prompts without it. Reported per prompt group: the relative change of the
   sampled latent ``‖x_lora − x_base‖ / ‖x_base‖``, and for the token prompt the distance
   of the samples to the nearest concept latent, before and after.

Everything is written to ``--out`` (store, runs with logs and checkpoints, ``results.json``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SAMPLES = {"astronaut": "an astronaut", "coffee": "a cup of coffee", "rocket": "a rocket"}
CONCEPT = "chelsea"  # held out of Stage C's data: the LoRA's new concept
TOKEN_PROMPTS = ["a photo of [sks]", "[sks]"]


def crops(image: Image.Image, n: int, size: int, seed: int) -> list[Image.Image]:
    """``n`` seeded random square crops (side 45–90 % of the short side), resized to ``size``."""
    rng = np.random.default_rng(seed)
    w, h = image.size
    out = []
    for _ in range(n):
        side = int(min(w, h) * rng.uniform(0.45, 0.9))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        out.append(image.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC))
    return out


def restandardise_encoder(weights: Path, images: list[Image.Image]) -> None:
    """Set the tiny encoder's final BatchNorm statistics so its latents of ``images`` have mean 0, variance 1."""
    from codec import weights as W
    from codec.codec import load_encoder
    from codec.images import pil_to_tensor
    from codec.tiny import TINY_NOTE

    enc = load_encoder(weights)
    x = torch.stack([pil_to_tensor(im) for im in images])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = enc.mapper[0](enc.backbone((x - mean) / std))
    bn = enc.mapper[1]
    bn.running_mean.copy_(feats.mean(dim=(0, 2, 3)))
    bn.running_var.copy_(feats.var(dim=(0, 2, 3)))
    W.save_module(enc, weights / W.EFFNET_FILE, None, TINY_NOTE + "; BatchNorm re-standardised on the proof crops")


@torch.no_grad()
def eval_loss(model, latents: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor, seed: int = 0) -> float:
    """Mean epsilon MSE over all latents at t = 0.05, 0.15 … 0.95 with fixed noise (model in eval mode)."""
    from codec.diffusion import CosineSchedule, diffuse

    model.eval()
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(latents.shape[0], 1, model.config.c_clip_img)
    losses = []
    for t in torch.arange(0.05, 1.0, 0.1):
        x_t, noise, _, nc = diffuse(latents, float(t), schedule=CosineSchedule(), generator=g)
        pred = model(x_t, nc, hidden, pooled, img)
        losses.append(((pred - noise) ** 2).mean().item())
    return float(np.mean(losses))


def store_conditions(store: Path, encoder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """All latents of a store and the text conditions of their captions."""
    from datasets_tools.dataset import LatentDataset

    ds = LatentDataset(store)
    items = [ds[i] for i in range(len(ds))]
    emb = encoder.encode([it["caption"] for it in items])
    return torch.stack([it["latent"] for it in items]), emb.hidden, emb.pooled, [it["caption"] for it in items]


@torch.no_grad()
def output_change(base, base_enc, lora, lora_enc, prompt: str, latents: torch.Tensor, seed: int = 0) -> float:
    """‖ε̂_lora − ε̂_base‖ / ‖ε̂_base‖ for ``prompt`` over ``latents`` noised at t = 0.05 … 0.95 (fixed noise)."""
    from codec.diffusion import CosineSchedule, diffuse

    base.eval(), lora.eval()
    g = torch.Generator().manual_seed(seed)
    n = latents.shape[0]
    cb, cl = base_enc.encode([prompt] * n), lora_enc.encode([prompt] * n)
    img = torch.zeros(n, 1, base.config.c_clip_img)
    num = den = 0.0
    for t in torch.arange(0.05, 1.0, 0.1):
        x_t, _, _, nc = diffuse(latents, float(t), schedule=CosineSchedule(), generator=g)
        pb = base(x_t, nc, cb.hidden, cb.pooled, img)
        pl = lora(x_t, nc, cl.hidden, cl.pooled, img)
        num += (pl - pb).pow(2).sum().item()
        den += pb.pow(2).sum().item()
    return (num / den) ** 0.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/finetune_proof"), help="output folder (recreated)")
    p.add_argument("--crops", type=int, default=16, help="crops per sample photo for Stage C")
    p.add_argument("--concept", type=int, default=10, help="crops of the new concept for the LoRA")
    p.add_argument("--size", type=int, default=128, help="encoder input size (128 → 4×4 latents)")
    p.add_argument("--steps", type=int, default=300, help="Stage C updates")
    p.add_argument("--lora-steps", type=int, default=200, help="LoRA updates")
    p.add_argument("--batch-size", type=int, default=16, help="Stage C batch")
    p.add_argument("--lr", type=float, default=1e-3, help="Stage C learning rate (from scratch, so above 1e-4)")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA learning rate")
    p.add_argument("--window", type=int, default=20, help="updates averaged for first/last training loss")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from codec.generation.finetune import train
    from codec.generation.finetune.logs import read_log
    from codec.generation.lora import read_lora
    from codec.generation.stage_c import StageC
    from codec.generation.text import TextEncoder
    from codec.generation.tokens import add_train_tokens, load_token_state
    from codec.tiny import TINY_STAGE_C, write_tiny_weights
    from codec.weights import load_configured
    from datasets_tools import encode_dataset

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    weights = write_tiny_weights(out / "weights")  # includes the tiny CLIP text encoder
    t0 = time.time()

    # 1. data
    src, concept_src = out / "crops", out / "concept"
    src.mkdir(parents=True)
    concept_src.mkdir()
    all_images = []
    for k, (name, caption) in enumerate(SAMPLES.items()):
        for i, im in enumerate(crops(Image.open(f"scripts/samples/{name}.jpg").convert("RGB"), args.crops,
                                     args.size, seed=k)):
            im.save(src / f"{name}_{i:02d}.png")
            (src / f"{name}_{i:02d}.txt").write_text(caption)
            all_images.append(im)
    concept_photo = Image.open(f"scripts/samples/{CONCEPT}.jpg").convert("RGB")
    for i, im in enumerate(crops(concept_photo, args.concept, args.size, seed=99)):
        im.save(concept_src / f"sks_{i:02d}.png")
        (concept_src / f"sks_{i:02d}.txt").write_text("a photo of [sks]")
        all_images.append(im)
    restandardise_encoder(weights, all_images)
    quiet = dict(size=args.size, batch_size=8, workers=0, progress=False, log=lambda s: None)
    encode_dataset(src, out / "photos.zarr", weights, dtype="float32", **quiet)
    encode_dataset(concept_src, out / "concept.zarr", weights, dtype="float32", **quiet)

    # 2. Stage C
    run_c = out / "stage_c"
    cfg_c = {"output_dir": str(run_c), "weights": str(weights), "seed": 0, "data": {"store": str(out / "photos.zarr")},
             "model": {"preset": "tiny"}, "batch_size": args.batch_size, "max_steps": args.steps,
             "optim": {"lr": args.lr, "warmup_updates": 20}, "log": {"every": 1},
             "checkpoint": {"save_every": args.steps}, "preview": {"every": args.steps, "n": 4, "steps": 20}}
    enc = TextEncoder.from_pretrained(weights)
    lat, hid, pool, caps = store_conditions(out / "photos.zarr", enc)
    torch.manual_seed(0)
    init = StageC(**TINY_STAGE_C)
    init.init_weights()
    before = eval_loss(init, lat, hid, pool)
    train("stage-c", cfg_c, echo=None)
    trained, _ = load_configured(StageC, run_c / "checkpoint/model.safetensors", None, torch.float32, "cpu")
    after = eval_loss(trained, lat, hid, pool)
    log = read_log(run_c)
    first = float(np.mean([r["loss"] for r in log[:args.window]]))
    last = float(np.mean([r["loss"] for r in log[-args.window:]]))
    res = {"stage_c": {"samples": len(lat), "latent_shape": list(lat.shape[1:]), "updates": args.steps,
                       "train_loss_first": first, "train_loss_last": last, "eval_loss_before": before,
                       "eval_loss_after": after}}
    print(f"Stage C: {len(lat)} latents {tuple(lat.shape[1:])}, {args.steps} updates of batch {args.batch_size}")
    print(f"  training loss (eps MSE), mean of first/last {args.window} updates: {first:.4f} → {last:.4f}")
    print(f"  evaluation loss (10 fixed t, fixed noise, all samples): {before:.4f} → {after:.4f}")

    # 3. LoRA + new token on the trained Stage C
    run_l = out / "lora"
    tokens = [["[sks]", "^a</w>$"]]
    cfg_l = {"output_dir": str(run_l), "weights": str(weights), "seed": 0,
             "data": {"store": str(out / "concept.zarr")}, "model": {"checkpoint": str(run_c / "checkpoint/model.safetensors")},
             "batch_size": args.concept, "max_steps": args.lora_steps, "optim": {"lr": args.lora_lr},
             "log": {"every": 1}, "checkpoint": {"save_every": args.lora_steps},
             "preview": {"every": args.lora_steps, "n": 4, "steps": 20, "captions": ["a photo of [sks]"] * 4},
             "lora": {"rank": 4, "train_tokens": tokens}}
    train("lora", cfg_l, echo=None)
    concept, _, _, _ = store_conditions(out / "concept.zarr", enc)
    base_enc = TextEncoder.from_pretrained(weights)
    base_enc.pool_at = "eos"
    add_train_tokens(base_enc, tokens)  # the token exists but is untrained (its initial embedding)
    lora_enc = TextEncoder.from_pretrained(weights)
    lora_enc.pool_at = "eos"
    lora_model, _ = load_configured(StageC, run_c / "checkpoint/model.safetensors", None, torch.float32, "cpu")
    net, info, token_state = read_lora(run_l / "checkpoint/model.safetensors", lora_model)
    load_token_state(lora_enc, token_state, info.tokens)
    net.attach(lora_model)
    llog = read_log(run_l)
    res["lora"] = {"concept_images": len(concept), "updates": args.lora_steps,
                   "train_loss_first": float(np.mean([r["loss"] for r in llog[:args.window]])),
                   "train_loss_last": float(np.mean([r["loss"] for r in llog[-args.window:]]))}
    print(f"LoRA rank 4 + token [sks]: {len(concept)} concept crops, {args.lora_steps} updates; training loss "
          f"{res['lora']['train_loss_first']:.4f} → {res['lora']['train_loss_last']:.4f}")
    # (a) what the LoRA learned: denoising loss on the concept with the token prompt, and on the other photos
    # with their own captions (forgetting), base model (token present but untrained) vs base + LoRA
    for name, latents, captions in (("concept, 'a photo of [sks]'", concept, ["a photo of [sks]"] * len(concept)),
                                    ("other photos, own captions", lat, caps)):
        eb, el = base_enc.encode(captions), lora_enc.encode(captions)
        b, l_ = eval_loss(trained, latents, eb.hidden, eb.pooled), eval_loss(lora_model, latents, el.hidden, el.pooled)
        res["lora"][f"eval_loss {name}"] = {"base": b, "lora": l_}
        print(f"  evaluation loss on {name}: base {b:.4f} → with LoRA {l_:.4f}")
    # (b) how much the LoRA changes Stage C's output, for prompts with and without the token
    for group, prompts in {"with [sks]": TOKEN_PROMPTS, "without [sks]": list(SAMPLES.values())}.items():
        changes = [output_change(trained, base_enc, lora_model, lora_enc, p, torch.cat([lat, concept]))
                   for p in prompts]
        res["lora"][f"output change {group}"] = {"prompts": prompts, "relative_change": changes}
        print(f"  relative change of the prediction, prompts {group}: "
              + ", ".join(f"{p!r} {c:.4f}" for p, c in zip(prompts, changes)))
    res["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(f"results: {out / 'results.json'} ({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()

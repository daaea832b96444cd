"""Proof that fine-tuning learns, at tiny scale on real photos (CPU, about 20 minutes).

Run ``python -m benchmarks.finetune_proof --out out/finetune_proof`` (photos: ``python scripts/get_photos.py``
first, or ``--photos 'scripts/samples/*.jpg'``). What it does:

1. **Data.** Seeded random square crops of real photos (``--crops`` per photo, ``--size`` px) captioned
   from the file name ("a photo of bridge", "a photo of lady bird", …) are encoded with ``encode_dataset``
   into Zarr stores by the *trained* EfficientNet of the built-in ``mini`` codec (``codec/mini``; 256 px
   → 8×8 latents), so the latents carry real image content. One photo (``--concept-photo``, default
   LadyBird) is held out of Stage C's data: it is the LoRA's new concept. ``--exclude`` leaves out photos
   whose latents are outliers (see its help). Text: the tiny *random* CLIP text
   encoder of ``codec.tiny`` (character-level tokenizer; no CLIP weights exist offline).
2. **Stage C.** A tiny Stage C (``get_preset("stage_c_tiny").kwargs()``, official training init) is trained with
   ``cascade train stage-c`` semantics for ``--steps`` updates. Reported: the training loss (epsilon MSE,
   first vs last ``--window`` updates) and an *evaluation* loss on every sample at 10 fixed t
   (0.05…0.95) with fixed noise and no dropout, before and after training.
3. **LoRA + new token.** On that trained Stage C, a rank-4 LoRA with the new token ``[sks]``
   (initialised from ``a</w>``) is trained for ``--lora-steps`` updates on ``--concept`` crops of the
   held-out photo, all captioned "a photo of [sks]" (official LoRA learning rate 1e-4). Reported, base
   (token present, untrained) vs base + LoRA: the evaluation loss (all t, and t > 0.5 where the prompt
   decides more than the noisy latent) on the concept with "a photo of [sks]" and on the other photos with their own
   captions; the relative change of Stage C's prediction for prompts with and without the token; and Stage
   C *samples* (``--samples`` seeds, 20 steps, cfg 4, shift 2) for "a photo of [sks]" and for
   ``--controls`` training captions: the share of samples nearest to the concept photo (token prompt) or to
   the caption's own photo (control prompts) — nearest by the mean latent over positions (a 16-number
   colour/texture summary) compared with each photo's crops' mean — and the relative change of the
   samples. The samples are decoded by the mini codec into ``samples.png``.

Everything is written to ``--out``: crops, stores, ``stage_c/`` and ``lora_r…_lr…_s…/`` runs (logs,
checkpoints; the LoRA run also ``results.json`` and ``samples.png``). Run again with the same data and
Stage C options, it reuses (or resumes) what is there — so LoRA settings can be compared cheaply.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from codec.presets import create_model

TOKEN_CAPTION = "a photo of [sks]"
TOKEN_PROMPTS = [TOKEN_CAPTION, "[sks]"]
TOKENS = [["[sks]", "^a</w>$"]]
# the options that decide the data and the trained Stage C (a rerun with the same ones reuses them)
STAGE_C_SETTINGS = ("photos", "concept_photo", "exclude", "crops", "concept", "size", "steps", "batch_size", "lr")


def caption_of(path: Path) -> str:
    """"a photo of …" from a photo's file name: ``Bridge_by_Sander_Klootwijk.jpg`` → "a photo of bridge"."""
    stem = re.sub(r"_by_.*$", "", path.stem)
    words = re.sub(r"([a-z])([A-Z])", r"\1 \2", stem).replace("_", " ").replace("-", " ")
    return "a photo of " + " ".join(words.lower().split())


ALL_T = [round(0.05 + 0.1 * i, 2) for i in range(10)]
HIGH_T = [t for t in ALL_T if t > 0.5]  # high noise: where the prompt, not the noisy latent, decides


@torch.no_grad()
def eval_loss(model, latents: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor, seed: int = 0,
              ts: list[float] = ALL_T) -> float:
    """Mean epsilon MSE over all latents at each t of ``ts`` with fixed noise (model in eval mode)."""
    from codec.diffusion import CosineSchedule, diffuse

    model.eval()
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(latents.shape[0], 1, model.config.c_clip_img)
    losses = []
    for t in ts:
        x_t, noise, _, nc = diffuse(latents, t, schedule=CosineSchedule(), generator=g)
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
    for t in ALL_T:
        x_t, _, _, nc = diffuse(latents, t, schedule=CosineSchedule(), generator=g)
        pb = base(x_t, nc, cb.hidden, cb.pooled, img)
        pl = lora(x_t, nc, cl.hidden, cl.pooled, img)
        num += (pl - pb).pow(2).sum().item()
        den += pb.pow(2).sum().item()
    return (num / den) ** 0.5


@torch.no_grad()
def sample_latents(model, encoder, prompt: str, n: int, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """``n`` Stage C samples for ``prompt`` (seeds ``seed``…, 20 DDPM steps, cfg 4 against "", shift 2)."""
    from codec.diffusion import sample

    model.eval()
    cond, empty = encoder.encode([prompt] * n), encoder.encode([""] * n)
    img = torch.zeros(n, 1, model.config.c_clip_img)
    return sample(model, {"clip_text": cond.hidden, "clip_text_pooled": cond.pooled, "clip_img": img},
                  shape=(n, model.config.c_in, *shape), uncond={"clip_text": empty.hidden,
                                                                "clip_text_pooled": empty.pooled, "clip_img": img},
                  steps=20, cfg=4.0, shift=2.0, generator=torch.Generator().manual_seed(seed))


def nearest_photo(samples: torch.Tensor, bank: torch.Tensor, labels: list[str]) -> list[str]:
    """For each sample, the label whose crops' mean latent colour/texture vector (the latent averaged over
    positions, 16 numbers) is nearest to the sample's."""
    names = list(dict.fromkeys(labels))
    pooled = bank.mean(dim=(2, 3))
    centroids = torch.stack([pooled[[i for i, lab in enumerate(labels) if lab == n]].mean(0) for n in names])
    return [names[int(i)] for i in torch.cdist(samples.mean(dim=(2, 3)), centroids).argmin(dim=1)]


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖b − a‖ / ‖a‖."""
    return float((b - a).norm() / a.norm())


def find_photos(pattern: str, concept: str) -> tuple[list[Path], Path]:
    """The photos matching ``pattern`` except the concept, and the concept photo (file stem ``concept``)."""
    paths = sorted(Path(p) for p in glob.glob(pattern))
    if not paths:
        raise SystemExit(f"no photos match {pattern!r}: run `python scripts/get_photos.py` first, or pass "
                         f"--photos 'scripts/samples/*.jpg' (the four bundled sample photos)")
    found = [p for p in paths if p.stem == concept]
    if not found:
        raise SystemExit(f"--concept-photo {concept!r} is not among the {len(paths)} photos of {pattern!r} "
                         f"(stems: {', '.join(p.stem for p in paths[:8])}, …)")
    return [p for p in paths if p.stem != concept], found[0]


def write_crops(photos: list[Path], folder: Path, n: int, size: int, caption: str | None = None,
                seed: int = 0) -> None:
    """``n`` seeded random square crops of each photo (side 45–90 % of the short side, resized to ``size``) as PNG
    + caption file in ``folder`` (kept when a previous call finished)."""
    from datasets_tools.crops import random_crops

    done = folder / ".complete"
    if done.exists():
        return
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for k, photo in enumerate(photos):
        for i, im in enumerate(random_crops(Image.open(photo).convert("RGB"), n, size, seed + k, scale=(0.45, 0.9))):
            name = f"{k:02d}_{i:02d}"
            im.save(folder / f"{name}.png")
            (folder / f"{name}.txt").write_text(caption or caption_of(photo))
    done.touch()


def finished(run: Path, steps: int) -> bool:
    """Whether the training run in ``run`` already reached ``steps`` updates (a rerun then reuses it)."""
    from codec.training import checkpoint as ckpt

    state = ckpt.checkpoint_dir(run) / ckpt.STATE_FILE
    return state.exists() and json.loads(state.read_text())["step"] >= steps


def prepare_out(out: Path, settings: dict, fresh: bool) -> None:
    """Start ``out`` afresh, or reuse it when it was made with the same data and Stage C ``settings``."""
    path = out / "settings.json"
    if fresh and out.exists():
        shutil.rmtree(out)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != settings:
            changed = ", ".join(f"{k}: {saved.get(k)} → {v}" for k, v in settings.items() if saved.get(k) != v)
            raise SystemExit(f"{out} was made with other data or Stage C settings ({changed}); pass --fresh to "
                             f"start over, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/finetune_proof"),
                   help="output folder; a second run reuses (or resumes) its data and Stage C and trains the LoRA "
                        "into lora_r{rank}_lr{lr}_s{steps}")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    p.add_argument("--photos", default="data/photos/originals/*/*.jpg",
                   help="glob of the real photos (default: those of scripts/get_photos.py)")
    p.add_argument("--concept-photo", default="LadyBird", help="file stem of the photo held out as the new concept")
    p.add_argument("--exclude", nargs="*", default=["Grey", "ColorfulCups"],
                   help="file stems left out: the mini encoder's latents of these photos' flat areas are outliers "
                        "(|z| up to 180 where the other photos' stay below 6) that would dominate a tiny Stage C's loss")
    p.add_argument("--crops", type=int, default=8, help="crops per photo for Stage C")
    p.add_argument("--concept", type=int, default=10, help="crops of the new concept for the LoRA")
    p.add_argument("--size", type=int, default=256, help="crop size = encoder input (256 → 8×8 latents)")
    p.add_argument("--steps", type=int, default=1500, help="Stage C updates")
    p.add_argument("--lora-steps", type=int, default=1000, help="LoRA updates")
    p.add_argument("--batch-size", type=int, default=32, help="Stage C batch")
    p.add_argument("--lr", type=float, default=1e-3, help="Stage C learning rate (from scratch, so above 1e-4)")
    p.add_argument("--lora-lr", type=float, default=1e-4, help="LoRA learning rate (official 1e-4)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--samples", type=int, default=8, help="Stage C samples per prompt")
    p.add_argument("--controls", type=int, default=3, help="training captions used as control prompts")
    p.add_argument("--window", type=int, default=20, help="updates averaged for first/last training loss")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from codec import Codec
    from codec import weights as W
    from codec.generation.lora import read_lora
    from codec.generation.tokens import add_train_tokens, load_token_state
    from codec.generation.training.lora_task import LoraTask
    from codec.generation.training.stage_c_task import StageCTask
    from codec.stage_c import StageC
    from codec.text import TextEncoder
    from codec.tiny import write_tiny_weights
    from codec.training import train
    from codec.training.logs import read_log
    from codec.training.preview import save_collage
    from codec.weights import BUILTIN_MODELS, load_configured
    from datasets_tools import encode_dataset
    from datasets_tools.training_data import training_dataset

    photos, concept_photo = find_photos(args.photos, args.concept_photo)
    photos = [ph for ph in photos if ph.stem not in args.exclude]
    out = args.out
    prepare_out(out, {k: str(v) for k, v in vars(args).items() if k in STAGE_C_SETTINGS}, args.fresh)
    weights = out / "weights"
    if not (weights / ".complete").exists():
        write_tiny_weights(weights)  # the tiny random CLIP text encoder and Stage C shapes
        shutil.copy(BUILTIN_MODELS["mini"].folder / W.EFFNET_FILE, weights / W.EFFNET_FILE)  # the trained encoder
        (weights / ".complete").touch()
    t0 = time.time()

    # 1. data
    write_crops(photos, out / "crops", args.crops, args.size)
    write_crops([concept_photo], out / "concept", args.concept, args.size, caption=TOKEN_CAPTION, seed=99)
    quiet = dict(size=args.size, batch_size=8, workers=0, progress=False, log=lambda s: None, dtype="float32")
    encode_dataset(out / "crops", out / "photos.zarr", weights, **quiet)
    encode_dataset(out / "concept", out / "concept.zarr", weights, **quiet)
    print(f"data: {len(photos)} photos (left out: {', '.join(args.exclude) or 'none'}) × {args.crops} crops for "
          f"Stage C; {args.concept} crops of {concept_photo.name} for the LoRA; encoded at {args.size} px by the "
          f"mini codec's EfficientNet ({time.time() - t0:.0f} s)")

    # 2. Stage C
    run_c = out / "stage_c"
    cfg_c = {"output_dir": str(run_c), "weights": str(weights), "seed": 0, "data": {"store": str(out / "photos.zarr")},
             "model": {"preset": "tiny"}, "batch_size": args.batch_size, "max_steps": args.steps,
             "optim": {"lr": args.lr, "warmup_updates": 20}, "log": {"every": 1},
             "checkpoint": {"save_every": args.steps}}
    enc = TextEncoder.from_pretrained(weights)
    lat, hid, pool, caps = store_conditions(out / "photos.zarr", enc)
    torch.manual_seed(0)
    init = create_model("stage_c_tiny")
    init.init_weights()
    before = eval_loss(init, lat, hid, pool)
    reused_c = finished(run_c, args.steps)
    train(StageCTask, cfg_c, training_dataset, echo=None)
    trained, _ = load_configured(StageC, run_c / "checkpoint/model.safetensors", None, torch.float32, "cpu")
    after = eval_loss(trained, lat, hid, pool)
    log = read_log(run_c)
    first = float(np.mean([r["loss"] for r in log[:args.window]]))
    last = float(np.mean([r["loss"] for r in log[-args.window:]]))
    res: dict = {"stage_c": {"samples": len(lat), "latent_shape": list(lat.shape[1:]), "updates": args.steps,
                             "train_loss_first": first, "train_loss_last": last, "eval_loss_before": before,
                             "eval_loss_after": after}}
    print(f"Stage C: {len(lat)} latents {tuple(lat.shape[1:])}, {args.steps} updates of batch {args.batch_size} "
          f"({'reused: ' + str(run_c) if reused_c else f'{time.time() - t0:.0f} s'})")
    print(f"  training loss (eps MSE), mean of first/last {args.window} updates: {first:.4f} → {last:.4f}")
    print(f"  evaluation loss (10 fixed t, fixed noise, all samples): {before:.4f} → {after:.4f}")

    # 3. LoRA + new token on the trained Stage C
    run_l = out / f"lora_r{args.rank}_lr{args.lora_lr:g}_s{args.lora_steps}"
    cfg_l = {"output_dir": str(run_l), "weights": str(weights), "seed": 0,
             "data": {"store": str(out / "concept.zarr")},
             "model": {"checkpoint": str(run_c / "checkpoint/model.safetensors")},
             "batch_size": args.concept, "max_steps": args.lora_steps, "optim": {"lr": args.lora_lr},
             "log": {"every": 1}, "checkpoint": {"save_every": args.lora_steps},
             "lora": {"rank": args.rank, "train_tokens": TOKENS}}
    reused_l = finished(run_l, args.lora_steps)
    train(LoraTask, cfg_l, training_dataset, echo=None)
    concept, _, _, _ = store_conditions(out / "concept.zarr", enc)
    base_enc = TextEncoder.from_pretrained(weights)
    base_enc.pool_at = "eos"
    add_train_tokens(base_enc, TOKENS)  # the token exists but is untrained (its initial embedding)
    lora_enc = TextEncoder.from_pretrained(weights)
    lora_enc.pool_at = "eos"
    lora_model, _ = load_configured(StageC, run_c / "checkpoint/model.safetensors", None, torch.float32, "cpu")
    net, info, token_state = read_lora(run_l / "checkpoint/model.safetensors", lora_model)
    load_token_state(lora_enc, token_state, info.tokens)
    net.attach(lora_model)
    llog = read_log(run_l)
    res["lora"] = {"rank": args.rank, "concept_images": len(concept), "updates": args.lora_steps,
                   "train_loss_first": float(np.mean([r["loss"] for r in llog[:args.window]])),
                   "train_loss_last": float(np.mean([r["loss"] for r in llog[-args.window:]]))}
    print(f"LoRA rank {args.rank} + token [sks]: {len(concept)} concept crops, {args.lora_steps} updates; "
          f"training loss {res['lora']['train_loss_first']:.4f} → {res['lora']['train_loss_last']:.4f} "
          f"({'reused: ' + str(run_l) if reused_l else f'{time.time() - t0:.0f} s'})")
    # (a) denoising loss on the concept with the token prompt, and on the other photos with their own captions
    for name, latents, captions in (("concept, 'a photo of [sks]'", concept, [TOKEN_CAPTION] * len(concept)),
                                    ("other photos, own captions", lat, caps)):
        eb, el = base_enc.encode(captions), lora_enc.encode(captions)
        for span, ts in (("all t", ALL_T), ("t > 0.5", HIGH_T)):
            b = eval_loss(trained, latents, eb.hidden, eb.pooled, ts=ts)
            l_ = eval_loss(lora_model, latents, el.hidden, el.pooled, ts=ts)
            res["lora"][f"eval_loss {name}, {span}"] = {"base": b, "lora": l_}
            print(f"  evaluation loss on {name}, {span}: base {b:.4f} → with LoRA {l_:.4f}")
    # (b) how much the LoRA changes Stage C's prediction, for prompts with and without the token
    unique = list(dict.fromkeys(caps))
    controls = [unique[round(i * (len(unique) - 1) / max(1, args.controls - 1))] for i in range(args.controls)]
    for group, prompts in {"with [sks]": TOKEN_PROMPTS, "without [sks]": controls}.items():
        changes = [output_change(trained, base_enc, lora_model, lora_enc, q, torch.cat([lat, concept]))
                   for q in prompts]
        res["lora"][f"prediction change {group}"] = dict(zip(prompts, changes))
        print(f"  relative change of the prediction, prompts {group}: "
              + ", ".join(f"{q!r} {c:.4f}" for q, c in zip(prompts, changes)))
    # (c) samples: which photo each is nearest to (the concept's and every training photo's crops)
    bank, labels = torch.cat([lat, concept]), caps + [TOKEN_CAPTION] * len(concept)
    shape = tuple(lat.shape[-2:])
    drawn = {}
    for q in [TOKEN_CAPTION, *controls]:
        xb = sample_latents(trained, base_enc, q, args.samples, shape)
        xl = sample_latents(lora_model, lora_enc, q, args.samples, shape)
        drawn[q] = (xb, xl)
        share = [sum(lab == q for lab in nearest_photo(x, bank, labels)) / args.samples for x in (xb, xl)]
        change = relative_change(xb, xl)
        res["lora"][f"samples {q!r}"] = {"share_nearest_own": share, "relative_change": change}
        own = "the concept" if q == TOKEN_CAPTION else "its own"
        print(f"  samples of {q!r}: nearest photo is {own} in {share[0]:.0%} (base) → {share[1]:.0%} "
              f"(LoRA) of {args.samples}; relative change {change:.4f}")
    # (d) picture: concept crops, then base / LoRA samples of the token prompt and of the first control
    mini = Codec.from_pretrained("mini", device="cpu")
    k = min(4, args.samples, len(concept))
    rows = [concept[:k], drawn[TOKEN_CAPTION][0][:k], drawn[TOKEN_CAPTION][1][:k], drawn[controls[0]][0][:k],
            drawn[controls[0]][1][:k]]
    pictures = [mini.decode(r, seed=0, output="tensor") for r in rows]
    save_collage(pictures, run_l / "samples.png")
    print(f"  {run_l / 'samples.png'}: rows = {k} concept crops (encoded, decoded by the mini codec); Stage C samples "
          f"of {TOKEN_CAPTION!r} base, with LoRA; of {controls[0]!r} base, with LoRA")
    res["seconds"] = time.time() - t0
    (run_l / "results.json").write_text(json.dumps(res, indent=1))
    print(f"results: {run_l / 'results.json'} ({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()

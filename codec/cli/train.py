"""``cascade train``: every training task, from a YAML config, resumable, on one or several processes."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .common import RESUMES, user_errors

# = codec.training.TASKS + codec.generation.training.TASKS (tests/test_finetune.py checks); spelled out here so that
# `cascade --help` does not import the trainer
TRAIN_TASKS = ("stage-c", "lora", "stage-b", "controlnet", "stage-a", "encoder", "codec", "decoder",
               "end-to-end")


@click.command("train")
@click.argument("task", type=click.Choice(TRAIN_TASKS))
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--device", default="auto", show_default=True,
              help="Torch device: auto (this process's CUDA device under torchrun, else CUDA if available, else CPU).")
@user_errors(interrupted=RESUMES)
def train_command(task, config, device) -> None:
    """Train with the YAML CONFIG: TASK is stage-c (full Stage C), lora (LoRA + new tokens on Stage C),
    stage-b (full Stage B), controlnet (a ControlNet on a frozen Stage C), stage-a (Stage A autoencoder from
    scratch), encoder (the codec's encoder from scratch on a thumbnail code), codec (encoder + Stage B on a trained
    Stage A), decoder (Stage A's decoder
    fine-tuned on a trained codec's Stage B output) or end-to-end (a trained codec's encoder, Stage B and decoder
    fine-tuned together on its reconstructions); the last five are how the mini codec was made.

    Reads latents from the Zarr store of data.store (controlnet, stage-a, codec: images from data.images), writes
    OUTPUT_DIR/checkpoint/ (model.safetensors
    in the release format, optimiser and RNG state), log.jsonl and previews/. Run the same command
    again after a stop: it resumes exactly where the last checkpoint left off. Several processes:
    `torchrun --nproc_per_node N -m codec.cli train TASK CONFIG` (DDP; distributed.strategy: fsdp to
    shard large models). Config keys: see codec/training/config.py; annotated examples in
    codec/generation/training/examples/ (stage-c, lora, controlnet), codec/training/examples/ (stage-b) and
    configs/mini/ (stage-a, encoder, codec, decoder, end-to-end).
    """
    from tqdm.auto import tqdm

    from datasets_tools.training_data import training_dataset

    from ..generation.training import TASKS as GENERATION_TASKS
    from ..training import TASKS, task_class, train

    pos = train(task_class(task, {**TASKS, **GENERATION_TASKS}), config, training_dataset, echo=tqdm.write,
                device=None if device == "auto" else device)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"done: {pos.step} updates ({pos.epoch} full epochs)")

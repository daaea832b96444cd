"""The generation training tasks, on the generic trainer of :mod:`codec.training`: full Stage C fine-tuning
(``stage-c``), LoRA with new tokens (``lora``) and ControlNet (``controlnet``); annotated example configs in
``examples/``. ``cascade train`` looks task names up in :data:`TASKS` and in ``codec.training.TASKS``.
"""

# name → "module:Class", imported lazily by codec.training.task_class
TASKS: dict[str, str] = {
    "stage-c": "codec.generation.training.stage_c_task:StageCTask",
    "lora": "codec.generation.training.lora_task:LoraTask",
    "controlnet": "codec.generation.training.controlnet_task:ControlNetTrainingTask",
}

__all__ = ["TASKS"]

"""Personalization trainers that take any StableDiffusionPipeline (the ShapesWorld micro-SD or SD 1.5)."""
from .custom_diffusion import (
    CustomDiffusionConfig,
    CustomDiffusionResult,
    list_custom_diffusion_snapshots,
    load_custom_diffusion,
    train_custom_diffusion,
)
from .dreambooth_lora import (
    DreamBoothLoRAConfig,
    DreamBoothLoRAResult,
    list_lora_snapshots,
    load_dreambooth_lora,
    train_dreambooth_lora,
)
from .lora_finetune import LoRAFinetuneConfig, train_lora_finetune
from .textual_inversion import (
    OBJECT_TEMPLATES,
    TIConfig,
    TIResult,
    list_snapshots,
    load_snapshot_embedding,
    train_textual_inversion,
)

__all__ = ["OBJECT_TEMPLATES", "TIConfig", "TIResult", "list_snapshots", "load_snapshot_embedding",
           "train_textual_inversion",
           "DreamBoothLoRAConfig", "DreamBoothLoRAResult", "list_lora_snapshots", "load_dreambooth_lora",
           "train_dreambooth_lora",
           "CustomDiffusionConfig", "CustomDiffusionResult", "list_custom_diffusion_snapshots",
           "load_custom_diffusion", "train_custom_diffusion",
           "LoRAFinetuneConfig", "train_lora_finetune"]

"""Personalization trainers that take any StableDiffusionPipeline (the ShapesWorld micro-SD or SD 1.5).

One name per method, in code, JSON keys and folders: ``METHODS``.
"""
from persviz.constants import METHODS
from persviz.trainers.custom_diffusion import (
    CustomDiffusionConfig,
    CustomDiffusionResult,
    custom_diffusion_embeddings,
    custom_diffusion_weights,
    list_custom_diffusion_snapshots,
    load_custom_diffusion,
    train_custom_diffusion,
)
from persviz.trainers.dreambooth_lora import (
    DreamBoothLoRAConfig,
    DreamBoothLoRAResult,
    find_lora_file,
    list_lora_snapshots,
    load_dreambooth_lora,
    train_dreambooth_lora,
)
from persviz.trainers.lora_finetune import LoRAFinetuneConfig, train_lora_finetune
from persviz.trainers.textual_inversion import (
    OBJECT_TEMPLATES,
    TextualInversionConfig,
    TextualInversionResult,
    final_embedding,
    list_snapshots,
    load_snapshot_embedding,
    load_textual_inversion_run,
    run_token,
    train_textual_inversion,
)


__all__ = ["METHODS", "OBJECT_TEMPLATES", "TextualInversionConfig", "TextualInversionResult", "list_snapshots", "load_snapshot_embedding",
           "final_embedding", "load_textual_inversion_run", "run_token",
           "train_textual_inversion",
           "DreamBoothLoRAConfig", "DreamBoothLoRAResult", "list_lora_snapshots", "load_dreambooth_lora",
           "train_dreambooth_lora",
           "CustomDiffusionConfig", "CustomDiffusionResult", "list_custom_diffusion_snapshots",
           "custom_diffusion_embeddings", "custom_diffusion_weights", "find_lora_file",
           "load_custom_diffusion", "train_custom_diffusion",
           "LoRAFinetuneConfig", "train_lora_finetune"]

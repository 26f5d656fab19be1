"""Tiny configurations for engine tests (digits, width-4 ResNet or a micro ViT, 16 px)."""

TINY = ["progress=false", "log_every=1", "tensorboard=false", "data_subset=128",
        "batch_size=16", "image_size=16", "backbone_width=4", "warmup_epochs=0.5"]
TINY_VIT = ["progress=false", "log_every=1", "tensorboard=false", "data_subset=128",
            "batch_size=16", "image_size=16", "backbone=vit_micro", "warmup_epochs=0.5"]

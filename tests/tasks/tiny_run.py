"""A tiny CLI training run (8 training images of 32 px, one epoch on the CPU, timm's test ResNet) for the task
kinds' end-to-end tests; each test adds its preset and tasks."""

TINY_RUN = [
    "data.image_size=32",
    "data.train_size=8",
    "data.val_size=4",
    "data.test_size=4",
    "train.epochs=1",
    "train.batch_size=4",
    "train.progress=false",
    "train.device=cpu",
    "model.backbone=test_resnet",
]

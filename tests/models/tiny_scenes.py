"""A tiny scenes run (4 training images of 32 px, one epoch on the CPU) for the architectures' end-to-end tests;
each test adds its backbone, architecture and tasks."""

TINY_SCENES = {
    "data.image_size": 32,
    "data.train_size": 4,
    "data.val_size": 2,
    "data.test_size": 2,
    "train.epochs": 1,
    "train.batch_size": 2,
    "train.progress": False,
    "train.device": "cpu",
}

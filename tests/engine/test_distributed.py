import socket

import pytest
import torch
import torch.multiprocessing as mp

from mtlvision.engine.trainer import Trainer

from .tinyrun import TinyScenes, distributed_worker, flat_weights, tiny_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("balancer", ["ew", "upgrad"])
def test_two_gloo_processes_match_one_process_on_the_combined_batch(tmp_path, balancer):
    out = tmp_path / "ddp.pt"
    mp.spawn(distributed_worker, args=(2, _free_port(), str(out), balancer, 4), nprocs=2, join=True)

    single = tiny_model()
    Trainer(
        single, balancer, epochs=1, batch_size=8, lr=5e-3, seed=3, device="cpu", optimizer="sgd", progress=False
    ).fit(TinyScenes(), TinyScenes(8, seed=1))
    torch.testing.assert_close(torch.load(out), flat_weights(single), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torchrun_cli_trains_into_one_run_folder(tmp_path):
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "mtlvision",
        "train",
        "scenes",
        "--set",
        "data.image_size=32",
        "data.train_size=32",
        "data.val_size=16",
        "data.test_size=16",
        "train.epochs=1",
        "train.batch_size=8",
        "tasks=[count,segmentation]",
        "train.progress=false",
        "--out",
        str(tmp_path),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    assert [p.name for p in tmp_path.iterdir()] == ["scenes"]
    assert (tmp_path / "scenes" / "metrics.json").is_file()

import os
import pickle

import pytest
import torch
from torch import nn

from mtlvision.engine.checkpoint import atomic_write, load_checkpoint, load_weights, save_checkpoint, save_weights
from mtlvision.errors import CheckpointError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def test_weights_round_trip_through_safetensors(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].running_mean.fill_(0.5)
    save_weights(model, tmp_path / "w.safetensors")
    other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    load_weights(other, tmp_path / "w.safetensors")
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k


def test_weights_of_another_model_are_refused_with_the_mismatch_named(tmp_path):
    save_weights(nn.Linear(3, 4), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"shapes differ for .*weight \(file \(4, 3\), model \(5, 3\)\)"):
        load_weights(nn.Linear(3, 5), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="missing from the file"):
        load_weights(nn.Sequential(nn.Linear(3, 4)), tmp_path / "w.safetensors")


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_weights(nn.Linear(3, 4), path)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_a_pickle_payload_disguised_as_a_checkpoint_is_refused_unrun(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "checkpoint.pt"
    with open(path, "wb") as handle:
        pickle.dump({"mtlvision_version": "0.1.0", "model": _Payload()}, handle)
    with pytest.raises(CheckpointError, match="not a safe mtlvision checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_torch_save_with_code_inside_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "checkpoint.pt"
    torch.save({"mtlvision_version": "0.1.0", "x": _Payload()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_checkpoint_round_trip_keeps_tensors_and_plain_values(tmp_path):
    model = _model()
    model(torch.zeros(1, 3, 5, 5))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    optimizer.step()
    save_checkpoint(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "loop": {"epoch": 3}}, tmp_path / "c.pt"
    )
    state = load_checkpoint(tmp_path / "c.pt")
    assert state["loop"] == {"epoch": 3}
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("old")

    def failing(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, failing)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_the_pickle_refusal_gives_the_reason_without_torchs_advice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "checkpoint.pt"
    torch.save({"mtlvision_version": "0.1.0", "x": _Payload()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "refers to Python code" in message and "system" in message
    assert "weights_only" not in message and "likely succeed" not in message


@pytest.mark.parametrize("corruption", ["int8", "nan", "inf", "truncated"])
def test_weights_of_the_wrong_dtype_or_not_finite_are_refused(tmp_path, corruption):
    from safetensors.torch import save_file

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    path = tmp_path / "w.safetensors"
    save_weights(model, path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if corruption == "int8":
        state = {k: v.to(torch.int8) if v.is_floating_point() else v for k, v in state.items()}
    elif corruption in ("nan", "inf"):
        state["0.weight"].fill_(float(corruption))
    if corruption == "truncated":
        path.write_bytes(path.read_bytes()[:40])
    else:
        save_file(state, str(path))
    fragment = {
        "int8": "wrong kind of dtype: 0.bias (torch.int8, model torch.float32)",
        "nan": "infinite or NaN values in 1 tensor",
        "inf": "infinite or NaN values in 1 tensor",
        "truncated": "not a readable safetensors file",
    }[corruption]
    with pytest.raises(CheckpointError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_weights(model, path)


def test_written_files_get_the_ordinary_mode_of_a_new_file(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.json", lambda tmp: tmp.write_text("{}"))
        save_weights(nn.Linear(2, 2), tmp_path / "w.safetensors")
        save_checkpoint({"x": 1}, tmp_path / "checkpoint.pt")
    finally:
        os.umask(previous)
    for name in ("a.json", "w.safetensors", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name

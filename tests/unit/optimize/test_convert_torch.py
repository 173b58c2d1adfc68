"""TorchScript sources to ONNX: refused unless trusted (a program), inputs named as ``forward``
names them, pickles never loaded even when trusted."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch  # the test extra installs it: edgebento[torch]

from modelpack.errors import ConfigError
from optimize.convert import to_onnx


def _two_input_net() -> Any:
    class TwoInputs(torch.nn.Module):
        """``features`` and ``scale`` have different shapes so a swap cannot pass unseen."""

        def __init__(self) -> None:
            super().__init__()
            self.hidden = torch.nn.Linear(6, 16)
            self.head = torch.nn.Linear(16, 3)

        def forward(self, features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.hidden(features))) * scale

    torch.manual_seed(0)
    return TwoInputs().eval()


def _arrays(rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    # Given in the reverse of forward's order: the export must go by name, not by position.
    return {
        "scale": rng.uniform(0.5, 2.0, (rows, 1)).astype(np.float32),
        "features": rng.standard_normal((rows, 6)).astype(np.float32),
    }


def _run_onnx(path: Path, feed: dict[str, np.ndarray]) -> tuple[list[str], list[str], Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    return inputs, outputs, session.run(None, feed)


def test_scripted_module_exports_with_forward_names_and_same_outputs(tmp_path: Path) -> None:
    net = _two_input_net()
    source = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(net), str(source))

    kind = to_onnx(source, tmp_path / "model.onnx", _arrays(4), trust_model_code=True)

    assert kind == "torch"
    feed = _arrays(5)  # another batch size than the export saw: the batch axis stays dynamic
    inputs, outputs, (got,) = _run_onnx(tmp_path / "model.onnx", feed)
    assert inputs == ["features", "scale"]
    assert outputs == ["output"]
    with torch.no_grad():
        want = net(torch.from_numpy(feed["features"]), torch.from_numpy(feed["scale"])).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_traced_module_with_two_outputs_names_each(tmp_path: Path) -> None:
    class Split(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.sum(dim=1), x.amax(dim=1)

    source = tmp_path / "traced.pth"
    traced = torch.jit.trace(Split(), torch.zeros(1, 4))
    torch.jit.save(traced, str(source))
    x = np.arange(12, dtype=np.float32).reshape(3, 4)

    to_onnx(source, tmp_path / "traced.onnx", {"x": x}, trust_model_code=True)

    _, outputs, (total, peak) = _run_onnx(tmp_path / "traced.onnx", {"x": x})
    assert outputs == ["output_0", "output_1"]
    np.testing.assert_allclose(total, x.sum(1))
    np.testing.assert_allclose(peak, x.max(1))


def _trojan_pickle(path: Path, marker: Path, zipped: bool = True) -> None:
    """A ``torch.save``d module whose unpickling would create ``marker``."""

    class Trojan(torch.nn.Module):
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.mkdir, (str(marker),))

    torch.save(Trojan(), str(path), _use_new_zipfile_serialization=zipped)


def test_trojan_pickle_is_armed(tmp_path: Path) -> None:
    """The control: unpickling the trojan does run its code, so the refusal below means something."""
    for zipped in (True, False):
        marker = tmp_path / f"marker-{zipped}"
        _trojan_pickle(tmp_path / "trojan.pt", marker, zipped)
        torch.load(str(tmp_path / "trojan.pt"), weights_only=False)
        assert marker.is_dir()


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_pickled_module_is_refused_and_never_unpickled(tmp_path: Path, zipped: bool) -> None:
    source, marker = tmp_path / "model.pt", tmp_path / "marker"
    _trojan_pickle(source, marker, zipped)

    with pytest.raises(ConfigError) as caught:
        to_onnx(source, tmp_path / "model.onnx", {"x": np.zeros((2, 4), np.float32)})

    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("model.pt is a pickled torch.save file, not TorchScript")
    assert "torch.jit.save(torch.jit.script(model))" in message
    assert not marker.exists()
    assert not (tmp_path / "model.onnx").exists()


def test_full_module_pickle_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "net.pt"
    torch.save(torch.nn.Linear(4, 2), str(source))
    with pytest.raises(ConfigError, match=r"^net.pt is a pickled torch.save file"):
        to_onnx(source, tmp_path / "net.onnx", {"input": np.zeros((2, 4), np.float32)})


def test_a_file_that_is_not_torchscript_is_a_clear_error(tmp_path: Path) -> None:
    source = tmp_path / "junk.pt"
    source.write_bytes(b"PK not really a zip")
    with pytest.raises(ConfigError, match=r"^junk.pt is not a TorchScript file; save it with"):
        to_onnx(
            source,
            tmp_path / "junk.onnx",
            {"x": np.zeros((2, 4), np.float32)},
            trust_model_code=True,
        )


def test_data_must_name_every_forward_input(tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(_two_input_net()), str(source))
    with pytest.raises(ConfigError) as caught:
        to_onnx(
            source,
            tmp_path / "m.onnx",
            {"features": np.zeros((2, 6), np.float32)},
            trust_model_code=True,
        )
    assert str(caught.value) == (
        "model.pt: forward takes features, scale; the data has no array 'scale' (it holds features)"
    )


def test_data_of_the_wrong_shape_is_a_clear_error(tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(_two_input_net()), str(source))
    wrong = {"features": np.zeros((2, 5), np.float32), "scale": np.ones((2, 1), np.float32)}
    with pytest.raises(ConfigError) as caught:
        to_onnx(source, tmp_path / "m.onnx", wrong, trust_model_code=True)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "cannot export model.pt to ONNX with features float32[2, 5], scale float32[2, 1]: "
    )


def test_torch_source_without_data_asks_for_it(tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(_two_input_net()), str(source))
    with pytest.raises(ConfigError, match="a PyTorch source needs --data"):
        to_onnx(source, tmp_path / "m.onnx", None, trust_model_code=True)


def _file_writer(victim: Path) -> Any:
    """A scripted module whose forward maps ``victim`` shared and overwrites its first bytes."""

    class Writer(torch.nn.Module):
        def __init__(self, path: str, size: int) -> None:
            super().__init__()
            self.path = path
            self.size = size

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mapped = torch.from_file(self.path, shared=True, size=self.size, dtype=torch.uint8)
            mapped.fill_(88)  # "X": written through the mapping into the user's file
            # Used in the result, or TorchScript drops the mapping as dead code.
            return x * 2 + mapped.sum().to(x.dtype) * 0

    return torch.jit.script(Writer(str(victim), victim.stat().st_size))


def test_torchscript_that_writes_a_users_file_is_refused_without_trust(tmp_path: Path) -> None:
    victim = tmp_path / "notes.txt"
    victim.write_bytes(b"my notes, not the model's")
    source = tmp_path / "writer.pt"
    torch.jit.save(_file_writer(victim), str(source))
    x = {"x": np.ones((2, 4), np.float32)}

    with pytest.raises(ConfigError) as caught:
        to_onnx(source, tmp_path / "w.onnx", x)
    assert str(caught.value) == (
        "writer.pt is TorchScript, a program: loading it runs code stored in the file with your"
        " rights, so it is not loaded by default; export ONNX with torch.onnx.export, or pass"
        " --trust-model-code if you trust its author"
    )
    assert victim.read_bytes() == b"my notes, not the model's"
    assert not (tmp_path / "w.onnx").exists()

    # The control: trusted, the module does what its code says while its outputs are named,
    # before the exporter finds it cannot export from_file. That is why it is refused.
    with pytest.raises(ConfigError, match="aten::from_file"):
        to_onnx(source, tmp_path / "w.onnx", x, trust_model_code=True)
    assert victim.read_bytes() == b"X" * len(b"my notes, not the model's")


def test_a_pickle_is_refused_even_with_trust(tmp_path: Path) -> None:
    source, marker = tmp_path / "model.pt", tmp_path / "marker"
    _trojan_pickle(source, marker)
    with pytest.raises(ConfigError, match=r"^model.pt is a pickled torch.save file"):
        to_onnx(source, tmp_path / "m.onnx", {"x": np.zeros((2, 4))}, trust_model_code=True)
    assert not marker.exists()

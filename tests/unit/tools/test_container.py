from __future__ import annotations

from pathlib import Path

import yaml

from tools import container


def test_the_storage_conf_is_written_once_with_vfs(tmp_path: Path) -> None:
    conf = tmp_path / "containers" / "storage.conf"
    assert container.ensure_storage_conf(conf) is True
    assert 'driver = "vfs"' in conf.read_text()
    conf.write_text('[storage]\ndriver = "overlay"\n')  # an admin's own choice stays
    assert container.ensure_storage_conf(conf) is False
    assert "overlay" in conf.read_text()


def test_the_base_image_comes_from_the_mirror_apt_uses() -> None:
    mirror = container.apt_mirror()
    assert mirror.startswith(("http://", "https://")) and mirror.endswith("/debian")


def test_bentofile_names_the_base_image_and_the_serving_set_only() -> None:
    bentofile = yaml.safe_load((Path(__file__).parents[3] / "bentofile.yaml").read_text())
    assert bentofile["service"] == "bentos.service:EdgebentoService"
    assert bentofile["docker"]["base_image"] == container.BASE_IMAGE
    packages = " ".join(bentofile["python"]["packages"])
    assert "onnxruntime" in packages and "bentoml" in packages
    assert "tensorflow" not in packages and "torch" not in packages and "onnx=" not in packages

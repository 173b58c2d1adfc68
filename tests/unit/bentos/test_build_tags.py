"""`edgebento bento build TAG` and the serve hint: any text as a tag is one clear ConfigError
(not a tag, or not in the store), never BentoML's own exception; the hint works anywhere."""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bentos.build import SERVICE, build_bento, serve_command, source_root
from modelpack.errors import ConfigError


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models import ModelStore

    root = tmp_path_factory.mktemp("models")
    BentoMLContainer.model_store.set(ModelStore(root))
    yield root
    BentoMLContainer.model_store.reset()


TAG_TEXT = st.text(st.characters(codec="utf-8"), max_size=40) | st.from_regex(
    r"[A-Za-z0-9._:/ -]{0,30}", fullmatch=True
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tag=TAG_TEXT)
def test_any_tag_is_a_config_error_before_a_build(empty_store: Path, tag: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_bento(tag)
    message = str(caught.value)
    assert "is not in the BentoML model store" in message or "is not a model tag" in message


def test_the_serve_hint_names_the_service_by_import_path() -> None:
    words = shlex.split(serve_command("digits:v1"))
    assert words == ["EDGEBENTO_MODEL=digits:v1", "bentoml", "serve", SERVICE]
    module, _, name = SERVICE.partition(":")
    assert (source_root() / (module.replace(".", "/") + ".py")).is_file()
    assert name == "EdgebentoService"

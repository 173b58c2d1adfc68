"""Topics from the agent's config that a broker would drop it for, at every reconnect, are
refused when the config is loaded (issue 18: every topic the agent uses is validated)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import load_config
from modelpack.errors import ConfigError

BASE = {"device": "d", "data_dir": "/tmp/d", "trust": ["/tmp/k.pub"]}


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"prefix": "fleet\u0001"}, "U+0001"),
        ({"prefix": "fleet/+"}, "wildcard"),
        ({"prefix": "x" * 65_530}, "the limit is 65535"),
        ({"prefix": "x" * 250, "max_topic_bytes": 256}, "the limit is 256"),
        ({"groups": ["line\x7f"]}, "U+007F"),
        ({"groups": ["a/b"]}, "one plain topic level"),
        ({"pipelines": [{"name": "p", "input_topic": "s/+x", "output_topic": "o"}]}, "alone"),
        ({"pipelines": [{"name": "p", "input_topic": "s/#/x", "output_topic": "o"}]}, "alone"),
        ({"pipelines": [{"name": "p", "input_topic": "s/\ufdd0", "output_topic": "o"}]}, "U+FDD0"),
        ({"pipelines": [{"name": "p", "input_topic": "s/#", "output_topic": "o/#"}]}, "wildcard"),
        ({"pipelines": [{"name": "p", "input_topic": "s/#", "output_topic": "s/out"}]}, "input of"),
    ],
)
def test_topics_a_broker_would_refuse_stop_the_agent_at_load(
    settings: dict[str, Any], why: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(None, {**BASE, **settings}, environ={})
    assert why in str(refused.value)
    assert len(str(refused.value)) < 400  # one readable line, whatever the topic's length


def test_plain_topics_load() -> None:
    pipeline = {"name": "p", "input_topic": "$SYS/broker/#", "output_topic": "plant/é/alarm"}
    config = load_config(
        None, {**BASE, "prefix": "fleet/eu", "groups": ["line-1"], "pipelines": [pipeline]}, {}
    )
    assert config.pipelines[0].output_topic == "plant/é/alarm" and config.data_dir == Path("/tmp/d")

"""What a download unpacks to is capped before any signature check (issue 19, unconfirmed point).

On main a fetch unpacked up to 4 GiB (the loader's own cap) onto the device's disk whatever
``max_download_bytes`` said: a 200 KB archive of zeros became 200 MB before the updater looked
at a signature. Here a real agent, with ``max_download_bytes`` of 8 MB, downloads such an archive
over HTTP and refuses it while unpacking, leaving nothing behind, and still serves.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from modelpack.archive import write_archive
from tests.support.agent import Client, wait_online


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _bomb(pack: Path, out: Path, mb: int) -> Path:
    """A signed pack with one more file of zeros: small packed, ``mb`` MB unpacked."""
    import shutil

    bomb = out.parent / "bomb-pack"
    shutil.copytree(pack, bomb)
    with (bomb / "padding.bin").open("wb") as fh:
        for _ in range(mb):
            fh.write(bytes(1 << 20))
    write_archive(bomb, out)
    shutil.rmtree(bomb)
    return out


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_an_archive_that_inflates_past_the_cap_is_refused_while_unpacking(
    agent_factory: Any,
    pack_v1: Path,
    pack_v2: Path,
    client: Client,
    topic_prefix: str,
    tmp_path: Path,
    served: tuple[Path, str],
) -> None:
    root, url = served
    config = tmp_path / "agent.toml"
    config.write_text("max_download_bytes = 8000000\n")
    agent = agent_factory(pack=pack_v1, args=("--config", str(config)))
    wait_online(client, topic_prefix, "dev-a")
    archive = _bomb(pack_v2, root / "bomb.tar.gz", 64)
    assert archive.stat().st_size < 1 << 20  # well under the download cap
    reply = client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"url": f"{url}/bomb.tar.gz"})
    assert reply["ok"] is False
    assert "unpacks to more than 8000000 bytes" in reply["error"], reply
    assert _disk_bytes(agent.data_dir) < 16 << 20  # the 64 MB never reached the disk
    assert client.request(f"{topic_prefix}/dev-a/cmd/ping", {})["model"]["version"] == 1
    # A pack within the cap installs from the same server.
    write_archive(pack_v2, root / "v2.tar.gz")
    reply = client.request(f"{topic_prefix}/dev-a/cmd/deploy", {"url": f"{url}/v2.tar.gz"})
    assert reply["ok"] is True, reply

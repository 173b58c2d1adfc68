"""Container tooling without a Docker engine or Docker Hub: buildah, podman and a Debian base.

``python -m tools.container setup`` (what ``make container-tools`` runs) makes this machine able
to run ``bentoml containerize --backend buildah``, once and idempotently:

1. installs buildah, podman and debootstrap with apt-get when one is missing;
2. writes ``/etc/containers/storage.conf`` with the vfs driver when there is none (overlay needs
   kernel support these machines lack);
3. builds ``localhost/edgebento-base:bookworm`` when it is not in local storage: a minbase Debian
   from the mirror apt already uses (debootstrap), imported with podman, plus a layer with this
   machine's CA bundle (pip and uv inside the build need it to reach PyPI), ``python`` linked
   to ``python3``, and the EXTERNALLY-MANAGED marker removed (the bento installs into it).

bentofile.yaml names that image as ``docker.base_image``. Builds use ``BUILDAH_ISOLATION=chroot``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from modelpack.errors import ConfigError

BASE_IMAGE = "localhost/edgebento-base:bookworm"
ROOTFS_IMAGE = "localhost/edgebento-rootfs:bookworm"
SUITE = "bookworm"
PACKAGES = ("buildah", "podman", "debootstrap")
STORAGE_CONF = Path("/etc/containers/storage.conf")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def container_env() -> dict[str, str]:
    """The environment buildah needs here (chroot isolation, no engine)."""
    return {**os.environ, "BUILDAH_ISOLATION": "chroot", "STORAGE_DRIVER": "vfs"}


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            cmd, check=True, text=True, capture_output=True, env=container_env(), **kwargs
        )  # type: ignore[call-overload, no-any-return]
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-5:]
        raise ConfigError(f"{' '.join(cmd[:3])} failed: {' / '.join(tail)}") from exc
    except FileNotFoundError as exc:
        raise ConfigError(f"{cmd[0]} is not installed: run 'make container-tools'") from exc


def ensure_packages() -> bool:
    """apt-get install what is missing; True when something was installed."""
    missing = [
        p for p in PACKAGES if shutil.which(p) is None and not Path(f"/usr/sbin/{p}").exists()
    ]
    if not missing:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    return True


def ensure_storage_conf(path: Path = STORAGE_CONF) -> bool:
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Written by edgebento (tools/container.py): no overlay support on these machines.\n"
        '[storage]\ndriver = "vfs"\nrunroot = "/run/containers/storage"\n'
        'graphroot = "/var/lib/containers/storage"\n'
    )
    return True


def image_exists(name: str) -> bool:
    found = subprocess.run(
        ["buildah", "inspect", "--type", "image", name],
        capture_output=True,
        env=container_env(),
    )
    return found.returncode == 0


def apt_mirror() -> str:
    """The Debian mirror apt uses on this machine (debootstrap fetches from the same place)."""
    sources = [Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*")]
    for source in sources:
        if not source.is_file():
            continue
        text = source.read_text(errors="replace")
        for match in re.finditer(r"(?:URIs:|deb)\s+(\S+/debian)\s*$", text, re.MULTILINE):
            return match.group(1)
    return DEFAULT_MIRROR


def build_base_image() -> None:
    with tempfile.TemporaryDirectory(prefix="edgebento-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,python3-pip,ca-certificates",
                SUITE,
                str(rootfs),
                apt_mirror(),
            ]
        )
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        tarball = Path(tmp) / "rootfs.tar"
        _run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."])
        _run(["podman", "import", str(tarball), ROOTFS_IMAGE])
    ctr = _run(["buildah", "from", ROOTFS_IMAGE]).stdout.strip()
    try:
        _run(["buildah", "copy", ctr, str(CA_BUNDLE), "/etc/ssl/certs/ca-certificates.crt"])
        _run(
            [
                "buildah",
                "run",
                "--isolation",
                "chroot",
                ctr,
                "--",
                "sh",
                "-c",
                "rm -f /usr/lib/python3*/EXTERNALLY-MANAGED && ln -sf /usr/bin/python3 /usr/bin/python",
            ]
        )
        _run(
            [
                "buildah",
                "config",
                "--env",
                "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
                "--env",
                "UV_NATIVE_TLS=1",
                "--env",
                "PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                "--cmd",
                "python3",
                ctr,
            ]
        )
        _run(["buildah", "commit", "--rm", ctr, BASE_IMAGE])
    except ConfigError:
        subprocess.run(["buildah", "rm", ctr], capture_output=True, env=container_env())
        raise


def ensure_promtool(bin_dir: Path) -> bool:
    """promtool (checks /metrics in the tests) from Debian's prometheus package, unpacked only:
    installing the package would also start a Prometheus server."""
    if shutil.which("promtool") or (bin_dir / "promtool").exists():
        return False
    with tempfile.TemporaryDirectory(prefix="edgebento-promtool-") as tmp:
        try:
            _run(["apt-get", "download", "prometheus"], cwd=tmp)
        except ConfigError:  # no package lists yet on a fresh machine
            _run(["apt-get", "update", "-qq"])
            _run(["apt-get", "download", "prometheus"], cwd=tmp)
        deb = next(Path(tmp).glob("prometheus_*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")])
        bin_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(tmp) / "x/usr/bin/promtool", bin_dir / "promtool")
    return True


def setup(promtool_dir: Path | None = None) -> list[str]:
    """Make the machine ready to containerize; returns what was done (empty: all there)."""
    done = []
    if ensure_packages():
        done.append("installed " + " ".join(PACKAGES))
    if promtool_dir is not None and ensure_promtool(promtool_dir):
        done.append(f"unpacked promtool into {promtool_dir}")
    if ensure_storage_conf():
        done.append(f"wrote {STORAGE_CONF} (vfs)")
    if not image_exists(BASE_IMAGE):
        build_base_image()
        done.append(f"built {BASE_IMAGE}")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.container")
    parser.add_argument("command", choices=["setup"], help="install tools and build the base image")
    parser.add_argument("--promtool", type=Path, metavar="DIR", help="also put promtool in DIR")
    args = parser.parse_args(argv)
    try:
        done = setup(args.promtool)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("; ".join(done) if done else f"container tooling ready ({BASE_IMAGE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

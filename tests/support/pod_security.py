"""The "restricted" Pod Security Standard (Kubernetes 1.30, baseline included) as a checker.

Each rule is the one the PodSecurity admission controller enforces, written from the standard's
table; ``violations`` returns one line per broken rule, so a test can also prove the checker
notices a pod that breaks one.
"""

from __future__ import annotations

from typing import Any

BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        c
        for key in ("initContainers", "containers", "ephemeralContainers")
        for c in pod.get(key, [])
    ]


def _baseline(pod: dict[str, Any], ctx: dict[str, Any]) -> list[str]:
    out = [f"{k} is set" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
    out += [f"volume {v['name']} is hostPath" for v in pod.get("volumes", []) if "hostPath" in v]
    out += [
        f"sysctl {s['name']} is not safe"
        for s in ctx.get("sysctls", [])
        if s["name"] not in SAFE_SYSCTLS
    ]
    for where, sc in [("pod", ctx)] + [
        (c["name"], c.get("securityContext", {})) for c in _containers(pod)
    ]:
        if sc.get("seccompProfile", {}).get("type") == "Unconfined":
            out.append(f"{where}: seccomp Unconfined")
        if sc.get("seLinuxOptions", {}).get("type", "") not in SELINUX_TYPES:
            out.append(f"{where}: SELinux type")
        if {"user", "role"} & set(sc.get("seLinuxOptions", {})):
            out.append(f"{where}: SELinux user or role")
        if sc.get("appArmorProfile", {}).get("type", "RuntimeDefault") == "Unconfined":
            out.append(f"{where}: AppArmor Unconfined")
    for c in _containers(pod):
        sc = c.get("securityContext", {})
        if sc.get("privileged"):
            out.append(f"{c['name']}: privileged")
        if set(sc.get("capabilities", {}).get("add", [])) - BASELINE_CAPABILITIES:
            out.append(f"{c['name']}: adds capabilities beyond the baseline")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{c['name']}: procMount")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{c['name']}: hostPort")
    return out


def _restricted(pod: dict[str, Any], ctx: dict[str, Any]) -> list[str]:
    out = [
        f"volume {v['name']} is of a type restricted does not allow"
        for v in pod.get("volumes", [])
        if not set(v) - {"name"} <= RESTRICTED_VOLUMES
    ]
    if ctx.get("runAsUser") == 0:
        out.append("pod: runAsUser 0")
    if ctx.get("runAsNonRoot") is False:  # refused even when every container sets true
        out.append("pod: runAsNonRoot is false")
    for c in _containers(pod):
        sc, name = c.get("securityContext", {}), c["name"]
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("runAsNonRoot", ctx.get("runAsNonRoot")) is not True:
            out.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", ctx.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccomp is not RuntimeDefault or Localhost")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: adds a capability other than NET_BIND_SERVICE")
    return out


def violations(pod: dict[str, Any]) -> list[str]:
    """What in a pod spec the restricted profile refuses; [] when it is admitted."""
    ctx = pod.get("securityContext", {})
    return _baseline(pod, ctx) + _restricted(pod, ctx)

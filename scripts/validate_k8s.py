"""Validate the Kubernetes manifests (deploy/k8s/), offline, as CI does:

1. render every overlay (``kubectl kustomize``), and each overlay with each component;
2. validate every rendered object against the Kubernetes schemas of one named version, strict
   (an unknown or misspelled field is an error), with the ``kubernetes-validate`` package;
3. check what a schema cannot: selectors match the pod labels, the HPA targets the Deployment
   and has CPU requests to measure against, the probes hit /ready and /health on a declared
   port, the termination grace outlasts the preStop pause plus the service's own drain
   (``CHARRNN_SHUTDOWN_GRACE_S``), the security settings, the volumes, the GPU request, and
   every ``CHARRNN_*`` variable is one the service knows (app/config.py), with a valid value.

A self-check first proves the strict validation rejects a misspelled field, so a schema set
that accepts anything cannot pass silently.

usage: python scripts/validate_k8s.py [--kubernetes-version 1.32.0] [--kubectl PATH]
Exits 1 with one line per problem; 2 when kubectl or kubernetes-validate is missing.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
sys.path.insert(0, str(ROOT))

# What uvicorn adds after the drain before it exits (app/__main__.py: timeout_graceful_shutdown).
UVICORN_EXTRA_S = 5
EXPECTED_KINDS = {
    "Deployment",
    "Service",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "PersistentVolumeClaim",
    "ServiceAccount",
}


def render(kubectl: str, directory: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise SystemExit(f"validate_k8s: kubectl kustomize {directory} failed:\n{done.stderr}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def renders(kubectl: str) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Every overlay, then every overlay with every component (through a temporary overlay)."""
    overlays = sorted(
        p for p in (K8S / "overlays").iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    components = sorted(p for p in (K8S / "components").iterdir() if p.is_dir())
    for overlay in overlays:
        yield f"overlays/{overlay.name}", render(kubectl, overlay)
        for component in components:
            # kustomize takes only relative paths: the temporary overlay lives beside the others.
            with tempfile.TemporaryDirectory(prefix=".validate-", dir=K8S / "overlays") as tmp:
                (Path(tmp) / "kustomization.yaml").write_text(
                    yaml.safe_dump(
                        {
                            "apiVersion": "kustomize.config.k8s.io/v1beta1",
                            "kind": "Kustomization",
                            "resources": [f"../{overlay.name}"],
                            "components": [f"../../components/{component.name}"],
                        }
                    )
                )
                name = f"overlays/{overlay.name} + components/{component.name}"
                yield name, render(kubectl, Path(tmp))


def schema_errors(docs: list[dict[str, Any]], version: str) -> list[str]:
    import kubernetes_validate

    errors = []
    for doc in docs:
        kind_name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path) or "(top)"
            errors.append(f"{kind_name}: {where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{kind_name}: {e}")
    return errors


def self_check(docs: list[dict[str, Any]], version: str) -> None:
    """Strict validation must reject a misspelled field and a wrong type."""
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    typo = copy.deepcopy(deployment)
    spec = typo["spec"]["template"]["spec"]
    spec["terminationGracePeriodSecond"] = spec.pop("terminationGracePeriodSeconds")
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "two"
    for broken, what in ((typo, "a misspelled field"), (wrong_type, "a string replica count")):
        if not schema_errors([broken], version):
            raise SystemExit(f"validate_k8s: the schema check accepts {what}; it checks nothing")


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def prestop_pause_s(container: dict[str, Any]) -> float:
    pre = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    command = pre.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] == "sleep":
        return float(command[1])
    return 0.0


def check_settings(env: dict[str, str]) -> list[str]:
    """Every CHARRNN_* variable must name a service setting and parse (as the service would)."""
    from pydantic import ValidationError

    from app.config import Settings

    names = {f"CHARRNN_{field.upper()}" for field in Settings.model_fields}
    unknown = [k for k in env if k.startswith("CHARRNN_") and k not in names]
    problems = [f"{k} is not a setting of the service" for k in unknown]
    values = {k.removeprefix("CHARRNN_").lower(): v for k, v in env.items() if k in names}
    try:
        Settings(_env_file=None, **values)  # type: ignore[call-arg]
    except ValidationError as e:
        problems += [
            f"CHARRNN_{'_'.join(map(str, x['loc'])).upper()}: {x['msg']}" for x in e.errors()
        ]
    return problems


def probe_problems(container: dict[str, Any], ports: set[Any]) -> list[str]:
    problems = []
    for probe, path in (
        ("startupProbe", "/ready"),
        ("readinessProbe", "/ready"),
        ("livenessProbe", "/health"),
    ):
        spec = container.get(probe)
        if spec is None:
            problems.append(f"no {probe}")
            continue
        get = spec.get("httpGet", {})
        if get.get("path") != path:
            problems.append(f"{probe} checks {get.get('path')!r}, not {path}")
        if get.get("port") not in ports:
            problems.append(f"{probe} port {get.get('port')!r} is no port of the container")
    startup = container.get("startupProbe", {})
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    if budget < 120:
        problems.append(f"the startup probe allows {budget} s for the warm-up; give it >= 120 s")
    return problems


def consistency(name: str, docs: list[dict[str, Any]]) -> list[str]:
    by_kind = {d["kind"]: d for d in docs}
    problems = []
    if set(by_kind) != EXPECTED_KINDS or len(docs) != len(EXPECTED_KINDS):
        problems.append(f"renders {sorted(d['kind'] for d in docs)}, not {sorted(EXPECTED_KINDS)}")
        return problems
    dep, svc = by_kind["Deployment"], by_kind["Service"]
    pdb, hpa = by_kind["PodDisruptionBudget"], by_kind["HorizontalPodAutoscaler"]
    pod = dep["spec"]["template"]
    labels = pod["metadata"].get("labels", {})
    for kind, selector in (
        ("Deployment", dep["spec"].get("selector", {}).get("matchLabels")),
        ("Service", svc["spec"].get("selector")),
        ("PodDisruptionBudget", pdb["spec"].get("selector", {}).get("matchLabels")),
    ):
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            problems.append(f"the {kind} selector {selector} does not match the pods {labels}")
    target = hpa["spec"]["scaleTargetRef"]
    if (target["kind"], target["name"]) != ("Deployment", dep["metadata"]["name"]):
        problems.append(f"the HPA scales {target}, not the Deployment")

    spec = pod["spec"]
    (container,) = spec["containers"]
    env = env_of(container)
    ports = {p["containerPort"] for p in container["ports"]} | {
        p.get("name") for p in container["ports"]
    }
    if int(env.get("CHARRNN_PORT", "8000")) not in ports:
        problems.append(f"CHARRNN_PORT {env.get('CHARRNN_PORT')} is not a container port")
    if svc["spec"]["ports"][0]["targetPort"] not in ports:
        problems.append("the Service's targetPort is no port of the container")
    problems += probe_problems(container, ports)
    problems += check_settings(env)

    grace = float(env.get("CHARRNN_SHUTDOWN_GRACE_S", "10"))
    pause = prestop_pause_s(container)
    needed = pause + grace + UVICORN_EXTRA_S
    termination = spec.get("terminationGracePeriodSeconds", 30)
    if pause <= 0:
        problems.append("no preStop pause: the pod drains before endpoints drop it")
    if termination <= needed:
        problems.append(
            f"terminationGracePeriodSeconds {termination} <= preStop {pause:g} + "
            f"CHARRNN_SHUTDOWN_GRACE_S {grace:g} + {UVICORN_EXTRA_S}: SIGKILL cuts the drain"
        )

    pod_security = spec.get("securityContext", {})
    security = container.get("securityContext", {})
    if not (pod_security.get("runAsNonRoot") or security.get("runAsNonRoot")):
        problems.append("runAsNonRoot is not set")
    if not security.get("readOnlyRootFilesystem"):
        problems.append("the root filesystem is not read-only")
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    if "emptyDir" not in volumes.get(mounts.get("/tmp", {}).get("name"), {}):
        problems.append("/tmp is not a writable emptyDir")
    models_dirs = {
        str(Path(p.split("=", 1)[1]).parent) for p in env.get("CHARRNN_MODELS", "").split(",")
    }
    for folder in models_dirs:
        mount = mounts.get(folder)
        if mount is None or "persistentVolumeClaim" not in volumes.get(mount["name"], {}):
            problems.append(f"the models folder {folder} is not mounted from a volume claim")
        elif not mount.get("readOnly"):
            problems.append(f"the models volume at {folder} is mounted writable")
    requests = container.get("resources", {}).get("requests", {})
    if "cpu" not in requests:
        problems.append("no CPU request: the HPA's CPU utilisation has nothing to measure by")

    gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    device = env.get("CHARRNN_DEVICE")
    if "/gpu" in name and (gpus != 1 or device != "cuda"):
        problems.append(f"GPU overlay: nvidia.com/gpu {gpus!r}, CHARRNN_DEVICE {device!r}")
    if "/cpu" in name and (gpus is not None or device != "cpu"):
        problems.append(f"CPU overlay: nvidia.com/gpu {gpus!r}, CHARRNN_DEVICE {device!r}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kubernetes-version", default="1.32.0")
    parser.add_argument("--kubectl", default=shutil.which("kubectl"))
    args = parser.parse_args()
    if not args.kubectl:
        print("validate_k8s: kubectl is not installed (apt-get install kubectl)", file=sys.stderr)
        return 2
    try:
        import kubernetes_validate  # noqa: F401
    except ImportError:
        print("validate_k8s: kubernetes-validate is not installed (the dev extra)", file=sys.stderr)
        return 2

    version, failed, checked = args.kubernetes_version, False, 0
    for name, docs in renders(args.kubectl):
        if checked == 0:
            self_check(docs, version)
        problems = schema_errors(docs, version) + consistency(name, docs)
        for problem in problems:
            print(f"validate_k8s: {name}: {problem}", file=sys.stderr)
        failed |= bool(problems)
        checked += len(docs)
        if not problems:
            kinds = ", ".join(sorted(d["kind"] for d in docs))
            print(f"validate_k8s: {name}: ok ({kinds})")
    if failed:
        print(f"validate_k8s: FAILED against Kubernetes {version}", file=sys.stderr)
        return 1
    print(f"validate_k8s: {checked} objects valid against Kubernetes {version} (strict)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

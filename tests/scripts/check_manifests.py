"""Checks deploy/kubernetes beyond the API schemas (kubernetes-validate does those): every
kustomization names files that exist and every manifest is named by one; the pods run as the
issue and the Pod Security "restricted" profile ask; probes, drain and budgets are wired; the
tunnel Service carries TCP and UDP on one port. Writes each ConfigMap's TOML to OUT_DIR (so
the caller can run `privlink --check-config` on it) and prints one line per file written.

usage: check_manifests.py DEPLOY_KUBERNETES_DIR OUT_DIR
"""

import os
import re
import sys

import yaml

root, out_dir = sys.argv[1], sys.argv[2]
problems = []


def need(condition, what):
    if not condition:
        problems.append(what)


def load_all(path):
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def seconds(duration):
    match = re.fullmatch(r"(\d+)s", duration)
    need(match, f"duration {duration!r} in seconds")
    return int(match.group(1)) if match else 0


named = set()
documents = []
for side in sorted(os.listdir(root)):
    base = os.path.join(root, side)
    kustomization = os.path.join(base, "kustomization.yaml")
    if not os.path.isfile(kustomization):
        continue
    (k,) = load_all(kustomization)
    for resource in k.get("resources", []):
        path = os.path.normpath(os.path.join(base, resource))
        if os.path.isdir(path):
            need(os.path.isfile(os.path.join(path, "kustomization.yaml")),
                 f"{side}: {resource} is a directory without kustomization.yaml")
            continue
        need(os.path.isfile(path), f"{side}: resource {resource} does not exist")
        named.add(path)
        if os.path.isfile(path):
            documents += [(side, doc) for doc in load_all(path)]
    for generator in k.get("secretGenerator", []):
        for entry in generator.get("files", []):
            source = entry.split("=", 1)[-1]
            need(source.startswith("secrets/"),
                 f"{side}: secret {generator['name']} reads {source} outside secrets/")
        need(os.path.isfile(os.path.join(base, "secrets", ".gitignore")),
             f"{side}: secrets/ has no .gitignore keeping secrets out of git")
    for name in os.listdir(base):
        path = os.path.join(base, name)
        if name.endswith(".yaml") and name != "kustomization.yaml":
            need(path in named, f"{side}: {name} is in no kustomization")

by_kind = {}
for side, doc in documents:
    by_kind.setdefault((side, doc["kind"]), []).append(doc)

written = []
for side in ("relay", "agent"):
    (deployment,) = by_kind.get((side, "Deployment"), [None])
    need(deployment is not None, f"{side}: a Deployment")
    (config_map,) = by_kind.get((side, "ConfigMap"), [None])
    (budget,) = by_kind.get((side, "PodDisruptionBudget"), [None])
    if not (deployment and config_map and budget):
        continue
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    need(spec["replicas"] == 2, f"{side}: 2 replicas")
    need(spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0,
         f"{side}: a rolling update never drops below the replica count")
    security = pod["securityContext"]
    need(security.get("runAsNonRoot") is True, f"{side}: runAsNonRoot")
    need(security.get("runAsUser") == 65532, f"{side}: runAsUser 65532")
    need(security.get("seccompProfile", {}).get("type") == "RuntimeDefault",
         f"{side}: the runtime's default seccomp profile")
    need(pod.get("automountServiceAccountToken") is False,
         f"{side}: no Kubernetes API token in the pod")
    need("podAntiAffinity" in pod.get("affinity", {}), f"{side}: anti-affinity")
    (container,) = pod["containers"]
    context = container["securityContext"]
    need(context.get("allowPrivilegeEscalation") is False, f"{side}: no privilege escalation")
    need(context.get("readOnlyRootFilesystem") is True, f"{side}: read-only root file system")
    need(context.get("capabilities", {}).get("drop") == ["ALL"], f"{side}: drop ALL")
    need("add" not in context.get("capabilities", {}), f"{side}: no capability added")
    need(container["livenessProbe"]["httpGet"]["path"] == "/healthz", f"{side}: liveness /healthz")
    need(container["readinessProbe"]["httpGet"]["path"] == "/readyz", f"{side}: readiness /readyz")
    need("startupProbe" in container, f"{side}: a startup probe")
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    need(budget["spec"].get("minAvailable") == 1, f"{side}: PodDisruptionBudget minAvailable 1")
    need(budget["spec"]["selector"] == spec["selector"],
         f"{side}: the budget selects the Deployment's pods")

    (file_name, text), = config_map["data"].items()
    grace = re.search(r'^shutdown_grace = "([^"]+)"', text, re.M)
    need(grace, f"{side}: shutdown_grace set in {file_name}")
    if grace:
        need(pod["terminationGracePeriodSeconds"] > pause + seconds(grace.group(1)),
             f"{side}: terminationGracePeriodSeconds longer than preStop + shutdown_grace")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    config_arg = container["args"][container["args"].index("--config") + 1]
    need(config_arg == f"{mounts.get('config')}/{file_name}",
         f"{side}: --config names the mounted {file_name}")
    path = os.path.join(out_dir, f"k8s-{file_name}")
    with open(path, "w") as f:
        f.write(text)
    written.append(path)

tunnel = [s for s in by_kind.get(("relay", "Service"), []) if "tunnel" in s["metadata"]["name"]]
need(len(tunnel) == 1, "relay: one tunnel Service")
if tunnel:
    ports = {(p["port"], p["protocol"]) for p in tunnel[0]["spec"]["ports"]}
    need({(7443, "TCP"), (7443, "UDP")} <= ports, "relay: tunnel Service on TCP and UDP 7443")

if tunnel:
    need(tunnel[0]["spec"].get("publishNotReadyAddresses") is True,
         "relay: the tunnel Service publishes relays that are not ready (agents make them ready)")
peers = [s for s in by_kind.get(("relay", "Service"), []) if s["spec"].get("clusterIP") == "None"]
need(len(peers) == 1, "relay: one headless Service for the fleet's peers")
relay_config = next(iter(by_kind.get(("relay", "ConfigMap"), [{}])[0].get("data", {}).values()), "")
if peers:
    need(peers[0]["spec"].get("publishNotReadyAddresses") is True,
         "relay: the peers Service lists relays that are not ready")
    name = peers[0]["metadata"]["name"]
    need(re.search(rf'^peers_dns = "{name}\.', relay_config, re.M),
         f"relay: [fleet] peers_dns names the headless Service {name}")
(relay_deployment,) = by_kind.get(("relay", "Deployment"), [None])
if relay_deployment:
    (relay_container,) = relay_deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in relay_container.get("env", [])}
    advertise = env.get("PRIVLINK_FLEET_ADVERTISE", {})
    need(advertise.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP",
         "relay: PRIVLINK_FLEET_ADVERTISE is the pod IP")
scalers = by_kind.get(("relay", "HorizontalPodAutoscaler"), [])
need(len(scalers) == 1, "relay: a HorizontalPodAutoscaler")
if scalers and relay_deployment:
    target = scalers[0]["spec"]["scaleTargetRef"]
    need(target["kind"] == "Deployment" and target["name"] == relay_deployment["metadata"]["name"],
         "relay: the autoscaler scales the relay Deployment")
    need(scalers[0]["spec"]["minReplicas"] >= 2, "relay: the autoscaler keeps at least 2 relays")

if problems:
    for problem in problems:
        print(f"PROBLEM: {problem}")
    sys.exit(1)
for path in written:
    print(path)

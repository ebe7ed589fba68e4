"""Lay out the archives for KServe's TorchServe runtime, with the manifests to deploy them.

    python -m serving.kserve --model-store model_store --out build/kserve \
        --image registry.example.com/image-classifiers:0.1 --storage-uri pvc://models/image-classifiers

writes, as KServe's TorchServe integration expects under the storage URI:

    build/kserve/config/config.properties   server settings + model_snapshot of every archive
    build/kserve/config/metrics.yaml        the metrics TorchServe exports (serving/metrics.yaml)
    build/kserve/config/log4j2.xml          TorchServe's logging without per-request DEBUG lines
    build/kserve/model-store/*.mar          the archives (checked against SHA256SUMS), and the sums
    build/kserve/servingruntime.yaml        a ServingRuntime running this project's image
    build/kserve/inferenceservice.yaml      the InferenceService that uses it

Nothing here runs Docker or Kubernetes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import zipfile
from pathlib import Path

import yaml

from serving.archive import SUMS_FILE, ArchiveMismatch, verify_archive

ROOT = Path(__file__).resolve().parent.parent
MOUNT = "/mnt/models"  # where KServe's storage initializer puts the storage URI's content
ENVELOPES = {"v1": "kserve", "v2": "kservev2"}


def archive_settings(mar: Path) -> dict:
    """Model name, version and worker settings from an archive's manifest and model-config.yaml."""
    with zipfile.ZipFile(mar) as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
        cfg = yaml.safe_load(z.read("model-config.yaml")) if "model-config.yaml" in z.namelist() else {}
    return {
        "name": manifest["modelName"],
        "version": manifest["modelVersion"],
        "minWorkers": cfg.get("minWorkers", 1),
        "maxWorkers": cfg.get("maxWorkers", 1),
        "maxBatchDelay": cfg.get("maxBatchDelay", 50),
        "responseTimeout": cfg.get("responseTimeout", 120),
    }


def model_snapshot(mars: list[Path]) -> dict:
    """TorchServe's model_snapshot: what the server loads at start.

    batchSize is 1: TorchServe's KServe envelopes read only the first request of a
    batch (measured: concurrent requests failed with 503 at batchSize 8). A client
    batches by sending several instances in one request.
    """
    models: dict[str, dict] = {}
    for mar in mars:
        s = archive_settings(mar)
        models.setdefault(s["name"], {})[s["version"]] = {
            "defaultVersion": not models.get(s["name"]),
            "marName": mar.name,
            "minWorkers": s["minWorkers"],
            "maxWorkers": s["maxWorkers"],
            "batchSize": 1,
            "maxBatchDelay": s["maxBatchDelay"],
            "responseTimeout": s["responseTimeout"],
        }
    return {"name": "startup.cfg", "modelCount": sum(len(v) for v in models.values()), "models": models}


def config_properties(mars: list[Path], protocol: str) -> str:
    lines = [
        "# TorchServe settings for KServe's TorchServe runtime, written by serving/kserve.py.",
        "# In the pod, TorchServe must listen on all addresses: KServe's proxy and probes call it.",
        "inference_address=http://0.0.0.0:8085",
        "management_address=http://0.0.0.0:8085",
        "metrics_address=http://0.0.0.0:8082",
        "grpc_inference_port=7070",
        "grpc_management_port=7071",
        "enable_metrics_api=true",
        "metrics_mode=prometheus",
        f"metrics_config={MOUNT}/config/metrics.yaml",
        f"model_store={MOUNT}/model-store",
        "# KServe sets TS_SERVICE_ENVELOPE from the protocol version; this is the same default.",
        "enable_envvars_config=true",
        f"service_envelope={ENVELOPES[protocol]}",
        "# No registration at run time: the snapshot below is what the pod serves.",
        "enable_model_api=false",
        "allowed_urls=^$",
        "# The key file would live inside the pod, out of clients' reach: authentication",
        "# belongs to the cluster's ingress (README, 'Scaling out').",
        "disable_token_authorization=true",
        "max_request_size=20971520",
        "default_workers_per_model=1",
        f"model_snapshot={json.dumps(model_snapshot(mars))}",
    ]
    return "\n".join(lines) + "\n"


def serving_runtime(name: str, image: str) -> dict:
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": {"name": name},
        "spec": {
            "annotations": {"prometheus.kserve.io/port": "8082", "prometheus.kserve.io/path": "/metrics"},
            "supportedModelFormats": [{"name": "pytorch", "version": "1", "autoSelect": False}],
            "protocolVersions": ["v1", "v2"],
            "containers": [
                {
                    "name": "kserve-container",
                    "image": image,
                    "args": [
                        "torchserve",
                        "--start",
                        "--foreground",
                        f"--model-store={MOUNT}/model-store",
                        f"--ts-config={MOUNT}/config/config.properties",
                        f"--log-config={MOUNT}/config/log4j2.xml",
                    ],
                    "env": [{"name": "TS_SERVICE_ENVELOPE", "value": "{{.Labels.serviceEnvelope}}"}],
                    "ports": [{"containerPort": 8085, "protocol": "TCP"}],
                    "resources": {
                        "requests": {"cpu": "2", "memory": "4Gi"},
                        "limits": {"cpu": "2", "memory": "4Gi"},
                    },
                }
            ],
        },
    }


def inference_service(name: str, runtime: str, storage_uri: str, protocol: str) -> dict:
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": name},
        "spec": {
            "predictor": {
                "model": {
                    "modelFormat": {"name": "pytorch"},
                    "runtime": runtime,
                    "protocolVersion": protocol,
                    "storageUri": storage_uri,
                }
            }
        },
    }


def layout(
    model_store: Path,
    out: Path,
    image: str,
    storage_uri: str,
    protocol: str = "v2",
    name: str = "image-classifiers",
) -> Path:
    mars = sorted(model_store.glob("*.mar"))
    if not mars:
        raise FileNotFoundError(f"no .mar files in {model_store}/: run make archive first")
    for mar in mars:
        verify_archive(mar)
    if out.exists():
        shutil.rmtree(out)
    (out / "config").mkdir(parents=True)
    (out / "model-store").mkdir()
    for f in (*mars, model_store / SUMS_FILE):
        shutil.copy2(f, out / "model-store" / f.name)
    (out / "config" / "config.properties").write_text(config_properties(mars, protocol))
    shutil.copy2(ROOT / "serving" / "metrics.yaml", out / "config" / "metrics.yaml")
    # serving/log4j2.xml: TorchServe's default logging cost ~35% of ResNet50's throughput here.
    shutil.copy2(ROOT / "serving" / "log4j2.xml", out / "config" / "log4j2.xml")
    runtime = f"{name}-torchserve"
    (out / "servingruntime.yaml").write_text(yaml.safe_dump(serving_runtime(runtime, image), sort_keys=False))
    (out / "inferenceservice.yaml").write_text(
        yaml.safe_dump(inference_service(name, runtime, storage_uri, protocol), sort_keys=False)
    )
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="KServe layout and manifests for the archives.")
    p.add_argument("--model-store", type=Path, default=Path("model_store"), help="folder of .mar files")
    p.add_argument("--out", type=Path, default=Path("build/kserve"), help="folder to write (replaced)")
    p.add_argument("--image", default="image-classifiers:0.1", help="the image built from the Dockerfile")
    p.add_argument(
        "--storage-uri",
        default="pvc://models/image-classifiers",
        help="where the content of --out will be uploaded (pvc://, s3://, gs://)",
    )
    p.add_argument("--protocol", choices=sorted(ENVELOPES), default="v2", help="KServe protocol version")
    p.add_argument("--name", default="image-classifiers", help="InferenceService name")
    a = p.parse_args(argv)
    try:
        out = layout(a.model_store, a.out, a.image, a.storage_uri, a.protocol, a.name)
    except (ArchiveMismatch, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}/: config/, model-store/, servingruntime.yaml, inferenceservice.yaml")


if __name__ == "__main__":
    main()

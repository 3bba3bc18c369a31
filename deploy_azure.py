"""Deploy modeles/model_final.onnx on an Azure ML managed online endpoint (azure-ai-ml SDK v2).

    python deploy_azure.py --dry-run      # no Azure account needed: checks and prints everything (CI runs this)
    az login
    python deploy_azure.py --subscription-id SUB --resource-group RG --workspace WS
    python deploy_azure.py --batch --dry-run   # the batch endpoint for a backlog of images (batch_score.py)

Steps: check the sidecar (format, ONNX file, sha256: inference.read_sidecar, what score.py will accept), copy the
model pair and the scoring code (score.py + the torch-free modules it imports) into azureml/build/{model,code}
(only those files are uploaded), build the endpoint and deployment with the SDK (ManagedOnlineEndpoint,
ManagedOnlineDeployment, Model, Environment, CodeConfiguration, OnlineRequestSettings, ProbeSettings), load
azureml/endpoint.yml and deployment.yml with the SDK and check they describe the same deployment (so `az ml online-deployment create -f azureml/deployment.yml`
deploys the same thing), print the specification. Without --dry-run, create or update the endpoint, the
deployment, and route the traffic to it.

--batch: a batch endpoint instead (BatchEndpoint, ModelBatchDeployment on an AmlCompute cluster that scales to
zero): batch_score.py + the modules it imports staged in STAGE/batch/{model,code}, the conda environment of the
online one minus the HTTP server plus Azure's batch runtime (STAGE/batch/environment.yml), one CSV line per image in
predictions.csv. Without --dry-run: create/update the cluster, the endpoint and the deployment, made the default.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
from pathlib import Path

import yaml

from lab_io import UserError, format_table, run_cli, sha256_file
from lab_targets import BATCH_COLUMNS

HERE = Path(__file__).resolve().parent
# The deployment this script builds; azureml/deployment.yml must say the same (checked on every run).
ENDPOINT_NAME = "tp4-mvtec-anomaly"
DEPLOYMENT_NAME = "blue"
# Azure ML's rule for endpoint and deployment names (azure-ai-ml's EndpointConfigurations): 3 to 32 characters, a
# letter first, then letters, digits and '-', not ending with '-'
AZURE_NAME = re.compile(r"[a-zA-Z]([-a-zA-Z0-9]{1,30})[a-zA-Z0-9]")
INSTANCE_TYPE = "Standard_DS3_v2"
INSTANCE_COUNT = 1
IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"
ENVIRONMENT_VARIABLES = {"WORKER_COUNT": "2", "TP4_ORT_THREADS": "2", "TP4_MAX_BODY_MB": "10", "TP4_MAX_IMAGES": "16"}
REQUEST_SETTINGS = {"request_timeout_ms": 10000, "max_concurrent_requests_per_instance": 2}
LIVENESS = {"initial_delay": 30, "period": 10, "timeout": 2, "failure_threshold": 30, "success_threshold": 1}
READINESS = {"initial_delay": 10, "period": 10, "timeout": 2, "failure_threshold": 3, "success_threshold": 1}
# score.py and the torch-free modules it imports: the only code uploaded (tests check the list is complete)
SCORING_CODE = ("score.py", "inference.py", "lab_io.py", "lab_targets.py")
# what score.py imports (onnxruntime or openvino, as the sidecar's engine says)
CONDA_PACKAGES = ("onnxruntime", "openvino", "numpy", "pillow", "safetensors", "azureml-inference-server-http")
STAGE_MARKER = ".staged_by_deploy_azure"
SDK_HINT = "pip install azure-ai-ml azure-identity (listed in requirements.txt)"

# The batch endpoint (--batch): one place for its cluster and its settings.
BATCH_ENDPOINT_NAME = "tp4-mvtec-batch"
BATCH_DEPLOYMENT_NAME = "classifier"
BATCH_CLUSTER = {"name": "tp4-cpu-cluster", "size": "Standard_DS3_v2",  # 4 vCPU, as the online instance
                 "min_instances": 0,  # no node (and no bill) between jobs; ~3-5 min to start one
                 "max_instances": 4, "idle_time_before_scale_down": 300}
BATCH_SETTINGS = {"mini_batch_size": 64,            # files per run() call: a retry re-scores at most 64 images
                  "instance_count": 2,              # nodes per job (<= max_instances)
                  "max_concurrency_per_instance": 2,  # run() processes per node, x TP4_ORT_THREADS = the 4 vCPU
                  "output_action": "append_row", "output_file_name": "predictions.csv",
                  "error_threshold": 0,  # bad images never fail (their row has the error): a failure is a real one
                  "logging_level": "info"}
# timeout: seconds per mini-batch. 64 images take ~2 s on one worker with the demo model (docs/guide.md, 900 px PNGs)
# and ~16 s with ViT-Base fp32 (deployment.yml: ~4 s per 16): a margin for slow nodes, a hung one is retried
BATCH_RETRY = {"max_retries": 3, "timeout": 300}
BATCH_ENVIRONMENT_VARIABLES = {"TP4_ORT_THREADS": "2"}  # TP4_MAX_PIXELS: score.py's default
# batch_score.py and the torch-free modules it imports (no HTTP server): the only code uploaded
BATCH_SCORING_CODE = ("batch_score.py", "inference.py", "lab_io.py", "lab_targets.py")
HTTP_SERVER_PACKAGE = "azureml-inference-server-http"
BATCH_RUNTIME_PACKAGES = ("azureml-core", "azureml-dataset-runtime[fuse]")  # required by Azure's batch runtime


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", default="modeles", help="folder holding the ONNX model and its sidecar")
    p.add_argument("--sidecar", default="model_final.json",
                   help="sidecar JSON written by onnx_optimization.py (a name in --models-dir, or a path)")
    p.add_argument("--detector", default=None, metavar="SAFETENSORS",
                   help="also ship the good-only detector of the same category (modeles/detector_<category>"
                        ".safetensors and its backbone, from anomaly_detector.py): score.py then answers ?maps=1")
    p.add_argument("--config-dir", default=str(HERE / "azureml"),
                   help="folder with endpoint.yml, deployment.yml, environment.yml")
    p.add_argument("--stage-dir", default=None,
                   help="where the files to upload are copied (default: CONFIG_DIR/build, where deployment.yml "
                        "points)")
    p.add_argument("--dry-run", action="store_true",
                   help="check and print the deployment without contacting Azure (no credentials needed)")
    p.add_argument("--subscription-id", default=os.environ.get("AZURE_SUBSCRIPTION_ID"),
                   help="Azure subscription id (default: $AZURE_SUBSCRIPTION_ID)")
    p.add_argument("--resource-group", default=os.environ.get("AZURE_RESOURCE_GROUP"),
                   help="resource group of the Azure ML workspace (default: $AZURE_RESOURCE_GROUP)")
    p.add_argument("--workspace", default=os.environ.get("AZUREML_WORKSPACE"),
                   help="Azure ML workspace name (default: $AZUREML_WORKSPACE)")
    p.add_argument("--endpoint-name", default=None,
                   help=f"endpoint name, unique in the Azure region (default: endpoint.yml's, {ENDPOINT_NAME})")
    p.add_argument("--deployment-name", default=None, help=f"deployment name (default: {DEPLOYMENT_NAME})")
    p.add_argument("--instance-type", default=None, help=f"VM size (default: {INSTANCE_TYPE})")
    p.add_argument("--instance-count", type=int, default=None, help=f"number of VMs (default: {INSTANCE_COUNT})")
    p.add_argument("--traffic", type=int, default=100,
                   help="percentage of the endpoint's traffic sent to this deployment once it is up (0-100)")
    p.add_argument("--batch", action="store_true",
                   help="deploy batch_score.py on a batch endpoint (a compute cluster scoring a folder of images, "
                        "for a backlog) instead of the online endpoint; --instance-type is then the cluster's VM "
                        "size and --instance-count the nodes per job")
    p.add_argument("--mini-batch-size", type=int, default=None,
                   help=f"--batch: files per run() call (default: {BATCH_SETTINGS['mini_batch_size']})")
    args = p.parse_args(argv)
    if not 0 <= args.traffic <= 100:
        raise UserError("--traffic must be between 0 and 100.")
    if args.instance_count is not None and args.instance_count < 1:
        raise UserError("--instance-count must be >= 1.")
    if args.mini_batch_size is not None and (not args.batch or args.mini_batch_size < 1):
        raise UserError("--mini-batch-size must be >= 1 and goes with --batch.")
    if args.batch and (args.instance_count or 0) > BATCH_CLUSTER["max_instances"]:
        raise UserError(f"--instance-count {args.instance_count} exceeds the cluster's max_instances "
                        f"({BATCH_CLUSTER['max_instances']}, BATCH_CLUSTER in deploy_azure.py).")
    if args.batch and args.detector:
        raise UserError("--detector goes with the online endpoint (maps on request), not with --batch.")
    return args


# --------------------------------------------------------------------------------------------------
# Local checks: model, staging, YAML
# --------------------------------------------------------------------------------------------------
def check_model(models_dir: str, sidecar: str) -> tuple[Path, dict]:
    """The sidecar's path and content, as score.py's init() will read it (inference.read_sidecar: format, ONNX file,
    sha256)."""
    from inference import read_sidecar

    path = Path(sidecar) if Path(sidecar).is_absolute() or Path(sidecar).parent != Path(".") \
        else Path(models_dir) / sidecar
    if not path.is_file():
        raise UserError(f"sidecar {path} not found: run onnx_optimization.py first (it writes "
                        f"{Path(models_dir) / 'model_final.onnx'} and model_final.json).")
    try:
        return path, read_sidecar(path)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None


def check_detector(path: str, meta: dict):
    """The detector as score.py will load it (bank, config, backbone with its sha256), of the model's category."""
    from inference import PatchDetector

    detector = PatchDetector(Path(path))
    if detector.info["category"] != meta["category"]:
        raise UserError(f"--detector {path} is fitted on {detector.info['category']}, the model on "
                        f"{meta['category']}: ship the detector of the same category.")
    return detector


def stage(meta: dict, sidecar_path: Path, stage_dir: Path, detector=None, code: tuple = SCORING_CODE) -> dict:
    """Copy the model pair (and the detector's files) to STAGE/model and `code` to STAGE/code (earlier copies
    replaced)."""
    out = {"model": stage_dir / "model", "code": stage_dir / "code"}
    marker = stage_dir / STAGE_MARKER
    if any(folder.exists() for folder in out.values()) and not marker.exists():
        raise UserError(f"{stage_dir} already has a model/ or code/ folder that deploy_azure.py did not create: "
                        "choose another --stage-dir.")
    for folder in out.values():
        if folder.exists():
            shutil.rmtree(folder)  # our own earlier copy (marker present)
        folder.mkdir(parents=True)
    marker.write_text("model/ and code/ here are copies made by deploy_azure.py, replaced on every run\n")
    model_copy = shutil.copy2(meta["model_path"], out["model"] / Path(meta["model_path"]).name)
    copies = [(model_copy, meta["sha256"])]
    if meta.get("weights_file"):  # an OpenVINO IR: the .xml and its .bin weights
        weights = Path(meta["model_path"]).with_name(meta["weights_file"])
        copies.append((shutil.copy2(weights, out["model"] / weights.name), meta["weights_sha256"]))
    shutil.copy2(sidecar_path, out["model"] / sidecar_path.name)
    if detector is not None:  # score.py finds it by name: detector_<category>.safetensors
        files = [Path(detector.meta["model_path"]), Path(detector.meta["backbone_path"])]
        if files[1].suffix == ".xml":
            files.append(files[1].with_suffix(".bin"))
        names = [f"detector_{meta['category']}.safetensors", files[1].name] + [f.name for f in files[2:]]
        for src, name in zip(files, names):
            shutil.copy2(src, out["model"] / name)
    for name in code:
        shutil.copy2(HERE / name, out["code"] / name)
    for copy, digest in copies:
        if sha256_file(copy) != digest:
            raise UserError(f"the copy {copy} does not match the sidecar's sha256 (disk full?).")
    return out


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found (the azureml/ folder of the lab is incomplete).")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path} must be a YAML mapping.")
    return doc


def check_yaml(config_dir: Path) -> dict:
    """Structure checks that need no SDK; returns the three documents."""
    docs = {name: read_yaml(config_dir / f"{name}.yml") for name in ("endpoint", "deployment", "environment")}
    dep = docs["deployment"]
    for key in ("name", "endpoint_name", "model", "code_configuration", "environment", "instance_type"):
        if key not in dep:
            raise UserError(f"{config_dir / 'deployment.yml'} lacks '{key}'.")
    if dep["endpoint_name"] != docs["endpoint"].get("name"):
        raise UserError(f"deployment.yml targets endpoint {dep['endpoint_name']!r} but endpoint.yml is named "
                        f"{docs['endpoint'].get('name')!r}.")
    conda_file = (config_dir / dep["environment"].get("conda_file", "")).resolve()
    if conda_file != (config_dir / "environment.yml").resolve():
        raise UserError(f"deployment.yml's environment must use environment.yml, not {conda_file}.")
    pip = [d["pip"] for d in docs["environment"].get("dependencies", []) if isinstance(d, dict) and "pip" in d]
    names = {str(req).split("=")[0].split("<")[0].split(">")[0].split("~")[0].strip().lower()
             for req in (pip[0] if pip else [])}
    missing = [name for name in CONDA_PACKAGES if name not in names]
    if missing:
        raise UserError(f"environment.yml lacks the pip package(s) {', '.join(missing)} that score.py needs.")
    if not any(str(d).startswith("python") for d in docs["environment"].get("dependencies", [])):
        raise UserError("environment.yml must pin python (e.g. python=3.11).")
    return docs


# --------------------------------------------------------------------------------------------------
# SDK entities
# --------------------------------------------------------------------------------------------------
def import_sdk():
    try:
        from azure.ai import ml  # noqa: F401, PLC0415
    except ImportError:
        return None
    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
    return True


def build_entities(args, meta: dict, staged: dict, config_dir: Path):
    """The endpoint and deployment, built in Python with the SDK's entity classes."""
    from azure.ai.ml.entities import (CodeConfiguration, Environment, ManagedOnlineDeployment,  # noqa: PLC0415
                                      ManagedOnlineEndpoint, Model, OnlineRequestSettings, ProbeSettings)

    endpoint_name = args.endpoint_name or ENDPOINT_NAME
    endpoint = ManagedOnlineEndpoint(
        name=endpoint_name, auth_mode="key", tags={"project": "tp4-optimisation"},
        description="MVTec AD good/anomaly classifier (ViT fine-tuned, ONNX Runtime) - TP Jour 4")
    model = Model(path=str(staged["model"]), type="custom_model",
                  description=f"{meta['category']} {meta['variant']} (sha256 {meta['sha256'][:12]})",
                  tags={"variant": str(meta["variant"]), "category": str(meta["category"]),
                        "sha256": str(meta["sha256"])})
    environment = Environment(image=IMAGE, conda_file=str(config_dir / "environment.yml"))
    deployment = ManagedOnlineDeployment(
        name=args.deployment_name or DEPLOYMENT_NAME, endpoint_name=endpoint_name, model=model,
        environment=environment,
        code_configuration=CodeConfiguration(code=str(staged["code"]), scoring_script="score.py"),
        instance_type=args.instance_type or INSTANCE_TYPE, instance_count=args.instance_count or INSTANCE_COUNT,
        environment_variables=dict(ENVIRONMENT_VARIABLES),
        request_settings=OnlineRequestSettings(**REQUEST_SETTINGS),
        liveness_probe=ProbeSettings(**LIVENESS), readiness_probe=ProbeSettings(**READINESS))
    return endpoint, deployment


def load_yaml_entities(config_dir: Path):
    from azure.ai.ml import load_online_deployment, load_online_endpoint  # noqa: PLC0415

    try:
        return (load_online_endpoint(config_dir / "endpoint.yml"),
                load_online_deployment(config_dir / "deployment.yml"))
    except Exception as exc:  # marshmallow ValidationError, azure ValidationException: report as one line
        text = " ".join(str(exc).split())
        raise UserError(f"the SDK rejects {config_dir}/endpoint.yml or deployment.yml: {text[:600]}") from None


def _resolve(base, path) -> str:
    return str((Path(base or ".") / str(path)).resolve())


def flatten(endpoint, deployment) -> dict:
    """What matters in a deployment, as comparable values."""
    d = deployment
    flat = {"endpoint.name": endpoint.name, "endpoint.auth_mode": endpoint.auth_mode,
            "deployment.name": d.name, "deployment.endpoint_name": d.endpoint_name,
            "instance_type": d.instance_type, "instance_count": d.instance_count,
            "model.path": _resolve(d.base_path, d.model.path), "model.type": d.model.type,
            "code": _resolve(d.base_path, d.code_configuration.code),
            "scoring_script": d.code_configuration.scoring_script,
            "environment.image": d.environment.image, "environment.conda": d.environment.conda_file,
            "environment_variables": dict(d.environment_variables or {})}
    for key in ("request_timeout_ms", "max_concurrent_requests_per_instance"):
        flat[f"request_settings.{key}"] = getattr(d.request_settings, key, None)
    for probe in ("liveness_probe", "readiness_probe"):
        for key in LIVENESS:
            flat[f"{probe}.{key}"] = getattr(getattr(d, probe), key, None)
    return flat


def compare(from_yaml: dict, from_code: dict, overridden: set) -> list[str]:
    return [f"{key}: YAML {from_yaml.get(key)!r} != script {from_code.get(key)!r}" for key in from_code
            if key not in overridden and from_yaml.get(key) != from_code.get(key)]


# --------------------------------------------------------------------------------------------------
# Real deployment
# --------------------------------------------------------------------------------------------------
def ml_client(args):
    from azure.ai.ml import MLClient  # noqa: PLC0415
    from azure.core.exceptions import ClientAuthenticationError  # noqa: PLC0415
    from azure.identity import CredentialUnavailableError, DefaultAzureCredential  # noqa: PLC0415

    credential = DefaultAzureCredential()
    try:
        credential.get_token("https://management.azure.com/.default")
    except (ClientAuthenticationError, CredentialUnavailableError) as exc:
        raise UserError(f"no usable Azure credentials ({' '.join(str(exc).split())[:200]}): run `az login` "
                        "first.") from None
    return MLClient(credential, args.subscription_id, args.resource_group, args.workspace)


def deploy(args, endpoint, deployment) -> None:
    from azure.core.exceptions import AzureError  # noqa: PLC0415

    client = ml_client(args)
    try:
        print(f"creating/updating endpoint {endpoint.name} ...")
        client.online_endpoints.begin_create_or_update(endpoint).result()
        print(f"creating/updating deployment {deployment.name} ({deployment.instance_type} x "
              f"{deployment.instance_count}); building the environment can take 10-20 minutes ...")
        client.online_deployments.begin_create_or_update(deployment).result()
        endpoint = client.online_endpoints.get(endpoint.name)
        endpoint.traffic = {**(endpoint.traffic or {}), deployment.name: args.traffic}
        client.online_endpoints.begin_create_or_update(endpoint).result()
        endpoint = client.online_endpoints.get(endpoint.name)
    except AzureError as exc:
        raise UserError(f"Azure refused the deployment: {' '.join(str(exc).split())[:500]}") from None
    print(f"\nendpoint {endpoint.name} ready, traffic {endpoint.traffic}\nscoring URI: {endpoint.scoring_uri}")
    print(f"key: az ml online-endpoint get-credentials -n {endpoint.name} -g {args.resource_group} "
          f"-w {args.workspace}")
    print(f"load test: python load_test.py --url {endpoint.scoring_uri} --key <key> --concurrency 1,2,4")
    print(f"delete it when done (billed per hour): az ml online-endpoint delete -n {endpoint.name} "
          f"-g {args.resource_group} -w {args.workspace} --yes")


# --------------------------------------------------------------------------------------------------
# The batch endpoint (--batch)
# --------------------------------------------------------------------------------------------------
def _package_name(requirement) -> str:
    return str(requirement).split("=")[0].split("<")[0].split(">")[0].split("~")[0].split("[")[0].strip().lower()


def batch_environment(online_env: dict) -> dict:
    """environment.yml (the online endpoint's, versions pinned there) minus the HTTP server, plus Azure's batch
    runtime: the same engine and libraries score the images online and in batch."""
    dependencies = []
    for dep in online_env.get("dependencies", []):
        if isinstance(dep, dict) and "pip" in dep:
            pip = [r for r in dep["pip"] if _package_name(r) != HTTP_SERVER_PACKAGE]
            dep = {"pip": pip + [r for r in BATCH_RUNTIME_PACKAGES if _package_name(r) not in map(_package_name, pip)]}
        dependencies.append(dep)
    return {**online_env, "name": "tp4-onnx-batch-scoring", "dependencies": dependencies}


def build_batch_entities(args, meta: dict, staged: dict, conda_file: Path):
    """The cluster, the batch endpoint and its deployment, built with the SDK's entity classes."""
    from azure.ai.ml.entities import (AmlCompute, BatchEndpoint, BatchRetrySettings,  # noqa: PLC0415
                                      CodeConfiguration, Environment, Model, ModelBatchDeployment,
                                      ModelBatchDeploymentSettings)

    cluster = AmlCompute(**{**BATCH_CLUSTER, "size": args.instance_type or BATCH_CLUSTER["size"]})
    endpoint_name = args.endpoint_name or BATCH_ENDPOINT_NAME
    endpoint = BatchEndpoint(name=endpoint_name, tags={"project": "tp4-optimisation"},
                             description="MVTec AD good/anomaly classifier, batch scoring of image folders - TP Jour 4")
    model = Model(path=str(staged["model"]), type="custom_model",
                  description=f"{meta['category']} {meta['variant']} (sha256 {meta['sha256'][:12]})",
                  tags={"variant": str(meta["variant"]), "category": str(meta["category"]),
                        "sha256": str(meta["sha256"])})
    settings = {**BATCH_SETTINGS, "instance_count": args.instance_count or BATCH_SETTINGS["instance_count"],
                "mini_batch_size": args.mini_batch_size or BATCH_SETTINGS["mini_batch_size"]}
    deployment = ModelBatchDeployment(
        name=args.deployment_name or BATCH_DEPLOYMENT_NAME, endpoint_name=endpoint_name, model=model,
        environment=Environment(image=IMAGE, conda_file=str(conda_file)),
        code_configuration=CodeConfiguration(code=str(staged["code"]), scoring_script="batch_score.py"),
        compute=cluster.name,
        settings=ModelBatchDeploymentSettings(**settings, retry_settings=BatchRetrySettings(**BATCH_RETRY),
                                              environment_variables=dict(BATCH_ENVIRONMENT_VARIABLES)))
    return cluster, endpoint, deployment


def batch_spec(cluster, endpoint, deployment) -> dict:
    """What matters in a batch deployment, read back from the SDK entities."""
    s = deployment.settings
    return {"endpoint.name": endpoint.name, "deployment.name": deployment.name,
            "compute.name": cluster.name, "compute.size": cluster.size,
            "compute.min_instances": cluster.min_instances, "compute.max_instances": cluster.max_instances,
            "compute.idle_time_before_scale_down": cluster.idle_time_before_scale_down,
            "instance_count": s.instance_count, "max_concurrency_per_instance": s.max_concurrency_per_instance,
            "mini_batch_size": s.mini_batch_size, "retry_settings.max_retries": s.retry_settings.max_retries,
            "retry_settings.timeout": s.retry_settings.timeout, "output_action": s.output_action,
            "output_file_name": s.output_file_name, "error_threshold": s.error_threshold,
            "logging_level": s.logging_level, "scoring_script": deployment.code_configuration.scoring_script,
            "environment.image": deployment.environment.image,
            "environment_variables": dict(s.environment_variables or {})}


def dump_yaml(entity, path: Path) -> None:
    """The SDK's own serialisation of an entity (it fails on an invalid one), as plain YAML."""
    path.write_text(yaml.safe_dump(json.loads(json.dumps(entity._to_dict())), sort_keys=False), "utf-8")


def deploy_batch(args, cluster, endpoint, deployment) -> None:
    from azure.core.exceptions import AzureError  # noqa: PLC0415

    client = ml_client(args)
    try:
        print(f"creating/updating compute cluster {cluster.name} ({cluster.size}, {cluster.min_instances}-"
              f"{cluster.max_instances} nodes) ...")
        client.compute.begin_create_or_update(cluster).result()
        print(f"creating/updating batch endpoint {endpoint.name} ...")
        client.batch_endpoints.begin_create_or_update(endpoint).result()
        print(f"creating/updating batch deployment {deployment.name}; building the environment can take 10-20 "
              "minutes ...")
        client.batch_deployments.begin_create_or_update(deployment).result()
        endpoint = client.batch_endpoints.get(endpoint.name)
        endpoint.defaults.deployment_name = deployment.name
        client.batch_endpoints.begin_create_or_update(endpoint).result()
    except AzureError as exc:
        raise UserError(f"Azure refused the batch deployment: {' '.join(str(exc).split())[:500]}") from None
    where = f"-g {args.resource_group} -w {args.workspace}"
    print(f"\nbatch endpoint {endpoint.name} ready, default deployment {deployment.name}")
    print(f"score a folder: az ml batch-endpoint invoke -n {endpoint.name} {where} --input <folder of images> "
          "--input-type uri_folder")
    print(f"results: az ml job download -n <job name> {where} --output-name score  "
          f"(-> {deployment.settings.output_file_name}, one line per image: {', '.join(BATCH_COLUMNS)})")


def main_batch(args, config_dir: Path, stage_dir: Path) -> int:
    sidecar_path, meta = check_model(args.models_dir, args.sidecar)
    online_env = read_yaml(config_dir / "environment.yml")
    env = batch_environment(online_env)
    pip = next((d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d), [])
    missing = [name for name in CONDA_PACKAGES if name != HTTP_SERVER_PACKAGE and name not in map(_package_name, pip)]
    if missing:
        raise UserError(f"{config_dir / 'environment.yml'} lacks the pip package(s) {', '.join(missing)} that "
                        "batch_score.py needs.")
    batch_dir = stage_dir / "batch"
    staged = stage(meta, sidecar_path, batch_dir, code=BATCH_SCORING_CODE)
    conda_file = batch_dir / "environment.yml"
    conda_file.write_text("# written by deploy_azure.py --batch from environment.yml: no HTTP server, Azure's batch "
                          "runtime\n" + yaml.safe_dump(env, sort_keys=False), "utf-8")
    print(f"model {meta['model_path']} (variant {meta['variant']}, category {meta['category']}, sha256 "
          f"{meta['sha256'][:12]}... verified), the batch scoring code ({', '.join(BATCH_SCORING_CODE)}) and "
          f"environment.yml staged in {batch_dir}")
    if not import_sdk():
        if not args.dry_run:
            raise UserError(f"the azure-ai-ml SDK is not installed: {SDK_HINT}.")
        print(f"note: azure-ai-ml is not installed ({SDK_HINT}): SDK entities not built.")
        print(format_table([{"setting": k, "value": v} for k, v in {**BATCH_CLUSTER, **BATCH_SETTINGS,
                                                                    **BATCH_RETRY}.items()], ["setting", "value"]))
        return 0

    cluster, endpoint, deployment = build_batch_entities(args, meta, staged, conda_file)
    for name, entity in (("batch-compute", cluster), ("batch-endpoint", endpoint),
                         ("batch-deployment", deployment)):
        dump_yaml(entity, batch_dir / f"{name}.generated.yml")
    spec = batch_spec(cluster, endpoint, deployment)
    rows = [{"setting": k, "value": v if not isinstance(v, dict) else ", ".join(f"{a}={b}" for a, b in v.items())}
            for k, v in spec.items()]
    print(format_table(rows, ["setting", "value"]))
    print(f"output: one line per image ({', '.join(BATCH_COLUMNS)}); full specification: "
          f"{batch_dir}/batch-deployment.generated.yml")
    if args.dry_run:
        print("dry run: nothing sent to Azure. Deploy with --batch --subscription-id/--resource-group/--workspace "
              "after `az login`.")
        return 0
    deploy_batch(args, cluster, endpoint, deployment)
    return 0


# --------------------------------------------------------------------------------------------------
def check_azure_names(args) -> None:
    """A name Azure would refuse after the upload is refused here, --dry-run included."""
    for flag, value in (("--endpoint-name", args.endpoint_name), ("--deployment-name", args.deployment_name)):
        if value is not None and not AZURE_NAME.fullmatch(value):
            raise UserError(f"{flag} {value!r} is not a name Azure ML accepts: 3 to 32 characters, a letter first, "
                            "then letters, digits or '-', not ending with '-' (e.g. tp4-mvtec-bottle)")


def main(argv=None) -> int:
    args = parse_args(argv)
    check_azure_names(args)
    config_dir = Path(args.config_dir).resolve()
    stage_dir = Path(args.stage_dir).resolve() if args.stage_dir else config_dir / "build"
    if not args.dry_run:
        missing = [flag for flag, value in (("--subscription-id", args.subscription_id),
                                            ("--resource-group", args.resource_group),
                                            ("--workspace", args.workspace)) if not value]
        if missing:
            raise UserError(f"a real deployment needs {', '.join(missing)} (and `az login`); use --dry-run to "
                            "check everything without Azure.")
    if args.batch:
        return main_batch(args, config_dir, stage_dir)

    sidecar_path, meta = check_model(args.models_dir, args.sidecar)
    docs = check_yaml(config_dir)
    detector = check_detector(args.detector, meta) if args.detector else None
    staged = stage(meta, sidecar_path, stage_dir, detector)
    print(f"model {meta['model_path']} (variant {meta['variant']}, category {meta['category']}, sha256 "
          f"{meta['sha256'][:12]}... verified) and the scoring code ({', '.join(SCORING_CODE)}) staged in "
          f"{stage_dir}")
    if detector is not None:
        print(f"detector {args.detector} ({detector.info['variant']}, backbone "
              f"{Path(detector.meta['backbone_path']).name}, sha256 verified) staged: score.py answers ?maps=1")

    if not import_sdk():
        if not args.dry_run:
            raise UserError(f"the azure-ai-ml SDK is not installed: {SDK_HINT}.")
        print(f"note: azure-ai-ml is not installed ({SDK_HINT}): YAML files checked with PyYAML only, "
              "SDK entities not built.")
        print(format_table([{"setting": k, "value": v} for k, v in docs["deployment"].items()
                            if not isinstance(v, dict)], ["setting", "value"]))
        return 0

    endpoint, deployment = build_entities(args, meta, staged, config_dir)
    yaml_endpoint, yaml_deployment = load_yaml_entities(config_dir)
    from_code, from_yaml = flatten(endpoint, deployment), flatten(yaml_endpoint, yaml_deployment)
    overridden = {key for flag, key in ((args.endpoint_name, "endpoint.name"),
                                        (args.endpoint_name, "deployment.endpoint_name"),
                                        (args.deployment_name, "deployment.name"),
                                        (args.instance_type, "instance_type"),
                                        (args.instance_count, "instance_count")) if flag}
    if stage_dir != config_dir / "build":  # deployment.yml points at CONFIG_DIR/build
        overridden |= {"model.path", "code"}
    differences = compare(from_yaml, from_code, overridden)
    if differences:
        raise UserError(f"{config_dir}/deployment.yml and deploy_azure.py disagree: {'; '.join(differences)}")

    # The SDK's own serialisation (it fails on an invalid entity), kept for reading and for `az ml ... -f`.
    endpoint_spec = json.loads(json.dumps(endpoint.dump()))  # OrderedDicts -> plain dicts for safe_dump
    (stage_dir / "endpoint.generated.yml").write_text(yaml.safe_dump(endpoint_spec, sort_keys=False), "utf-8")
    (stage_dir / "deployment.generated.yml").unlink(missing_ok=True)
    deployment.dump(stage_dir / "deployment.generated.yml")
    rows = [{"setting": k, "value": v if not isinstance(v, dict) else ", ".join(f"{a}={b}" for a, b in v.items())}
            for k, v in from_code.items() if k != "environment.conda"]
    print(format_table(rows, ["setting", "value"]))
    print(f"SDK entities built; azureml/endpoint.yml and deployment.yml loaded with the SDK and identical on "
          f"{len(from_code) - len(overridden)} settings; full specification: {stage_dir}/deployment.generated.yml")
    if args.dry_run:
        print("dry run: nothing sent to Azure. Deploy with --subscription-id/--resource-group/--workspace after "
              "`az login`, or: az ml online-endpoint create -f azureml/endpoint.yml && "
              "az ml online-deployment create -f azureml/deployment.yml --all-traffic")
        return 0
    deploy(args, endpoint, deployment)
    return 0


if __name__ == "__main__":
    run_cli(main)

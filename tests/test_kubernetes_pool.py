"""The gpu pool as a Kubernetes pool: flows/deploy.py's base job template, checked by prefect-kubernetes' own
code the way a Kubernetes worker uses it. No cluster runs here: the test stops at the Job manifest the
worker would submit (docs/production.md says so too)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import pytest
from conftest import REPO, tiny_params, write_params
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun
from prefect.server.schemas.actions import WorkPoolCreate
from prefect.utilities.schema_tools import ValidationError, validate
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

from flows import deploy
from lmline import config

IMAGE = "registry.example/lmline:3f2a1c0"


def render(template: dict, job_variables: dict) -> dict:
    """The Job manifest a Kubernetes worker submits for a flow run with these job variables.

    from_template_and_values takes a client only to resolve {{ prefect.blocks/variables }} references;
    the template has none, so a real client pointed at a closed port is never called (a call would fail)."""
    validate(job_variables, template["variables"], raise_on_error=True, preprocess=True, ignore_required=True)
    client = PrefectClient(api="http://127.0.0.1:9/api")
    job = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, job_variables, client=client))
    job.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="pretrain-3f2a1c0"))
    return job.job_manifest


def routed_env(template: dict) -> dict:
    """What flows.stage_task.job_env passes as a routed run's `env`: the pool's default env plus MLflow nesting."""
    return {
        **template["variables"]["properties"]["env"]["default"],
        "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
        "LMLINE_PARENT_RUN_ID": "0123abcd",
    }


def test_gpu_pool_template_renders_a_job_with_the_gpus_env_and_image():
    template = deploy.kubernetes_gpu_job_template(config.WorkPoolsConfig(gpu_devices="2,3"), image=IMAGE)
    WorkPoolCreate(name="gpu", type="kubernetes", base_job_template=template)  # what the server checks

    manifest = render(template, {"env": routed_env(template)})

    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert container["image"] == IMAGE
    env = {e["name"]: e["value"] for e in container["env"]}
    # the pod sees its two GPUs as 0 and 1, whatever the host calls them
    assert {
        k: env.get(k)
        for k in ("CUDA_VISIBLE_DEVICES", "LMLINE_WORKSPACE", "MLFLOW_TRACKING_URI", "LMLINE_PARENT_RUN_ID")
    } == {
        "CUDA_VISIBLE_DEVICES": "0,1",
        "LMLINE_WORKSPACE": "/workspace",
        "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
        "LMLINE_PARENT_RUN_ID": "0123abcd",
    }
    assert container["args"] == ["prefect", "flow-run", "execute"]
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert toleration in manifest["spec"]["template"]["spec"]["tolerations"]
    assert manifest["kind"] == "Job" and manifest["metadata"]["namespace"] == "default"


def test_a_deployment_can_override_gpus_and_image():
    template = deploy.kubernetes_gpu_job_template(config.WorkPoolsConfig())
    assert template["variables"]["properties"]["gpus"]["default"] == 1

    manifest = render(template, {"env": routed_env(template), "gpus": 4, "image": "other/lmline:2"})

    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 4} and container["image"] == "other/lmline:2"
    with pytest.raises(ValidationError, match="0 is less than the minimum of 1"):
        render(template, {"gpus": 0})  # the variable's schema: at least one GPU


def test_template_is_printed_for_prefect_work_pool_create(tmp_path):
    write_params(tmp_path / "params.yaml", tiny_params(orchestration={"work_pools": {"gpu_devices": "0,1,2"}}))
    out = subprocess.run(
        [sys.executable, "-m", "flows.deploy", "kubernetes-template", "--image", IMAGE],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    template = json.loads(out.stdout)
    assert template == deploy.kubernetes_gpu_job_template(config.WorkPoolsConfig(gpu_devices="0,1,2"), image=IMAGE)

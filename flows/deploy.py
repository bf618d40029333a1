"""`lmline deploy`: create the work pools if missing, then register prefect.yaml's deployments.

prefect.yaml reads its pool names, schedule and trigger from {{ $LMLINE_* }} variables; this module
sets them from params.yaml's `orchestration` section, so params.yaml stays the one place for knobs.

Prefect's modules (and flows.routing, which imports them) are imported inside the functions that use
them: the `lmline` command imports this module at start-up, and Prefect takes a second to import.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from lmline import config
from lmline.errors import LmlineError


def pool_job_template(kind: str, pools: config.WorkPoolsConfig) -> dict:
    """A process pool's base job template; the gpu pool's default env pins its device(s)."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    if kind == "gpu":
        template["variables"]["properties"]["env"]["default"] = {"CUDA_VISIBLE_DEVICES": pools.gpu_devices}
    return template


GPU_RESOURCE = "nvidia.com/gpu"  # what NVIDIA's Kubernetes device plugin calls a GPU


def kubernetes_gpu_job_template(pools: config.WorkPoolsConfig, image: str | None = None) -> dict:
    """The gpu pool as a Kubernetes pool (not run on a cluster here: docs/production.md): prefect-kubernetes'
    own default base job template plus a GPU limit, the pod's CUDA_VISIBLE_DEVICES and lmline's image.

    The pod gets as many GPUs as work_pools.gpu_devices lists. The device plugin shows a pod only its
    own GPUs, numbered from 0, so CUDA_VISIBLE_DEVICES counts from 0 whatever the host's numbers are.
    Like the process pool's, it is the default `env`, which routing merges into each run's env
    (MLFLOW_TRACKING_URI, LMLINE_PARENT_RUN_ID); LMLINE_WORKSPACE is where the image holds its clone."""
    try:
        from prefect_kubernetes.worker import KubernetesWorker
    except ImportError:
        raise LmlineError("the Kubernetes template needs prefect-kubernetes: pip install -e '.[kubernetes]'") from None

    from flows.routing import WORKSPACE_ENV

    template = KubernetesWorker.get_default_base_job_template()
    variables = template["variables"]["properties"]
    gpus = len(pools.gpu_devices.split(","))
    variables["gpus"] = {
        "title": "GPUs",
        "type": "integer",
        "minimum": 1,
        "default": gpus,
        "description": f"{GPU_RESOURCE} limit of the flow run's container (lmline: work_pools.gpu_devices)",
    }
    variables["env"]["default"] = {
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus)),
        WORKSPACE_ENV: "/workspace",
    }
    variables["image"]["default"] = image
    variables["image"]["description"] = "lmline's image: the project installed, a clone of origin at $LMLINE_WORKSPACE"
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    pod["containers"][0]["resources"]["limits"][GPU_RESOURCE] = "{{ gpus }}"
    # GPU nodes are commonly tainted so that only pods asking for GPUs land there
    pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return template


def ensure_work_pools(pools: config.WorkPoolsConfig) -> dict[str, str]:
    """Create each missing pool as a process pool; an existing pool (say a Kubernetes one) is left as is."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    done = {}
    with get_client(sync_client=True) as client:
        for kind, name in (("cpu", pools.cpu), ("gpu", pools.gpu)):
            try:
                client.read_work_pool(name)
                done[name] = "exists"
            except ObjectNotFound:
                client.create_work_pool(
                    WorkPoolCreate(name=name, type="process", base_job_template=pool_job_template(kind, pools))
                )
                done[name] = "created"
    return done


def deploy_values(params: config.Params) -> dict[str, str]:
    """The {{ $LMLINE_* }} values prefect.yaml reads."""
    o = params.orchestration
    return {
        "LMLINE_PROJECT": params.project.name,
        "LMLINE_CPU_POOL": o.work_pools.cpu,
        "LMLINE_GPU_POOL": o.work_pools.gpu,
        "LMLINE_BRANCH": o.branch,
        "LMLINE_CRON": o.schedule.cron,
        "LMLINE_TIMEZONE": o.schedule.timezone,
        "LMLINE_SCHEDULE_ACTIVE": str(o.schedule.active).lower(),
        "LMLINE_TRIGGER_ENABLED": str(o.trigger.enabled).lower(),
        "LMLINE_TRIGGER_QUIET_SECONDS": f"PT{o.trigger.quiet_seconds}S",  # a string duration must be ISO 8601
    }


def deploy_env(params: config.Params) -> dict[str, str]:
    """The environment `prefect deploy` runs in: ours plus the values prefect.yaml reads."""
    return {**os.environ, **deploy_values(params)}


def deploy(params: config.Params, root: Path) -> dict:
    """Pools, then `prefect deploy --all` in the repo root; returns what was created or updated."""
    if not os.environ.get("PREFECT_API_URL"):
        raise LmlineError("lmline deploy needs a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    if not (root / "prefect.yaml").exists():
        raise LmlineError(f"{root / 'prefect.yaml'}: file not found (run lmline deploy in the repo root)")
    pools = ensure_work_pools(params.orchestration.work_pools)
    prefect = Path(sys.executable).parent / "prefect"
    out = subprocess.run(
        [str(prefect), "--no-prompt", "deploy", "--all"],
        cwd=root,
        env=deploy_env(params),
        capture_output=True,
        text=True,
    )
    if out.returncode:
        # Prefect's own message (often a wrapped validation error) ends its output, before pydantic's link
        lines = [
            line.strip()
            for line in (out.stdout + out.stderr).splitlines()
            if line.strip() and not line.strip().startswith("For further information")
        ]
        raise LmlineError(f"prefect deploy failed: {' '.join(lines[-3:]) or f'exit code {out.returncode}'}")
    return {"work_pools": pools, "deployments": re.findall(r"Deployment '([^']+)' successfully", out.stdout)}


def main(argv: list[str] | None = None) -> None:
    """`python -m flows.deploy kubernetes-template [--params FILE] [--image IMAGE]`: print the gpu pool's
    Kubernetes base job template, for `prefect work-pool create gpu --type kubernetes --base-job-template`."""
    parser = argparse.ArgumentParser(prog="python -m flows.deploy")
    parser.add_argument("what", choices=["kubernetes-template"])
    parser.add_argument("--params", default="params.yaml", help="the params file whose orchestration.work_pools to use")
    parser.add_argument("--image", help="lmline's container image (else set it per deployment: job variable `image`)")
    args = parser.parse_args(argv)
    params = config.load(args.params)
    print(json.dumps(kubernetes_gpu_job_template(params.orchestration.work_pools, args.image), indent=2))


if __name__ == "__main__":
    try:
        main()
    except LmlineError as exc:
        sys.exit(f"error: {exc}")

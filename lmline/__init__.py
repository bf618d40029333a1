"""lmline: train and ship small transformer language models as a DVC + Prefect + MLflow pipeline."""

import os

# Offline by design: never phone home or try a hub. The one list of these switches: processes lmline
# starts inherit them, and tests that start servers with an environment of their own use it too.
OFFLINE_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
# setdefault so a user can still opt back in
for _key, _value in {
    **OFFLINE_ENV,
    "TOKENIZERS_PARALLELISM": "false",  # we fork workers ourselves (datasets.map, datatrove)
}.items():
    os.environ.setdefault(_key, _value)

__version__ = "0.1.0"

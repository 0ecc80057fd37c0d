"""Regenerate the `serving` part of helm/qwen-serve/values.schema.json from serving/config.py.

The chart validates its embedded serving config with the same schema the CLI
uses; tests/test_deploy_chart.py fails when the two drift. Run after changing
the config schema:  .venv/bin/python scripts/sync_chart_schema.py
"""

import json
from pathlib import Path

from serving.config import DeploymentConfig

SCHEMA = Path(__file__).resolve().parent.parent / "helm" / "qwen-serve" / "values.schema.json"


def main() -> None:
    doc = json.loads(SCHEMA.read_text())
    config = DeploymentConfig.model_json_schema()
    defs = config.pop("$defs")
    chart_only = {k: v for k, v in doc["$defs"].items() if k not in defs and k != "DeploymentConfig"
                  and not k.endswith("Config")}
    doc["$defs"] = {**defs, "DeploymentConfig": config, **chart_only}
    SCHEMA.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()

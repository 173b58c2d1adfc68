"""A Lambda container image build context and its SAM template for one pack.

The context holds the pack (verified before it is copied), the trusted public key, the code the
handler needs (``modelpack`` and ``bentos``, no BentoML), a ``requirements.txt``, a
``Dockerfile`` with ``awslambdaric`` as the entrypoint, and ``template.yaml`` for
``sam build && sam deploy``: an HTTP API with ``POST /predict``, ``GET /metadata`` and the Open
Inference Protocol under ``/v2``, behind IAM auth by default (``api_auth="none"`` makes it
public), and a ``ReservedConcurrency`` parameter that caps how many environments may run.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelpack import load_pack

# The serving set of the handler: no bentoml, no onnx, no TensorFlow.
REQUIREMENTS = [
    "awslambdaric>=3,<4",
    "numpy>=1.26,<3",
    "onnxruntime==1.32.*",
    "pydantic>=2.7,<3",
    "cryptography>=42",
    "prometheus-client==0.26.*",
    "rich>=13",
]
CODE_PACKAGES = ("modelpack", "bentos")

DEFAULT_BASE_IMAGE = "python:3.11-slim"

# ``BASE_IMAGE`` is any image with Python 3.11 and pip; without Docker Hub, build from the Debian
# base ``make container-tools`` makes: ``--build-arg BASE_IMAGE=localhost/edgebento-base:bookworm``.
DOCKERFILE = """\
# Lambda container image: awslambdaric runs bentos.lambda_handler.handler.
ARG BASE_IMAGE={base_image}
FROM ${{BASE_IMAGE}}
ENV EDGEBENTO_PACK=/var/task/pack \\
    EDGEBENTO_TRUST=/var/task/trust/signing.pub
WORKDIR /var/task
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY modelpack/ modelpack/
COPY bentos/ bentos/
COPY trust/ trust/
COPY pack/ pack/
# Lambda's /var/task is read-only: bytecode compiled now is what keeps the cold start short.
RUN python -m compileall -q modelpack bentos
ENTRYPOINT ["python", "-m", "awslambdaric"]
CMD ["bentos.lambda_handler.handler"]
"""


@dataclass(frozen=True)
class LambdaOptions:
    pack: Path
    trust: Path
    memory_mb: int = 1024
    timeout_s: int = 30
    architecture: str = "x86_64"
    base_image: str = DEFAULT_BASE_IMAGE
    api_auth: str = "iam"  # iam (SigV4-signed callers only) | none (a public API)
    reserved_concurrency: int = 10  # the template parameter's default; 0: no reservation


def _function_name(name: str, version: int) -> str:
    return "".join(c if c.isalnum() else "-" for c in f"{name}-v{version}")


def _events(api: str) -> dict[str, Any]:
    routes = {
        "Predict": ("/predict", "POST"),
        "Metadata": ("/metadata", "GET"),
        "InferenceProtocol": ("/v2/{proxy+}", "ANY"),
        "InferenceProtocolRoot": ("/v2", "GET"),
    }
    return {
        name: {"Type": "HttpApi", "Properties": {"ApiId": {"Ref": api}, "Path": p, "Method": m}}
        for name, (p, m) in routes.items()
    }


def _api(auth: str) -> dict[str, Any]:
    if auth not in ("iam", "none"):
        raise ValueError(f"api_auth is iam or none, not {auth!r}")
    properties: dict[str, Any] = {}
    if auth == "iam":
        # Every route needs a SigV4-signed caller with execute-api:Invoke on it.
        properties["Auth"] = {"EnableIamAuthorizer": True, "DefaultAuthorizer": "AWS_IAM"}
    return {"Type": "AWS::Serverless::HttpApi", "Properties": properties}


def sam_template(name: str, version: int, o: LambdaOptions) -> dict[str, Any]:
    logical, api = "PredictFunction", "PredictApi"
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Transform": "AWS::Serverless-2016-10-31",
        "Description": f"edgebento: {name} v{version} served by bentos.lambda_handler",
        "Parameters": {
            "ReservedConcurrency": {
                "Type": "Number",
                "Default": o.reserved_concurrency,
                "MinValue": 0,
                "Description": "Environments reserved for (and the most allowed to) this "
                "function; 0 leaves it on the account's unreserved pool",
            }
        },
        "Conditions": {
            "HasReservedConcurrency": {
                "Fn::Not": [{"Fn::Equals": [{"Ref": "ReservedConcurrency"}, 0]}]
            }
        },
        "Resources": {
            api: _api(o.api_auth),
            logical: {
                "Type": "AWS::Serverless::Function",
                "Properties": {
                    "FunctionName": _function_name(name, version),
                    "PackageType": "Image",
                    "Architectures": [o.architecture],
                    "MemorySize": o.memory_mb,
                    "Timeout": o.timeout_s,
                    "ReservedConcurrentExecutions": {
                        "Fn::If": [
                            "HasReservedConcurrency",
                            {"Ref": "ReservedConcurrency"},
                            {"Ref": "AWS::NoValue"},
                        ]
                    },
                    "Environment": {"Variables": {"EDGEBENTO_PACK": "/var/task/pack"}},
                    "FunctionUrlConfig": {"AuthType": "AWS_IAM"},
                    "Events": _events(api),
                },
                "Metadata": {
                    "Dockerfile": "Dockerfile",
                    "DockerContext": ".",
                    "DockerTag": f"v{version}",
                },
            },
        },
        "Outputs": {
            "PredictUrl": {
                "Description": "POST tensor JSON here (SigV4-signed unless api_auth is none)",
                "Value": {
                    "Fn::Sub": f"https://${{{api}}}.execute-api.${{AWS::Region}}.amazonaws.com/predict"
                },
            },
            "FunctionUrl": {
                "Description": "The function URL (IAM auth)",
                "Value": {"Fn::GetAtt": [f"{logical}Url", "FunctionUrl"]},
            },
        },
    }


def write_lambda_context(o: LambdaOptions, out: Path) -> list[Path]:
    """Verify the pack, then write the build context into ``out``; returns the written files."""
    import yaml

    pack = load_pack(o.pack, [o.trust])
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "pack", ignore_errors=True)
    shutil.copytree(pack.root, out / "pack")
    (out / "trust").mkdir(exist_ok=True)
    shutil.copyfile(o.trust, out / "trust" / "signing.pub")
    root = Path(__file__).resolve().parent.parent
    for package in CODE_PACKAGES:
        shutil.rmtree(out / package, ignore_errors=True)
        shutil.copytree(
            root / package, out / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    (out / "requirements.txt").write_text("\n".join(REQUIREMENTS) + "\n")
    (out / "Dockerfile").write_text(DOCKERFILE.format(base_image=o.base_image))
    m = pack.manifest
    (out / "template.yaml").write_text(
        yaml.safe_dump(sam_template(m.name, m.version, o), sort_keys=False)
    )
    return [out / n for n in ("Dockerfile", "template.yaml", "requirements.txt", "pack")]

"""``edgebento deploy k8s|lambda``: deployment files for a bento or a pack."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    deploy = sub.add_parser(
        "deploy", help="write Kubernetes, BentoCloud or Lambda deployment files"
    )
    verbs = deploy.add_subparsers(dest="verb", metavar="TARGET", required=True)

    k8s = verbs.add_parser(
        "k8s",
        help="Deployment, Service, HPA (or KEDA) in OUT/k8s/, a BentoCloud config in OUT/bentocloud/",
    )
    k8s.add_argument("--bento", required=True, help="the bento tag, NAME:VERSION")
    k8s.add_argument("--model", required=True, help="the model tag to serve (EDGEBENTO_MODEL)")
    k8s.add_argument("--image", help="container image (default: the bento tag)")
    k8s.add_argument("--out", type=Path, required=True)
    k8s.add_argument("--namespace", default="default")
    k8s.add_argument("--min", type=int, default=1, dest="min_replicas", help="0 scales to zero")
    k8s.add_argument("--max", type=int, default=5, dest="max_replicas")
    k8s.add_argument("--cpu-target", type=int, default=70, help="HPA CPU utilization, percent")
    k8s.add_argument(
        "--keda", action="store_true", help="scale on the Prometheus request rate with KEDA"
    )
    k8s.add_argument("--prometheus", default=None, help="Prometheus URL KEDA queries")
    k8s.add_argument(
        "--keda-http",
        metavar="HOST",
        help="scale (from zero too) with KEDA's HTTP add-on: its interceptor serves HOST",
    )
    k8s.add_argument("--keda-namespace", default="keda", help="where the HTTP add-on runs")
    k8s.add_argument(
        "--activation-query",
        metavar="PROMQL",
        help="a Prometheus query that exists at zero pods (e.g. the ingress controller's"
        " requests for this service), so --min 0 can scale up again",
    )
    k8s.set_defaults(func=cmd_k8s)

    lam = verbs.add_parser("lambda", help="a Lambda container image context and a SAM template")
    lam.add_argument("--pack", type=Path, required=True)
    lam.add_argument("--pub", type=Path, required=True, help="the public key the pack is signed by")
    lam.add_argument("--out", type=Path, required=True)
    lam.add_argument("--memory", type=int, default=1024, help="MB")
    lam.add_argument("--timeout", type=int, default=30, help="seconds")
    lam.add_argument(
        "--base-image", help="any image with Python 3.11 and pip (default: python:3.11-slim)"
    )
    lam.set_defaults(func=cmd_lambda)


def cmd_k8s(args: argparse.Namespace) -> int:
    from bentos.deploy_k8s import BENTOCLOUD_DIR, K8S_DIR, K8sOptions, write_manifests

    extra = {"prometheus_url": args.prometheus} if args.prometheus else {}
    options = K8sOptions(
        bento=args.bento,
        model=args.model,
        image=args.image,
        namespace=args.namespace,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        cpu_target=args.cpu_target,
        keda=args.keda,
        keda_http_host=args.keda_http,
        keda_namespace=args.keda_namespace,
        activation_query=args.activation_query,
        **extra,
    )
    for path in write_manifests(options, args.out):
        print(f"wrote {path}")
    if options.min_replicas == 0 and not options.keda:
        print("note: a plain HPA cannot scale to zero; hpa.yaml keeps 1 (use --keda for 0)")
    if options.image is None:  # the tag containerizing the bento gives, from any folder
        print(f"image: {options.image_ref} (bentoml containerize {options.bento}; push it)")
    print(f"apply: kubectl apply -f {args.out / K8S_DIR}/")
    print(f"BentoCloud: bentoml deployment create -f {args.out / BENTOCLOUD_DIR}/bentocloud.yaml")
    return 0


def cmd_lambda(args: argparse.Namespace) -> int:
    from bentos.deploy_lambda import LambdaOptions, write_lambda_context

    options = LambdaOptions(
        pack=args.pack,
        trust=args.pub,
        memory_mb=args.memory,
        timeout_s=args.timeout,
        **({"base_image": args.base_image} if args.base_image else {}),
    )
    write_lambda_context(options, args.out)
    print(f"wrote a Lambda image context and template.yaml to {args.out}")
    print(f"deploy: cd {args.out} && sam build && sam deploy --guided")
    return 0

"""The fleet ACL as AWS IoT Core policies, and enrollment by claim as fleet provisioning.

Import path and API::

    from cloud_sync.aws_policy import cloudformation_template
    doc = cloudformation_template(prefix="edgebento")   # a CloudFormation template (a dict)

The device policy grants what ``deploy/mosquitto/acl`` grants a device, with the thing name in
place of Mosquitto's ``%u`` (``${iot:Connection.Thing.ThingName}``; inside ``Fn::Sub`` it is
written ``${!...}`` so that CloudFormation leaves it to IoT Core). The client id must be the
thing name: what ``use_username_as_clientid`` does on Mosquitto. The claim policy lets the
shared claim certificate do only fleet provisioning: create a certificate from the device's own
CSR, then register it with the provisioning template, whose pre-provisioning hook (a Lambda of
yours) is where the one-time, device-bound claim token is checked (docs/fleet-identity.md).
"""

from __future__ import annotations

import json
from typing import Any

THING = "${!iot:Connection.Thing.ThingName}"  # Fn::Sub leaves ${iot:...} to IoT Core
ARN = "arn:${AWS::Partition}:iot:${AWS::Region}:${AWS::AccountId}"


def _sub(text: str) -> dict[str, str]:
    return {"Fn::Sub": text}


def _statement(action: str, kind: str, names: list[str]) -> dict[str, Any]:
    return {
        "Effect": "Allow",
        "Action": [action],
        "Resource": [_sub(f"{ARN}:{kind}/{name}") for name in names],
    }


def device_policy_document(prefix: str) -> dict[str, Any]:
    p, me = prefix, f"{prefix}/{THING}"
    reads = [f"{me}/infer", f"{me}/cmd/*", f"{me}/desired", f"{me}/telemetry/ack"]
    read_filters = [
        f"{me}/infer",
        f"{me}/cmd/#",
        f"{me}/desired",
        f"{me}/telemetry/ack",
        f"{p}/group/*/cmd/#",
    ]
    return {
        "Version": "2012-10-17",
        "Statement": [
            _statement("iot:Connect", "client", [THING]),
            _statement(
                "iot:Publish",
                "topic",
                [
                    f"{me}/status",
                    f"{me}/telemetry",
                    f"{me}/replies/*",
                    # Renewal over the current certificate (IoT Core's own CreateCertificateFromCsr).
                    "$aws/certificates/create-from-csr/json",
                ],
            ),
            _statement(
                "iot:Subscribe",
                "topicfilter",
                [*read_filters, "$aws/certificates/create-from-csr/json/*"],
            ),
            _statement(
                "iot:Receive",
                "topic",
                [*reads, f"{p}/group/*/cmd/*", "$aws/certificates/create-from-csr/json/*"],
            ),
        ],
    }


def claim_policy_document(template: str) -> dict[str, Any]:
    provision = f"$aws/provisioning-templates/{template}/provision/json"
    csr = "$aws/certificates/create-from-csr/json"
    return {
        "Version": "2012-10-17",
        "Statement": [
            _statement("iot:Connect", "client", ["claim-*"]),
            _statement("iot:Publish", "topic", [csr, provision]),
            _statement("iot:Subscribe", "topicfilter", [f"{csr}/*", f"{provision}/*"]),
            _statement("iot:Receive", "topic", [f"{csr}/*", f"{provision}/*"]),
        ],
    }


def provisioning_body(device_policy: str) -> str:
    """The template IoT Core runs for a claim: a thing named by the device id, the certificate
    made from the device's CSR, and the device policy attached to it."""
    body = {
        "Parameters": {
            "DeviceId": {"Type": "String"},
            "AWS::IoT::Certificate::Id": {"Type": "String"},
        },
        "Resources": {
            "thing": {
                "Type": "AWS::IoT::Thing",
                "Properties": {"ThingName": {"Ref": "DeviceId"}},
                "OverrideSettings": {"AttributePayload": "MERGE"},
            },
            "certificate": {
                "Type": "AWS::IoT::Certificate",
                "Properties": {
                    "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"},
                    "Status": "ACTIVE",
                },
            },
            "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": device_policy}},
        },
    }
    return json.dumps(body, sort_keys=True)


def cloudformation_template(prefix: str = "edgebento", name: str = "edgebento") -> dict[str, Any]:
    template_name = f"{name}-fleet-provisioning"
    device_policy = f"{name}-device"
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": "edgebento fleet identity on AWS IoT Core: the device ACL as an IoT "
        "policy, and enrollment by claim as fleet provisioning (edgebento fleet aws-policy)",
        "Parameters": {
            "PreProvisioningHookArn": {
                "Type": "String",
                "Description": "A Lambda that checks the claim token: single use, unexpired, "
                "bound to the DeviceId (the enrollment service's checks)",
            }
        },
        "Resources": {
            "DevicePolicy": {
                "Type": "AWS::IoT::Policy",
                "Properties": {
                    "PolicyName": device_policy,
                    "PolicyDocument": device_policy_document(prefix),
                },
            },
            "ClaimPolicy": {
                "Type": "AWS::IoT::Policy",
                "Properties": {
                    "PolicyName": f"{name}-claim",
                    "PolicyDocument": claim_policy_document(template_name),
                },
            },
            "ProvisioningRole": {
                "Type": "AWS::IAM::Role",
                "Properties": {
                    "AssumeRolePolicyDocument": {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Effect": "Allow",
                                "Principal": {"Service": "iot.amazonaws.com"},
                                "Action": "sts:AssumeRole",
                            }
                        ],
                    },
                    "ManagedPolicyArns": [
                        _sub(
                            "arn:${AWS::Partition}:iam::aws:policy/service-role/"
                            "AWSIoTThingsRegistration"
                        )
                    ],
                },
            },
            "FleetProvisioning": {
                "Type": "AWS::IoT::ProvisioningTemplate",
                "DependsOn": "DevicePolicy",
                "Properties": {
                    "TemplateName": template_name,
                    "Description": "enrollment by claim: a thing per device id, its own CSR",
                    "Enabled": True,
                    "ProvisioningRoleArn": {"Fn::GetAtt": ["ProvisioningRole", "Arn"]},
                    "PreProvisioningHook": {
                        "TargetArn": {"Ref": "PreProvisioningHookArn"},
                        "PayloadVersion": "2020-04-01",
                    },
                    "TemplateBody": provisioning_body(device_policy),
                },
            },
        },
        "Outputs": {
            "DevicePolicyName": {"Value": {"Ref": "DevicePolicy"}},
            "ClaimPolicyName": {"Value": {"Ref": "ClaimPolicy"}},
            "ProvisioningTemplateName": {"Value": {"Ref": "FleetProvisioning"}},
        },
    }

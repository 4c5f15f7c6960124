#!/usr/bin/env python3
"""What a generic gRPC client sees of the controller, with no .proto file of tapgraph's.

grpcio's own clients: server reflection v1alpha through grpcio-reflection's descriptor database
(the client many tools are built on), v1 with the same messages on v1's method (the two versions'
messages are identical on the wire), and grpcio-health-checking's Health stub.

Usage: grpc_probe.py HOST:PORT CA_PEM SERVICE...
Prints one JSON object: the services each reflection version lists, the methods of the services
resolved from reflected descriptors alone, and the health status of "" and each SERVICE.

       grpc_probe.py HOST:PORT CA_PEM --watch SERVICE
Watches SERVICE's health: prints each status on a line as it comes, until NOT_SERVING or the end.
"""

import json
import sys

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

TIMEOUT = 20


def v1_services(channel):
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = list(call(iter([request]), timeout=TIMEOUT))
    return sorted(s.name for r in responses for s in r.list_services_response.service)


def health(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
    except grpc.RpcError as error:
        return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def watch(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    for answer in stub.Watch(health_pb2.HealthCheckRequest(service=service)):
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        print(status, flush=True)
        if status == "NOT_SERVING":
            return


def main():
    target, ca_pem, services = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open(ca_pem, "rb") as f:
        credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
    # The controller's certificate names localhost; the probe dials its loopback address.
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(target, credentials, options) as channel:
        if services[:1] == ["--watch"]:
            watch(channel, services[1])
            return
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = DescriptorPool(database)
        resolved = {}
        for name in ["grpc.health.v1.Health"] + services:
            resolved[name] = sorted(m.name for m in pool.FindServiceByName(name).methods)
        print(
            json.dumps(
                {
                    "v1alpha_services": sorted(database.get_services()),
                    "v1_services": v1_services(channel),
                    "methods": resolved,
                    "health": {s: health(channel, s) for s in [""] + services},
                }
            )
        )


if __name__ == "__main__":
    main()

"""A hostile collaborator, as its own OS process, for the attacks of issue 14.

    python tests/hostile_site.py WORKSPACE STATE SITE PORT [--attack N] [plan overrides]

It holds a real certificate of a site in the plan (its folder STATE) and says Hello
like any collaborator. It declines every task it is given (a failure report), so the
rounds close as soon as the honest sites have answered. With ``--attack N`` it also
runs the cancelled-long-poll attack from N threads: ask for work with an hour's wait,
hang up 10 ms later, again and again, on its own channel. It stops when the aggregator
says the federation finished, or when it is killed.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import grpc

from fedloom.core.errors import AccessDenied, AggregatorLost, TransportError
from fedloom.core.records import InstructionKind
from fedloom.pki import site_credentials
from fedloom.plan import load_plan, plan_hash
from fedloom.transport import FailureReport, serde
from fedloom.transport.grpc import ClientSettings, GrpcConnection
from fedloom.transport.grpc.wire import SESSION_HEADER, channel_options, path


def attack(port: int, state: str, session: str, stop: threading.Event, counter: list[int]) -> None:
    creds = site_credentials(state)
    channel = grpc.secure_channel(
        f"127.0.0.1:{port}",
        grpc.ssl_channel_credentials(creds.ca_pem, creds.key_pem, creds.cert_pem),
        options=channel_options(),
    )
    get_instruction = channel.unary_unary(path("GetInstruction"))
    an_hour = serde.encode_task_request(3600.0)
    while not stop.is_set():
        call = get_instruction.future(an_hour, timeout=4000, metadata=[(SESSION_HEADER, session)])
        time.sleep(0.01)
        call.cancel()
        counter[0] += 1
    channel.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workspace")
    parser.add_argument("state")
    parser.add_argument("site")
    parser.add_argument("port", type=int)
    parser.add_argument("--attack", type=int, default=0)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    plan = load_plan(args.workspace, args.overrides)
    settings = ClientSettings(
        address=f"127.0.0.1:{args.port}",
        site=args.site,
        plan_hash=plan_hash(plan, args.workspace),
        connect_seconds=120.0,
    )
    connection = GrpcConnection(site_credentials(args.state), settings)
    connection.open()
    stop = threading.Event()
    counter = [0]
    attackers = [
        threading.Thread(
            target=attack,
            args=(args.port, args.state, connection.session_id, stop, counter),
            daemon=True,
        )
        for _ in range(args.attack)
    ]
    for thread in attackers:
        thread.start()
    print(f"hostile: joined, attacking from {args.attack} threads", flush=True)
    declined: set[str] = set()
    try:
        while True:
            try:
                task = connection.get_instruction()
                if task is None:
                    continue
                if task.kind is InstructionKind.FINISHED:
                    break
                if task.attempt_id not in declined:
                    report = FailureReport(task.round, "this site declines", task.attempt_id)
                    connection.report_failure(report)
                    declined.add(task.attempt_id)
            except (AccessDenied, AggregatorLost):
                raise
            except TransportError as err:  # its own share of calls is full: try again
                print(f"hostile: {err.message}", flush=True)
                time.sleep(0.05)
    finally:
        stop.set()
        for thread in attackers:
            thread.join(timeout=10)
        connection.close()
    print(f"hostile: {counter[0]} cancelled asks for work", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

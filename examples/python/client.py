#!/usr/bin/env python3
"""A Python client of the twin.v1 API, with the stubs gen.sh generates from proto/.

Against a running `twin serve`, it walks the round trip of a desired change:

1. lists the twins (Twins.ListTwins, every page);
2. creates the device's twin if it does not exist (Twins.CreateTwin);
3. opens the device's DeviceSync stream and says Hello (the answer: the whole current delta);
4. starts a Twins.Watch on that device;
5. updates desired (Twins.UpdateDesired) with a value unique to this run;
6. sees the delta arrive on the device stream and the change on the watch;
7. applies the delta as the device, reports it back and sees the ReportedAck, the watch's
   REPORTED_UPDATED event and an empty delta in Twins.GetTwin.

It prints what it saw, one line per step, and `ok` at the end (exit 0). Any failure prints
`error: <step>: <reason>` on stderr and exits 1; a step that waits longer than --timeout
seconds fails the same way, and the whole run is bounded by a watchdog (exit 3), so it never
hangs.

    pip install -r examples/python/requirements.txt
    examples/python/gen.sh                       # stubs into examples/python/generated/
    python3 examples/python/client.py --target 127.0.0.1:7878 --device py-demo-1

With TLS: --ca-cert server.pem (and --authority localhost if the certificate does not name
the address). With authentication on: --token TOKEN (an operator token).
"""

import argparse
import json
import os
import queue
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))


class Failure(Exception):
    """A step failed: the message says which and why."""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:7878", help="host:port of twin serve")
    parser.add_argument("--device", default="py-demo-1", help="device id to sync as")
    parser.add_argument("--group", default="python-example", help="group of a twin it creates")
    parser.add_argument(
        "--stubs",
        default=os.environ.get("TWIN_STUBS", os.path.join(HERE, "generated")),
        help="folder gen.sh generated the stubs into (default: examples/python/generated, "
        "or $TWIN_STUBS)",
    )
    parser.add_argument("--token", default=os.environ.get("TWIN_TOKEN"), help="bearer token")
    parser.add_argument("--ca-cert", help="PEM file of the CA to trust: connect with TLS")
    parser.add_argument("--authority", help="TLS server name, if not the target's host")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds any one step may take (default 10)"
    )
    return parser.parse_args(argv)


def import_stubs(folder):
    """Imports the generated modules from `folder`, with a clear message if they are missing."""
    if not os.path.isdir(os.path.join(folder, "twin", "v1")):
        raise Failure(
            f"stubs: no generated stubs in {folder} (run examples/python/gen.sh [DIR] first)"
        )
    sys.path.insert(0, folder)
    try:
        import grpc  # noqa: F401  (grpcio: imported here so its absence is reported clearly)
        from twin.v1 import device_sync_pb2, device_sync_pb2_grpc, twins_pb2, twins_pb2_grpc
        from twin.v1 import common_pb2
    except ImportError as error:
        raise Failure(
            f"stubs: cannot import grpcio or the stubs ({error}); "
            f"run: python3 -m pip install -r {os.path.join(HERE, 'requirements.txt')}"
        ) from error
    return common_pb2, device_sync_pb2, device_sync_pb2_grpc, twins_pb2, twins_pb2_grpc


def describe_rpc_error(error):
    """`CODE: details` of a grpc.RpcError."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    name = code.name if code is not None else "UNKNOWN"
    return f"{name}: {details}"


class StreamReader:
    """Reads a response stream on a thread into a queue, so the main thread waits with a
    timeout. The stream's end or error arrives as a final ("end", error) item."""

    def __init__(self, name, responses):
        self.name = name
        self.responses = responses
        self.items = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self):
        import grpc

        try:
            for response in self.responses:
                self.items.put(("message", response))
            self.items.put(("end", None))
        except grpc.RpcError as error:
            self.items.put(("end", error))

    def next(self, step, timeout):
        """The next message; Failure if the stream ends or nothing comes within `timeout`."""
        try:
            kind, value = self.items.get(timeout=timeout)
        except queue.Empty:
            raise Failure(f"{step}: nothing arrived on the {self.name} within {timeout:g} s")
        if kind == "end":
            reason = describe_rpc_error(value) if value is not None else "the server ended it"
            raise Failure(f"{step}: the {self.name} ended: {reason}")
        return value

    def wait_for(self, step, timeout, accept):
        """Reads until `accept(message)` is true (skipping others) or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"{step}: the expected message did not arrive within {timeout:g} s")
            message = self.next(step, left)
            if accept(message):
                return message


class Outbox:
    """The device's side of the sync stream: an iterator grpcio sends from, fed by put()."""

    _END = object()

    def __init__(self):
        self.items = queue.Queue()
        self.sequence = 0

    def put(self, message):
        self.sequence += 1
        message.sequence = self.sequence
        self.items.put(message)
        return self.sequence

    def close(self):
        self.items.put(self._END)

    def __iter__(self):
        while True:
            item = self.items.get()
            if item is self._END:
                return
            yield item


def list_all_twins(twins, twins_pb2, call):
    """Every twin's id, following next_page_token."""
    ids = []
    token = ""
    while True:
        page = call(
            "list twins",
            twins.ListTwins,
            twins_pb2.ListTwinsRequest(page_size=1000, page_token=token),
        )
        ids.extend(twin.device_id for twin in page.twins)
        token = page.next_page_token
        if not token:
            return ids


def run(args):
    common_pb2, sync_pb2, sync_grpc, twins_pb2, twins_grpc = import_stubs(args.stubs)
    import grpc
    timeout = args.timeout
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []

    if args.ca_cert:
        try:
            with open(args.ca_cert, "rb") as file:
                root = file.read()
        except OSError as error:
            raise Failure(f"connect: cannot read --ca-cert {args.ca_cert}: {error}") from error
        options = [("grpc.ssl_target_name_override", args.authority)] if args.authority else []
        channel = grpc.secure_channel(
            args.target, grpc.ssl_channel_credentials(root_certificates=root), options=options
        )
        transport = "tls"
    else:
        channel = grpc.insecure_channel(args.target)
        transport = "plaintext"
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise Failure(f"connect: {args.target} not reachable ({transport}) within {timeout:g} s")
    print(f"connected to {args.target} ({transport})", flush=True)

    twins = twins_grpc.TwinsStub(channel)
    sync = sync_grpc.DeviceSyncStub(channel)

    def call(step, method, request):
        try:
            return method(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as error:
            raise Failure(f"{step}: {describe_rpc_error(error)}") from error

    # 1. List, 2. create if needed.
    ids = list_all_twins(twins, twins_pb2, call)
    print(f"listed {len(ids)} twins", flush=True)
    if args.device in ids:
        twin = call("get twin", twins.GetTwin, twins_pb2.GetTwinRequest(device_id=args.device))
        print(f"twin {args.device} exists at version {twin.version}", flush=True)
    else:
        twin = call(
            "create twin",
            twins.CreateTwin,
            twins_pb2.CreateTwinRequest(
                device_id=args.device,
                group=args.group,
                desired_json=json.dumps({"sampling": {"rate_hz": 10}}),
                tags_json=json.dumps({"created_by": "examples/python/client.py"}),
            ),
        )
        print(f"created twin {args.device} at version {twin.version}", flush=True)

    # 3. The device's stream: Hello, answered by the whole current delta.
    outbox = Outbox()
    outbox.put(sync_pb2.DeviceMessage(hello=sync_pb2.Hello(device_id=args.device, firmware="py-1.0")))
    # The stream's deadline bounds it even if the server never answers.
    sync_call = sync.Sync(iter(outbox), timeout=timeout * 6, metadata=metadata)
    device = StreamReader("device stream", sync_call)
    watch_call = None
    try:
        first = device.next("hello", timeout)
        if first.WhichOneof("body") != "delta":
            raise Failure(f"hello: expected a DesiredDelta first, got {first.WhichOneof('body')}")
        connected = first.delta
        if connected.reason != sync_pb2.DELTA_REASON_CONNECTED:
            raise Failure(f"hello: first delta has reason {connected.reason}, not CONNECTED")
        print(
            f"device stream open: CONNECTED delta {connected.delta_json} at version {connected.version}",
            flush=True,
        )

        # 4. A watch on this device, from now.
        watch_call = twins.Watch(
            twins_pb2.WatchRequest(filter=common_pb2.TwinFilter(device_ids=[args.device])),
            timeout=timeout * 6,
            metadata=metadata,
        )
        watch = StreamReader("watch", watch_call)
        started = watch.next("watch", timeout)
        if started.WhichOneof("event") != "started":
            raise Failure(f"watch: expected WatchStarted first, got {started.WhichOneof('event')}")
        print(f"watch started at revision {started.started.revision}", flush=True)

        # 5. A desired change unique to this run.
        nonce = uuid.uuid4().hex[:12]
        patch = {"python_client": {"run": nonce, "rate_hz": 20}}
        updated = call(
            "update desired",
            twins.UpdateDesired,
            twins_pb2.UpdateDesiredRequest(device_id=args.device, patch_json=json.dumps(patch)),
        )
        print(
            f"desired updated: version {updated.version}, revision {updated.revision}, "
            f"delta_empty {str(updated.delta_empty).lower()}",
            flush=True,
        )

        # 6. The delta on the device stream, the change on the watch.
        def is_our_delta(message):
            if message.WhichOneof("body") == "error":
                raise Failure(f"device stream: SyncError {message.error.code}: {message.error.message}")
            return (
                message.WhichOneof("body") == "delta"
                and message.delta.reason == sync_pb2.DELTA_REASON_DESIRED_CHANGED
                and message.delta.version >= updated.version
            )

        pushed = device.wait_for("delta", timeout, is_our_delta).delta
        delta = json.loads(pushed.delta_json)
        if delta.get("python_client", {}).get("run") != nonce:
            raise Failure(f"delta: the pushed delta lacks python_client.run {nonce}: {pushed.delta_json}")
        print(
            f"device received delta (DESIRED_CHANGED) at version {pushed.version}: {pushed.delta_json}",
            flush=True,
        )

        def change_of(kind, revision):
            def accept(message):
                event = message.WhichOneof("event")
                return event == "change" and message.change.kind == kind and message.change.revision >= revision

            return accept

        seen = watch.wait_for(
            "watch desired", timeout, change_of(twins_pb2.CHANGE_KIND_DESIRED_UPDATED, updated.revision)
        ).change
        if seen.revision != updated.revision or seen.device_id != args.device:
            raise Failure(
                f"watch desired: saw revision {seen.revision} of {seen.device_id}, "
                f"expected revision {updated.revision} of {args.device}"
            )
        print(
            f"watch saw DESIRED_UPDATED of {seen.device_id} at revision {seen.revision}, "
            f"version {seen.version}: {seen.patch_json}",
            flush=True,
        )

        # 7. The device applies the whole delta and reports it back.
        sent = outbox.put(
            sync_pb2.DeviceMessage(reported=sync_pb2.ReportedPatch(patch_json=pushed.delta_json))
        )

        def is_our_ack(message):
            if message.WhichOneof("body") == "error" and message.error.sequence == sent:
                raise Failure(f"report: SyncError {message.error.code}: {message.error.message}")
            return message.WhichOneof("body") == "reported_ack" and message.reported_ack.sequence == sent

        ack = device.wait_for("report", timeout, is_our_ack).reported_ack
        print(f"device reported it back: ack version {ack.version}, revision {ack.revision}", flush=True)
        reported = watch.wait_for(
            "watch reported", timeout, change_of(twins_pb2.CHANGE_KIND_REPORTED_UPDATED, ack.revision)
        ).change
        print(f"watch saw REPORTED_UPDATED of {reported.device_id} at revision {reported.revision}", flush=True)
        final = call("get twin", twins.GetTwin, twins_pb2.GetTwinRequest(device_id=args.device))
        left = json.loads(final.delta_json or "{}")
        if left:
            raise Failure(f"get twin: the delta is not empty after the report: {final.delta_json}")
        print(f"twin {args.device} at version {final.version}: delta {final.delta_json or '{}'}", flush=True)
    finally:
        outbox.close()
        sync_call.cancel()
        if watch_call is not None:
            watch_call.cancel()
        channel.close()
    print("ok", flush=True)


def main(argv):
    args = parse_args(argv)
    # Every wait is bounded by --timeout; the watchdog bounds the whole run in case a call
    # blocks somewhere a timeout does not reach.
    def expire():
        print(f"error: watchdog: the run took longer than {args.timeout * 10:g} s", file=sys.stderr, flush=True)
        os._exit(3)

    watchdog = threading.Timer(args.timeout * 10, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        run(args)
    except Failure as failure:
        print(f"error: {failure}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        watchdog.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

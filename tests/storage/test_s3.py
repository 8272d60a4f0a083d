"""
S3ObjectStorage: the IObjectStorage contract on a real S3-compatible server
(moto in server mode on loopback, started by the tests), large objects in
parts, a server that restarts, hangs or refuses, and the start-up checks.
"""

from __future__ import annotations

import os
import secrets

from botocore.exceptions import ClientError, EndpointConnectionError
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.internet.testing import MemoryReactorClock

from difydaemon.blocking import InlineRunner, ThreadPoolRunner
from difydaemon.errors import ConfigError, ObjectStorageError
from difydaemon.storage.s3 import RetryPolicy, S3ObjectStorage, S3Settings, is_transient, make_client
from difydaemon.testing.cases import AsyncTestCase, SynchronousTestCase
from difydaemon.testing.s3 import ACCESS_KEY, SECRET_KEY, MotoServer, bucket_client, moto_server
from tests.storage.test_storage import ObjectStorageContract, _raises

MiB = 1024 * 1024

#: one server for the contract and the other tests that never stop it:
#: moto takes seconds to start; each test has a bucket of its own
_shared = None


async def shared_server() -> MotoServer:
    """The module's moto server, started on first use (destroyed at exit)."""
    global _shared
    if _shared is None or not _shared.running:
        _shared = MotoServer(reactor)
        await _shared.start()
    return _shared


def settings_for(server: MotoServer, bucket: str, **overrides) -> S3Settings:
    """The settings of a store on ``server``'s ``bucket``, as the daemon's configuration makes them."""
    values = dict(
        bucket=bucket, endpoint=server.endpoint, use_aws=False, access_key=ACCESS_KEY, secret_key=SECRET_KEY,
        region="us-east-1",
    )
    values.update(overrides)
    return S3Settings(**values)


def new_bucket() -> str:
    return "difydaemon-" + secrets.token_hex(6)


class S3Case(AsyncTestCase):
    """A store on a fresh bucket of the shared server (``self.storage``, ``self.raw``: botocore behind its back)."""

    timeout = 120

    def setUp(self):
        return Deferred.fromCoroutine(self._set_up())

    async def _set_up(self):
        self.runner = ThreadPoolRunner(reactor, "test-s3", max_threads=4)
        self.addCleanup(self.runner.stop)
        self.server = await shared_server()
        self.bucket = new_bucket()
        self.storage = await self.make_storage()
        self.raw = await self.runner.run(bucket_client, self.server)

    async def make_storage(self, server=None, **kwargs) -> S3ObjectStorage:
        """A started store on this test's bucket (made by the start, as Go does)."""
        settings = kwargs.pop("settings", None) or settings_for(server or self.server, self.bucket)
        storage = S3ObjectStorage(reactor, settings, self.runner, **kwargs)
        await storage.start()
        return storage

    def run_check(self, check):
        return Deferred.fromCoroutine(check)

    async def pending_uploads(self) -> list:
        answer = await self.runner.run(self.raw.list_multipart_uploads, Bucket=self.bucket)
        return answer.get("Uploads", [])


class S3ObjectStorageTests(ObjectStorageContract, S3Case):
    """The S3 store keeps the IObjectStorage contract on a real S3-compatible server."""

    async def test_keys_are_the_go_daemons(self):
        """A key is the object key itself, no prefix added, so the Go daemon's objects load and ours are its."""
        await self.storage.save("plugin_packages/acme/echo:0.0.1@abc", b"ours")
        await self.runner.run(self.raw.put_object, Bucket=self.bucket, Key="assets/go-made.svg", Body=b"go")
        listed = await self.runner.run(self.raw.list_objects_v2, Bucket=self.bucket)
        self.assertEqual(
            sorted(entry["Key"] for entry in listed["Contents"]),
            ["assets/go-made.svg", "plugin_packages/acme/echo:0.0.1@abc"],
        )
        self.assertEqual(await self.storage.load("assets/go-made.svg"), b"go")

    async def test_large_object_in_parts(self):
        """An object above the threshold goes up in parts and loads back whole; no upload is left pending."""
        storage = await self.make_storage(multipart_threshold=5 * MiB, part_size=5 * MiB)
        data = os.urandom(12 * MiB + 3)
        await storage.save("plugin/big", data)
        self.assertEqual(await storage.load("plugin/big"), data)
        head = await self.runner.run(self.raw.head_object, Bucket=self.bucket, Key="plugin/big")
        self.assertEqual(head["ContentLength"], len(data))
        # a multipart ETag ends in "-<parts>"
        self.assertTrue(head["ETag"].strip('"').endswith("-3"), head["ETag"])
        self.assertEqual(await self.pending_uploads(), [])

    async def test_failed_part_aborts_the_upload(self):
        """A part the store refuses aborts the multipart upload: no object, no pending upload, a clear error."""

        def failing_client(settings):
            return PartRefusingClient(make_client(settings), refuse_part=2)

        storage = await self.make_storage(
            multipart_threshold=5 * MiB, part_size=5 * MiB, client_factory=failing_client
        )
        try:
            await storage.save("plugin/big", os.urandom(11 * MiB))
        except ObjectStorageError as error:
            self.assertIn("object storage cannot save plugin/big: AccessDenied", error.message)
        else:
            self.fail("the save did not fail")
        self.assertFalse(await storage.exists("plugin/big"))
        self.assertEqual(await self.pending_uploads(), [])

    async def test_list_across_pages(self):
        """A listing longer than one page is followed to its end."""
        storage = await self.make_storage(page_size=2)
        for name in ("e", "a", "d", "b", "c"):
            await storage.save(f"media/{name}", b"x")
        await storage.save("other/z", b"x")
        self.assertEqual(await storage.list("media"), [f"media/{name}" for name in "abcde"])

    async def test_delete_leaves_siblings(self):
        """Deleting a key leaves the keys beside and below its name alone."""
        for key in ("a/b", "a/b/c", "a/bc"):
            await self.storage.save(key, key.encode())
        await self.storage.delete("a/b")
        self.assertEqual(await self.storage.list("a"), ["a/b/c", "a/bc"])


class PartRefusingClient:
    """A botocore client whose ``refuse_part``-th part upload is refused (AccessDenied)."""

    def __init__(self, client, refuse_part: int) -> None:
        self._client = client
        self._refuse_part = refuse_part
        self.meta = client.meta

    def upload_part(self, **kwargs):
        if kwargs["PartNumber"] == self._refuse_part:
            raise client_error(403, "AccessDenied", "UploadPart")
        return self._client.upload_part(**kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


class S3OutageTests(S3Case):
    """A server of the test's own that stops, restarts and hangs."""

    async def _set_up(self):
        self.runner = ThreadPoolRunner(reactor, "test-s3", max_threads=4)
        self.addCleanup(self.runner.stop)
        self.server = await moto_server(self, reactor)
        self.bucket = new_bucket()
        self.raw = await self.runner.run(bucket_client, self.server)

    async def test_server_restarted_mid_run(self):
        """A save met by a stopped server waits, is tried again and succeeds once the server is back."""
        # the pauses run on a clock of the test's, the S3 calls on the real
        # reactor's threads: the retry comes exactly when the test says
        clock = Clock()
        storage = S3ObjectStorage(
            clock, settings_for(self.server, self.bucket), self.runner,
            retry=RetryPolicy(attempts=3, first_pause=1.0),
        )
        await storage.start()
        await storage.save("assets/before", b"1")
        await self.server.stop()
        saving = storage.save("assets/during", b"2")
        while storage.transient_failures == 0:
            await deferLater(reactor, 0.02, lambda: None)
        self.assertFalse(saving.called)
        await self.server.start()
        # moto restarts empty; a real store keeps its bucket
        await self.runner.run(self.raw.create_bucket, Bucket=self.bucket)
        self.assertFalse(saving.called)
        clock.advance(1.0)
        await saving
        self.assertEqual(storage.transient_failures, 1)
        self.assertEqual(await storage.load("assets/during"), b"2")

    async def test_server_gone_fails_after_the_retries(self):
        """A server that stays away fails the call with an error naming the key, after the retries."""
        storage = await self.make_storage(retry=RetryPolicy(attempts=3, first_pause=0.01, max_pause=0.01))
        await self.server.stop()
        try:
            await storage.load("plugin/x")
        except ObjectStorageError as error:
            self.assertIn("object storage cannot load plugin/x: Could not connect", error.message)
        else:
            self.fail("the load did not fail")
        self.assertEqual(storage.transient_failures, 2)

    async def test_hung_server_times_out(self):
        """A server that accepts and never answers fails the call after the read timeout, not never."""
        settings = settings_for(self.server, self.bucket, read_timeout=0.5, connect_timeout=0.5)
        storage = await self.make_storage(settings=settings, retry=RetryPolicy(attempts=2, first_pause=0.01))
        self.server.freeze()
        self.addCleanup(self.server.thaw)
        await _raises(self, ObjectStorageError, storage.exists("plugin/x"))
        self.assertEqual(storage.transient_failures, 1)


class S3StartTests(S3Case):
    """The start-up checks: what an operator got wrong is named."""

    async def _set_up(self):
        self.runner = ThreadPoolRunner(reactor, "test-s3", max_threads=2)
        self.addCleanup(self.runner.stop)
        self.bucket = new_bucket()

    async def start_error(self, settings) -> ConfigError:
        storage = S3ObjectStorage(reactor, settings, self.runner, retry=RetryPolicy(attempts=2, first_pause=0.01))
        try:
            await storage.start()
        except ConfigError as error:
            return error
        self.fail("the start did not fail")

    async def test_missing_bucket_is_created(self):
        """A bucket that does not exist is created at start, as the Go daemon does."""
        server = await shared_server()
        storage = await self.make_storage(server=server)
        await storage.save("k", b"v")
        raw = await self.runner.run(bucket_client, server)
        await self.runner.run(raw.head_bucket, Bucket=self.bucket)

    async def test_unreachable_endpoint_names_s3_endpoint(self):
        """An endpoint nobody listens on stops the start with an error naming S3_ENDPOINT."""
        from difydaemon.testing.postgres import free_port

        endpoint = f"http://127.0.0.1:{free_port()}"
        error = await self.start_error(
            S3Settings(bucket=self.bucket, endpoint=endpoint, use_aws=False, access_key="a", secret_key="b")
        )
        self.assertEqual(error.variable, "S3_ENDPOINT")
        self.assertIn(f"cannot reach the S3 store at {endpoint}", error.problem)

    async def test_refused_credentials_name_the_keys(self):
        """Credentials the store refuses stop the start with an error naming AWS_ACCESS_KEY and AWS_SECRET_KEY."""
        server = await moto_server(self, reactor, require_auth=True)
        error = await self.start_error(settings_for(server, self.bucket))
        self.assertEqual(error.variable, "AWS_ACCESS_KEY")
        self.assertIn("refused the credentials", error.problem)
        self.assertIn("AWS_SECRET_KEY", error.problem)
        self.assertNotIn(SECRET_KEY, str(error))

    async def test_invalid_bucket_name_names_the_bucket(self):
        """A bucket name S3 cannot have stops the start with an error naming PLUGIN_STORAGE_OSS_BUCKET."""
        server = await shared_server()
        error = await self.start_error(settings_for(server, "No_Such:Bucket"))
        self.assertEqual(error.variable, "PLUGIN_STORAGE_OSS_BUCKET")
        self.assertIn("No_Such:Bucket", error.problem)


class TransientClient:
    """A client whose ``put_object`` fails ``failures`` times (connection refused), then stores."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.objects = {}

    def put_object(self, Bucket, Key, Body):
        self.calls += 1
        if self.calls <= self.failures:
            raise EndpointConnectionError(endpoint_url="http://s3.invalid")
        self.objects[Key] = Body

    def head_bucket(self, Bucket):
        return {}


class RetryTests(SynchronousTestCase):
    """Transient failures wait on the reactor's clock, growing, and give up at the last attempt."""

    def storage(self, failures: int, attempts: int = 5):
        self.clock = MemoryReactorClock()
        self.client = TransientClient(failures)
        storage = S3ObjectStorage(
            self.clock, S3Settings(bucket="b"), InlineRunner(),
            retry=RetryPolicy(attempts=attempts, first_pause=1.0, max_pause=3.0),
            client_factory=lambda settings: self.client,
        )
        self.successResultOf(storage.start())
        return storage

    def test_retried_after_growing_pauses(self):
        """Two connection failures are tried again after 1 s and then 2 s, and the save succeeds."""
        storage = self.storage(failures=2)
        saving = storage.save("k", b"v")
        self.assertEqual(self.client.calls, 1)
        self.clock.advance(0.99)
        self.assertEqual(self.client.calls, 1)
        self.clock.advance(0.01)
        self.assertEqual(self.client.calls, 2)
        self.clock.advance(1.99)
        self.assertEqual(self.client.calls, 2)
        self.clock.advance(0.01)
        self.assertIsNone(self.successResultOf(saving))
        self.assertEqual(self.client.objects, {"k": b"v"})

    def test_gives_up_at_the_last_attempt(self):
        """After the last attempt the save fails with an ObjectStorageError naming the key."""
        storage = self.storage(failures=10, attempts=3)
        saving = storage.save("plugin/k", b"v")
        self.clock.pump([1.0, 2.0, 3.0])
        failure = self.failureResultOf(saving, ObjectStorageError)
        self.assertIn("object storage cannot save plugin/k: Could not connect", failure.value.message)
        self.assertEqual(self.client.calls, 3)

    def test_stop_ends_the_waiting_retries(self):
        """stop() fails a call waiting to be tried again, and later calls, without another attempt."""
        storage = self.storage(failures=10)
        saving = storage.save("plugin/k", b"v")
        self.assertEqual(self.client.calls, 1)
        storage.stop()
        failure = self.failureResultOf(saving, ObjectStorageError)
        self.assertIn("object storage cannot save plugin/k: the daemon is stopping", failure.value.message)
        self.failureResultOf(storage.save("plugin/other", b"v"), ObjectStorageError)
        self.clock.advance(10)
        self.assertEqual((self.client.calls, self.clock.getDelayedCalls()), (1, []))

    def test_calls_before_start_fail(self):
        """A store used before start() fails each call with an ObjectStorageError saying so, never an AttributeError."""
        storage = S3ObjectStorage(MemoryReactorClock(), S3Settings(bucket="b"), InlineRunner())
        for call in (storage.load("k"), storage.exists("k"), storage.delete("k"), storage.list("p"), storage.save("k", b"")):
            failure = self.failureResultOf(call, ObjectStorageError)
            self.assertIn("the store has not been started", failure.value.message)

    def test_pause_is_capped(self):
        """The pause doubles up to its cap."""
        policy = RetryPolicy(first_pause=0.5, max_pause=3.0)
        self.assertEqual([policy.pause(n) for n in (1, 2, 3, 4, 5)], [0.5, 1.0, 2.0, 3.0, 3.0])

    def test_what_is_transient(self):
        """Connection failures, 5xx and SlowDown are transient; 403 and 404 are not."""

        self.assertTrue(is_transient(EndpointConnectionError(endpoint_url="http://x")))
        self.assertTrue(is_transient(client_error(503, "ServiceUnavailable")))
        self.assertTrue(is_transient(client_error(400, "SlowDown")))
        self.assertFalse(is_transient(client_error(403, "AccessDenied")))
        self.assertFalse(is_transient(client_error(404, "NoSuchKey")))
        self.assertFalse(is_transient(ValueError("bug")))


def client_error(status: int, code: str, operation: str = "Op") -> ClientError:
    """The error botocore raises for an S3 answer of ``status`` and ``code``."""
    return ClientError({"Error": {"Code": code, "Message": ""}, "ResponseMetadata": {"HTTPStatusCode": status}}, operation)


class PolicyClient:
    """A client under an IAM policy that grants object reads and writes but not listing: HEADs get 403."""

    def __init__(self, list_code: str) -> None:
        self.list_code = list_code
        self.meta = None

    def head_bucket(self, Bucket):
        raise client_error(403, "403", "HeadBucket")

    def list_objects_v2(self, **kwargs):
        raise client_error(403, self.list_code, "ListObjectsV2")

    def head_object(self, Bucket, Key):
        raise client_error(403, "403", "HeadObject")


class NarrowPolicyTests(SynchronousTestCase):
    """Credentials that may read and write objects but not list the bucket work, as on the Go daemon."""

    def storage(self, list_code: str, **settings) -> S3ObjectStorage:
        return S3ObjectStorage(
            MemoryReactorClock(), S3Settings(bucket="b", **(settings or {"access_key": "id", "secret_key": "s"})),
            InlineRunner(), client_factory=lambda settings: PolicyClient(list_code),
        )

    def test_start_goes_on_without_list_permission(self):
        """A refused HEAD of the bucket, then AccessDenied on listing: the start succeeds."""
        storage = self.storage("AccessDenied")
        self.successResultOf(storage.start())

    def test_missing_key_under_narrow_policy(self):
        """A 403 on HEAD of a key means absent (S3 hides absence from who may not list)."""
        storage = self.storage("AccessDenied")
        self.successResultOf(storage.start())
        self.assertFalse(self.successResultOf(storage.exists("assets/x")))

    def test_bad_key_still_refused(self):
        """A refused HEAD, then InvalidAccessKeyId on listing: the start fails naming AWS_ACCESS_KEY."""
        storage = self.storage("InvalidAccessKeyId")
        failure = self.failureResultOf(storage.start(), ConfigError)
        self.assertEqual(failure.value.variable, "AWS_ACCESS_KEY")
        self.assertIn("InvalidAccessKeyId", failure.value.problem)

    def test_refused_role_names_managed_iam(self):
        """With S3_USE_AWS_MANAGED_IAM, refused credentials name that setting and the credential chain."""
        storage = self.storage("InvalidAccessKeyId", managed_iam=True)
        failure = self.failureResultOf(storage.start(), ConfigError)
        self.assertEqual(failure.value.variable, "S3_USE_AWS_MANAGED_IAM")
        self.assertIn("the AWS credential chain", failure.value.problem)


class TricklingS3(Protocol):
    """Answers a HEAD at once and a GET with a 1000-byte body sent one byte every 50 ms."""

    def connectionMade(self):
        self.factory.connections.append(self)
        self.buffer = b""
        self.sending = None

    def dataReceived(self, data):
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        if head.startswith(b"HEAD"):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        self.sending = LoopingCall(self.transport.write, b"x")
        self.sending.clock = reactor
        self.sending.start(0.05)

    def connectionLost(self, reason):
        if self.sending is not None and self.sending.running:
            self.sending.stop()


class TricklingPeerTests(AsyncTestCase):
    """A store that trickles its answer, never silent long enough for the read timeout."""

    timeout = 60

    async def test_call_timeout(self):
        """The call fails after call_timeout with an error saying so, though bytes keep coming."""
        runner = ThreadPoolRunner(reactor, "test-s3", max_threads=2)
        self.addCleanup(runner.stop)
        factory = Factory.forProtocol(TricklingS3)
        factory.connections = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")

        async def close():
            for connection in factory.connections:
                connection.transport.abortConnection()
            await port.stopListening()

        # before the runner's stop: the blocked thread sees the connection end
        self.addCleanup(lambda: Deferred.fromCoroutine(close()))
        settings = S3Settings(
            bucket="b", endpoint=f"http://127.0.0.1:{port.getHost().port}", use_aws=False,
            access_key="a", secret_key="b", read_timeout=5.0, call_timeout=1.0,
        )
        storage = S3ObjectStorage(reactor, settings, runner, retry=RetryPolicy(attempts=1))
        await storage.start()
        try:
            await storage.load("plugin/slow")
        except ObjectStorageError as error:
            self.assertEqual(error.message, "object storage cannot load plugin/slow: no complete answer within 1 s")
        else:
            self.fail("the load did not fail")

"""
:class:`S3ObjectStorage`: IObjectStorage on an S3-compatible bucket
(``PLUGIN_STORAGE_TYPE=aws_s3``).

Keys are the object keys as they are, with no prefix of ours: the Go daemon
(dify-cloud-kit's ``oss/s3``) stores ``plugin_packages/<identifier>`` at
exactly that key, so both daemons read each other's bucket.

Every S3 request is one botocore call run in a thread pool of the store's
own (botocore is blocking); what to do between requests -- retry, give up,
abort a multipart upload -- is decided on the reactor thread, so a retry
waits on ``reactor.callLater``, not in a sleeping thread.  botocore's own
retries are off for that reason; its SigV4 signer, endpoint and addressing
rules are used as they are.

Failure modes and what they give:

- a transient failure (connection refused or reset, a timeout, HTTP 5xx,
  ``SlowDown``): tried again after a growing pause, :class:`RetryPolicy`;
  after the last attempt an :class:`~difydaemon.errors.ObjectStorageError`
  naming the operation, the key and the reason;
- a peer that accepts and never answers: botocore's connect and read
  timeouts turn it into a transient failure;
- any other refusal (403, a missing bucket): an ObjectStorageError at once;
- a save that fails leaves no object: small objects go up in one PUT, which
  S3 applies whole or not at all; large ones in a multipart upload that is
  aborted when any part fails, and that no reader sees before it completes.
"""

from __future__ import annotations

import io

from attrs import field, frozen
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from difydaemon.errors import ConfigError, ObjectNotFoundError, ObjectStorageError
from difydaemon.interfaces import IObjectStorage
from difydaemon.storage.keys import check_key, check_prefix, storage_error

log = Logger()

#: bytes above which a save is a multipart upload; S3 allows 5 GiB in one
#: PUT, but a part that fails is retried alone
MULTIPART_THRESHOLD = 16 * 1024 * 1024
#: bytes per part (S3's minimum is 5 MiB, but for the last part)
PART_SIZE = 8 * 1024 * 1024

#: error codes S3 and compatible stores answer for a passing overload
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "Throttling"}
)
_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
#: good credentials that a policy does not allow this request
_NOT_ALLOWED_CODES = frozenset({"AccessDenied", "AllAccessDisabled"})


@frozen
class S3Settings:
    """
    Where the bucket is and how to sign for it, with the Go daemon's
    variables (``http-api.md`` §6).

    :ivar bucket: ``PLUGIN_STORAGE_OSS_BUCKET``.
    :ivar region: ``AWS_REGION`` (None: botocore's own resolution, or
        ``us-east-1`` for a non-AWS endpoint).
    :ivar endpoint: ``S3_ENDPOINT`` (None: AWS's endpoint for the region).
    :ivar path_style: ``S3_USE_PATH_STYLE``: ``http://host/bucket/key``
        rather than ``http://bucket.host/key``.
    :ivar use_aws: ``S3_USE_AWS``: the AWS credential chain applies when no
        keys are given.
    :ivar managed_iam: ``S3_USE_AWS_MANAGED_IAM``: credentials come from the
        environment, instance or pod role, never from the keys below.
    :ivar access_key: ``AWS_ACCESS_KEY``.
    :ivar secret_key: ``AWS_SECRET_KEY``.
    """

    bucket: str
    region: str | None = None
    endpoint: str | None = None
    path_style: bool = True
    use_aws: bool = True
    managed_iam: bool = False
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    #: seconds a connection attempt may take
    connect_timeout: float = 5.0
    #: seconds of silence on an open request before it counts as failed
    read_timeout: float = 30.0
    #: seconds one request may take in all: a peer that trickles its answer
    #: never trips the read timeout (the request's thread stays blocked
    #: until it does, but the caller is answered)
    call_timeout: float = 300.0

    def static_keys(self) -> bool:
        """Whether the access and secret keys sign requests (not the credential chain)."""
        return bool(self.access_key and self.secret_key) and not self.managed_iam


@frozen
class RetryPolicy:
    """
    How often and how patiently a transient failure is tried again: the
    pause starts at ``first_pause`` seconds and doubles up to ``max_pause``.
    """

    attempts: int = 5
    first_pause: float = 0.2
    max_pause: float = 5.0

    def pause(self, failures: int) -> float:
        """The pause after the ``failures``-th failure in a row (1-based)."""
        return min(self.max_pause, self.first_pause * (2 ** (failures - 1)))


def make_client(settings: S3Settings, max_connections: int = 10):
    """
    A botocore S3 client for ``settings`` (blocking: it reads botocore's
    service models; call it in a thread).

    Checksums are sent and checked only where S3 requires them: the CRC
    trailers newer botocore adds by default are refused by several
    S3-compatible stores.
    """
    import boto3
    from botocore.config import Config as BotocoreConfig

    region = settings.region
    if region is None and (settings.endpoint or not settings.use_aws):
        # compatible stores ignore the region, but SigV4 needs one
        region = "us-east-1"
    config = BotocoreConfig(
        region_name=region,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries={"total_max_attempts": 1},
        max_pool_connections=max_connections,
        s3={"addressing_style": "path" if settings.path_style else "virtual"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    keys = {}
    if settings.static_keys():
        keys = {"aws_access_key_id": settings.access_key, "aws_secret_access_key": settings.secret_key}
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=settings.endpoint or None, config=config, **keys)


def _http_status(error) -> int | None:
    response = getattr(error, "response", None) or {}
    return (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")


def _error_code(error) -> str:
    response = getattr(error, "response", None) or {}
    return str((response.get("Error") or {}).get("Code", ""))


def is_missing(error) -> bool:
    """Whether a botocore error says the key (or bucket) does not exist."""
    return _error_code(error) in _MISSING_CODES or _http_status(error) == 404


def is_transient(error) -> bool:
    """Whether trying the same request again later may succeed."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(error, (ConnectionError, HTTPClientError, CallTimeout)):
        return True
    if isinstance(error, ClientError):
        status = _http_status(error) or 0
        return status >= 500 or _error_code(error) in _TRANSIENT_CODES
    return False


def describe(error) -> str:
    """A one-line reason for a botocore error, without the request's secrets."""
    code = _error_code(error)
    if code:
        message = (getattr(error, "response", None) or {}).get("Error", {}).get("Message") or ""
        return f"{code}: {message}".rstrip(": ")
    return str(error) or type(error).__name__


@implementer(IObjectStorage)
class S3ObjectStorage:
    """
    IObjectStorage on one bucket of an S3-compatible store.

    :param reactor: keeps time for the retry pauses; results arrive on it.
    :param settings: the :class:`S3Settings`.
    :param runner: a blocking runner (``run(f, *args)``) for the botocore
        calls; a pool of the store's own, so that a slow store never holds
        the threads that decode packages.
    :param retry: the :class:`RetryPolicy` of transient failures.
    :param client_factory: ``(settings) -> client`` (blocking), botocore's
        by default; tests pass one that fails on purpose.
    :param multipart_threshold: bytes above which saves go up in parts.
    :param part_size: bytes per part.
    :param page_size: keys asked for per listing request (S3 gives at most
        1000).
    """

    def __init__(
        self,
        reactor,
        settings: S3Settings,
        runner,
        retry: RetryPolicy = RetryPolicy(),
        client_factory=None,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
        page_size: int = 1000,
    ) -> None:
        self._reactor = reactor
        self._settings = settings
        self._bucket = settings.bucket
        self._runner = runner
        self._retry = retry
        self._client_factory = client_factory or make_client
        self._client = None
        self._threshold = multipart_threshold
        self._part_size = part_size
        self._page_size = page_size
        #: transient failures met so far (an operator's figure; tests wait on it)
        self.transient_failures = 0
        self._stopped = False
        #: the retry pauses under way, cancelled by :meth:`stop`
        self._pauses: set = set()

    # -- start-up

    def start(self) -> Deferred:
        """
        Make the client and check the bucket (create it if it is missing,
        as the Go daemon does).  Fails with a
        :class:`~difydaemon.errors.ConfigError` naming the setting to fix
        when the endpoint cannot be reached, the credentials are refused or
        the bucket cannot be had.
        """
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        try:
            self._client = await self._runner.run(self._client_factory, self._settings)
        except Exception as error:
            raise ConfigError("AWS_REGION", f"cannot make an S3 client: {describe(error)}") from None
        try:
            await self._call_with_retry("reach", self._bucket, self._client.head_bucket, Bucket=self._bucket)
            return
        except ObjectStorageError as error:
            cause = error.__cause__
        if cause is not None and is_missing(cause):
            await self._create_bucket()
            return
        if _http_status(cause) in (401, 403):
            cause = await self._probe_objects()
            if cause is None:
                return
        raise self._startup_error(cause)

    async def _probe_objects(self):
        """
        After a HEAD of the bucket was refused: None when the credentials are
        good but may not list the bucket (an IAM policy granting only object
        reads and writes, which the Go daemon runs on), else the error that
        says what is wrong.  A HEAD answer has no body; this one has.
        """
        try:
            await self._call_with_retry(
                "reach", self._bucket, self._client.list_objects_v2, Bucket=self._bucket, MaxKeys=1
            )
            return None
        except ObjectStorageError as error:
            cause = error.__cause__
        if _error_code(cause) in _NOT_ALLOWED_CODES:
            log.warn(
                "the credentials may not list bucket {bucket} ({reason}); going on, as the Go daemon does",
                bucket=self._bucket, reason=describe(cause),
            )
            return None
        return cause

    async def _create_bucket(self) -> None:
        log.warn("bucket {bucket} does not exist; creating it", bucket=self._bucket)
        arguments = {"Bucket": self._bucket}
        region = self._client.meta.region_name
        if region and region != "us-east-1" and not self._settings.endpoint:
            arguments["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            await self._call_with_retry("create bucket", self._bucket, self._client.create_bucket, **arguments)
        except ObjectStorageError as error:
            raise ConfigError(
                "PLUGIN_STORAGE_OSS_BUCKET",
                f"bucket {self._bucket!r} does not exist and cannot be created: {describe(error.__cause__)}",
            ) from None

    def _startup_error(self, cause) -> ConfigError:
        from botocore.exceptions import ClientError, NoCredentialsError, ParamValidationError, PartialCredentialsError

        endpoint = self._settings.endpoint or "the AWS endpoint"
        if isinstance(cause, (NoCredentialsError, PartialCredentialsError)):
            return ConfigError(
                "AWS_ACCESS_KEY", "no S3 credentials: set AWS_ACCESS_KEY and AWS_SECRET_KEY, or give the daemon a role"
            )
        if isinstance(cause, ParamValidationError):
            return ConfigError("PLUGIN_STORAGE_OSS_BUCKET", f"bucket {self._bucket!r}: {describe(cause)}")
        if isinstance(cause, ClientError):
            status = _http_status(cause)
            if status in (401, 403):
                if self._settings.static_keys():
                    variable, whose = "AWS_ACCESS_KEY", "AWS_ACCESS_KEY and AWS_SECRET_KEY"
                else:
                    variable = "S3_USE_AWS_MANAGED_IAM" if self._settings.managed_iam else "AWS_ACCESS_KEY"
                    whose = "the AWS credential chain: the instance or pod role, AWS_* environment variables"
                return ConfigError(
                    variable,
                    f"the S3 store at {endpoint} refused the credentials for bucket {self._bucket!r} "
                    f"(from {whose}): {describe(cause)}",
                )
            return ConfigError(
                "PLUGIN_STORAGE_OSS_BUCKET", f"bucket {self._bucket!r} at {endpoint}: {describe(cause)}"
            )
        return ConfigError("S3_ENDPOINT", f"cannot reach the S3 store at {endpoint}: {describe(cause)}")

    def stop(self) -> None:
        """
        The daemon is stopping: no call starts or is tried again any more,
        and the calls waiting to be tried again fail now, so that nothing
        hands work to the thread pool once it is being stopped.
        """
        self._stopped = True
        for pause in list(self._pauses):
            pause.cancel()

    # -- IObjectStorage

    def _refused(self, check, key: str):
        """A failed Deferred when ``key`` is malformed or the store has not started, else None."""
        try:
            check(key)
        except ValueError:
            return fail()
        if self._client is None:
            return fail(storage_error("use", key, "the store has not been started"))
        return None

    def save(self, key: str, data: bytes) -> Deferred:
        refused = self._refused(check_key, key)
        if refused is not None:
            return refused
        return Deferred.fromCoroutine(self._save(key, bytes(data)))

    def load(self, key: str) -> Deferred:
        refused = self._refused(check_key, key)
        if refused is not None:
            return refused
        return Deferred.fromCoroutine(self._load(key))

    def exists(self, key: str) -> Deferred:
        refused = self._refused(check_key, key)
        if refused is not None:
            return refused
        return Deferred.fromCoroutine(self._exists(key))

    def delete(self, key: str) -> Deferred:
        refused = self._refused(check_key, key)
        if refused is not None:
            return refused
        return Deferred.fromCoroutine(
            self._call_with_retry("delete", key, self._client.delete_object, Bucket=self._bucket, Key=key)
        )

    def list(self, prefix: str) -> Deferred:
        refused = self._refused(check_prefix, prefix)
        if refused is not None:
            return refused
        return Deferred.fromCoroutine(self._list(prefix))

    # -- the operations

    async def _save(self, key: str, data: bytes) -> None:
        if len(data) <= self._threshold:
            await self._call_with_retry("save", key, self._client.put_object, Bucket=self._bucket, Key=key, Body=data)
            return
        upload = await self._call_with_retry(
            "save", key, self._client.create_multipart_upload, Bucket=self._bucket, Key=key
        )
        upload_id = upload["UploadId"]
        try:
            parts = []
            view = memoryview(data)
            for number, start in enumerate(range(0, len(data), self._part_size), start=1):
                answer = await self._call_with_retry(
                    "save",
                    key,
                    _upload_part,
                    self._client,
                    self._bucket,
                    key,
                    upload_id,
                    number,
                    view[start:start + self._part_size],
                )
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            await self._call_with_retry(
                "save",
                key,
                self._client.complete_multipart_upload,
                Bucket=self._bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            # the parts already sent are stored (and billed) until aborted
            await self._abort(key, upload_id)
            raise

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await self._call_with_retry(
                "abort the upload of",
                key,
                self._client.abort_multipart_upload,
                Bucket=self._bucket,
                Key=key,
                UploadId=upload_id,
            )
        except ObjectStorageError as error:
            log.error(
                "aborting the multipart upload {upload_id} of {key} failed: {reason}",
                upload_id=upload_id, key=key, reason=error.message,
            )

    async def _load(self, key: str) -> bytes:
        try:
            return await self._call_with_retry("load", key, _get_object, self._client, self._bucket, key)
        except ObjectStorageError as error:
            if error.__cause__ is not None and is_missing(error.__cause__):
                raise ObjectNotFoundError(f"object {key} not found") from None
            raise

    async def _exists(self, key: str) -> bool:
        try:
            await self._call_with_retry("look up", key, self._client.head_object, Bucket=self._bucket, Key=key)
        except ObjectStorageError as error:
            cause = error.__cause__
            # S3 answers 403, not 404, for a missing key to whom may not
            # list the bucket; the credentials were checked at start
            if cause is not None and (is_missing(cause) or _http_status(cause) == 403):
                return False
            raise
        return True

    async def _list(self, prefix: str) -> list:
        below = prefix + "/" if prefix else ""
        keys = []
        token = None
        while True:
            arguments = {"Bucket": self._bucket, "Prefix": below, "MaxKeys": self._page_size}
            if token is not None:
                arguments["ContinuationToken"] = token
            page = await self._call_with_retry("list", prefix or "/", self._client.list_objects_v2, **arguments)
            keys.extend(entry["Key"] for entry in page.get("Contents", ()))
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = page["NextContinuationToken"]

    async def _call_with_retry(self, operation: str, key: str, function, *args, **kwargs):
        """
        ``function(*args, **kwargs)`` in a thread, tried again after a pause
        while it fails transiently.  Any final failure is an
        ObjectStorageError whose ``__cause__`` is botocore's error.
        """
        failures = 0
        while True:
            if self._stopped:
                raise storage_error(operation, key, "the daemon is stopping")
            try:
                return await self._runner.run(function, *args, **kwargs).addTimeout(
                    self._settings.call_timeout, self._reactor, onTimeoutCancel=_took_too_long
                )
            except Exception as error:
                if isinstance(error, (ObjectStorageError, ObjectNotFoundError)):
                    raise
                failures += 1
                if not is_transient(error) or failures >= self._retry.attempts:
                    raise storage_error(operation, key, describe(error)) from error
                self.transient_failures += 1
                pause = self._retry.pause(failures)
                log.warn(
                    "object storage: {operation} {key} failed ({reason}); trying again in {pause:g} s",
                    operation=operation, key=key, reason=describe(error), pause=pause,
                )
                waiting = deferLater(self._reactor, pause, lambda: None)
                self._pauses.add(waiting)
                try:
                    await waiting
                except CancelledError:
                    raise storage_error(operation, key, "the daemon is stopping") from error
                finally:
                    self._pauses.discard(waiting)


class CallTimeout(Exception):
    """An S3 request that went on past :attr:`S3Settings.call_timeout`."""


def _took_too_long(result, timeout):
    raise CallTimeout(f"no complete answer within {timeout:g} s")


def _upload_part(client, bucket: str, key: str, upload_id: str, number: int, view: memoryview) -> dict:
    # one part's copy at a time: botocore needs a seekable body to sign it
    return client.upload_part(
        Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=io.BytesIO(view)
    )


def _get_object(client, bucket: str, key: str) -> bytes:
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    try:
        return body.read()
    finally:
        body.close()

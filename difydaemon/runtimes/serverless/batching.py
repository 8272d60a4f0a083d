"""
Splitting text-embedding and num-tokens calls under the request size limit,
and merging their answers (``serverless.md`` §3.3).  Pure.

A function takes one request body of at most ``MAX_SERVERLESS_REQUEST_BYTES``;
an embedding call with many texts is cut into batches sent one after
another (same session id), and the batches' single results are merged
into the one result the caller expects.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

import orjson

EMBEDDING_ACTION = "invoke_text_embedding"
NUM_TOKENS_ACTION = "get_text_embedding_num_tokens"
BATCHED_ACTIONS = frozenset({EMBEDDING_ACTION, NUM_TOKENS_ACTION})
PAYLOAD_TOO_LARGE = "ServerlessPayloadTooLarge"
BATCH_MISMATCH = "ServerlessBatchResultMismatch"

_SUMMED = ("tokens", "total_tokens", "latency")
_REQUIRED_USAGE = ("tokens", "total_tokens", "currency", "latency")
_EQUAL_USAGE = ("unit_price", "price_unit", "currency")


class PayloadTooLarge(Exception):
    """A request (or one text of it) is over the limit; ``str()`` is the wire text."""


class BatchMismatch(Exception):
    """The batches' results cannot be merged; ``str()`` is the wire text."""


def payload_too_large(action: str, size: int, limit: int, item_index: int | None = None) -> PayloadTooLarge:
    """The ``ServerlessPayloadTooLarge`` error of an oversized request or item."""
    text = f"{PAYLOAD_TOO_LARGE}: action={action} payload_bytes={size} max_request_bytes={limit}"
    if item_index is not None:
        text += f" item_index={item_index}"
    return PayloadTooLarge(text)


def plan_batches(request: dict, limit: int) -> list[list[int]]:
    """
    The indexes of ``request["data"]["texts"]`` in each batch: packed
    greedily in order so that each batch's serialized request stays within
    ``limit`` bytes (each text counts its JSON length plus one comma).

    :raises PayloadTooLarge: when one text alone does not fit.
    """
    data = request["data"]
    texts = data.get("texts")
    if not isinstance(texts, list):
        texts = []
    empty = dict(request, data=dict(data, texts=[]))
    base = len(orjson.dumps(empty))
    batches: list[list[int]] = []
    current: list[int] = []
    size = base
    for index, text in enumerate(texts):
        cost = len(orjson.dumps(text))
        if base + cost > limit:
            raise payload_too_large(str(data.get("action")), base + cost, limit, index)
        extra = cost + (1 if current else 0)
        if current and size + extra > limit:
            batches.append(current)
            current, size, extra = [], base, cost
        current.append(index)
        size += extra
    if current or not batches:
        batches.append(current)
    return batches


def batch_request(request: dict, indexes: list[int]) -> dict:
    """The request of one batch: the same, with only those texts."""
    data = request["data"]
    texts = data["texts"]
    return dict(request, data=dict(data, texts=[texts[i] for i in indexes]))


def _mismatch(action, batch_index, expected, actual, responses, reason) -> BatchMismatch:
    return BatchMismatch(
        f"{BATCH_MISMATCH}: action={action} batch_index={batch_index} expected_items={expected}"
        f" actual_items={actual} response_count={responses} reason={reason}"
    )


def _decimal(value):
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


class BatchMerger:
    """
    Merges the single results of the batches of one call, in order.

    :param action: ``invoke_text_embedding`` or ``get_text_embedding_num_tokens``.
    :param total: how many texts the whole call has.
    """

    def __init__(self, action: str, total: int) -> None:
        self.action = action
        self.total = total
        self._merged: dict | None = None
        self._batches = 0

    def add(self, expected: int, results: list) -> None:
        """
        The results (chunks) of the next batch of ``expected`` texts.

        :raises BatchMismatch: when they cannot be merged.
        """
        index = self._batches
        self._batches += 1
        if len(results) != 1 or not isinstance(results[0], dict):
            raise _mismatch(self.action, index, expected, 0, len(results), "response_count")
        result = results[0]
        if self.action == NUM_TOKENS_ACTION:
            counts = result.get("num_tokens")
            actual = len(counts) if isinstance(counts, list) else 0
            if actual != expected:
                raise _mismatch(self.action, index, expected, actual, 1, "token_count")
            if self._merged is None:
                self._merged = dict(result, num_tokens=list(counts))
            else:
                self._merged["num_tokens"].extend(counts)
            return
        embeddings = result.get("embeddings")
        actual = len(embeddings) if isinstance(embeddings, list) else 0
        if actual != expected:
            raise _mismatch(self.action, index, expected, actual, 1, "embedding_count")
        usage = result.get("usage")
        if not isinstance(usage, dict) or any(name not in usage for name in _REQUIRED_USAGE):
            raise _mismatch(self.action, index, expected, actual, 1, "missing_usage_field")
        merged = self._merged
        if merged is None:
            self._merged = dict(result, embeddings=list(embeddings), usage=dict(usage))
            return
        if result.get("model") != merged.get("model"):
            raise _mismatch(self.action, index, expected, actual, 1, "model")
        total_usage = merged["usage"]
        for name in _EQUAL_USAGE:
            if usage.get(name) != total_usage.get(name):
                raise _mismatch(self.action, index, expected, actual, 1, name)
        merged["embeddings"].extend(embeddings)
        for name in _SUMMED:
            total_usage[name] = total_usage[name] + usage[name]
        if "total_price" in usage:
            before, more = _decimal(total_usage.get("total_price", 0)), _decimal(usage["total_price"])
            if before is not None and more is not None:
                price = before + more
                # prices travel as strings (pydantic Decimals) or numbers: keep the kind
                total_usage["total_price"] = str(price) if isinstance(usage["total_price"], str) else float(price)

    def result(self) -> dict:
        """
        The merged result.

        :raises BatchMismatch: when the merged result does not cover every text.
        """
        merged = self._merged or {}
        key, reason = ("num_tokens", "final_token_count") if self.action == NUM_TOKENS_ACTION else (
            "embeddings", "final_embedding_count")
        got = len(merged.get(key) or [])
        if got != self.total:
            raise _mismatch(self.action, self._batches - 1, self.total, got, self._batches, reason)
        return merged

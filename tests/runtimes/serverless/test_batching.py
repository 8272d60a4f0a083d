"""Tests for difydaemon.runtimes.serverless.batching: embedding and num-tokens batches."""

from __future__ import annotations

import orjson

from difydaemon.runtimes.serverless.batching import (
    EMBEDDING_ACTION,
    NUM_TOKENS_ACTION,
    BatchMerger,
    BatchMismatch,
    PayloadTooLarge,
    batch_request,
    plan_batches,
)
from difydaemon.testing.cases import SynchronousTestCase


def request(texts, action=EMBEDDING_ACTION) -> dict:
    return {
        "session_id": "s",
        "conversation_id": None,
        "message_id": None,
        "app_id": None,
        "endpoint_id": None,
        "context": None,
        "event": "request",
        "data": {"type": "model", "action": action, "model": "m", "texts": texts},
    }


def usage(tokens=2, price="0.002", currency="USD", **extra) -> dict:
    return dict(
        tokens=tokens, total_tokens=tokens, unit_price="0.001", price_unit="1", total_price=price,
        currency=currency, latency=0.5, **extra,
    )


class PlanTests(SynchronousTestCase):
    """Greedy packing under the limit."""

    def test_one_batch(self):
        """Texts that fit go in one batch."""
        self.assertEqual(plan_batches(request(["a", "b"]), 10_000), [[0, 1]])

    def test_every_batch_fits(self):
        """Each batch's serialized request stays within the limit and the batches keep the order."""
        texts = ["x" * n for n in (10, 30, 5, 40, 1, 1, 25)]
        base = len(orjson.dumps(request([])))
        limit = base + 45
        batches = plan_batches(request(texts), limit)
        self.assertEqual([i for batch in batches for i in batch], list(range(len(texts))))
        self.assertGreater(len(batches), 1)
        for batch in batches:
            self.assertLessEqual(len(orjson.dumps(batch_request(request(texts), batch))), limit)

    def test_limit_is_exact(self):
        """A batch whose request is exactly the limit is one batch; one byte less makes two."""
        whole = len(orjson.dumps(request(["aaa", "bbb"])))
        self.assertEqual(plan_batches(request(["aaa", "bbb"]), whole), [[0, 1]])
        self.assertEqual(plan_batches(request(["aaa", "bbb"]), whole - 1), [[0], [1]])

    def test_text_too_large(self):
        """A single text over the limit names its index."""
        base = len(orjson.dumps(request([])))
        error = self.assertRaises(PayloadTooLarge, plan_batches, request(["a", "y" * 100]), base + 20)
        self.assertIn("ServerlessPayloadTooLarge: action=invoke_text_embedding", str(error))
        self.assertTrue(str(error).endswith("item_index=1"))


class MergeTests(SynchronousTestCase):
    """Merge rules of §3.3."""

    def test_embeddings(self):
        """Embeddings are concatenated, tokens and latency summed, prices added."""
        merger = BatchMerger(EMBEDDING_ACTION, 3)
        merger.add(2, [{"model": "m", "embeddings": [[1.0], [2.0]], "usage": usage(2, "0.002")}])
        merger.add(1, [{"model": "m", "embeddings": [[3.0]], "usage": usage(1, "0.001")}])
        merged = merger.result()
        self.assertEqual(merged["embeddings"], [[1.0], [2.0], [3.0]])
        self.assertEqual((merged["usage"]["tokens"], merged["usage"]["total_tokens"]), (3, 3))
        self.assertEqual(merged["usage"]["latency"], 1.0)
        self.assertEqual(merged["usage"]["total_price"], "0.003")

    def test_num_tokens(self):
        """num_tokens lists are concatenated."""
        merger = BatchMerger(NUM_TOKENS_ACTION, 3)
        merger.add(1, [{"num_tokens": [4]}])
        merger.add(2, [{"num_tokens": [5, 6]}])
        self.assertEqual(merger.result(), {"num_tokens": [4, 5, 6]})

    def assert_mismatch(self, reason, *batches, total=None):
        merger = BatchMerger(EMBEDDING_ACTION, total if total is not None else sum(b[0] for b in batches))
        try:
            for expected, results in batches:
                merger.add(expected, results)
            merger.result()
        except BatchMismatch as exc:
            self.assertIn("ServerlessBatchResultMismatch: action=invoke_text_embedding", str(exc))
            self.assertTrue(str(exc).endswith("reason=" + reason), str(exc))
        else:
            self.fail("no mismatch")

    def test_mismatches(self):
        """Each rule breaks with its reason."""
        one = {"model": "m", "embeddings": [[1.0]], "usage": usage()}
        self.assert_mismatch("response_count", (1, [one, one]))
        self.assert_mismatch("embedding_count", (2, [one]))
        self.assert_mismatch("missing_usage_field", (1, [{"model": "m", "embeddings": [[1]], "usage": {"tokens": 1}}]))
        self.assert_mismatch("model", (1, [one]), (1, [dict(one, model="other")]))
        self.assert_mismatch("currency", (1, [one]), (1, [dict(one, usage=usage(currency="EUR"))]))
        self.assert_mismatch("final_embedding_count", (1, [one]), total=2)

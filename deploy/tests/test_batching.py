"""Batched inference (serve's micro-batcher, watch's per-pass batches) and the onnxruntime session options.

Real onnxruntime sessions on a small convolutional model; values, not timings: batched logits equal the
per-image logits, concurrent calls are coalesced into fewer runs, the options reach the session.
"""

import threading
import time

import numpy as np
import pytest
from corpus import image_bytes, noisy_bytes
from fastapi.testclient import TestClient
from onnx_models import write_conv_model

from stablesdg_line import Classifier, RuntimeOptions
from stablesdg_line.batching import MicroBatcher
from stablesdg_line.cli import _build_parser, _load_classifier, main
from stablesdg_line.server import ServeConfig, create_app
from stablesdg_line.watch import DropFolderWatcher, WatchConfig

ATOL = 1e-5


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory):
    return write_conv_model(tmp_path_factory.mktemp("conv") / "conv.onnx")


def noisy_images(n: int) -> list[bytes]:
    rng = np.random.default_rng(3)
    return [
        image_bytes(tuple(int(v) for v in rng.integers(0, 255, 3)), size=(40, 30))
        if i % 2
        else noisy_bytes("PNG", size=(48 + i, 40))
        for i, _ in enumerate(range(n))
    ]


def test_batched_scores_equal_per_image_scores(conv_model):
    classifier = Classifier(conv_model)
    images = noisy_images(7)
    together = classifier.classify(images)
    alone = [classifier.classify([image])[0] for image in images]
    for batched, single in zip(together, alone, strict=True):
        assert batched.label == single.label
        np.testing.assert_allclose(list(batched.scores.values()), list(single.scores.values()), atol=ATOL)


def gated(classifier: Classifier):
    """`run_batch` whose first call waits for `release` (set once every caller has queued: no timing in the
    tests), the batch sizes it was called with, and the event."""
    release, calls = threading.Event(), []

    def gated_run(x):
        calls.append(len(x))
        if len(calls) == 1:
            release.wait(10)
        return classifier.run_batch(x)

    return gated_run, release, calls


def test_micro_batcher_coalesces_concurrent_calls_and_keeps_each_callers_rows(conv_model):
    classifier = Classifier(conv_model)
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(n, 3, 32, 32)).astype(np.float32) for n in (1, 2, 1, 3, 1)]
    expected = [classifier.run_batch(x) for x in inputs]
    gated_run, release, calls = gated(classifier)

    results: dict[int, np.ndarray] = {}
    with MicroBatcher(gated_run, max_batch=32) as batcher:
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, batcher.run(inputs[i])))
            for i in range(len(inputs))
        ]
        threads[0].start()
        while not calls:
            time.sleep(0.001)
        for t in threads[1:]:
            t.start()
        while batcher._queue.qsize() < len(inputs) - 1:
            time.sleep(0.001)
        release.set()
        for t in threads:
            t.join(10)
    assert calls == [1, 7]  # the lone first call, then the other four callers' 7 images in one run
    for i, x in enumerate(inputs):
        assert results[i].shape == (len(x), 3)
        np.testing.assert_allclose(results[i], expected[i], atol=ATOL)


def test_micro_batcher_respects_max_batch_and_order(conv_model):
    classifier = Classifier(conv_model)
    rng = np.random.default_rng(1)
    inputs = [rng.normal(size=(2, 3, 32, 32)).astype(np.float32) for _ in range(5)]
    gated_run, release, calls = gated(classifier)

    out: dict[int, np.ndarray] = {}
    with MicroBatcher(gated_run, max_batch=4) as batcher:
        first = threading.Thread(target=lambda: out.__setitem__(0, batcher.run(inputs[0])))
        first.start()
        while not calls:
            time.sleep(0.001)
        rest = [
            threading.Thread(target=lambda i=i: out.__setitem__(i, batcher.run(inputs[i])))
            for i in range(1, 5)
        ]
        for t in rest:
            t.start()
        while batcher._queue.qsize() < 4:
            time.sleep(0.001)
        release.set()
        for t in [first, *rest]:
            t.join(10)
    assert calls == [2, 4, 4]
    for i, x in enumerate(inputs):
        np.testing.assert_allclose(out[i], classifier.run_batch(x), atol=ATOL)


def test_micro_batcher_hands_a_failed_run_to_its_callers_and_lives_on():
    def run(x):
        if np.isnan(x).any():
            raise ValueError("bad batch")
        return x.reshape(len(x), -1)[:, :2]

    with MicroBatcher(run) as batcher:
        with pytest.raises(ValueError, match="bad batch"):
            batcher.run(np.full((1, 1, 2, 2), np.nan, np.float32))
        np.testing.assert_array_equal(batcher.run(np.ones((1, 1, 2, 2), np.float32)), [[1.0, 1.0]])


def test_classifier_with_batching_gives_the_same_predictions(conv_model):
    plain, batched = Classifier(conv_model), Classifier(conv_model)
    batched.enable_batching(max_batch=4)
    images = noisy_images(6)
    try:
        for a, b in zip(plain.classify(images), batched.classify(images), strict=True):
            assert a.label == b.label
            np.testing.assert_allclose(list(a.scores.values()), list(b.scores.values()), atol=ATOL)
    finally:
        batched.close()


def test_serve_batches_concurrent_requests_with_the_same_answers(conv_model):
    classifier = Classifier(conv_model)
    reference = {f"{i}.png": p for i, p in enumerate(Classifier(conv_model).classify(noisy_images(8)))}
    app = create_app(classifier, ServeConfig(max_concurrent=4, max_batch=16))
    results: dict[str, dict] = {}
    with TestClient(app) as client:

        def post(i: int, data: bytes) -> None:
            reply = client.post("/classify", files=[("files", (f"{i}.png", data, "image/png"))])
            assert reply.status_code == 200
            results[f"{i}.png"] = reply.json()["results"][0]

        threads = [threading.Thread(target=post, args=(i, d)) for i, d in enumerate(noisy_images(8))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    stats = app.state.batcher.stats
    assert stats.images == 8 and 1 <= stats.runs <= 8
    for name, row in results.items():
        assert row["class"] == reference[name].label
        np.testing.assert_allclose(
            list(row["scores"].values()), list(reference[name].scores.values()), atol=ATOL
        )
    classifier.close()


def test_serve_max_batch_1_runs_without_a_batcher(conv_model):
    app = create_app(Classifier(conv_model), ServeConfig(max_batch=1))
    assert not hasattr(app.state, "batcher")


def test_watch_runs_files_that_arrive_together_as_one_batch(conv_model, dirs):
    drop, rejected, results = dirs
    for i, data in enumerate(noisy_images(5)):
        (drop / f"{i}.png").write_bytes(data)
    classifier = Classifier(conv_model)
    sizes = []
    original = classifier.run_batch

    def counted(x):
        sizes.append(len(x))
        return original(x)

    classifier.run_batch = counted
    config = WatchConfig(
        drop_dir=drop, results=results, rejected_dir=rejected, settle_seconds=0.0, batch_size=4
    )
    with DropFolderWatcher(classifier, config) as watcher:
        watcher.poll()
        summary = watcher.poll()
    assert summary.classified == 5
    assert sizes == [4, 1]  # two runs for five files with batch_size 4


@pytest.mark.parametrize(
    ("level", "arena"), [("disable", False), ("basic", True), ("extended", False), ("all", True)]
)
def test_session_options_reach_onnxruntime(conv_model, level, arena):
    import onnxruntime as ort

    classifier = Classifier(
        conv_model, RuntimeOptions(threads=2, graph_optimization=level, memory_arena=arena)
    )
    opts = classifier.session.get_session_options()
    assert opts.intra_op_num_threads == 2
    assert opts.enable_cpu_mem_arena is arena
    assert (
        opts.graph_optimization_level
        == {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
    )


def test_every_optimisation_level_gives_the_same_logits(conv_model):
    x = np.random.default_rng(2).normal(size=(3, 3, 32, 32)).astype(np.float32)
    reference = Classifier(conv_model, RuntimeOptions(graph_optimization="disable")).run_batch(x)
    for level in ("basic", "extended", "all"):
        for arena in (True, False):
            got = Classifier(
                conv_model, RuntimeOptions(graph_optimization=level, memory_arena=arena)
            ).run_batch(x)
            np.testing.assert_allclose(got, reference, atol=ATOL)


def test_unknown_optimisation_level_is_refused():
    with pytest.raises(ValueError, match="graph_optimization"):
        RuntimeOptions(graph_optimization="max")


def test_cli_session_options(conv_model):
    args = _build_parser().parse_args(
        ["info", str(conv_model), "--graph-optimization", "basic", "--no-memory-arena", "--threads", "2"]
    )
    options = _load_classifier(args).options
    assert (options.graph_optimization, options.memory_arena, options.threads) == ("basic", False, 2)
    defaults = _load_classifier(_build_parser().parse_args(["info", str(conv_model)])).options
    assert (defaults.graph_optimization, defaults.memory_arena) == ("all", True)
    assert main(["info", str(conv_model), "--graph-optimization", "extended", "--memory-arena"]) == 0


def test_cli_serve_batch_options_parse():
    args = _build_parser().parse_args(["serve", "m.onnx", "--max-batch", "8", "--batch-wait-ms", "2.5"])
    assert (args.max_batch, args.batch_wait_ms) == (8, 2.5)

"""The onnxruntime classifier: sha256 pinning, contract checks, batched classification, per-file errors."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from .batching import DEFAULT_MAX_BATCH, MicroBatcher
from .contract import (
    INPUT_NAME,
    OUTPUT_NAME,
    ModelContractError,
    PreprocessSpec,
    descriptive_metadata,
    parse_preprocess_spec,
    provenance_metadata,
)
from .images import (
    DEFAULT_DECODE_TIMEOUT_S,
    DEFAULT_MAX_PIXELS,
    Deadline,
    ImageRejected,
    ImageSource,
    file_kind,
    load_image,
    open_regular_file,
    preprocess,
    stack_batch,
)

# A line classifier is tens of megabytes (resnet18 fp32: 45 MB); anything above this is not one, and a
# device such as /dev/zero would otherwise be read until memory runs out.
MAX_MODEL_BYTES = 1 << 30
# The contract run at load uses a batch of this many: an output of [1, K] for any batch shows only with N > 1.
CONTRACT_BATCH = 2


class ModelIntegrityError(RuntimeError):
    """The model file's sha256 differs from the pinned one: refuse to run an unexpected or tampered model."""


GRAPH_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class RuntimeOptions:
    """onnxruntime session settings; what each bought on a 2-core PC: benchmarks/bench_limit.py (issue 15)."""

    expected_sha256: str | None = None
    threads: int = 1  # intra-op threads; 1 keeps a line PC responsive, raise it on a dedicated box
    warmup_runs: int = 1
    max_pixels: int = DEFAULT_MAX_PIXELS
    graph_optimization: str = "all"  # disable | basic | extended | all (layout + fusions: the fast one)
    memory_arena: bool = True  # onnxruntime's CPU arena: reuses activation buffers between runs
    # Seconds one file may take to decode (classify, watch); serve applies it to a whole request. None: none.
    decode_timeout_s: float | None = DEFAULT_DECODE_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise ValueError(f"graph_optimization must be one of {sorted(GRAPH_OPTIMIZATION_LEVELS)}, "
                             f"got {self.graph_optimization!r}")


@dataclass(frozen=True)
class Prediction:
    """One file's result. label/confidence are None and error is set when the file could not be classified.

    latency_ms = this file's decode + preprocess time + its equal share of the batch's inference time.
    """

    file: str
    label: str | None
    confidence: float | None
    scores: dict[str, float]
    latency_ms: float
    model_version: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_row(self) -> dict:
        return {"file": self.file, "class": self.label, "confidence": self.confidence,
                "scores": self.scores, "latency_ms": round(self.latency_ms, 3),
                "model_version": self.model_version, "error": self.error}


@dataclass
class _Pending:
    """A decoded + preprocessed item waiting for its batch's inference."""

    name: str
    tensor: np.ndarray | None
    prep_ms: float
    error: str | None = None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _verify_sha256(model_bytes: bytes, expected: str | None, path: Path) -> str:
    actual = sha256_hex(model_bytes)
    if expected is None:
        return actual
    expected = expected.strip().lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise ModelIntegrityError(f"expected sha256 must be 64 hex characters, got {expected!r}")
    if not hmac.compare_digest(actual, expected):
        raise ModelIntegrityError(f"refusing model {path}: sha256 is {actual}, expected {expected} "
                                  "(file changed, corrupted or not the released model)")
    return actual


def read_model_file(path: Path) -> bytes:
    """The model's bytes, only from a regular file of sane size (a FIFO would hang, /dev/zero never ends)."""
    try:
        info = os.stat(path)
    except FileNotFoundError as err:
        raise ModelContractError(f"model file {path} not found") from err
    if not stat.S_ISREG(info.st_mode):
        raise ModelContractError(f"model {path} is not a regular file ({file_kind(info.st_mode)})")
    if info.st_size > MAX_MODEL_BYTES:
        raise ModelContractError(f"model {path} is {info.st_size} bytes, above the {MAX_MODEL_BYTES} a line "
                                 "classifier can need")
    try:
        with open_regular_file(path) as handle:
            data = handle.read(MAX_MODEL_BYTES + 1)
    except ImageRejected as err:
        raise ModelContractError(f"model {err}") from err
    if len(data) > MAX_MODEL_BYTES:
        raise ModelContractError(f"model {path} grew above {MAX_MODEL_BYTES} bytes while being read")
    return data


def _check_output_shape(logits: np.ndarray, batch: int, classes: int, path: Path) -> None:
    if logits.shape != (batch, classes):
        raise ModelContractError(f"model {path} returns '{OUTPUT_NAME}' of shape {list(logits.shape)} for a "
                                 f"batch of {batch}; the contract is [N, {classes}] (one row of "
                                 f"{classes} logits per image)")


def _check_io(session: ort.InferenceSession, spec: PreprocessSpec) -> None:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    input_names, output_names = [i.name for i in inputs], [o.name for o in outputs]
    if input_names != [INPUT_NAME] or OUTPUT_NAME not in output_names:
        raise ModelContractError(f"model must have one input '{INPUT_NAME}' and an output '{OUTPUT_NAME}',"
                                 f" got inputs {input_names} outputs {output_names}")
    declared = inputs[0].shape[1:]
    for dim, want, what in zip(declared, spec.input_shape, ("channels", "height", "width"), strict=False):
        if isinstance(dim, int) and dim != want:
            raise ModelContractError(f"model input {what} is {dim} but metadata implies {want} "
                                     f"(input shape {inputs[0].shape}, metadata {spec.input_shape})")
    out_classes = next(o for o in outputs if o.name == OUTPUT_NAME).shape[-1]
    if isinstance(out_classes, int) and out_classes != len(spec.class_names):
        raise ModelContractError(f"model has {out_classes} logits but metadata lists "
                                 f"{len(spec.class_names)} classes")


class Classifier:
    """Loads a contract-following .onnx once; thread-safe for concurrent classify calls (onnxruntime is)."""

    def __init__(self, model_path: str | Path, options: RuntimeOptions | None = None):
        self.options = options or RuntimeOptions()
        self.model_path = Path(model_path)
        model_bytes = read_model_file(self.model_path)
        # Hash and load the very same bytes, so the file cannot be swapped between check and load.
        self.sha256 = _verify_sha256(model_bytes, self.options.expected_sha256, self.model_path)
        self.session = self._open_session(model_bytes)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.spec = parse_preprocess_spec(self.metadata)
        _check_io(self.session, self.spec)
        self.model_version = descriptive_metadata(self.metadata)["model_version"]
        self._batcher: MicroBatcher | None = None
        self._warm_up()

    def _open_session(self, model_bytes: bytes) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, self.options.threads)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = GRAPH_OPTIMIZATION_LEVELS[self.options.graph_optimization]
        opts.enable_cpu_mem_arena = self.options.memory_arena
        try:
            return ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for unparsable/unsupported graphs
            if "model_path must not be empty" in str(err):  # loaded from the pinned bytes, no path: by design
                raise ModelContractError(
                    f"model {self.model_path} references external data files, which its sha256 pin would "
                    "not cover: refused. Export it as one file (torch.onnx.export(..., external_data=False))"
                ) from err
            raise ModelContractError(f"onnxruntime cannot load {self.model_path}: {err}") from err

    def _warm_up(self) -> None:
        """The contract run (a batch of CONTRACT_BATCH, always) and then the requested warm-up runs."""
        try:
            dummy = np.zeros((CONTRACT_BATCH, *self.spec.input_shape), dtype=np.float32)
            logits = self.run_batch(dummy)
            for _ in range(self.options.warmup_runs):
                self.run_batch(dummy[:1])
        except MemoryError as err:
            raise ModelContractError(f"model {self.model_path}: not enough memory for one input of shape "
                                     f"{self.spec.input_shape} (metadata 'input_size')") from err
        except Exception as err:  # onnxruntime's own error types: the graph cannot run on a valid input
            raise ModelContractError(f"model {self.model_path} fails on an input of shape "
                                     f"{self.spec.input_shape}: {err}") from err
        _check_output_shape(np.asarray(logits), CONTRACT_BATCH, len(self.class_names), self.model_path)
        if not np.all(np.isfinite(logits)):
            raise ModelContractError(f"model {self.model_path} returns non-finite logits for a blank input "
                                     "(check 'mean', 'std' and the weights)")

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    def describe(self) -> dict:
        """Everything an operator needs to identify the loaded model."""
        return {"path": str(self.model_path), "sha256": self.sha256, "model_version": self.model_version,
                "class_names": list(self.class_names), **descriptive_metadata(self.metadata),
                "provenance": provenance_metadata(self.metadata), "metadata": self.metadata}

    def run_batch(self, x: np.ndarray) -> np.ndarray:
        """Raw logits [N, num_classes] for a preprocessed float32 [N, C, H, W] batch."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    def enable_batching(self, max_batch: int = DEFAULT_MAX_BATCH, max_wait_s: float = 0.0) -> MicroBatcher:
        """From now on, concurrent `classify` calls share onnxruntime runs (see batching.MicroBatcher)."""
        if self._batcher is None:
            self._batcher = MicroBatcher(self.run_batch, max_batch, max_wait_s)
        return self._batcher

    def close(self) -> None:
        """Stop the batching thread, if any (the session itself is freed with the object)."""
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None

    def classify(self, inputs: Sequence[Image.Image | ImageSource],
                 names: Sequence[str] | None = None, deadline: Deadline | None = None) -> list[Prediction]:
        """Classify PIL images, paths, bytes or streams as one batch; bad inputs become per-file errors.

        Each file may take `options.decode_timeout_s` to decode; a `deadline` instead bounds them all
        together (the server's per-request budget): files still undecoded when it passes are refused.
        """
        names = names or [_default_name(item, i) for i, item in enumerate(inputs)]
        return self._infer([self._prepare(item, name, deadline)
                            for item, name in zip(inputs, names, strict=True)])

    def classify_files(self, paths: Iterable[str | Path], batch_size: int = 16) -> Iterator[Prediction]:
        """Stream predictions for many files, batch_size files per inference call."""
        batch: list[str | Path] = []
        for path in paths:
            batch.append(path)
            if len(batch) >= batch_size:
                yield from self.classify(batch)
                batch = []
        if batch:
            yield from self.classify(batch)

    def _prepare(self, item: Image.Image | ImageSource, name: str, deadline: Deadline | None) -> _Pending:
        start = time.perf_counter()
        try:
            if isinstance(item, Image.Image):
                image = item
            else:
                deadline = deadline or Deadline.after(self.options.decode_timeout_s)
                image = load_image(item, self.options.max_pixels, deadline)
            tensor = preprocess(image, self.spec)
        except ImageRejected as err:
            return _Pending(name, None, _ms_since(start), error=str(err))
        except Exception as err:  # e.g. a mode PIL cannot convert: still only this file's problem
            reason = f"cannot preprocess: {type(err).__name__}: {err}"
            return _Pending(name, None, _ms_since(start), error=reason)
        return _Pending(name, tensor, _ms_since(start))

    def _infer(self, items: list[_Pending]) -> list[Prediction]:
        valid = [item for item in items if item.tensor is not None]
        probs: dict[int, np.ndarray] = {}
        share_ms = 0.0
        if valid:
            start = time.perf_counter()
            batch = stack_batch([item.tensor for item in valid])
            batcher = self._batcher
            batch_probs = softmax(batcher.run(batch) if batcher is not None else self.run_batch(batch))
            share_ms = _ms_since(start) / len(valid)
            probs = {id(item): p for item, p in zip(valid, batch_probs, strict=True)}
        return [self._prediction(item, probs.get(id(item)), share_ms) for item in items]

    def _prediction(self, item: _Pending, probs: np.ndarray | None, share_ms: float) -> Prediction:
        if probs is None:
            return Prediction(item.name, None, None, {}, item.prep_ms, self.model_version, item.error)
        if not np.all(np.isfinite(probs)):  # never report NaN as a confidence (and keep the JSON valid)
            return Prediction(item.name, None, None, {}, item.prep_ms + share_ms, self.model_version,
                              "model returned non-finite scores for this image")
        best = int(np.argmax(probs))
        scores = {name: float(p) for name, p in zip(self.class_names, probs, strict=True)}
        return Prediction(item.name, self.class_names[best], float(probs[best]), scores,
                          item.prep_ms + share_ms, self.model_version)


def _default_name(item: Image.Image | ImageSource, index: int) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"item-{index}"


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0

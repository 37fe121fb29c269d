"""`stablesdg-line` command line: classify, watch, serve, info (stdlib argparse: no extra dependency)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from . import __version__, pull
from .classifier import GRAPH_OPTIMIZATION_LEVELS, Classifier, ModelIntegrityError, Prediction, RuntimeOptions
from .contract import ModelContractError
from .images import DEFAULT_DECODE_TIMEOUT_S, DEFAULT_MAX_PIXELS
from .reload import DEFAULT_FOLLOW_INTERVAL_S, ModelSlot, Reloader
from .review import ReviewConfigError, add_review_options, review_from_args
from .watch import IMAGE_EXTENSIONS, DropFolderWatcher, WatchConfig, WatchError

# Defaults of the serve extra, repeated here so `--help` works without FastAPI installed.
DEFAULT_MAX_REQUEST_PIXELS = 64_000_000
DEFAULT_MAX_CONCURRENT = 2
DEFAULT_MAX_WAITING = 16
DEFAULT_QUEUE_TIMEOUT_S = 10.0
DEFAULT_MAX_BATCH = 32  # batching.DEFAULT_MAX_BATCH
DEFAULT_MAX_SPOOL_MB = 64  # server.DEFAULT_MAX_SPOOL_MB

TOKEN_ENV = "STABLESDG_LINE_TOKEN"
# Most open connections; lowered at start-up to fit RLIMIT_NOFILE (connections.fit_connection_cap).
DEFAULT_LIMIT_CONCURRENCY = 512
DEFAULT_KEEP_ALIVE_S = 5.0
DEFAULT_HEADER_TIMEOUT_S = 10.0  # connections.DEFAULT_HEADER_TIMEOUT_S
DEFAULT_BODY_TIMEOUT_S = 30.0  # connections.DEFAULT_BODY_TIMEOUT_S
CSV_COLUMNS = ("file", "class", "confidence", "scores", "latency_ms", "model_version", "error")
EXIT_MODEL_REFUSED = 2  # also argparse's usage-error code: "the invocation cannot work as given"
EXIT_SOME_FILES_FAILED = 3

log = logging.getLogger("stablesdg_line")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="exported .onnx classifier")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--expected-sha256", metavar="HEX", help="refuse the model unless its sha256 matches")
    parser.add_argument("--warmup-runs", type=int, default=1, help="dummy inferences at load (default 1)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"reject images with more pixels than this (default {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--decode-timeout", type=float, default=DEFAULT_DECODE_TIMEOUT_S, metavar="S",
                        help="refuse a file whose decoding takes longer than S seconds ('decode took longer "
                             "than S s'); serve applies it to all files of a request together; 0: no limit "
                             f"(default {DEFAULT_DECODE_TIMEOUT_S:g})")
    parser.add_argument("--graph-optimization", choices=sorted(GRAPH_OPTIMIZATION_LEVELS), default="all",
                        help="onnxruntime graph optimisation level (default all)")
    parser.add_argument("--memory-arena", action=argparse.BooleanOptionalAction, default=True,
                        help="onnxruntime CPU memory arena (default on)")


def _add_reload_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--follow", action="store_true",
                        help="reload the model when its file is replaced (e.g. by `pull`); SIGHUP always "
                             "reloads. A model that fails the load checks is refused, the old one runs on")
    parser.add_argument("--follow-interval", type=float, default=DEFAULT_FOLLOW_INTERVAL_S,
                        help="seconds between checks of the model file "
                             f"(default {DEFAULT_FOLLOW_INTERVAL_S:g})")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablesdg-line", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    classify = commands.add_parser("classify", help="classify image files or folders")
    _add_model_options(classify)
    classify.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or directories")
    classify.add_argument("--recursive", action="store_true", help="descend into sub-directories")
    classify.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    classify.add_argument("--output", type=Path, help="write here instead of stdout")
    classify.add_argument("--batch-size", type=int, default=16)
    add_review_options(classify)

    watch = commands.add_parser("watch", help="classify each new file dropped into a folder, exactly once")
    _add_model_options(watch)
    watch.add_argument("drop_dir", type=Path)
    watch.add_argument("--results", type=Path, required=True, help="JSONL results; also the restart state")
    watch.add_argument("--rejected-dir", type=Path, help="where bad files go (default DROP_DIR/rejected)")
    watch.add_argument("--poll-interval", type=float, default=2.0, help="seconds between scans (default 2)")
    watch.add_argument("--settle-seconds", type=float, default=1.0,
                       help="a file must be unmodified this long before it is read (default 1)")
    watch.add_argument("--incomplete-grace-seconds", type=float, default=30.0,
                       help="retry an empty or cut-short file until it is unchanged this long (default 30)")
    watch.add_argument("--batch-size", type=int, default=16)
    watch.add_argument("--once", action="store_true", help="process what is there now, then exit")
    _add_reload_options(watch)
    add_review_options(watch)

    pull.add_parser(commands)

    serve = commands.add_parser("serve", help="HTTP classification service")
    _add_model_options(serve)
    _add_reload_options(serve)
    add_review_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token-file", type=Path, metavar="FILE",
                       help="require 'Authorization: Bearer TOKEN', TOKEN read from FILE (preferred; or set "
                            f"env {TOKEN_ENV})")
    serve.add_argument("--token", help="the token on the command line: visible to every user in `ps`; prefer "
                                       f"--token-file or env {TOKEN_ENV}")
    serve.add_argument("--limit-concurrency", type=int, default=DEFAULT_LIMIT_CONCURRENCY,
                       help="most open connections (default "
                            f"{DEFAULT_LIMIT_CONCURRENCY}; lowered to fit RLIMIT_NOFILE, see LimitNOFILE). "
                            "One more closes the longest-idle connection, or gets 503 when every one has a "
                            "request in progress")
    serve.add_argument("--keep-alive-timeout", type=float, default=DEFAULT_KEEP_ALIVE_S,
                       help=f"seconds an idle connection stays open (default {DEFAULT_KEEP_ALIVE_S:g})")
    serve.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                       help="seconds a client has to send a complete request head, from connecting or "
                            "from the previous response; then 408 and close "
                            f"(default {DEFAULT_HEADER_TIMEOUT_S:g})")
    serve.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                       help="seconds a client has to send the whole body after its head; then 408 and close "
                            f"(default {DEFAULT_BODY_TIMEOUT_S:g})")
    serve.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body (default 20)")
    serve.add_argument("--max-spool-mb", type=float, default=DEFAULT_MAX_SPOOL_MB,
                       help="most MB of request bodies in progress at once, all requests together (uploads "
                            "are spooled to temporary files: RAM on a tmpfs /tmp); beyond it 503 before the "
                            f"body is read (default {DEFAULT_MAX_SPOOL_MB}; at least --max-upload-mb)")
    serve.add_argument("--max-files", type=int, default=32, help="most files per request (default 32)")
    serve.add_argument("--max-request-pixels", type=int, default=DEFAULT_MAX_REQUEST_PIXELS,
                       help=f"most pixels per request, from headers (default {DEFAULT_MAX_REQUEST_PIXELS})")
    serve.add_argument("--max-concurrent", type=int, default=DEFAULT_MAX_CONCURRENT,
                       help=f"requests decoding at once (default {DEFAULT_MAX_CONCURRENT})")
    serve.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                       help=f"requests queued for a slot before 503 (default {DEFAULT_MAX_WAITING})")
    serve.add_argument("--queue-timeout", type=float, default=DEFAULT_QUEUE_TIMEOUT_S,
                       help=f"seconds to wait for a slot before 503 (default {DEFAULT_QUEUE_TIMEOUT_S:g})")
    serve.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                       help="images of concurrent requests run as one batch, at most this many "
                            f"(default {DEFAULT_MAX_BATCH}; 1: every request runs alone)")
    serve.add_argument("--batch-wait-ms", type=float, default=0.0,
                       help="wait this long for more requests to batch with (default 0: batch only the "
                            "requests that queued while the previous batch ran)")

    info = commands.add_parser("info", help="print the model's identity, provenance and evidence")
    _add_model_options(info)
    info.add_argument("--json", action="store_true", help="print everything as one JSON object")
    return parser


def _load_classifier(args: argparse.Namespace, path: Path | None = None,
                     pin: str | None = None) -> Classifier:
    options = RuntimeOptions(expected_sha256=pin if path is not None else args.expected_sha256,
                             threads=args.threads, warmup_runs=args.warmup_runs, max_pixels=args.max_pixels,
                             graph_optimization=args.graph_optimization, memory_arena=args.memory_arena,
                             decode_timeout_s=args.decode_timeout or None)
    return Classifier(path or args.model, options)


@contextmanager
def _reloading(args: argparse.Namespace, current, install) -> Iterator[Reloader]:
    """SIGHUP (and, with --follow, a replaced model file) reloads the model in a background thread."""
    reloader = Reloader(args.model, lambda path, pin: _load_classifier(args, path, pin), install, current,
                        pin=args.expected_sha256,
                        follow_interval_s=args.follow_interval if args.follow else None)
    previous = signal.signal(signal.SIGHUP, lambda _signum, _frame: reloader.request())
    try:
        with reloader:
            yield reloader
    finally:
        signal.signal(signal.SIGHUP, previous)


def expand_paths(paths: Iterable[Path], recursive: bool) -> Iterator[Path]:
    """Files as given; directories expand to their image files (sorted, so output order is stable)."""
    for path in paths:
        if not path.is_dir():
            yield path  # a missing/bad path still yields a row with its error
            continue
        children = path.rglob("*") if recursive else path.iterdir()
        yield from sorted(p for p in children if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


@contextmanager
def _open_output(output: Path | None) -> Iterator[IO[str]]:
    """UTF-8 text; a file name that is not UTF-8 (surrogate-escaped by Python) is written as its escape,
    never an exception that loses the row (JSONL escapes it by itself)."""
    if output is None:
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(errors="backslashreplace")
        yield sys.stdout
        return
    with output.open("w", encoding="utf-8", errors="backslashreplace", newline="") as handle:
        yield handle


def write_predictions(predictions: Iterable[Prediction], handle: IO[str], fmt: str) -> int:
    """Write rows as they come; returns how many files failed."""
    writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS) if fmt == "csv" else None
    if writer:
        writer.writeheader()
    failed = 0
    for prediction in predictions:
        row = prediction.to_row()
        failed += not prediction.ok
        if writer:
            writer.writerow({**row, "scores": json.dumps(row["scores"])})
        else:
            handle.write(json.dumps(row) + "\n")
    return failed


def cmd_classify(args: argparse.Namespace) -> int:
    review = review_from_args(args)
    classifier = _load_classifier(args)
    paths = expand_paths(args.paths, args.recursive)
    predictions = classifier.classify_files(paths, batch_size=args.batch_size)
    if review is not None:
        predictions = review.tap(predictions, classifier.sha256)
    with _open_output(args.output) as handle:
        failed = write_predictions(predictions, handle, args.format)
    return EXIT_SOME_FILES_FAILED if failed else 0


def cmd_watch(args: argparse.Namespace) -> int:
    config = WatchConfig(drop_dir=args.drop_dir, results=args.results,
                         rejected_dir=args.rejected_dir or args.drop_dir / "rejected",
                         poll_interval=args.poll_interval, settle_seconds=args.settle_seconds,
                         batch_size=args.batch_size, incomplete_grace_seconds=args.incomplete_grace_seconds)
    stop = threading.Event()
    review = review_from_args(args)
    with DropFolderWatcher(_load_classifier(args), config, review) as watcher, _stop_on_signals(stop), \
            _reloading(args, lambda: watcher.classifier, _installer(watcher)):
        if args.once:
            log.info("%s", watcher.run_once(stop))
        else:
            watcher.run_forever(stop)
    return 0


def _installer(watcher: DropFolderWatcher):
    """A batch already running keeps the model it started with; the next batch takes the new one."""
    def install(new: Classifier) -> Classifier:
        old, watcher.classifier = watcher.classifier, new
        return old
    return install


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM / SIGINT set `stop`: the watcher finishes the batch in hand (rows, moves, fsync), exits 0."""
    def handler(signum, _frame):
        log.info("%s received: finishing the current batch, then stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .connections import ACCEPT_BACKLOG, ConnectionLimits, fit_connection_cap, protocol_class
        from .server import ServeConfig, create_app
    except ImportError as err:
        raise SystemExit(f"serve needs the HTTP extra: pip install 'stablesdg-line[serve]' ({err})") from err
    token = resolve_token(args)
    if args.max_spool_mb < args.max_upload_mb:
        raise ServeConfigError(f"--max-spool-mb {args.max_spool_mb:g} is below --max-upload-mb "
                               f"{args.max_upload_mb:g}: the largest upload could never be accepted")
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a token: anyone on the network can use the model", args.host)
    config = ServeConfig(token=token, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                         max_spool_bytes=int(args.max_spool_mb * 1024 * 1024),
                         max_files=args.max_files, max_request_pixels=args.max_request_pixels,
                         max_concurrent=args.max_concurrent, max_waiting=args.max_waiting,
                         queue_timeout_s=args.queue_timeout, max_batch=args.max_batch,
                         batch_wait_s=args.batch_wait_ms / 1000.0)
    slot = ModelSlot(_load_classifier(args))
    app = create_app(slot, config, review_from_args(args))
    cap, why = fit_connection_cap(args.limit_concurrency)
    log.info("connections: %s; request head within %g s, body within %g s", why, args.header_timeout,
             args.body_timeout)
    limits = ConnectionLimits(header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                              max_connections=cap)
    with _reloading(args, slot.get, slot.swap):
        # The connection cap is the protocol's (it evicts idle connections first); uvicorn's own
        # limit_concurrency would answer 503 to every request once idle connections fill it.
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", server_header=False,
                    http=protocol_class(limits), backlog=ACCEPT_BACKLOG, limit_concurrency=None,
                    timeout_keep_alive=args.keep_alive_timeout)
    return 0


class TokenError(ValueError):
    """A token was given but cannot be used (empty, unreadable file)."""


class ServeConfigError(ValueError):
    """serve's limits contradict each other."""


def resolve_token(args: argparse.Namespace) -> str | None:
    """--token-file, then --token, then the environment; a token that is given but empty is refused (an
    empty secret would otherwise silently serve without authentication)."""
    given: list[tuple[str, str]] = []
    if args.token_file is not None:
        try:
            given.append((f"--token-file {args.token_file}", args.token_file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as err:
            raise TokenError(f"cannot read --token-file {args.token_file}: {err}") from err
    if args.token is not None:
        given.append(("--token", args.token))
    if TOKEN_ENV in os.environ:
        given.append((f"env {TOKEN_ENV}", os.environ[TOKEN_ENV]))
    if not given:
        return None
    source, token = given[0]
    token = token.strip()
    if not token:
        raise TokenError(f"{source} is set but empty: refusing to serve without the token it was meant to "
                         f"require (unset it to serve without a token)")
    return token


def cmd_info(args: argparse.Namespace) -> int:
    described = _load_classifier(args).describe()
    print(json.dumps(described, indent=2) if args.json else format_info(described))
    return 0


def _adapters(raw: str) -> str:
    try:
        adapters = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    if not isinstance(adapters, dict):
        return raw
    # one short hash per class (the first file's): enough to tell two adapter sets apart on a screen
    short = {cls: (sorted(files.values())[0][:12] if isinstance(files, dict) and files else "?")
             for cls, files in adapters.items()}
    return ", ".join(f"{cls} {h}" for cls, h in sorted(short.items())) or "none"


def format_info(d: dict) -> str:
    """`info` for a person: one line per fact, the full values (hashes included) so they can be compared."""
    p = d["provenance"]
    dirty = {"true": " (tree was dirty)", "false": " (clean)"}.get(p["git_dirty"], "")
    rows = [
        ("model", f"{d['model_name']} v{d['model_version']}, quantized {d['quantized']}, opset {d['opset']}"),
        ("file", f"{d['path']}"), ("sha256", d["sha256"]), ("weights", d["weights_sha256"]),
        ("classes", ", ".join(d["class_names"])),
        ("git commit", f"{p['git_commit']}{dirty}"),
        ("data", d["data_hash"]), ("synthetic", p["synthetic_hash"]),
        ("prior recipe", p["prior_recipe_sha256"]), ("adapters", _adapters(p["adapter_sha256"])),
        ("mlflow run", p["mlflow_run_id"]),
        ("test set", p["test_set_sha256"]),
        ("test", f"accuracy {p['test_accuracy'][:6]}, macro-F1 {p['test_macro_f1'][:6]}"),
        ("gain macro-F1",
         f"{p['gain_macro_f1_mean']} +/- {p['gain_macro_f1_std']} over {p['gain_repeats']} seed(s)"),
        ("synthetic set", f"mean FID {p['mean_fid']}, KID {p['mean_kid']} ({p['feature_net']} features)"),
        ("export parity", f"max |diff| {p['parity_max_abs_diff']}, top-1 agreement "
                          f"{p['parity_top1_agreement']} on {p['parity_images']} test images"),
        ("int8 gate", f"{p['int8_decision']}: {p['int8_reason']}"),
        ("stablesdg", d["stablesdg_version"]),
    ]
    return "\n".join(f"{name:<14} {printable(value)}" for name, value in rows)


def printable(value: object) -> str:
    """Metadata as text a terminal shows and never obeys: control characters (escape sequences, newlines)
    and undecodable bytes are printed as Python escapes."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


COMMANDS = {"classify": cmd_classify, "watch": cmd_watch, "serve": cmd_serve, "info": cmd_info,
            "pull": pull.run}


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (ModelIntegrityError, ModelContractError, WatchError, TokenError, ServeConfigError,
            ReviewConfigError, OSError) as err:
        print(f"stablesdg-line: error: {err}", file=sys.stderr)
        return EXIT_MODEL_REFUSED
    except KeyboardInterrupt:
        return 130

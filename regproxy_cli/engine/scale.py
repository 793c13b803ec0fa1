"""``regproxy predict --engine ray``: batch inference on a Ray cluster (a laptop's local one, or many machines).

Ray Data reads and decodes the images in its read tasks, a pool of actors (:class:`RegProxyPredictor`, one model
each, loaded once) segments them and writes each image's files with :class:`~regproxy_cli.engine.runner.OutputWriter`
(the names, writers and formats of ``regproxy predict``), and the driver only counts what comes back. Images of
different sizes are never resized to one: each batch is split into buckets of one size, and each bucket runs as
``regproxy predict`` runs it. A rerun skips the inputs whose files all exist (every file is written atomically, so
one that exists is complete); a file that cannot be decoded is one row of ``OUT/failures.jsonl``.

Ray is imported only here, and only when used (the ``ray`` extra). torch is imported only where a model runs: Ray's
read tasks import this module for :func:`decode_row`, and importing torch there (seconds of CPU per read process)
delayed the actors, which import it on the same cores. :class:`RegProxyPredictor` also works in a pipeline of your
own: ``ds.map_batches(RegProxyPredictor, fn_constructor_kwargs={...}, concurrency=2)`` over rows
of ``path`` and ``image`` (see docs/scale.md).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from regproxy_cli.constants import IMAGE_SUFFIXES
from regproxy_cli.data.formats import check_formats
from regproxy_cli.engine.outputs import check_out_dir, expand_inputs, expected_files, output_names, prepare_out_dir
from regproxy_cli.errors import RegproxyError, missing_extra, one_line, require_extra
from regproxy_cli.files import write_atomic, write_text_atomic
from regproxy_cli.images import decode_image, label_png_bytes

RAY_MISSING = missing_extra("ray", "--engine ray (Ray Data)")
FAILURES_FILE = "failures.jsonl"
PARQUET_DIR = "labels.parquet"  # --format parquet: one Parquet dataset of (path, labels PNG, class histogram)
# What each read task asks for, at most: the actors never take the CPUs reading needs. Less than an actor's CPU, so
# Ray does not fuse decoding into the actors (equal requests let it), where it would keep a GPU waiting.
READ_CPUS = 0.5
BATCH = 16  # rows per actor call: enough to fill a size bucket, few enough to show progress


def import_ray() -> Any:
    """``ray`` with ``ray.data`` loaded, or one error line naming the extra."""
    require_extra("ray.data", "ray", "--engine ray (Ray Data)")  # ray without [data] lacks the Data library's needs
    return require_extra("ray", "ray", "--engine ray (Ray Data)")


@dataclass
class Source:
    """One input: ``read`` is what Ray reads (a local path or a URI), ``key`` the path Ray reports for it, ``path``
    the path output names are made from (as ``regproxy predict`` makes them)."""

    read: str
    key: str
    path: Path


def expand_sources(inputs: Iterable[str]) -> tuple[list[Source], list[str]]:
    """Folders, globs and files as ``regproxy predict`` expands them, and URIs (``s3://``, ``gs://``, ``file://``:
    a file, a folder listed recursively or a glob) through fsspec -> (sources, problems)."""
    sources, problems, local = [], [], []
    for item in inputs:
        if "://" not in item:
            local.append(item)
            continue
        found, problem = _expand_uri(item)
        sources += found
        problems += [problem] if problem else []
    paths, local_problems = expand_inputs(local)
    sources = [Source(os.path.abspath(p), os.path.abspath(p), p) for p in paths] + sources
    seen: set[str] = set()
    unique = [s for s in sources if not (s.key in seen or seen.add(s.key))]
    return unique, local_problems + problems


def _expand_uri(uri: str) -> tuple[list[Source], str | None]:
    try:
        import fsspec

        fs, root = fsspec.core.url_to_fs(uri)
        if glob.has_magic(root):
            found = fs.glob(root)
        elif fs.isdir(root):
            found = fs.find(root)
        else:
            found = [root] if fs.exists(root) else []
    except (ImportError, OSError, ValueError) as error:
        return [], f"{uri}: cannot list ({one_line(error)})"
    protocol = uri.split("://", 1)[0]
    images = sorted(p for p in found if Path(p).suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        return [], f"{uri}: no images found"
    return [Source(f"{protocol}://{p}" if protocol != "file" else p, p, Path(p)) for p in images], None


def plan_resources(cpus: float, gpus: float, workers: int | None, gpus_per_worker: float) -> tuple[int, float, float]:
    """(actors, CPUs per actor, CPUs per read task) for a cluster of ``cpus`` and ``gpus``.

    Ray's read tasks need CPUs too: an actor pool that takes every CPU leaves them none, and ``map_batches`` then
    waits forever without an error (2 actors of 1 CPU each on a 2-CPU cluster). So reading keeps half a CPU,
    and the actors share the rest. Without ``workers``: one actor per ``gpus_per_worker`` of the GPUs, or one per
    remaining CPU."""
    if gpus_per_worker < 0:
        raise RegproxyError(f"--gpus-per-worker must be 0 or more, got {gpus_per_worker}")
    if gpus_per_worker > 0 and gpus < gpus_per_worker:
        raise RegproxyError(f"--gpus-per-worker {gpus_per_worker}: the Ray cluster has {gpus:g} GPUs")
    read = min(READ_CPUS, cpus / 2)
    if workers is None:
        workers = int(gpus // gpus_per_worker) if gpus_per_worker > 0 else max(1, int(cpus - read))
    if workers < 1:
        raise RegproxyError(f"--workers must be at least 1, got {workers}")
    if gpus_per_worker > 0 and workers * gpus_per_worker > gpus:
        raise RegproxyError(f"--workers {workers} x --gpus-per-worker {gpus_per_worker} is more than the Ray "
                            f"cluster's {gpus:g} GPUs")
    per_actor = min(1.0, (cpus - read) / workers)
    if per_actor < 0.05:
        raise RegproxyError(f"--workers {workers}: the Ray cluster has {cpus:g} CPUs, too few for that many actors "
                            "and the read tasks")
    return workers, round(per_actor, 4), round(read, 4)


class RegProxyPredictor:
    """A Ray Data actor: the model loaded once (zoo name, Hub id, model directory, .pth or .onnx), then called on
    batches of rows with ``path`` (str) and ``image`` ((H, W, 3) uint8 RGB) and, optionally, ``error`` (a decode
    error: that row is passed on as a failure). Writes each image's files under ``out`` as ``regproxy predict`` does,
    or with ``parquet`` one Parquet file per batch under ``out/labels.parquet/``. Returns one row per input: ``path``,
    ``error`` ("" when written) and ``histogram`` (pixels per class).

    ``names`` maps each path to its output name (:func:`~regproxy_cli.engine.outputs.output_names` of the whole run,
    so names never collide across actors); without it a path's file stem is its name. ``options`` are those of
    :func:`~regproxy_cli.engine.runner.predict_files` (formats, regions, mode, tta, scale, precision, ...)."""

    def __init__(self, model: str, out: str, *, names: dict[str, str] | None = None, device: str = "auto",
                 provider: str = "cpu", threads: int | None = None, parquet: bool = False, **options: Any) -> None:
        import torch

        from regproxy_cli.engine.runner import OutputWriter, open_model
        from regproxy_cli.inference.runtime import resolve_device

        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device("cuda" if device == "auto" and torch.cuda.is_available() else
                                     "cpu" if device == "auto" else device)
        self.model = open_model(model, self.device, precision=options.get("precision", "fp32"), provider=provider,
                                regions=options.get("regions", False))
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.names = names
        self.parquet = parquet
        writer_keys = ("formats", "polygon_tolerance", "opacity", "confidence", "save_probs")
        self.writer_options = {k: options[k] for k in writer_keys if k in options}
        self.writer_class = OutputWriter
        # segment()'s: regions, regions_by, confidence, save_probs, mode, tta, scale, batch_size, precision
        self.options = {k: v for k, v in options.items() if k not in writer_keys[:3] and k != "batch"}

    def _writer(self, paths: list[str]) -> Any:
        names = {Path(p): (self.names[p] if self.names is not None else Path(p).stem) for p in paths}
        return self.writer_class(self.model, self.out, names, **self.writer_options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from regproxy_cli.engine.runner import segment

        paths = [str(p) for p in batch["path"]]
        errors = [str(e) for e in batch["error"]] if "error" in batch else [""] * len(paths)
        classes = self.model.config.num_classes
        histograms = np.zeros((len(paths), classes), dtype=np.int64)
        buckets: dict[tuple, list[int]] = {}  # one size per forward: images of other sizes keep their own
        for index, image in enumerate(batch["image"]):
            if not errors[index]:
                buckets.setdefault(np.shape(image), []).append(index)
        writer = self._writer([p for p, e in zip(paths, errors) if not e])
        rows = []
        for indices in buckets.values():
            images = [np.asarray(batch["image"][i], dtype=np.uint8) for i in indices]
            try:
                results = segment(self.model, images, **self.options)
            except Exception:  # noqa: BLE001 - e.g. out of memory on a bucket: then each image alone, below
                results = None
            for position, index in enumerate(indices):
                try:
                    if results is None:
                        result = segment(self.model, images[position:position + 1], **self.options)[0]
                    else:
                        result = results[position]
                    labels = result[0]
                    if self.parquet:
                        rows.append((paths[index], label_png_bytes(labels, writer.palette)))
                    else:
                        writer.write(Path(paths[index]), images[position], result)
                    ids, counts = np.unique(labels, return_counts=True)
                    histograms[index, ids[ids < classes]] = counts[ids < classes]
                except Exception as error:  # noqa: BLE001 - one image's failure is its row, never the job's end
                    errors[index] = error_line(paths[index], error)
        writer.close()
        if self.parquet and rows:
            self._write_parquet(rows, {p: histograms[i] for i, p in enumerate(paths)})
        return {"path": np.array(paths, dtype=object), "error": np.array(errors, dtype=object),
                "histogram": histograms}

    def _write_parquet(self, rows: list[tuple[str, bytes]], histograms: dict[str, np.ndarray]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"path": [p for p, _ in rows], "labels": pa.array([b for _, b in rows], pa.binary()),
                          "histogram": [histograms[p].tolist() for p, _ in rows]})
        folder = self.out / PARQUET_DIR
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1("\n".join(p for p, _ in rows).encode()).hexdigest()[:16]
        write_atomic(folder / f"part-{digest}.parquet", lambda temporary: pq.write_table(table, temporary))


def error_line(path: str, error: BaseException) -> str:
    """One line for a failed image, starting with its path."""
    message = str(error) if isinstance(error, RegproxyError) else f"failed ({type(error).__name__}: " \
                                                                   f"{one_line(error)})"
    return message if message.startswith(path) else f"{path}: {message}"


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """Ray's read task: a file's bytes -> its RGB image, or a tiny placeholder and the error line."""
    path = str(row["path"])
    try:
        return {"path": path, "image": decode_image(row["bytes"], path), "error": ""}
    except Exception as error:  # noqa: BLE001 - a corrupt file is one failure row, not the job's end
        return {"path": path, "image": np.zeros((1, 1, 3), dtype=np.uint8), "error": error_line(path, error)}


@dataclass
class ScaleReport:
    """What a Ray run did: images written now, skipped (complete from an earlier run), failures, seconds."""

    written: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)  # error lines, each starting with the input as given
    failures: list[dict] = field(default_factory=list)  # failures.jsonl's rows: path, error
    seconds: float = 0.0
    workers: int = 0
    classes: list[str] = field(default_factory=list)  # the model's, for the summary
    pixels: Counter = field(default_factory=Counter)
    images: Counter = field(default_factory=Counter)

    @property
    def images_per_s(self) -> float:
        return (self.written + len(self.failed)) / self.seconds if self.seconds else 0.0


def done_parquet(out: Path) -> set[str]:
    """The paths already in ``out/labels.parquet/`` (complete part files only: each is written atomically)."""
    folder = out / PARQUET_DIR
    if not folder.is_dir():
        return set()
    import pyarrow.parquet as pq

    done: set[str] = set()
    for part in sorted(folder.glob("part-*.parquet")):
        done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
    return done


def predict_ray(
    inputs: list[str],
    model: str,
    out: Path,
    *,
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
    device: str = "auto",
    provider: str = "cpu",
    formats: tuple[str, ...] | list[str] = ("png",),
    batch_size_rows: int = BATCH,
    problems: list[str] | None = None,
    **options: Any,
) -> ScaleReport:
    """Segment ``inputs`` on a Ray cluster into ``out`` (see the module's doc). ``address``: ``auto`` (a running
    cluster, e.g. after ``ray start --head``), ``ray://host:10001`` (Ray Client), None (the one ``RAY_ADDRESS``
    names, or a local cluster started here); a Ray already initialised in this process is used as it is.
    ``formats``: those of predict (png, labelme; coco and cvat hold the whole run, so not here) or ``parquet``.
    ``options``: :func:`~regproxy_cli.engine.runner.predict_files`'s. Inputs that cannot be listed are added to
    ``problems``. A ``KeyboardInterrupt`` leaves every written file complete; a rerun continues."""
    formats = [str(getattr(f, "value", f)) for f in formats]
    parquet = "parquet" in formats
    whole = [f for f in formats if f in ("coco", "cvat")]
    if whole:
        raise RegproxyError(f"--format {' and '.join(whole)} write one file for the whole run; with --engine ray use "
                            "png, labelme or parquet")
    if parquet and len(formats) > 1:
        raise RegproxyError("--format parquet is one Parquet dataset of the label maps; it goes alone")
    if parquet and (options.get("regions") or options.get("confidence") or options.get("save_probs")):
        raise RegproxyError("--format parquet holds label maps only: drop --regions, --confidence and --save-probs")
    formats = [] if parquet else check_formats(formats)  # a missing extra stops here, before Ray starts
    ray = import_ray()
    sources, found_problems = expand_sources(inputs)
    if problems is not None:
        problems += found_problems
    check_out_dir(out)
    # a bad --model is one line before any actor starts; the names need its label levels, the summary its classes
    classes, levels = describe_model(model, provider)
    prepare_out_dir(out)
    # the actors run in another working directory (or on another machine): they get absolute local paths
    out = out.absolute()
    model = str(Path(model).expanduser().absolute()) if Path(model).expanduser().exists() else model
    names = output_names([s.path for s in sources], levels)
    already = done_parquet(out) if parquet else set()
    todo, report = [], ScaleReport(classes=classes)
    rewritten: set[str] = set()
    for source in sources:
        expected = [] if parquet else expected_files(
            names[source.path], levels=levels, formats=formats, regions=options.get("regions", False),
            confidence=options.get("confidence", False), tta=options.get("tta", False),
            save_probs=options.get("save_probs", False))
        if (source.key in already) if parquet else all((out / f).exists() for f in expected):
            report.skipped += 1
        else:
            todo.append(source)
            rewritten.update(expected)
    remove_partial(out, rewritten)
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, logging_level="warning", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise RegproxyError(f"--address {address}: cannot reach a Ray cluster ({one_line(error)})") from None
    try:
        resources = ray.cluster_resources()
        report.workers, per_actor, read = plan_resources(resources.get("CPU", 0.0), resources.get("GPU", 0.0),
                                                         workers, gpus_per_worker)
        if todo:
            begin = time.perf_counter()
            _run_guarded(ray, todo, model, out, report, names={s.key: names[s.path] for s in todo},
                         shown={s.key: s.read if "://" in s.read else str(s.path) for s in todo}, device=device,
                 provider=provider, per_actor=per_actor, read=read, gpus_per_worker=gpus_per_worker,
                 threads=max(1, int(resources.get("CPU", 1) // report.workers)), parquet=parquet,
                 rows=batch_size_rows, formats=formats, **options)
            report.seconds = time.perf_counter() - begin
    finally:
        if started:
            ray.shutdown()
    write_text_atomic(out / FAILURES_FILE, "".join(json.dumps(row) + "\n" for row in report.failures))
    return report


def remove_partial(out: Path, names: set[str]) -> None:
    """Remove what a killed run left half-written for the files ``names`` it writes again: the hidden temporary
    files of :func:`~regproxy_cli.files.write_atomic` (``.NAME.XXXXXXXX.tmp``). One listing of ``out``."""
    for entry in os.scandir(out):
        if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
            target = entry.name[1:-len(".tmp")].rpartition(".")[0]
            if target in names:
                Path(entry.path).unlink(missing_ok=True)


def describe_model(model: str, provider: str = "cpu") -> tuple[list[str], tuple[str, ...]]:
    """The class names and label levels (e.g. HSSN's ``category``) of ``model``, for the driver's output names and
    summary: from its config, without torch, where that says all (the paper's linear classifier has no label
    levels); else the model is loaded here once on the CPU (an ``.onnx`` file, an authors' ``.pth``, a zoo model
    still to be converted, another classifier: its levels come from its module)."""
    from regproxy_cli.hub.zoo import model_config

    config = model_config(model, provider=provider)
    if config is not None and config.classifier == "linear":
        return list(config.classes), ()
    import torch

    from regproxy_cli.engine.runner import level_maps, open_model

    local = open_model(model, torch.device("cpu"), provider="cpu")
    return list(local.config.classes), tuple(level_maps(local))


def _run_guarded(ray: Any, *args: Any, **kwargs: Any) -> None:
    """:func:`_run`, with a failure of Ray itself (an actor that cannot load the model, a lost cluster) as one line."""
    try:
        _run(ray, *args, **kwargs)
    except ray.exceptions.RayError as error:
        raise RegproxyError(f"the Ray job failed: {_cause(error)}; files already written are complete, and a "
                            "rerun continues with the rest") from None


def _cause(error: BaseException) -> str:
    """A Ray error as one line: an actor's own error line (e.g. a model that fails to load there) when it raised
    one, not the remote traceback Ray's message carries."""
    text = str(error)
    marker = f"{RegproxyError.__name__}: "
    if marker in text:
        return text.rsplit(marker, 1)[1].strip().splitlines()[0]
    return one_line(error)


def _run(ray: Any, todo: list[Source], model: str, out: Path, report: ScaleReport, *, names: dict[str, str],
         shown: dict[str, str], device: str, provider: str, per_actor: float, read: float, gpus_per_worker: float, threads: int,
         parquet: bool, rows: int, **options: Any) -> None:
    """The Ray Data pipeline: read + decode (read tasks), segment + write (the actor pool), counted here."""
    dataset = ray.data.read_binary_files([s.read for s in todo], include_paths=True, num_cpus=read,
                                         override_num_blocks=max(1, min(len(todo) // rows, 200)))
    dataset = dataset.map(decode_row, num_cpus=read)
    if device == "auto":
        device = "cuda" if gpus_per_worker > 0 else "cpu"
    results = dataset.map_batches(
        RegProxyPredictor, batch_size=rows, batch_format="numpy", num_cpus=per_actor,
        compute=ray.data.ActorPoolStrategy(size=report.workers),
        num_gpus=gpus_per_worker or None,
        fn_constructor_kwargs={"model": model, "out": str(out), "names": names, "device": device,
                               "provider": provider, "threads": threads if gpus_per_worker == 0 else None,
                               "parquet": parquet, **options})
    for batch in results.iter_batches(batch_format="numpy", batch_size=None):
        for path, error, histogram in zip(batch["path"], batch["error"], batch["histogram"]):
            if error:
                key, error = str(path), str(error)
                given = shown.get(key, key)  # the input as the user gave it, not the absolute path Ray reads
                line = given + error[len(key):] if error.startswith(key) else f"{given}: {error}"
                report.failed.append(line)
                report.failures.append({"path": given, "error": line})
                continue
            report.written += 1
            present = np.flatnonzero(histogram)
            report.pixels.update(dict(zip(present.tolist(), histogram[present].tolist())))
            report.images.update(present.tolist())

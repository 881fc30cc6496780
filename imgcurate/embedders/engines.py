"""Inference engines for the CPU: run an embedder's torch model in torch or OpenVINO, in fp32 or bf16.

Which is fastest depends on the model and the machine (on the development machine OpenVINO ran EfficientNet-Lite0
2.4x faster than torch in fp32 and slower than torch on ViT-B/32), so ``engine="auto"`` measures, once per model and
worker process:

1. builds every candidate that the installed packages and the CPU allow (:data:`BUILDERS`, one entry per engine):
   torch fp32 (channels-last for convolutional models), OpenVINO fp32 and bf16 (bf16 only where the CPU computes it
   natively). OpenVINO's converted model is cached on disk under ``<imgcurate home>/engines``, keyed by the model's
   identity, a digest of its weights, the input shape and the OpenVINO version.
2. runs each on a probe batch of real photos (scikit-image's, through the embedder's own preprocessing) and drops,
   with a warning, any whose embeddings fall below cosine :data:`MIN_COSINE` of torch fp32 on any photo;
3. times a few batches of each, interleaved (a busy machine slows all alike), and keeps the fastest;
4. records that choice on disk (``<imgcurate home>/engines/choices``, keyed by the model, its weights, the input
   shape, the candidates, the thread layout and the CPU model), first writer wins: every later process on the machine
   (the other Dask workers, a resumed run) uses the same engine instead of timing again, so results never depend on
   which candidate won a race on a busy machine. Workers on different kinds of machine may choose differently: set
   ``engine`` and ``precision`` explicitly where a run must give the same bits everywhere.

An explicit engine goes through the same check: a candidate that fails it falls back to torch fp32 with a warning.
OpenVINO is imported only when it is a candidate; without it ``auto`` is torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import os
import queue
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "ENGINES",
    "PRECISIONS",
    "MIN_COSINE",
    "BUILDERS",
    "EngineModel",
    "Request",
    "prepare",
    "probe_batch",
    "choice_path",
]

logger = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "openvino")
PRECISIONS = ("auto", "fp32", "bf16")
#: A candidate must give embeddings at least this close (cosine) to torch fp32 on every probe photo.
MIN_COSINE = 0.9995
#: Real photos shipped inside scikit-image: the probe batch for the accuracy check and the timing.
PROBE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "camera.png",
    "coins.png",
    "hubble_deep_field.jpg",
)


@dataclasses.dataclass
class Request:
    """What the engines need to build their candidates.

    Attributes:
        module: the torch model in eval mode on the CPU, mapping (N, C, H, W) to (N, D).
        input_shape: (C, H, W) of one image.
        precisions: the precisions asked for (``fp32``, ``bf16``).
        threads: threads of one model call.
        streams: model calls that may run at once (Dask threads in this process).
        key: the model's identity (name, weights source, output), part of the disk cache key with a weights digest.
        cache_dir: where converted models are kept.
    """

    module: torch.nn.Module
    input_shape: tuple[int, int, int]
    precisions: tuple[str, ...]
    threads: int
    streams: int
    key: str
    cache_dir: str


class EngineModel:
    """A model ready to run: ``model(batch) -> embeddings`` (float32 torch tensors), and the engine it runs on."""

    def __init__(self, name: str, run: Callable[[torch.Tensor], torch.Tensor], rate: float | None = None):
        self.name = name
        self.run = run
        self.rate = rate  # images/s measured when it was chosen (None when nothing was timed)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.run(batch)

    def __repr__(self) -> str:
        return f"EngineModel({self.name!r})"


# ---------------------------------------------------------------------------------------------------- torch
def is_convolutional(module: torch.nn.Module) -> bool:
    """Whether the model is mostly convolutions (more than two Conv2d with kernels over 1x1; a ViT's patch
    embedding alone does not count), so that channels-last memory format helps it."""
    import torch

    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d) and max(m.kernel_size) > 1]
    return len(convs) > 2


def _torch_candidates(req: Request) -> list[EngineModel]:
    import torch

    module = req.module
    layout = torch.contiguous_format
    if is_convolutional(module):
        module = module.to(memory_format=torch.channels_last)
        layout = torch.channels_last
    note = " channels-last" if layout is torch.channels_last else ""

    def fp32(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x.contiguous(memory_format=layout))

    out = []
    if "fp32" in req.precisions:
        out.append(EngineModel("torch fp32" + note, fp32))
    if req.precisions == ("bf16",):  # only on request: torch's bf16 on CPUs ran at 0.6x its fp32 here

        def bf16(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return module(x.contiguous(memory_format=layout)).float()

        out.append(EngineModel("torch bf16" + note, bf16))
    return out


# ---------------------------------------------------------------------------------------------------- openvino
def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of the model's state (names, dtypes, shapes and values of parameters and buffers)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def openvino_model_path(req: Request) -> str:
    """The cached OpenVINO IR (``.xml``, its weights beside it in ``.bin``) for this model, weights and shape."""
    import openvino

    ident = f"{req.key}|{weights_digest(req.module)}|{tuple(req.input_shape)}|openvino {openvino.__version__}"
    return os.path.join(req.cache_dir, hashlib.sha256(ident.encode()).hexdigest()[:32] + ".xml")


def _convert_openvino(req: Request) -> Any:
    """The model as OpenVINO IR, converted once and cached on disk (written atomically: ``.bin`` then ``.xml``)."""
    import openvino as ov
    import torch

    path = openvino_model_path(req)
    core = ov.Core()
    if os.path.exists(path):
        return core.read_model(path)
    logger.info("converting %s to OpenVINO (cached in %s)", req.key, path)
    example = torch.zeros(1, *req.input_shape)
    with warnings.catch_warnings():  # torch.jit.trace's deprecation and tracer warnings say nothing to a user
        warnings.simplefilter("ignore")
        model = ov.convert_model(req.module, example_input=example, input=[(-1, *req.input_shape)])
    os.makedirs(req.cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=req.cache_dir) as tmp:
        tmp_xml = os.path.join(tmp, "model.xml")
        ov.save_model(model, tmp_xml, compress_to_fp16=False)  # keep the fp32 weights exactly
        os.replace(tmp_xml[:-4] + ".bin", path[:-4] + ".bin")
        os.replace(tmp_xml, path)
    return model


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def _openvino_bf16() -> bool:
    """Whether OpenVINO computes bf16 natively on this CPU (avx512_bf16 or AMX), not emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _openvino_candidates(req: Request) -> list[EngineModel]:
    import openvino as ov
    import torch

    model = _convert_openvino(req)
    core = ov.Core()
    out = []
    for precision in req.precisions:
        if precision == "bf16" and not _openvino_bf16():
            continue
        compiled = core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
                "NUM_STREAMS": str(req.streams),
                "INFERENCE_NUM_THREADS": str(req.threads * req.streams),
            },
        )
        # an infer request runs one call at a time: a pool of them, as many as calls have run at once, shared by
        # every calling thread (Dask's threads come and go; a request per thread would be set up again in each)
        requests: queue.SimpleQueue = queue.SimpleQueue()

        def run(x: torch.Tensor, compiled: Any = compiled, requests: queue.SimpleQueue = requests) -> torch.Tensor:
            if tuple(x.shape[1:]) != req.input_shape:  # converted for one image size: others run in torch
                return _torch_fp32(req.module, x)
            try:
                request = requests.get_nowait()
            except queue.Empty:
                request = compiled.create_infer_request()
            try:
                result = request.infer({0: x.detach().contiguous().numpy()}, share_inputs=True)
                return torch.from_numpy(result[0].copy())
            finally:
                requests.put(request)

        out.append(EngineModel(f"openvino {precision}", run))
    return out


#: engine name -> (is it installed?, candidates builder). ``auto`` tries every installed one.
BUILDERS: dict[str, tuple[Callable[[], bool], Callable[[Request], list[EngineModel]]]] = {
    "torch": (lambda: True, _torch_candidates),
    "openvino": (openvino_installed, _openvino_candidates),
}


# ---------------------------------------------------------------------------------------------------- choice
def probe_batch(preprocess: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    """The probe photos through ``preprocess`` (decoded RGB PIL image -> tensor), stacked."""
    import skimage
    import torch
    from PIL import Image

    from imgcurate.embedders.decode import to_rgb

    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    tensors = []
    for name in PROBE_PHOTOS:
        with Image.open(os.path.join(folder, name)) as img:
            img.load()
            tensors.append(preprocess(to_rgb(img)))
    return torch.stack(tensors)


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    import torch

    a, b = a.float().flatten(1), b.float().flatten(1)
    if a.shape != b.shape:
        return -1.0
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).min())


def _time(candidates: Sequence[EngineModel], batch: torch.Tensor, rounds: int) -> list[float]:
    """Best images/s of each candidate over ``rounds`` rounds, the candidates interleaved in each round."""
    best = [0.0] * len(candidates)
    for c in candidates:
        c(batch)  # warm-up (first-call compilation, allocator)
    for _ in range(rounds):
        for i, c in enumerate(candidates):
            start = time.perf_counter()
            c(batch)
            best[i] = max(best[i], len(batch) / (time.perf_counter() - start))
    return best


def prepare(
    module: torch.nn.Module,
    *,
    engine: str,
    precision: str,
    batch_size: int,
    probe: torch.Tensor,
    threads: int,
    streams: int,
    key: str,
    cache_dir: str,
    rounds: int = 3,
) -> EngineModel:
    """The model on the engine and precision asked for, checked against torch fp32 (``auto``: the fastest).

    Args:
        module: the torch model (eval mode, CPU), (N, C, H, W) -> (N, D).
        engine: ``auto``, ``torch`` or ``openvino``.
        precision: ``auto`` (fp32 and, where the CPU has it natively, bf16), ``fp32`` or ``bf16``.
        batch_size: the batch size the candidates are timed at.
        probe: preprocessed real images for the accuracy check (see :func:`probe_batch`); their shape is the input
            shape the model is converted for.
        threads: threads of one model call; streams: concurrent calls.
        key: the model's identity for the disk cache; cache_dir: the cache folder.
        rounds: timing rounds for ``auto``.

    Raises:
        ValueError: an unknown engine or precision.
        MissingDependencyError: ``engine="openvino"`` without openvino installed.
    """
    import torch

    check_choice(engine, precision)
    precisions = ("fp32", "bf16") if precision == "auto" else (precision,)
    req = Request(module, tuple(probe.shape[1:]), precisions, threads, streams, key, cache_dir)
    want = _torch_fp32(module, probe)
    names = [n for n, (installed, _) in BUILDERS.items() if installed()] if engine == "auto" else [engine]
    candidates: list[EngineModel] = []
    for name in names:
        try:
            candidates += BUILDERS[name][1](req)
        except Exception as err:  # a conversion that fails leaves the other engines
            warnings.warn(f"{key}: the {name} engine is not used: {type(err).__name__}: {err}", stacklevel=2)
    passed = []
    for c in candidates:
        try:
            cosine = _min_cosine(c(probe), want)
        except Exception as err:  # a candidate that cannot run the probe is not used
            warnings.warn(f"{key}: engine {c.name} is not used: {type(err).__name__}: {err}", stacklevel=2)
            continue
        if cosine >= MIN_COSINE:
            passed.append(c)
        else:
            warnings.warn(
                f"{key}: engine {c.name} is not used: its embeddings differ from torch fp32 (min cosine "
                f"{cosine:.5f} < {MIN_COSINE} on the probe photos)",
                stacklevel=2,
            )
    if not passed:
        passed = _torch_candidates(dataclasses.replace(req, precisions=("fp32",)))
    batch = probe.repeat((batch_size + len(probe) - 1) // len(probe), 1, 1, 1)[:batch_size].contiguous()
    if len(passed) == 1:
        return _warm_up(passed[0], batch, req)
    record = choice_path(req, [c.name for c in passed], batch_size)
    by_name = {c.name: c for c in passed}
    chosen = _read_choice(record)
    if chosen in by_name:
        return _warm_up(by_name[chosen], batch, req)
    with torch.inference_mode():
        rates = _time(passed, batch, rounds)
    best = max(range(len(passed)), key=rates.__getitem__)
    logger.info("%s: %s", key, ", ".join(f"{c.name} {r:.1f} img/s" for c, r in zip(passed, rates, strict=True)))
    passed[best].rate = rates[best]
    winner = _write_choice(record, passed[best].name)  # another process may have recorded its choice first
    return _warm_up(by_name.get(winner, passed[best]), batch, req)


def _warm_up(model: EngineModel, batch: torch.Tensor, req: Request) -> EngineModel:
    """Runs ``req.streams`` calls at once, at the batch size, so that every stream of the engine has run (OpenVINO
    sets up each stream's memory on its first inference, and the infer requests are made here) before the first
    shard: part of the one-time preparation (0.1-0.2 s of CPU per process on the benchmark's models)."""
    import torch

    def call(_: int) -> None:
        torch.set_num_threads(req.threads)  # per thread with OpenMP, as the embedder sets it for its calls
        with torch.inference_mode():
            model(batch)

    if req.streams <= 1:
        call(0)
        return model
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(req.streams) as pool:
        list(pool.map(call, range(req.streams)))
    return model


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        import platform

        return platform.processor()


def choice_path(req: Request, names: Sequence[str], batch_size: int) -> str:
    """Where ``auto``'s choice among ``names`` is recorded for this model, weights, input, thread layout and CPU."""
    ident = "\0".join([req.key, weights_digest(req.module), repr(req.input_shape), ",".join(sorted(names)),
                       f"{req.threads}x{req.streams}", str(batch_size), _cpu_model()])  # fmt: skip
    return os.path.join(req.cache_dir, "choices", hashlib.sha256(ident.encode()).hexdigest()[:32] + ".txt")


def _read_choice(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _write_choice(path: str, name: str) -> str:
    """Records ``name`` at ``path`` unless a choice is there already (an atomic first-writer-wins link); returns
    the recorded choice."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(name)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links: a plain rename (last writer wins, still one file)
            if not os.path.exists(path):
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return _read_choice(path) or name


def _torch_fp32(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.inference_mode():
        return module(x.contiguous())


def check_choice(engine: str, precision: str) -> None:
    """Checks an engine and precision name, and that the engine's package is installed."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if engine != "auto" and not BUILDERS[engine][0]():
        from imgcurate.errors import MissingDependencyError

        raise MissingDependencyError(f"engine={engine!r}", engine, extra="cpu")

"""The GPU fast path: network calls replayed from captured CUDA graphs (or compiled by inductor).

Eager PyTorch launches every kernel of a UNet or transformer forward from Python; at batch 1 on a
large GPU the card then idles most of each forward, waiting for the CPU. A CUDA graph records the
kernels of one forward once and replays them with a single launch. What is wrapped here is a
*network* ``net(sample, timestep, **cond) -> out`` (what :func:`distillpp.unet_fn` returns, the
flow-transformer adapters, :class:`~distillpp.pipelines.lora.AdapterOffNet`), never a denoiser or a
sampler, so the denoiser arithmetic, the solver and the teacher guidance stay ordinary eager code
and every sampler works unchanged.

Modes (the ``compile=`` option of the pipelines and ``--compile`` of the CLI):

- ``"none"``: the network is returned unchanged.
- ``"graphs"``: one CUDA graph per input signature (shapes, dtypes and devices of every tensor
  argument, the values of the non-tensor ones, the model's LoRA adapter state), captured on first
  use after a warm-up on a side stream, with static input buffers that each call copies into, and
  outputs copied out (so a result is never overwritten by a later replay). The graphs of one
  :class:`Accelerator` share one memory pool per device: student and teacher forwards run one
  after the other on one stream, so their intermediates can reuse the same memory. On a device
  that is not CUDA it falls back to eager with a one-line warning.
- ``"inductor"``: the network compiled by ``torch.compile`` (inductor's fused kernels, static
  shapes), then captured and replayed exactly like ``"graphs"`` (same signatures, pool, LoRA
  handling and copy-out). This is ``mode="reduce-overhead"``'s idea with our own graphs, so both
  modes share one replay mechanism. The first call per shape compiles for minutes on an SDXL-size
  UNet (93-108 s per shape on an H200, 23 s from the cache); a one-line notice says so. Compiled
  artifacts are cached across runs by inductor's FX-graph and AOTAutograd caches, in
  ``TORCHINDUCTOR_CACHE_DIR`` (set here to
  ``~/.cache/distillpp/torchinductor`` when unset, so the cache outlives ``/tmp``). Off CUDA the
  compiled network runs without graphs.

Text encoders are called by code we do not own (diffusers' ``encode_prompt``): :func:`accelerate_module`
graphs a whole module's ``forward`` and :func:`routed_forwards` points the module at it for the
duration of one encode, so the pipelines replay their encoders from graphs too (fixed token lengths:
one graph per batch size). Prompts are still encoded on every call; only the kernels are reused.

A captured graph replays the kernels, and reads the weights at the addresses, of the moment of
capture. So: a LoRA model's adapter state is part of the signature (the adapter-off teacher of a
LoRA student is its own graph); a network whose weights are swapped in per call
(:class:`~distillpp.pipelines.placement.OffloadedNet`) is never graphed; moving or reloading weights
after capture is detected through the first parameter's address and drops the stale graphs.
:meth:`Accelerator.reset` drops them by hand (e.g. after changing adapter scales).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = ["COMPILE_MODES", "check_compile", "Accelerator", "GraphedNet", "GraphPool", "accelerate_net",
           "CaptureRecord", "shared_accelerator", "ModuleForward", "accelerate_module", "routed_forwards",
           "host_to_device"]

COMPILE_MODES = ("none", "graphs", "inductor")

logger = logging.getLogger(__name__)

Net = Callable[..., Any]


def check_compile(compile: Any) -> str:
    """Validate a ``compile=`` value (``None`` means ``"none"``); a ValueError names ``compile`` otherwise."""
    if compile is None:
        return "none"
    if not isinstance(compile, str) or compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(repr(m) for m in COMPILE_MODES)} or None; got {compile!r}")
    return compile


# --------------------------------------------------------------------------------------------
# Input signatures: nested (args, cond) -> a hashable spec plus the list of its tensors.
# --------------------------------------------------------------------------------------------


def _flatten(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """A hashable description of ``obj`` with each tensor replaced by its slot, shape, dtype and device."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return ("T", len(tensors) - 1, tuple(obj.shape), obj.dtype, obj.device)
    if isinstance(obj, dict):
        return ("dict", tuple((k, _flatten(v, tensors)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return (type(obj), tuple(_flatten(v, tensors) for v in obj))
    try:
        hash(obj)
    except TypeError:  # keyed by its repr; such a call runs eagerly (the value cannot be rebuilt)
        return ("U", type(obj), repr(obj))
    return ("V", type(obj), obj)


def _build(spec: Any, tensors: list[torch.Tensor]) -> Any:
    """Inverse of :func:`_flatten` over (possibly other) tensors in the same slots."""
    tag = spec[0]
    if tag == "T":
        return tensors[spec[1]]
    if tag == "dict":
        return {k: _build(v, tensors) for k, v in spec[1]}
    if tag == "V":
        return spec[2]
    if tag == "U":
        raise ValueError(f"cannot rebuild an unhashable non-tensor argument {spec[2]}")
    return spec[0](_build(v, tensors) for v in spec[1])


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        mapped = {k: _map_tensors(v, fn) for k, v in obj.items()}
        if type(obj) is dict:
            return mapped
        try:  # a transformers ModelOutput (read by index and by attribute): rebuilt as its own type
            return type(obj)(**mapped)
        except TypeError:
            return mapped
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def _describe(spec: Any) -> str:
    """``"1x4x128x128 float16"``: the shape of the first tensor of a signature, for notices."""
    while spec[0] != "T":
        spec = spec[1][0] if spec[0] != "dict" else spec[1][0][1]
    return "x".join(str(s) for s in spec[2]) + " " + str(spec[3]).replace("torch.", "")


def _has_unhashable(spec: Any) -> bool:
    if spec[0] in ("T", "V", "U"):
        return spec[0] == "U"
    items = spec[1] if spec[0] != "dict" else tuple(v for _, v in spec[1])
    return any(_has_unhashable(v) for v in items)


# --------------------------------------------------------------------------------------------
# What a graph depends on besides its inputs: the network's adapter state and weight addresses.
# --------------------------------------------------------------------------------------------


def _module_of(net: Any) -> torch.nn.Module | None:
    """The ``torch.nn.Module`` under a network callable (``unet_fn``'s ``.model``, a wrapper's ``.net``)."""
    seen = 0
    while net is not None and seen < 8:
        if isinstance(net, torch.nn.Module):
            return net
        model = getattr(net, "model", None)
        if isinstance(model, torch.nn.Module):
            return model
        net = getattr(net, "net", None)
        seen += 1
    return None


def _tuner_layers(module: torch.nn.Module | None) -> list[torch.nn.Module]:
    if module is None:
        return []
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft: no adapters
        return []
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def _wrapper_classes() -> tuple[type, type, type]:
    """``(AdapterOffNet, OffloadedNet, PlacedNet)`` from the pipelines package (imported late: it imports diffusers)."""
    from .pipelines.lora import AdapterOffNet
    from .pipelines.placement import OffloadedNet, PlacedNet

    return AdapterOffNet, OffloadedNet, PlacedNet


def _is_adapter_off(net: Any) -> bool:
    return isinstance(net, _wrapper_classes()[0])


class _NetState:
    """The part of a network's state a captured graph bakes in, read cheaply on every call."""

    def __init__(self, net: Any):
        self.module = _module_of(net)
        self.layers = _tuner_layers(self.module)
        self.adapter_off = _is_adapter_off(net)

    def key(self) -> tuple:
        """``("adapters", <state>)`` for LoRA models (``"off"`` for the adapter-off call), plus the weights' address."""
        if self.adapter_off:
            adapters: Any = "off"
        elif self.layers:
            off = [bool(getattr(m, "disable_adapters", False)) for m in self.layers]
            act = self.layers[0].active_adapter
            adapters = ("off" if all(off) else "on" if not any(off) else "mixed", tuple(act) if isinstance(act, list)
                        else act)
        else:
            adapters = None
        return ("adapters", adapters)

    def trainable(self) -> bool:
        """Whether a call may need autograd: the module has trainable weights, or no module is known."""
        return self.module is None or any(p.requires_grad for p in self.module.parameters())

    def weights_token(self) -> tuple | None:
        if self.module is None:
            return None
        p = next(self.module.parameters(), None)
        return None if p is None else (p.data_ptr(), p.dtype, p.device)


# --------------------------------------------------------------------------------------------
# Captured graphs.
# --------------------------------------------------------------------------------------------


@dataclass
class CaptureRecord:
    """One first call: a CUDA-graph capture (warm-up included) or an inductor compile.

    Attributes:
        name: the wrapped network's name (``"student"``, ``"teacher"``).
        signature: the first tensor's shape and dtype (``"2x4x128x128 float16"``).
        seconds: wall time of the first call, synchronized.
        kind: ``"graph"`` or ``"inductor"``.
    """

    name: str
    signature: str
    seconds: float
    kind: str


@dataclass
class _Graph:
    replay: Callable[[], None]
    inputs: list[torch.Tensor]
    outputs: Any
    spec: Any


def cuda_capture(net: Net, args: tuple, kwargs: dict, device: torch.device, pool: "GraphPool | None",
                 warmup: int) -> tuple[
        Callable[[], None], Any]:
    """Capture ``net(*args, **kwargs)`` into a CUDA graph; returns ``(replay, static outputs)``.

    The warm-up runs on a side stream first (cuBLAS/cuDNN handles, lazy init and autotuning must not
    happen inside the capture), then one call is recorded into ``pool`` (a :class:`GraphPool`, whose
    capture stream on ``device`` is used for both; ``None``: a pool and stream of its own). Nothing is executed by the
    capture itself, so the caller replays once to get the first result.
    """
    with torch.cuda.device(device):
        # An explicit stream on `device`: torch.cuda.graph's own default stream is created once, on
        # whichever device was current then, and a capture on another GPU through it records nothing.
        stream = pool.stream if pool is not None else torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                net(*args, **kwargs)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool.handle if pool is not None else None, stream=stream):
                outputs = net(*args, **kwargs)
        except BaseException:
            _end_generator_capture(device)
            raise
    return graph.replay, outputs


def _end_generator_capture(device: torch.device) -> None:
    """Take the device's default CUDA generator out of capture mode after a failed capture.

    ``capture_begin`` puts the default generator into capture mode before it claims the memory pool;
    when the claim fails, nothing takes it out again, and every later random draw outside a capture
    raises ``Offset increment outside graph capture``. A complete capture of one tiny kernel runs the
    generator's capture prologue and epilogue once more, which leaves it in its normal state.
    """
    try:
        with torch.cuda.device(device):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
                torch.zeros(1, device=device)
    except Exception:  # noqa: BLE001 - best effort; the original error is what the caller reports
        logger.debug("distillpp.accel: could not reset the CUDA generator after a failed capture", exc_info=True)


class GraphPool:
    """One CUDA-graph memory pool on one device, kept usable for as long as this object lives.

    PyTorch frees a pool when the last graph captured into it is destroyed, but a pool whose graphs
    are gone while some of its blocks are still allocated lingers with a use count of zero, and a
    later capture into the same handle then fails inside the allocator (``use_count > 0 INTERNAL
    ASSERT FAILED``); that failed ``capture_begin`` also leaves the default CUDA generator in capture
    mode, so that the next random draw outside a capture, inductor's autotuning among them, raises
    ``Offset increment outside graph capture``. This happens as soon as one pipeline's graphs are
    dropped and another pipeline captures into the same process-wide pool. So every pool gets an
    *anchor*: a one-element graph captured into it on creation and held by this object, which every
    :class:`GraphedNet` using the pool holds too. The pool's use count then never drops to zero while
    anyone can still capture into it.

    Captures into one pool also share one capture stream on its device (:attr:`stream`), as PyTorch
    advises for memory sharing between the graphs of one pool.

    Args:
        device: the CUDA device.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.handle = torch.cuda.graph_pool_handle()
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(self.device)
            self._anchor = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._anchor, pool=self.handle, stream=self.stream):
                self._anchor_out = torch.zeros(1, device=self.device)


class GraphedNet:
    """``net(*args, **kwargs)`` replayed from CUDA graphs, one per input signature.

    Usually a denoising network ``net(sample, timestep, **cond)``; a text encoder's forward
    (:class:`ModuleForward`) works alike.

    Returned outputs are fresh tensors (copied out of the graph's static outputs), so they stay
    valid across later calls. Calls that may need autograd (gradients enabled and an input or a
    weight that requires grad; weights frozen after wrapping are noticed when they move), with a
    tensor off ``device``, or with an argument that cannot be keyed run eagerly, as does every new
    signature beyond ``max_graphs``.

    Args:
        net: the network callable.
        device: the CUDA device its weights live on.
        pool: the :class:`GraphPool` shared with the other networks of one run, held for as long as
            this wrapper lives (``None``: each capture gets a pool of its own).
        name: name used in notices and :attr:`records`.
        warmup: eager calls on a side stream before each capture.
        max_graphs: most signatures captured; later new ones run eagerly (with one warning).
        records: list that capture records are appended to (shared by an :class:`Accelerator`).
        capture: the capture function (default :func:`cuda_capture`; tests pass a CPU stand-in).
        like: the network whose module and adapter state key the graphs, when ``net`` wraps it (a
            ``torch.compile``-d network); default ``net``.
        kind: ``"graph"`` or ``"inductor"``, for :attr:`records`.
    """

    def __init__(
        self,
        net: Net,
        device: torch.device | str,
        pool: Any = None,
        name: str = "net",
        warmup: int = 2,
        max_graphs: int = 16,
        records: list[CaptureRecord] | None = None,
        capture: Callable[..., tuple[Callable[[], None], Any]] = cuda_capture,
        like: Net | None = None,
        kind: str = "graph",
    ):
        self.net = net
        self.device = torch.device(device)
        self.pool = pool
        self.name = name
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.records = records if records is not None else []
        self._capture_fn = capture
        self.kind = kind
        self._state = _NetState(net if like is None else like)
        self._weights = self._state.weights_token()
        self._trainable = self._state.trainable()
        self._graphs: dict[tuple, _Graph] = {}
        self._eager_keys: set[tuple] = set()
        self.replays = 0
        self.eager_calls = 0

    @property
    def model(self) -> torch.nn.Module | None:
        """The underlying module (for code that reads ``net.model`` from :func:`distillpp.unet_fn`)."""
        return self._state.module

    def key(self, *args: Any, **kwargs: Any) -> tuple:
        """The signature a call is cached under (its adapter state, and its inputs' structure/shapes/dtypes)."""
        return self._key_and_tensors(args, kwargs)[0]

    def _key_and_tensors(self, args: tuple, kwargs: dict) -> tuple[tuple, Any, list[torch.Tensor]]:
        tensors: list[torch.Tensor] = []
        spec = _flatten((args, kwargs), tensors)
        return (self._state.key(), spec), spec, tensors

    def reset(self) -> None:
        """Drop every captured graph (they are recaptured on next use)."""
        self._graphs.clear()
        self._eager_keys.clear()

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        token = self._state.weights_token()
        if token != self._weights:  # weights moved or were replaced: every graph reads stale addresses
            self.reset()
            self._weights = token
            self._trainable = self._state.trainable()
        key, spec, tensors = self._key_and_tensors(args, kwargs)
        if torch.is_grad_enabled() and (self._trainable or any(t.requires_grad for t in tensors)):
            self.eager_calls += 1  # a replayed graph records nothing for autograd
            return self.net(*args, **kwargs)
        graph = self._graphs.get(key)
        started = None
        if graph is None:
            if key in self._eager_keys or not self._capturable(spec, tensors):
                self._eager_keys.add(key)
                self.eager_calls += 1
                return self.net(*args, **kwargs)
            started = self._sync_clock()
            graph = self._record(key, spec, tensors)
            if graph is None:
                self.eager_calls += 1
                return self.net(*args, **kwargs)
        else:
            for dst, src in zip(graph.inputs, tensors):
                if dst is not src:
                    dst.copy_(src)
        graph.replay()  # a capture executes nothing, so a first call replays too
        self.replays += 1
        out = _map_tensors(graph.outputs, torch.Tensor.clone)
        if started is not None:
            seconds = self._sync_clock() - started
            self.records.append(CaptureRecord(self.name, _describe(spec), seconds, self.kind))
            logger.info("distillpp.accel: captured a CUDA graph of %s for %s in %.2f s", self.name, _describe(spec),
                        seconds)
        return out

    def _sync_clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _capturable(self, spec: Any, tensors: list[torch.Tensor]) -> bool:
        if any(t.device != self.device for t in tensors) or _has_unhashable(spec):
            return False
        if len(self._graphs) >= self.max_graphs:
            warnings.warn(f"distillpp.accel: {self.name} already has {self.max_graphs} CUDA graphs; new input "
                          "signatures run eagerly", RuntimeWarning, stacklevel=3)
            return False
        return True

    def _record(self, key: tuple, spec: Any, tensors: list[torch.Tensor]) -> _Graph | None:
        inputs = [t.detach().clone() for t in tensors]
        args, kwargs = _build(spec, inputs)
        try:
            replay, outputs = self._capture_fn(self.net, args, kwargs, self.device, self.pool, self.warmup)
        except Exception as e:  # noqa: BLE001 - a network that cannot be captured still runs, eagerly
            self._sync_clock()
            warnings.warn(f"distillpp.accel: could not capture a CUDA graph of {self.name} ({type(e).__name__}: "
                          f"{str(e)[:200]}); this input signature runs eagerly", RuntimeWarning, stacklevel=3)
            self._eager_keys.add(key)
            return None
        graph = _Graph(replay, inputs, outputs, spec)
        self._graphs[key] = graph
        return graph


# --------------------------------------------------------------------------------------------
# Inductor: compiled kernels under the same graphs.
# --------------------------------------------------------------------------------------------


def _torch_default_cache() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # pragma: no cover - moved in another torch version
        return None
    return default_cache_dir()


def _default_inductor_cache() -> str:
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Importing diffusers' pipelines already asks inductor for its cache folder, which writes
    # PyTorch's /tmp default into the variable: that value is not a user's choice.
    if folder and folder != _torch_default_cache():
        return folder
    folder = os.path.join(os.path.expanduser("~"), ".cache", "distillpp", "torchinductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder  # read lazily by inductor at its first compile
    return folder


# --------------------------------------------------------------------------------------------
# One accelerator per pipeline: the nets of a run, one pool per device, first-call costs.
# --------------------------------------------------------------------------------------------


@dataclass
class Accelerator:
    """Accelerates the networks of one pipeline (student, teacher, adapter-off teacher) alike.

    Keep one per pipeline and call :meth:`wrap` on each network; wrapping the same network again
    returns the same wrapper, so graphs captured in one pipeline call are replayed in the next.

    Args:
        mode: ``"none"``, ``"graphs"`` or ``"inductor"`` (``None`` = ``"none"``).
        device: the execution device (default: the current CUDA device, else CPU).
        warmup: eager warm-up calls before each graph capture.
        max_graphs: most graphs per network.
        records: where capture/compile records go (default: a new list, :attr:`records`).
        memoize: return the same wrapper when the same network is wrapped again (it then lives as
            long as the Accelerator; the process-wide shared accelerator does not memoize).

    Raises:
        ValueError: ``mode`` is not one of :data:`COMPILE_MODES` (the message names ``compile``).
    """

    mode: str = "graphs"
    device: Any = None
    warmup: int = 2
    max_graphs: int = 16
    records: list[CaptureRecord] = field(default_factory=list)
    memoize: bool = True

    def __post_init__(self) -> None:
        self.mode = check_compile(self.mode)
        if self.device is None:
            self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
                else torch.device("cpu")
        self.device = torch.device(self.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # Graphs need CUDA: elsewhere every wrapped network runs eagerly (wrap() says so).
        self.effective_mode = "none" if self.mode == "graphs" and self.device.type != "cuda" else self.mode
        if self.mode == "inductor":
            cache = _default_inductor_cache()
            logger.warning("distillpp: compile='inductor' compiles each network on its first call per shape (minutes "
                           "for an SDXL-size UNet, cached in %s for later runs); compile='graphs' captures in seconds",
                           cache)
        self._pools: dict[torch.device, Any] = {}
        self._wrapped: dict[int, tuple[Any, Any]] = {}
        self._graphed: list[GraphedNet] = []

    def pool(self, device: torch.device) -> GraphPool | None:
        """The graph memory pool shared by every capture on ``device`` (``None`` off CUDA)."""
        if device not in self._pools:
            pool = None
            if device.type == "cuda":
                try:
                    pool = GraphPool(device)
                except Exception as e:  # noqa: BLE001 - each capture then gets a pool of its own (or runs eagerly)
                    warnings.warn(f"distillpp.accel: could not set up a shared CUDA graph pool on {device} "
                                  f"({type(e).__name__}: {str(e)[:200]}); graphs will not share memory",
                                  RuntimeWarning, stacklevel=3)
            self._pools[device] = pool
        return self._pools[device]

    def wrap(self, net: Net, name: str | None = None) -> Net:
        """The accelerated version of ``net(sample, timestep, **cond)`` (``net`` itself for mode ``"none"``).

        A teacher placed on another GPU (:class:`~distillpp.pipelines.placement.PlacedNet`) is graphed on
        its own device; a CPU-offloaded one (:class:`~distillpp.pipelines.placement.OffloadedNet`) stays
        eager, with a notice, because its weights move in per call.

        Args:
            net: the network callable.
            name: name for notices and :attr:`records` (default: its class name).
        """
        if self.effective_mode == "none":
            if self.mode == "graphs":
                warnings.warn(f"compile='graphs' needs a CUDA device; running eagerly on {self.device}",
                              RuntimeWarning, stacklevel=2)
            return net
        hit = self._wrapped.get(id(net))
        if hit is not None and hit[0] is net:
            return hit[1]
        wrapped = self._wrap(net, name or getattr(net, "__name__", type(net).__name__))
        if self.memoize:
            self._wrapped[id(net)] = (net, wrapped)  # the strong reference keeps id(net) from being reused
        else:
            self._graphed.clear()  # nothing to reset later: keep no reference to the networks
        return wrapped

    def _wrap(self, net: Net, name: str) -> Net:
        AdapterOffNet, OffloadedNet, PlacedNet = _wrapper_classes()

        if isinstance(net, OffloadedNet):
            logger.warning("distillpp: the CPU-offloaded %s runs eagerly under compile=%r (its weights are copied in "
                           "per call, so a captured graph would read stale memory)", name, self.mode)
            return net
        if isinstance(net, PlacedNet):
            if net.device.type != "cuda" and self.effective_mode == "graphs":
                return net
            return PlacedNet(self._wrap_on(net.net, name, net.device, None), net.device)
        return self._wrap_on(net, name, self.device, net if isinstance(net, AdapterOffNet) else None)

    def _wrap_on(self, net: Net, name: str, device: torch.device, adapter_off: Any) -> Net:
        like = net
        if self.effective_mode == "inductor":
            if adapter_off is not None:
                # Compile the inner network; the adapters are switched off around it, and dynamo's
                # guards on the adapter flags give that state its own compiled code.
                net = type(adapter_off)(torch.compile(adapter_off.net, dynamic=False), adapter_off.model)
            else:
                net = torch.compile(net, dynamic=False)
            if device.type != "cuda":
                return net
        graphed = GraphedNet(net, device, self.pool(device), name, self.warmup, self.max_graphs, self.records,
                             like=like, kind="graph" if self.effective_mode == "graphs" else "inductor")
        self._graphed.append(graphed)
        return graphed

    @property
    def first_call_s(self) -> float:
        """Total seconds spent in first calls so far (captures or compiles)."""
        return sum(r.seconds for r in self.records)

    def reset(self) -> None:
        """Drop every captured graph of every wrapped network (recaptured on next use)."""
        for graphed in self._graphed:
            graphed.reset()


_SHARED: dict[tuple[str, torch.device], Accelerator] = {}


def shared_accelerator(mode: str | None, device: Any = None) -> Accelerator:
    """The process-wide :class:`Accelerator` of ``(mode, device)`` that :func:`accelerate_net` uses.

    Its :attr:`Accelerator.records` hold the first-call cost of every network accelerated through
    :func:`accelerate_net` on that device; its graph pool is shared by all of them (graphs are
    replayed on the caller's stream, one at a time: do not run two accelerated pipelines
    concurrently from different threads).

    Args:
        mode: ``"none"``, ``"graphs"`` or ``"inductor"``.
        device: the execution device (default: the current CUDA device, else CPU).
    """
    mode = check_compile(mode)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (mode, device)
    if key not in _SHARED:
        _SHARED[key] = Accelerator(mode, device, memoize=False)
    return _SHARED[key]


def accelerate_net(
    net: Net,
    mode: str | None = "graphs",
    device: Any = None,
    name: str | None = None,
    module: torch.nn.Module | None = None,
    accelerator: Accelerator | None = None,
) -> Net:
    """Accelerate one network: ``net`` itself for ``"none"``, else a graphed or compiled wrapper.

    Without ``accelerator`` the network joins the process-wide :func:`shared_accelerator` of its
    device (one graph memory pool per device for every student and teacher).

    Args:
        net: ``net(sample, timestep, **cond)``.
        mode: ``"none"``, ``"graphs"`` or ``"inductor"`` (``None`` = ``"none"``).
        device: execution device (default: ``module``'s, else the current CUDA device, else CPU, where
            ``"graphs"`` falls back to eager with a warning).
        name: name used in notices and capture records.
        module: the network's ``torch.nn.Module`` (its device is the default ``device``).
        accelerator: an :class:`Accelerator` to join instead of the shared one.

    Raises:
        ValueError: unknown ``mode`` (the message names ``compile``).
    """
    mode = check_compile(mode)
    if mode == "none":
        return net
    if device is None and module is not None:
        p = next(module.parameters(), None)
        device = p.device if p is not None else None
    if accelerator is None:
        accelerator = shared_accelerator(mode, device)
    return accelerator.wrap(net, name)


# --------------------------------------------------------------------------------------------
# Whole modules called by code we do not own (text encoders inside diffusers' encode_prompt).
# --------------------------------------------------------------------------------------------


class ModuleForward:
    """A module's own ``forward`` as a network callable (``.model`` is the module).

    It calls the class's ``forward``, not the instance's, so :func:`routed_forwards` can point the
    module's ``forward`` at an accelerated wrapper of this object without recursing.

    Args:
        module: the module (a text encoder).
    """

    def __init__(self, module: torch.nn.Module):
        self.model = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.model).forward(self.model, *args, **kwargs)


def accelerate_module(module: torch.nn.Module, mode: str | None, name: str | None = None) -> Net | None:
    """A graphed ``forward`` for a whole module that other code calls (``None``: it stays eager).

    Meant for text encoders: their inputs have fixed shapes (77 CLIP tokens, a fixed T5 length), so
    one graph per batch size replays every later call. ``"inductor"`` captures them as graphs of
    their eager kernels too: compiling an encoder costs a minute for about a millisecond per call.
    A module that is not on a CUDA device, or whose ``forward`` is already replaced on the instance
    (accelerate's offload hooks move weights in it), stays eager.

    Args:
        module: the module.
        mode: ``"none"``, ``"graphs"`` or ``"inductor"`` (``None`` = ``"none"``).
        name: name for notices and capture records.

    Raises:
        ValueError: unknown ``mode`` (the message names ``compile``).
    """
    if check_compile(mode) == "none" or "forward" in module.__dict__:
        return None
    p = next(module.parameters(), None)
    if p is None or p.device.type != "cuda":
        return None
    return accelerate_net(ModuleForward(module), "graphs", p.device, name or type(module).__name__)


@contextlib.contextmanager
def routed_forwards(routes: Sequence[tuple[torch.nn.Module, Net]]) -> Iterator[None]:
    """Inside the block each ``module(...)`` runs its accelerated ``forward``; restored on exit, errors too.

    The module stays what its owner holds (its ``dtype``, ``config``, hooks and ``__call__`` are
    untouched); only the instance's ``forward`` attribute is set for the duration of the block.

    Args:
        routes: ``(module, accelerated forward)`` pairs, as :func:`accelerate_module` gives them.
    """
    patched: list[torch.nn.Module] = []
    try:
        for module, fast in routes:
            module.forward = fast
            patched.append(module)
        yield
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


def host_to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t.to(device)`` without a host synchronisation when it copies host memory to a GPU.

    A blocking copy from pageable host memory waits for the GPU stream to drain; a non-blocking one
    from pinned memory is queued behind the work already issued (the pinned buffer is kept alive by
    PyTorch's caching host allocator until the copy has run).
    """
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)

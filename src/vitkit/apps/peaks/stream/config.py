"""The configuration of a streaming run (``vitkit stream``): a typed schema, Hydra composition, checks.

The schema is :class:`StreamConfig` (dataclasses); the packaged YAML ``vitkit/configs/stream/default.yaml``
documents every key. :func:`load_stream_config` composes a packaged config name (``default``) or a YAML file
with command-line style overrides (``model.num_actors=2``), checks every key against the schema (an unknown
key is a :class:`~vitkit.errors.ConfigError` naming the closest valid key) and every value against its
allowed range, and returns a :class:`StreamConfig`.

Nothing here imports Ray.
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from vitkit.apps.compose import compose
from vitkit.errors import ConfigError

__all__ = ["SourceConfig", "DetectorConfig", "ModelConfig", "PeaksConfig", "OutputConfig", "RayConfig",
           "StreamConfig", "load_stream_config", "check_config"]

SOURCE_KINDS = ("synthetic", "files", "queue", "zmq")
ZMQ_SOCKETS = ("pull", "sub")
OVERFLOW_POLICIES = ("block", "drop_oldest")
MASK_FORMATS = ("packed", "uint8")


@dataclass
class SourceConfig:
    kind: str = "synthetic"
    """``synthetic`` (vitkit's generator, in memory), ``files`` (zarr/HDF5/... via ``open_frames``), ``queue``
    (a ``ray.util.queue.Queue`` fed by external producers) or ``zmq`` (ZeroMQ sockets, e.g. LCLStreamer's)."""
    path: Any = None
    """files: a path, glob, CSV list of paths, or a list of these."""
    key: str | None = None
    """files: the image dataset/array (HDF5 default ``/entry_1/data_1/data``, zarr ``images``)."""
    num_frames: int = 64
    """synthetic: frames in the stream."""
    shape: list[int] = field(default_factory=lambda: [128, 128])
    """synthetic: frame shape ``[H, W]`` (single-panel frames; without ``detector``)."""
    detector: str | None = None
    """synthetic: a built-in detector name or ``.geom``: whole lattice stills ``[P, H, W]`` of that detector."""
    seed: int = 0
    """synthetic: seed of :class:`~vitkit.apps.peaks.synthetic.SyntheticPeakDataset`."""
    queue_name: str | None = None
    """queue: name of the (detached) queue actor to read from (``ray.get_actor``)."""
    queue_namespace: str | None = None
    """queue: its Ray namespace."""
    num_producers: int = 1
    """queue: producers feeding the queue; each ends its part of the stream with one ``None`` sentinel."""
    poll_s: float = 0.05
    """queue: how long one empty poll of the queue waits."""
    batch_timeout_s: float = 0.5
    """A partial batch is sent to a model actor after waiting this long for more frames."""
    endpoints: Any = None
    """zmq: one address or a list (``tcp://host:port``); the source connects to each (binds with ``bind``)."""
    socket: str = "pull"
    """zmq: ``pull`` (PUSH/PULL: backpressure holds) or ``sub`` (PUB/SUB: the publisher drops at its HWM)."""
    bind: bool = False
    topic: str = ""
    """zmq sub: subscription prefix; with one, each message's first part is the topic."""
    data_key: str = "data"
    """zmq: the npz key of the detector array ``[P, H, W]`` or slab ``[SS, FS]``."""
    id_key: str = "event_id"
    timestamp_key: str = "timestamp"
    batched: bool = False
    """zmq: each message holds a batch ``[B, ...]`` of events (LCLStreamer's batch pipeline); ids/timestamps
    ``[B]`` or one for all."""
    hwm: int = 4
    """zmq: receive high-water mark (messages held on this side while the pipeline is full)."""
    idle_timeout_s: float | None = None
    """zmq: end the stream after this long without a message (a producer gone without its end marker)."""
    overflow: str = "block"
    """zmq: ``block`` (stop reading; the sender holds the data) or ``drop_oldest`` (live monitoring: keep reading,
    drop the oldest waiting events beyond ``buffer_events``, counted and warned)."""
    buffer_events: int = 16
    """zmq drop_oldest: events waiting on this side at most."""


@dataclass
class DetectorConfig:
    geometry: str | None = None
    """CrystFEL ``.geom`` or built-in name (``epix10k2m``...); None: the run's ``detector.geom`` when it has one,
    else every event is panels of whatever shape it has (no lab coordinates)."""
    mask: str | None = None
    """Bad-pixel mask file (psana: non-zero = good; or the geometry's CrystFEL mask bits)."""
    mask_key: str | None = None


@dataclass
class ModelConfig:
    checkpoint: str | None = None
    """Run directory, ``.ckpt`` or exported model directory (what ``vitkit predict`` takes). Required."""
    num_actors: int = 1
    device: str = "cpu"
    """``cpu`` or ``cuda`` / ``cuda:N``."""
    num_cpus: float = 1.0
    """Ray CPUs reserved per model actor."""
    num_gpus: float | None = None
    """Ray GPUs per actor; default 1 on ``cuda``, 0 on ``cpu``."""
    torch_threads: int = 1
    """``torch.set_num_threads`` in each actor."""
    bf16: bool = False
    """Weights in bfloat16, cast once (``cast_for_inference``); results then differ slightly from fp32 predict."""
    overlap: float = 0.25
    """Sliding-window overlap (as ``vitkit predict --overlap``)."""
    sparse: bool | None = None
    """Sparse-token EoMT: true, the run's ``sparse_model/`` and ``sparse.json`` threshold (``vitkit predict
    --sparse``); false, its dense model (``--dense``); null, as ``vitkit predict`` decides without either flag (the
    sparse-token model where it held the accuracy on the run's held-out shots and the actors run on a CPU)."""
    batch_size: int = 4
    """Frames per batch sent to one actor call."""
    max_batches_per_actor: int = 2
    """Batches queued or running per actor (2: the next batch is already local when one finishes)."""
    max_restarts: int = 3
    """Ray ``max_restarts`` of each model actor; an actor that died more often is dropped from the pool."""
    max_batch_retries: int = 3
    """A batch whose actor died is re-run at most this many times."""
    restart_timeout_s: float = 300.0
    """An actor that is not back this long after its death is dropped from the pool."""
    warmup: bool = True
    """Each actor runs one blank window through the model before the stream starts (and after a restart)."""
    mask_format: str = "packed"
    """What a model actor returns per frame: ``packed`` (1 bit/pixel, ``np.packbits``) or ``uint8``."""


@dataclass
class PeaksConfig:
    workers: int = 2
    """Peak-finding actors; each has one call in flight at most (a hard bound, not a hint)."""
    num_cpus: float = 0.5
    """Ray CPUs reserved per peak actor."""
    min_peaks: int = 0
    max_peaks: int = 2048
    min_pixels: int = 1
    min_snr: float | None = 5.5
    """Smallest photometric SNR of a peak (as ``vitkit predict --min-snr``; None: no test)."""
    threshold: float = 0.6
    """Peak-class share of the probabilities a peak core needs (as ``vitkit predict --threshold``)."""


@dataclass
class OutputConfig:
    dir: str = "stream"
    """Output folder: ``peaks.cxi`` and ``stream_stats.json``."""
    flush_every_s: float = 5.0
    """The writer flushes the HDF5 file this often."""


@dataclass
class RayConfig:
    address: str | None = None
    """``None``: start a local Ray for this run (shut down at the end); ``auto`` or ``ray://...``: connect. An
    already initialised Ray in the calling process is used as it is and left running."""
    num_cpus: int | None = None
    num_gpus: int | None = None
    namespace: str | None = None
    log_to_driver: bool = False
    actor_start_timeout_s: float = 300.0


@dataclass
class StreamConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peaks: PeaksConfig = field(default_factory=PeaksConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    max_frames_in_flight: int = 64
    """Events read from the source and not yet written to the CXI, at most (bounded memory, backpressure)."""
    report_every_s: float = 5.0
    """Progress line period (0 disables)."""


# ------------------------------------------------------------------------------------------------ keys
def _schema_keys(cls=StreamConfig, prefix: str = "") -> list[str]:
    out = []
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        out.append(prefix + f.name)
        if is_dataclass(default):
            out.extend(_schema_keys(type(default), prefix + f.name + "."))
    return out


def _unknown_key_error(key: str, where: str) -> ConfigError:
    keys = _schema_keys()
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    section = key.rsplit(".", 1)[0] if "." in key else ""
    valid = sorted(k for k in keys if (k.rsplit(".", 1)[0] if "." in k else "") == section)
    return ConfigError(f"stream config: unknown key {key!r} ({where}).{hint} Valid keys here: {', '.join(valid)}.")


def _check_override_keys(overrides: list[str]) -> None:
    keys = set(_schema_keys())
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"stream config: expected overrides as key=value, found {ov!r}.")
        key = ov.split("=", 1)[0].strip().lstrip("+~")
        if key not in keys:
            raise _unknown_key_error(key, f"override {ov!r}")


def _flat_keys(d: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            out.append(f"{prefix}{k}")
            out.extend(_flat_keys(v, f"{prefix}{k}."))
    return out


def _check_tree_keys(d: Any, prefix: str = "", where: str = "") -> None:
    keys = set(_schema_keys())
    if not isinstance(d, dict):
        return
    for k, v in d.items():
        full = f"{prefix}{k}"
        if full not in keys:
            raise _unknown_key_error(full, where)
        if isinstance(v, dict) and any(s.startswith(full + ".") for s in keys):
            _check_tree_keys(v, full + ".", where)


# ----------------------------------------------------------------------------------------------- load
def packaged_configs() -> list[str]:
    """Names of the packaged stream configs (``vitkit/configs/stream/*.yaml``)."""
    d = importlib.resources.files("vitkit.configs") / "stream"
    return sorted(p.name.removesuffix(".yaml") for p in d.iterdir() if p.name.endswith(".yaml"))


def load_stream_config(config: str | os.PathLike | dict | StreamConfig | None = "default",
                       overrides: list[str] | tuple[str, ...] = ()) -> StreamConfig:
    """A checked :class:`StreamConfig` from a packaged name, a YAML path, a dict or a StreamConfig, with overrides.

    Raises:
        ConfigError: an unknown key (with the closest valid one), a value of the wrong type or out of range, a
            required value (``model.checkpoint``) missing.
        FileNotFoundError: ``config`` is neither a packaged name nor an existing YAML file.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(overrides)
    _check_override_keys(overrides)
    if isinstance(config, StreamConfig):
        raw = OmegaConf.to_container(OmegaConf.structured(config))
        if overrides:
            raw = OmegaConf.to_container(OmegaConf.merge(raw, OmegaConf.from_dotlist(overrides)))
        where = "StreamConfig"
    elif isinstance(config, dict) or config is None:
        raw = OmegaConf.merge(OmegaConf.create(config or {}), OmegaConf.from_dotlist(overrides))
        raw = OmegaConf.to_container(raw)
        where = "dict"
    else:
        p = Path(config)
        name = os.fspath(config)
        if name in packaged_configs():
            where, config_name, config_dir = f"packaged config {name!r}", f"stream/{name}", None
        elif p.suffix in (".yaml", ".yml") and p.is_file():
            where, config_name, config_dir = str(p), p.stem, p.parent
        else:
            raise FileNotFoundError(f"stream config {name!r}: expected a packaged config name "
                                    f"({', '.join(packaged_configs())}) or an existing .yaml file; found neither.")
        # a file may leave keys to the schema's defaults: Hydra adds those with "+key=value"
        present = set(_flat_keys(OmegaConf.to_container(compose([], config_name, config_dir), resolve=False)))
        ovs = [ov if ov[0] in "+~" or ov.split("=", 1)[0].strip() in present else "+" + ov for ov in overrides]
        raw = OmegaConf.to_container(compose(ovs, config_name, config_dir), resolve=False)
    _check_tree_keys(raw, where=where)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(StreamConfig), raw)
        out: StreamConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"stream config ({where}): bad value for {key!r}: {msg}. See "
                          "vitkit/configs/stream/default.yaml for the expected types.") from e
    check_config(out)
    return out


def check_config(cfg: StreamConfig) -> StreamConfig:
    """Range and consistency checks; raises :class:`ConfigError` saying what to change."""
    def bad(key: str, expected: str, found: Any) -> ConfigError:
        return ConfigError(f"stream config: {key}: expected {expected}, found {found!r}.")

    s, m, p = cfg.source, cfg.model, cfg.peaks
    if s.kind not in SOURCE_KINDS:
        raise bad("source.kind", f"one of {SOURCE_KINDS}", s.kind)
    if s.kind == "files" and not s.path:
        raise ConfigError("stream config: source.kind=files needs source.path (a file, glob or CSV list).")
    if s.kind == "synthetic" and (len(s.shape) != 2 or min(s.shape) < 16 or s.num_frames < 0):
        raise bad("source.shape / source.num_frames", "[H, W] with H, W >= 16 and num_frames >= 0",
                  (list(s.shape), s.num_frames))
    if s.num_producers < 1:
        raise bad("source.num_producers", ">= 1", s.num_producers)
    if s.kind == "zmq":
        if not s.endpoints:
            raise ConfigError("stream config: source.kind=zmq needs source.endpoints (e.g. "
                              "source.endpoints=tcp://127.0.0.1:5555, or a list [tcp://a:1,tcp://b:2]).")
        if s.socket not in ZMQ_SOCKETS:
            raise bad("source.socket", f"one of {ZMQ_SOCKETS}", s.socket)
        if s.overflow not in OVERFLOW_POLICIES:
            raise bad("source.overflow", f"one of {OVERFLOW_POLICIES}", s.overflow)
        if s.hwm < 1 or s.buffer_events < 1:
            raise bad("source.hwm / source.buffer_events", ">= 1", (s.hwm, s.buffer_events))
        if s.idle_timeout_s is not None and s.idle_timeout_s <= 0:
            raise bad("source.idle_timeout_s", "> 0 or null", s.idle_timeout_s)
    if not m.checkpoint:
        raise ConfigError("stream config: model.checkpoint is required: pass model.checkpoint=<run directory, .ckpt "
                          "or exported model directory> (what `vitkit predict` takes).")
    for key, val, lo in (("model.num_actors", m.num_actors, 1), ("model.batch_size", m.batch_size, 1),
                         ("model.torch_threads", m.torch_threads, 1),
                         ("model.max_batches_per_actor", m.max_batches_per_actor, 1),
                         ("model.max_restarts", m.max_restarts, 0), ("model.max_batch_retries", m.max_batch_retries, 0),
                         ("peaks.workers", p.workers, 1), ("peaks.max_peaks", p.max_peaks, 1),
                         ("peaks.min_pixels", p.min_pixels, 1)):
        if val < lo:
            raise bad(key, f">= {lo}", val)
    if not (m.device == "cpu" or m.device.startswith("cuda")):
        raise bad("model.device", "'cpu' or 'cuda[:N]'", m.device)
    if m.mask_format not in MASK_FORMATS:
        raise bad("model.mask_format", f"one of {MASK_FORMATS}", m.mask_format)
    if not 0.0 < p.threshold < 1.0:
        raise bad("peaks.threshold", "0 < threshold < 1", p.threshold)
    if not 0.0 <= m.overlap < 1.0:
        raise bad("model.overlap", "0 <= overlap < 1", m.overlap)
    if m.num_cpus < 0 or p.num_cpus < 0:
        raise bad("model.num_cpus / peaks.num_cpus", ">= 0", (m.num_cpus, p.num_cpus))
    if cfg.max_frames_in_flight < m.batch_size:
        raise ConfigError(f"stream config: max_frames_in_flight ({cfg.max_frames_in_flight}) must be >= "
                          f"model.batch_size ({m.batch_size}); raise the cap or lower the batch size.")
    return cfg

"""Typed settings from one place: CLI flags > ``VISIONSERVE_*`` env vars > config file > defaults.

Per-model settings (batching, instances, execution providers) come from ``defaults`` overridden by
``models.<name>``; env vars reach nested fields with ``__``, e.g.
``VISIONSERVE_DEFAULTS__MAX_BATCH_SIZE=16`` or ``VISIONSERVE_MODELS__MOBILENET_V2__INSTANCES=2``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from .cpus import available_cpus
from .versions import VersionPolicy

Provider = Literal["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


class ModelSettings(BaseModel):
    """How one model is run. Any field left unset falls back to ``defaults``."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(default=None, ge=1, le=1024)
    """Largest batch a client may send in one Open Inference Protocol request (default: the manifest's)."""
    preferred_batch_size: int | None = Field(default=None, ge=1, le=1024)
    """Largest batch the batcher forms (Triton's ``preferred_batch_size``). Default: 4 on the CPU provider,
    where batching gains at most 8 % beyond 4 (MobileNetV2, fp32 and int8) and bigger batches only cost
    memory; ``max_batch_size`` on a GPU."""
    max_batch_delay_ms: float = Field(default=0.0, ge=0, le=1000)
    """Extra wait for a fuller batch. 0: never wait while the engine is idle (a lone request runs at once)."""
    instances: int | None = Field(default=None, ge=1, le=64)
    """Parallel ONNX Runtime sessions (batch workers) for this model. Default: one per usable CPU on the CPU
    provider — each worker decodes its own batch and runs it on one thread, a pipeline per core — and 2 on a
    GPU (one batch computes while the next is prepared)."""
    solo_threads: int | None = Field(default=None, ge=0, le=256)
    """Threads of an extra session that runs a lone request (every worker idle, nothing queued) on every
    core. Default: the usable CPUs on the CPU provider (0 where there is one), 0 on a GPU. 0: no solo session."""
    max_queue: int = Field(default=256, ge=1)
    """Items (images) waiting in the batcher beyond this are refused at once with 503 + Retry-After."""
    max_inflight: int | None = Field(default=None, ge=1)
    """Admission control at the door: requests for this model admitted and not yet answered (reading their
    body, decoding, queued or running). One more is refused with 503 + Retry-After when it arrives, before
    its body is read or its image decoded. Default: ``max_queue`` plus what the workers hold (instances x
    the batch they form), so a native request is refused here, cheaply, before the batcher's queue could be
    full; the queue bound then only catches Open Inference Protocol requests that carry many images each.
    Lower it to bound latency under overload: the worst queueing delay is about ``max_inflight`` divided
    by the model's throughput."""
    providers: list[Provider] = Field(
        default_factory=lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    """Execution providers in order of preference; those this onnxruntime build lacks are skipped."""
    require_provider: Provider | None = None
    """A provider the model must run on (e.g. ``CUDAExecutionProvider``): if it is missing or fails to initialise,
    the model is UNAVAILABLE (503 with the reason) instead of quietly running on CPU. Unset: fall back, with
    a warning."""
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    """Which versions to serve, as Triton spells it: ``{"latest": {"num_versions": N}}``,
    ``{"specific": {"versions": [1, 3]}}`` or ``{"all": {}}``. Default: all with ``model_control`` none (what
    the server always did), the latest one (Triton's default) with poll or explicit."""
    intra_op_threads: int = Field(default=0, ge=0)
    """Threads per instance session for one operator (0: 1 on the CPU provider — the instances are the
    parallelism — and the usable CPUs divided among the instances otherwise)."""
    inter_op_threads: int = Field(default=1, ge=0)
    allow_spinning: bool = False
    """Let idle intra-op threads of the instance sessions spin-wait. Off: under load a spinning thread burns
    the CPU that decoding needs (int8 MobileNetV2: 355 img/s off vs 320 on). The solo session always spins:
    it runs only when the machine is otherwise idle, and spinning halves its latency."""
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    device_id: int = Field(default=0, ge=0)
    trt_fp16: bool = False
    trt_int8: bool = False
    trt_engine_cache: str | None = None
    """Directory for TensorRT engines (keep it on a volume: building an engine takes minutes)."""
    trt_max_workspace_bytes: int = Field(default=1 << 30, ge=1 << 20)


class Settings(BaseSettings):
    """Server settings, validated at start."""

    model_config = SettingsConfigDict(env_prefix="VISIONSERVE_", env_nested_delimiter="__", extra="forbid")

    repository: Path = Path("model_repository")
    data_dir: Path | None = None
    """Where one-shot galleries are kept (``galleries/`` inside it). Default: ``.visionserve-data`` inside the
    model repository (hidden from the model scan); set it when the repository is mounted read-only."""
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: SecretStr | None = None
    """When set, every model and metadata endpoint needs header ``X-API-Key`` (or ``Authorization:
    Bearer``); health checks, ``/docs`` and (unless ``protect_metrics``) ``/metrics`` stay open."""
    api_key_file: Path | None = None
    """A file holding the API key (a Kubernetes secret mount); read at start, surrounding whitespace
    dropped. Used when ``api_key`` is unset."""
    protect_metrics: bool = False
    """Put ``/metrics`` behind the API key too (Prometheus then needs the key as a bearer token)."""
    max_connections: int = Field(default=1000, ge=1)
    """Open connections beyond this are answered 503 (JSON) and closed at once. The server also raises its
    open-file limit to what this needs, and keeps this under that limit."""
    header_timeout_s: float = Field(default=10.0, gt=0)
    """Longest a client may take to send a request's headers, counted from the connection or the request's
    first byte; a client that takes longer gets 408 and the connection is closed (slow-header attacks)."""
    max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    """Request line plus headers beyond this get 431 and the connection is closed."""
    body_timeout_s: float = Field(default=60.0, gt=0)
    """Longest a client may take to send a request's body, counted from its headers; then 408."""
    keep_alive_s: float = Field(default=5.0, gt=0)
    """An idle keep-alive connection is closed after this."""
    max_body_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(default=40_000_000, ge=1024)
    """Decoded image size limit (decompression bombs get 413)."""
    cpus: int = Field(default=0, ge=0, le=4096)
    """CPUs to size the thread pools for. 0: what this process may really use (affinity mask and cgroup CPU
    quota). The Helm chart sets it from the pod's CPU request: with a request and no limit there is no quota."""
    decode_threads: int | None = Field(default=None, ge=1)
    """Threads decoding images where the inference workers do not decode themselves (GPU providers); default:
    ``cpus``."""
    jpeg_draft: bool = True
    """Decode large JPEGs at 1/2, 1/4 or 1/8 scale when the model input is much smaller."""
    warmup: bool = True
    default_timeout_ms: int | None = Field(default=None, ge=1)
    """Deadline for requests that send no ``X-Request-Timeout-Ms``."""
    max_top_k: int = Field(default=1000, ge=1)
    max_masks: int = Field(default=1024, ge=1, le=100_000)
    """Most masked images (forward passes) one explanation may run (``/explain``: RISE masks, occlusion
    patches)."""
    explain_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    """Deadline of an explanation that sends no ``X-Request-Timeout-Ms``: its work runs only in the engine's
    idle time, so under heavy live load it may not finish (504)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    graceful_timeout_s: float = Field(default=30.0, ge=0)
    """Longest drain on SIGTERM. What is still unanswered then gets a JSON 503, and the exit status is 3."""
    drain_idle_close_s: float = Field(default=1.0, ge=0)
    """On SIGTERM, idle keep-alive connections stay open this long; a request that arrives on one meanwhile
    is answered (with ``Connection: close``) instead of meeting a closed socket (a TCP reset)."""
    model_control: Literal["none", "poll", "explicit"] = "none"
    """Triton's model control modes. ``none``: the repository is read once at start. ``poll``: new, changed and
    removed version directories are picked up every ``poll_interval_s`` without a restart. ``explicit``:
    models are loaded and unloaded through ``/v2/repository/models/{m}/load|unload``."""
    poll_interval_s: float = Field(default=2.0, gt=0, le=3600)
    """How often ``poll`` mode looks at the repository."""
    load_models: list[str] = Field(default_factory=list)
    """``explicit`` mode: the models loaded at start, as Triton's ``--load-model`` (default none; ``*``: all)."""
    strict_readiness: bool = False
    """``/v2/health/ready`` only when every model has a READY version (default: when at least one has)."""
    defaults: ModelSettings = Field(default_factory=ModelSettings)
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per-model overrides of ``defaults``, by model name."""

    @field_validator("models")
    @classmethod
    def _valid_overrides(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name, over in v.items():
            try:
                ModelSettings(**over)
            except Exception as e:
                raise ValueError(f"models.{name}: {e}") from None
        return v

    @model_validator(mode="after")
    def _key_from_file(self) -> Settings:
        if self.api_key is None and self.api_key_file is not None:
            try:
                key = self.api_key_file.read_text().strip()
            except OSError as e:
                raise ValueError(f"api_key_file: cannot read {self.api_key_file}: {e.strerror}") from None
            if not key:
                raise ValueError(f"api_key_file: {self.api_key_file} is empty")
            self.api_key = SecretStr(key)
        return self

    def usable_cpus(self) -> int:
        return self.cpus or available_cpus()

    def for_model(self, name: str) -> ModelSettings:
        over = self.models.get(name) or self.models.get(name.upper()) or self.models.get(name.lower()) or {}
        # validated again, so that nested settings (version_policy) are models, not dicts
        merged = {**self.defaults.model_dump(exclude_unset=True),
                  **ModelSettings(**over).model_dump(exclude_unset=True)}
        if "version_policy" not in merged and self.model_control == "none":
            # model control "none" keeps what the server always did: every version in the repository is served
            # (each under /versions/{v}, the newest by default); poll and explicit default to Triton's latest 1
            merged["version_policy"] = {"all": {}}
        return ModelSettings.model_validate(merged)


class ConfigError(Exception):
    """The configuration is invalid; the message lists what and where."""


def read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10 (JetPack 6)
                import tomli as tomllib  # type: ignore[no-redef]

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise ConfigError(f"cannot parse {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings")
    return data


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build validated settings; raises ConfigError with every problem listed."""
    from pydantic import ValidationError

    file_values = read_config_file(config_file) if config_file else {}

    class FromFile(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=file_values))

    try:
        return FromFile(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
                             for err in e.errors())
        raise ConfigError(f"invalid settings: {problems}") from None

"""The model manifest: the one schema the tools write and the runtime reads.

A model repository is laid out like Triton's::

    REPO/<name>/<version>/model.onnx
    REPO/<name>/<version>/manifest.json

The manifest says everything the server needs to turn an encoded image into the model's input tensor
and the model's output tensors into an answer, plus where the model came from and how faithful its
export was proven to be.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SerializeAsAny, model_validator

# the built-in tasks' sections are importable from here as before (the tools and tests name them)
from .tasks import TASKS, Section, section_for
from .tasks.classify import ClassifyPostprocess as ClassifyPostprocess
from .tasks.detect import DetectPostprocess as DetectPostprocess
from .tasks.embed import EmbedPostprocess as EmbedPostprocess

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One named tensor of the model; ``-1`` marks a dynamic axis (the batch)."""

    name: str
    datatype: Literal["FP32", "FP16", "INT64", "INT32", "UINT8"] = "FP32"
    shape: list[int]


class InputSpec(TensorSpec):
    layout: Literal["NCHW", "NHWC"] = "NCHW"

    @property
    def height(self) -> int:
        return self.shape[2] if self.layout == "NCHW" else self.shape[1]

    @property
    def width(self) -> int:
        return self.shape[3] if self.layout == "NCHW" else self.shape[2]


class Preprocess(_Strict):
    """How an RGB image becomes the input tensor, in order.

    - ``resize_policy``: ``shorter_side_center_crop`` (torchvision's Resize(resize) + CenterCrop(input)),
      ``stretch`` (resize to the input size, aspect not kept) or ``letterbox`` (fit inside, pad).
    - pixel values are multiplied by ``scale`` and then normalised ``(x - mean) / std`` per channel.
    """

    resize_policy: Literal["shorter_side_center_crop", "stretch", "letterbox"] = "shorter_side_center_crop"
    resize: int | None = Field(default=None, description="shorter side before the crop (crop policy only)")
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    channel_order: Literal["RGB", "BGR"] = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    pad_value: int = Field(default=114, description="letterbox padding, in 0-255 pixel units")


def _known_task(name: str) -> str:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return name


def _section(value: Any) -> Any:
    """The ``postprocess`` section of the task its ``kind`` names (the registry's tasks only)."""
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    section = section_for(kind)
    if section is None:
        raise ValueError(f"postprocess 'kind' must name a task ({', '.join(TASKS)}), got {kind!r}")
    return value if isinstance(value, section) else section.model_validate(value)


# a task's name, and its manifest section, as the task registry (service.tasks) knows them: a task
# registered there is a manifest's task without a line here
TaskName = Annotated[str, AfterValidator(_known_task)]
Postprocess = Annotated[SerializeAsAny[Section], BeforeValidator(_section)]


class Parity(_Strict):
    """What the converter measured: ONNX Runtime against PyTorch on the same inputs."""

    max_abs_error: float
    max_rel_error: float
    top1_agreement: float | None = Field(default=None, description="classifiers only")
    batch_sizes: list[int]
    samples: int
    real_images: int = 0
    atol: float
    rtol: float


class Provenance(_Strict):
    source: str = Field(description="what was converted: torchvision arch, module factory or TorchScript file")
    weights: str | None = None
    weights_sha256: str | None = None
    exporter: str = ""
    opset: int | None = None
    torch_version: str = ""
    onnx_sha256: str
    parity: Parity | None = None
    created: str = ""
    derived_from: str | None = Field(default=None, description="parent model (name:version) for optimized ones")
    notes: dict[str, object] = Field(default_factory=dict)


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    task: TaskName
    model_file: str = MODEL_FILE
    input: InputSpec
    outputs: list[TensorSpec]
    preprocess: Preprocess
    postprocess: Postprocess
    labels: list[str] = Field(default_factory=list)
    max_batch_size: int = Field(default=32, ge=1)
    provenance: Provenance

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        kind = self.postprocess.kind  # type: ignore[attr-defined]
        if self.task != kind:
            raise ValueError(f"task {self.task!r} does not match postprocess kind {kind!r}")
        names = {o.name for o in self.outputs}
        missing = [n for n in self.postprocess.reads() if n not in names]
        if missing:
            raise ValueError(f"postprocess refers to unknown outputs {missing}; outputs are {sorted(names)}")
        if len(self.input.shape) != 4:
            raise ValueError(f"input shape must be 4-D (batch, ...), got {self.input.shape}")
        return self

    def label(self, index: int) -> str:
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)

    # -- files -------------------------------------------------------------------------------------
    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        return cls.model_validate_json((Path(directory) / MANIFEST_FILE).read_text())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

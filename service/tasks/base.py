"""What a task is: one module that says what a model's outputs mean and how the service answers with them.

Modelled on LitServe's ``LitSpec`` (a spec brings its own endpoints and response shapes) and MLServer's
``MLModel`` + codecs (decode → predict → encode, each overridable). A task declares:

- ``section``: its manifest ``postprocess`` section (a pydantic model whose ``kind`` is the task's name);
- ``params`` / ``response``: the query parameters and answer of its native route
  ``POST /v1/models/{model}/<route>`` (the route itself — model lookup, admission, deadline, metrics, body,
  batched inference — is written once, in ``service.http.tasks``);
- ``check``: refuse bad parameters (422) before the body is read;
- ``answer``: one image's outputs → the native answer (the postprocessing);
- ``render_type`` / ``render``: an answer other than JSON when the parameters ask for one (detect's
  ``annotate=true``: the image with its boxes, PNG);
- ``oip_output``: what the Open Inference Protocol returns for one output tensor (default: the tensor);
- ``routers``: extra routes the task brings (embeddings bring galleries);
- for the tools, by name only (the runtime never imports the tools): ``guard_metric`` (what quantize's
  accuracy guard compares between fp32 and int8), ``evaluator`` (``"module:function"`` that
  ``visionserve evaluate`` calls), and ``loadtest_kinds`` (the request kinds ``visionserve loadtest --kind``
  sends to it).

Nothing here imports a web framework, and a task module imports nothing of the service at import time but
this module and ``service.errors``: the manifest imports the task registry for its sections, and the tools
import task modules without the serving stack. Postprocessing libraries (``service.postprocess``,
``service.detection``), which read the manifest, are imported when an answer is made.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from ..errors import BadTensor

if TYPE_CHECKING:
    from ..imaging import Geometry
    from ..registry import LoadedModel
    from ..settings import Settings


class Section(BaseModel):
    """A task's manifest ``postprocess`` section. Subclasses add ``kind: Literal["<task>"]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def reads(self) -> list[str]:
        """The model outputs this section reads (the manifest checks they exist)."""
        return [v for k, v in self if k == "output" and isinstance(v, str)]

    @property
    def batched(self) -> bool:
        """Whether the model's outputs have a batch axis (torchvision's post-processed detectors answer for
        one image: the server then runs them one image at a time)."""
        return True


class NoParams(BaseModel):
    """A route without query parameters."""

    model_config = ConfigDict(extra="forbid")


class Task(ABC):
    """One kind of model: its manifest section, native route, postprocessing and tool hooks."""

    name: ClassVar[str]
    section: ClassVar[type[Section]]
    route: ClassVar[str]  # POST /v1/models/{model}/<route> (and the versioned path)
    summary: ClassVar[str] = ""
    params: ClassVar[type[BaseModel]] = NoParams
    response: ClassVar[type[BaseModel]]
    guard_metric: ClassVar[str]
    evaluator: ClassVar[str | None] = None
    loadtest_kinds: ClassVar[tuple[str, ...]] = ()

    def check(self, params: Any, settings: Settings) -> None:
        """Refuse bad parameters (raise ``InvalidParameter``) before any work is done."""
        return None

    @abstractmethod
    def answer(self, model: LoadedModel, outputs: dict[str, np.ndarray], geometry: Geometry,
               params: Any) -> dict[str, Any]:
        """One image's outputs (by output name, batch axis removed) → the native JSON answer."""

    def render_type(self, params: Any) -> str | None:
        """The media type of the answer when ``params`` ask for something other than JSON, else None."""
        return None

    def render(self, image: bytes, answer: dict[str, Any], params: Any) -> bytes:
        """The non-JSON answer (of ``render_type``), from the request's image and the JSON answer. Runs on a
        thread, off the event loop."""
        raise NotImplementedError(f"task {self.name} renders nothing")

    def oip_output(self, model: LoadedModel, name: str, array: np.ndarray, parameters: dict[str, Any]
                   ) -> np.ndarray:
        """The Open Inference Protocol's answer for one requested output (``parameters``: the request's
        per-output parameters). Default: the tensor itself. Triton's ``classification`` extension is answered
        only by a task that implements it (classify); any other refuses it."""
        if parameters.get("classification", 0):
            raise BadTensor("'classification' must be a positive integer on a classifier's output")
        return array

    def routers(self) -> list[Any]:
        """Extra FastAPI routers this task brings (imported here, lazily, so the tools never need FastAPI)."""
        return []

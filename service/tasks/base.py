"""What a task is: one module that says what a model's outputs mean and how the service answers with them.

Modelled on LitServe's ``LitSpec`` (a spec brings its own endpoints and response shapes) and MLServer's
``MLModel`` + codecs (decode → predict → encode, each overridable). A task declares:

- ``section``: its manifest ``postprocess`` section (a pydantic model whose ``kind`` is the task's name);
- ``params`` / ``response``: the query parameters and answer of its native route
  ``POST /v1/models/{model}/<route>`` (the route itself — auth, model lookup, deadline, metrics, body — is
  written once, in ``service.http.tasks``);
- ``answer``: one image's outputs → the native answer (the postprocessing);
- ``oip_output``: what the Open Inference Protocol returns for one output tensor (default: the tensor);
- ``routers``: extra routes the task brings (embeddings bring galleries);
- for the tools, by name only (the runtime never imports the tools): ``guard_metric`` (what quantize's
  accuracy guard compares between fp32 and int8), ``evaluator`` (``"module:function"`` that
  ``visionserve evaluate`` calls), and ``loadtest_kinds`` (the request kinds ``visionserve loadtest --kind``
  sends to it).

Nothing here imports a web framework: a task module stays importable by the tools.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

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

    def oip_output(self, model: LoadedModel, name: str, array: np.ndarray, parameters: dict[str, Any]
                   ) -> np.ndarray:
        """The Open Inference Protocol's answer for one requested output (``parameters``: the request's
        per-output parameters, e.g. Triton's ``classification``). Default: the tensor itself."""
        return array

    def routers(self) -> list[Any]:
        """Extra FastAPI routers this task brings (imported here, lazily, so the tools never need FastAPI)."""
        return []

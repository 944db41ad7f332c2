"""MLflow models-from-code definition of an identity (``mlflow.pyfunc.log_model(python_model=<this file>)``).

The registered model ``faceid-<identity>`` carries the identity folder as its artifact
``identity``; ``faceid infer --identity models:/faceid-<name>@candidate`` downloads it and loads it
with :func:`faceid.model.identity.load_identity`. ``predict`` returns the identity card (generation
needs the base model and a GPU, so it stays in ``faceid infer``); nothing pickled is ever loaded.
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class IdentityModel(PythonModel):
    def load_context(self, context):
        import json
        from pathlib import Path

        self.folder = Path(context.artifacts["identity"])
        self.card = json.loads((self.folder / "identity.json").read_text())

    def predict(self, context, model_input: list[str], params: dict[str, Any] | None = None):
        """``[identity card + its local folder]``; ``model_input``'s values are not used. The input hint
        (MLflow wants ``list[...]``) gives the logged model a signature and spares MLflow's "Add type
        hints to the `predict` method" warning; no return hint: ``dict[str, Any]`` would warn too."""
        return [dict(self.card, folder=str(self.folder))]


mlflow.models.set_model(IdentityModel())

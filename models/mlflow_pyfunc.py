"""The MLflow pyfunc face of a pivotmap model, logged as code (MLflow "models from code").

MLflow copies this file into the model artifact and runs it at load time, so that
`mlflow.pyfunc.load_model("models:/<name>@champion").predict(x)` works for any user with
pivotmap installed, and nothing is cloudpickled: the weights are a safetensors file and the
architecture is rebuilt from `spec.json` with `pivotmap.models.network.build_model`.

Input is what the network takes: a float32 array [N, T, C] with the channels of
`ModelSpec.channels`, already prepared (normalised, gaps at 0, ages capped) as the training and
prediction pipelines feed it. Output is the class code (not the index) of each of the N pixels.
Pass `model_config={"device": "cuda"}` to `load_model` to predict on a GPU (default: CPU).
"""

import json

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

from pivotmap.models.network import ModelSpec, build_model

_BATCH = 65536  # pixels per forward pass: bounds memory on large inputs


class PivotmapClassifier(PythonModel):
    """Pixel time series [N, T, C] float32 -> class codes [N].

    The `np.ndarray` type hint tells MLflow to validate against the logged tensor signature
    (it infers no schema from this hint, and stops warning about missing hints).
    """

    def load_context(self, context) -> None:
        from safetensors.torch import load_file

        with open(context.artifacts["spec"], encoding="utf-8") as f:
            self.spec = ModelSpec.from_dict(json.load(f))
        config = context.model_config or {}
        self.device = torch.device(config.get("device", "cpu"))
        net = build_model(self.spec)
        net.load_state_dict(load_file(context.artifacts["weights"], device="cpu"))
        self.net = net.to(self.device).eval()
        self.codes = np.asarray(self.spec.classes, dtype=np.int64)

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        x = np.asarray(model_input, dtype=np.float32)
        if x.ndim != 3 or x.shape[-1] != len(self.spec.channels):
            raise ValueError(
                f"expected an array [N, T, {len(self.spec.channels)}] "
                f"(channels {', '.join(self.spec.channels)}), got shape {x.shape}"
            )
        out = np.empty(len(x), dtype=np.int64)
        with torch.inference_mode():
            for start in range(0, len(x), _BATCH):
                batch = torch.from_numpy(x[start : start + _BATCH]).to(self.device)
                out[start : start + _BATCH] = self.net(batch).argmax(dim=-1).cpu().numpy()
        return self.codes[out]


mlflow.models.set_model(PivotmapClassifier())

"""The MLflow pyfunc face of a pivotmap model, logged as code (MLflow "models from code").

It runs without pivotmap: the network travels as a `torch.export` program (`network.pt2`: the
graph as JSON, the weights as raw tensors, no pickle) and the preprocessing as `pivot_series.py`
(logged beside this file through `code_paths`), so the model's requirements are index packages
only. `mlflow.pyfunc.load_model("models:/<name>@champion").predict(x)` takes what a user reads
from the pivot cube:

- `time`: the daily dates, datetime64[ns] [D], with D = `n_steps * step_days` of `spec.json`
  (a shorter cube is padded with NaN days at the end: the network never sees them);
- one float32 array [N, D] per pivot variable of `spec.json` (bands, VV/VH, ages), decoded
  values with NaN where missing (all NaN for a variable the cube lacks).

It samples every `step_days` from the first date, normalises, caps ages and adds the day of year
as pivotmap's prediction does, and returns a DataFrame of N rows: `class` (class code, 255 where
a pixel has no data), `confidence` (0–100, 255 where no data) and `p_<code>` (probabilities).
For an ensemble (`members` > 1 in `spec.json`) the probabilities are the members' mean and the
confidence is the class's probability times the share of members that chose that class, as in
pivotmap's maps.
Pass `model_config={"device": "cuda"}` to `load_model` to predict on a GPU (default: CPU).
Pass `params={"calendar_shift_days": d}` to `predict` to classify the series moved d days later
(earlier when negative), as pivotmap's predict does where a region's season comes earlier or
later than the model's: a product's STAC items say the shift it was made with
(`pivotmap:calendar_shift_days`). It is rounded to whole steps of `step_days`; default 0.

This file imports nothing of pivotmap.
"""

import json
import zipfile

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

_BATCH = 65536  # pixels per forward pass: bounds memory on large inputs
NODATA = 255  # class and confidence of a pixel with no data, as in the published maps


class PivotmapClassifier(PythonModel):
    """Daily pivot series of N pixels -> class code, confidence and probabilities per pixel."""

    def load_context(self, context) -> None:
        import pivot_series  # logged with the model (`code_paths`): on sys.path at load time

        self.prep = pivot_series
        with open(context.artifacts["spec"], encoding="utf-8") as f:
            self.spec = json.load(f)
        config = context.model_config or {}
        self.device = torch.device(config.get("device", "cpu"))
        self.net = load_network(context.artifacts["network"], self.device)
        self.codes = np.asarray(self.spec["classes"], dtype=np.int64)
        self.names = (*self.spec["s2_channels"], *self.spec["s1_channels"])
        self.n_days = self.spec["n_steps"] * self.spec["step_days"]

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        """Class, confidence and probabilities of each pixel (rows in input order)."""
        dates, series = self._checked(model_input)
        ok = self.prep.has_data(series)
        shift = round(int((params or {}).get("calendar_shift_days", 0)) / self.spec["step_days"])
        series = self.prep.shift_series(series, shift)
        proba = np.full((len(series), len(self.codes)), np.nan, dtype=np.float32)
        agreement = None
        if ok.any():
            proba[ok], agreement = self._proba(series[ok], self.prep.day_of_year(dates))
        classes = np.full(len(series), NODATA, dtype=np.int32)
        confidence = np.full(len(series), NODATA, dtype=np.int32)
        classes[ok] = self.codes[proba[ok].argmax(1)]
        top = proba[ok].max(1)
        if agreement is not None:  # an ensemble: a class the members split on counts less
            top = top * agreement
        confidence[ok] = np.rint(top * 100).astype(np.uint8)
        columns: dict[str, np.ndarray] = {"class": classes, "confidence": confidence}
        columns |= {f"p_{code}": proba[:, k] for k, code in enumerate(self.codes)}
        return pd.DataFrame(columns)

    def _checked(self, model_input) -> tuple[np.ndarray, np.ndarray]:
        """The sampled dates [T] and series [N, T, C] float32; a clear error on a wrong input
        (MLflow's schema check refuses it first when the model is loaded through MLflow)."""
        missing = [n for n in ("time", *self.names) if n not in model_input]
        if missing:
            raise ValueError(f"missing inputs {missing}: expected 'time' and {list(self.names)}")
        dates = self._shaped("time", np.asarray(model_input["time"]))
        arrays = [self._shaped(n, np.asarray(model_input[n], np.float32)) for n in self.names]
        steps = self.prep.sample_days(self.n_days, self.spec["step_days"])
        return dates[steps], np.stack([a[:, steps] for a in arrays], axis=-1)

    def _shaped(self, name: str, values: np.ndarray) -> np.ndarray:
        """`values` if its shape is [D] (`time`) or [N, D] (a variable), else a ValueError that
        names the expected daily length."""
        ndim, shape = (1, f"[{self.n_days}]") if name == "time" else (2, f"[N, {self.n_days}]")
        if values.ndim != ndim or values.shape[-1] != self.n_days:
            raise ValueError(
                f"input {name!r} has shape {values.shape}: expected {shape}, a daily axis of "
                f"{self.n_days} days from the first date ({self.spec['n_steps']} steps of "
                f"{self.spec['step_days']} days; pad a shorter series with NaN days at the end)"
            )
        return values

    def _proba(self, series: np.ndarray, doy: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities [N, K] and, for an ensemble, the members' agreement [N] (else None),
        batched; bf16 autocast on CUDA as pivotmap predicts. A network's program returns
        logits; an ensemble's returns (mean probabilities, agreement)."""
        s = self.spec
        probas, agreements = [], []
        on_cuda = self.device.type == "cuda"
        with torch.inference_mode():
            for start in range(0, len(series), _BATCH):
                x = self.prep.network_input(
                    series[start : start + _BATCH], doy, self.names,
                    s["norm_mean"], s["norm_std"], s["age_cap"],
                )  # fmt: skip
                batch = torch.from_numpy(x).to(self.device)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on_cuda):
                    out = self.net(batch)
                if isinstance(out, tuple | list):
                    probas.append(out[0].float().cpu().numpy())
                    agreements.append(out[1].float().cpu().numpy())
                else:
                    probas.append(torch.softmax(out.float(), dim=-1).cpu().numpy())
        return np.concatenate(probas), np.concatenate(agreements) if agreements else None


def load_network(path: str, device: torch.device):
    """The exported network on `device`; an archive that declares pickled payloads is refused
    (pivotmap writes none, and torch would unpickle them without restriction)."""
    if pickled_entries(path):
        raise ValueError(f"{path}: the exported network holds pickled payloads; refusing it")
    from torch.export.passes import move_to_device_pass

    program = torch.export.load(path)
    if device.type != "cpu":
        program = move_to_device_pass(program, device)
    return program.module()


def pickled_entries(path: str) -> list[str]:
    """Names of the payloads a `torch.export` archive stores as pickles (none for pivotmap's)."""
    with zipfile.ZipFile(path) as archive:
        found = [
            n for n in archive.namelist() if "/sample_inputs/" in n and archive.getinfo(n).file_size
        ]
        for name in archive.namelist():
            if name.endswith("_config.json"):
                config = json.loads(archive.read(name)).get("config", {})
                found += [k for k, meta in config.items() if meta.get("use_pickle", True)]
    return found


mlflow.models.set_model(PivotmapClassifier())

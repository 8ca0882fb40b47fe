"""Predict a merge schedule's speed-up before exporting it, and say when merging won't pay.

Owns the latency model of a token-merged transformer: each block's time is a linear
function of its work — FLOPs of the linear layers (QKV/projection at the block's input
token count N, MLP after the merge at N − r, ∝ N·C²), of attention scores/values
(∝ N²·C), elementwise work on the score matrix (∝ heads·N², and again for proportional
attention's log(size) after the first merge) and on tokens (∝ N·C), and a fixed per-block cost — plus, in every merging layer, the merge op's own cost: the
similarity matmul (Na·Nb·C/heads on head-averaged keys), sorts (∝ N log N),
gathers/scatters (∝ N·C) and a fixed per-op overhead, which is what dominates at small N
(the merge is many small ops). Dividing the predicted r=0 time by the schedule's gives the
predicted speed-up (:func:`predict`).

The coefficients are per runtime and device, fitted from measurements by
``bench/calibrate_cost_model.py`` and kept in ONE table, ``cost_coefficients.json`` beside
this module (with the machine they were measured on). Refit them whenever the merge
lowering changes: the script rewrites that file.

Public surface: :class:`ModelShape`, :class:`Coefficients`, :class:`Prediction`,
:func:`predict`, :func:`block_features`, :func:`merge_features`, :func:`coefficients_for`,
:func:`write_coefficients`, :func:`shape_of`, :func:`warning_line`, :func:`manifest_entry`, :func:`predicted_for`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tome_export.merging.bipartite import max_r

COEFFICIENTS_FILE = Path(__file__).with_name("cost_coefficients.json")
BLOCK_TERMS = ("linear_gflop", "attention_gflop", "scores_melem", "merged_scores_melem", "tokens_melem", "fixed")
MERGE_TERMS = ("similarity_gflop", "tokens_melem", "sort_melem", "fixed")
PAYS_THRESHOLD = 1.05  # below this predicted speed-up, export warns


@dataclass(frozen=True)
class ModelShape:
    """What the latency model needs to know about a ViT-style model besides its token counts."""

    dim: int  # channels C
    heads: int
    mlp_ratio: float = 4.0
    batch: int = 1
    stem_gflop: float = 0.0  # patch embedding etc. per sample: the same merged or not
    prop_attn: bool = True  # proportional attention: + log(size) on the scores after the first merge

    @property
    def head_dim(self) -> int:
        return max(1, self.dim // max(1, self.heads))


@dataclass(frozen=True)
class Coefficients:
    """Milliseconds per unit of each term, for one runtime on one machine."""

    name: str
    machine: str = "?"
    runtime: str = "?"
    calibrated: str = "?"
    devices: tuple[str, ...] = ("cpu",)
    targets: tuple[str, ...] = ("onnx",)
    block: dict[str, float] = field(default_factory=dict)
    merge: dict[str, float] = field(default_factory=dict)
    model_fixed_ms: float = 0.0

    def label(self) -> str:
        return f"cost model {self.name}, fitted {self.calibrated}"


@dataclass(frozen=True)
class Prediction:
    """A schedule's predicted latency next to the same model unmerged (r=0)."""

    layer_ms: tuple[float, ...]  # every block, its merge included
    merge_ms: tuple[float, ...]
    total_ms: float
    unmerged_ms: float
    flops: float
    unmerged_flops: float
    coefficients: str

    @property
    def speedup(self) -> float:
        return self.unmerged_ms / self.total_ms

    @property
    def flop_ratio(self) -> float:
        return self.unmerged_flops / self.flops

    @property
    def flops_saved(self) -> float:
        return 1.0 - self.flops / self.unmerged_flops

    @property
    def merge_cost(self) -> float:
        """The merge ops' predicted time as a fraction of the unmerged model's."""
        return sum(self.merge_ms) / self.unmerged_ms


def block_features(tokens_in: int, r: int, shape: ModelShape, after_merge: bool = False) -> dict[str, float]:
    """One block's work: attention at ``tokens_in``, the MLP after the merge (``tokens_in − r``);
    ``after_merge``: an earlier block merged, so proportional attention adds log(size) to the scores."""
    n, out, c, b = tokens_in, tokens_in - r, shape.dim, shape.batch
    hidden = c * shape.mlp_ratio
    return {
        "linear_gflop": b * (2 * n * c * 4 * c + 2 * 2 * out * c * hidden) / 1e9,
        "attention_gflop": b * 2 * 2 * n * n * c / 1e9,
        "scores_melem": b * shape.heads * n * n / 1e6,
        "merged_scores_melem": b * shape.heads * n * n / 1e6 if after_merge and shape.prop_attn else 0.0,
        "tokens_melem": b * (n + out) * c / 1e6,
        "fixed": 1.0,
    }


def merge_features(tokens_in: int, r: int, shape: ModelShape) -> dict[str, float]:
    """The merge op's work at ``tokens_in`` tokens (zero when ``r`` is 0)."""
    if r <= 0:
        return dict.fromkeys(MERGE_TERMS, 0.0)
    n, b = tokens_in, shape.batch
    a_tokens, b_tokens = (n + 1) // 2, n // 2
    return {
        "similarity_gflop": b * 2 * a_tokens * b_tokens * shape.head_dim / 1e9,
        "tokens_melem": b * n * shape.dim / 1e6,
        "sort_melem": b * n * math.log2(max(n, 2)) / 1e6,
        "fixed": 1.0,
    }


def _flops(features: dict[str, float]) -> float:
    return 1e9 * (features["linear_gflop"] + features["attention_gflop"])


def _dot(coefficients: dict[str, float], features: dict[str, float]) -> float:
    return sum(coefficients.get(term, 0.0) * value for term, value in features.items())


def predict(
    tokens_per_layer: list[int], r_per_layer: list[int], shape: ModelShape, coefficients: Coefficients
) -> Prediction:
    """Predicted latency of the schedule and of the same model at r=0 (tokens entering each
    block, r merged after its attention; ``len(tokens_per_layer)`` may be depth or depth + 1)."""
    depth = len(r_per_layer)
    if depth == 0 or len(tokens_per_layer) < depth:
        raise ValueError("need the tokens entering every block and r per block")
    stem_ms = coefficients.block.get("linear_gflop", 0.0) * shape.stem_gflop * shape.batch
    base_ms = coefficients.model_fixed_ms + stem_ms
    base_flops = 1e9 * shape.stem_gflop * shape.batch
    layer_ms, merge_ms, flops = [], [], base_flops
    for index, (n, r) in enumerate(zip(tokens_per_layer[:depth], r_per_layer, strict=True)):
        block = block_features(n, r, shape, after_merge=any(r_per_layer[:index]))
        merge = _dot(coefficients.merge, merge_features(n, r, shape))
        layer_ms.append(_dot(coefficients.block, block) + merge)
        merge_ms.append(merge)
        flops += _flops(block)
    unmerged = block_features(tokens_per_layer[0], 0, shape)
    return Prediction(
        layer_ms=tuple(layer_ms),
        merge_ms=tuple(merge_ms),
        total_ms=base_ms + sum(layer_ms),
        unmerged_ms=base_ms + depth * _dot(coefficients.block, unmerged),
        flops=flops,
        unmerged_flops=base_flops + depth * _flops(unmerged),
        coefficients=coefficients.name,
    )


def constant_plan(num_tokens: int, depth: int, r: int, protected: int) -> tuple[list[int], list[int]]:
    """(tokens entering each block, r per block) for a constant r, capped like the patcher does."""
    from tome_export.merging.schedule import plan

    r_per_layer, tokens = plan([r] * depth, num_tokens, protected)
    return tokens[:depth], r_per_layer


def _load_table(path: Path = COEFFICIENTS_FILE) -> dict[str, Coefficients]:
    if not path.is_file():
        return {}
    table = {}
    for name, entry in json.loads(path.read_text()).get("profiles", {}).items():
        table[name] = Coefficients(
            name=name,
            machine=entry.get("machine", "?"),
            runtime=entry.get("runtime", "?"),
            calibrated=entry.get("calibrated", "?"),
            devices=tuple(entry.get("devices", ())),
            targets=tuple(entry.get("targets", ())),
            block={k: float(v) for k, v in entry.get("block", {}).items()},
            merge={k: float(v) for k, v in entry.get("merge", {}).items()},
            model_fixed_ms=float(entry.get("model_fixed_ms", 0.0)),
        )
    return table


def coefficients_for(device: str = "cpu", target: str = "onnx", path: Path = COEFFICIENTS_FILE) -> Coefficients | None:
    """The calibrated coefficients for ``target`` on ``device``, or None when none were fitted."""
    for coefficients in _load_table(path).values():
        if device in coefficients.devices and target in coefficients.targets:
            return coefficients
    return None


def coefficients_to_json(coefficients: Coefficients) -> dict:
    """The table entry :func:`coefficients_for` reads back (the calibration script writes it)."""
    entry = asdict(coefficients)
    entry.pop("name")
    entry["devices"], entry["targets"] = list(coefficients.devices), list(coefficients.targets)
    return entry


def write_coefficients(coefficients: Coefficients, path: Path = COEFFICIENTS_FILE) -> None:
    """Store ``coefficients`` in the table under its name (other entries kept)."""
    table = json.loads(path.read_text()) if path.is_file() else {}
    table.setdefault("profiles", {})[coefficients.name] = coefficients_to_json(coefficients)
    path.write_text(json.dumps(table, indent=2) + "\n")


def shape_of(module, batch: int = 1, patch_tokens: int | None = None) -> ModelShape | None:
    """Channels, heads and MLP ratio of a timm-style ViT (blocks with ``attn.qkv``) or a
    Hugging Face model with a transformer config; None when neither applies."""
    from torch import nn

    dim = heads = hidden = None
    for sub in module.modules():
        attn, mlp = getattr(sub, "attn", None), getattr(sub, "mlp", None)
        if isinstance(getattr(attn, "qkv", None), nn.Linear) and hasattr(attn, "num_heads"):
            dim, heads = attn.qkv.in_features, int(attn.num_heads)
            fc1 = getattr(mlp, "fc1", None)
            hidden = fc1.out_features if isinstance(fc1, nn.Linear) else 4 * dim
            break
    config = getattr(module, "config", None)
    if dim is None and config is not None and getattr(config, "hidden_size", None):
        dim, heads = int(config.hidden_size), int(getattr(config, "num_attention_heads", 1) or 1)
        hidden = int(getattr(config, "intermediate_size", 4 * dim) or 4 * dim)
    if dim is None or not heads:
        return None
    stem = 0.0
    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and patch_tokens:
        stem = 2 * patch_tokens * conv.weight.numel() / 1e9
    return ModelShape(dim=dim, heads=heads, mlp_ratio=hidden / dim, batch=batch, stem_gflop=stem)


def _describe(r_per_layer: list[int]) -> str:
    merging = set(r_per_layer)
    if len(merging) == 1:
        return f"r={r_per_layer[0]}"
    return f"schedule {','.join(map(str, r_per_layer))}"


def warning_line(
    tokens_per_layer: list[int],
    r_per_layer: list[int],
    protected: int,
    shape: ModelShape,
    coefficients: Coefficients,
    threshold: float = PAYS_THRESHOLD,
) -> str | None:
    """One line when the schedule's predicted speed-up is below ``threshold``, else None."""
    if not any(r_per_layer):
        return None
    prediction = predict(tokens_per_layer, r_per_layer, shape, coefficients)
    if prediction.speedup >= threshold:
        return None
    n, depth = tokens_per_layer[0], len(r_per_layer)
    hint = "merging does not pay for this model here: export with --r 0"
    for r in range(1, max_r(n, protected) + 1):
        trial = predict(*constant_plan(n, depth, r, protected), shape, coefficients)
        if trial.speedup >= threshold:
            hint = f"try --r ≥ {r} (≈{trial.speedup:.2f}×), or --r 0"
            break
    return (
        f"warning: {_describe(r_per_layer)} on {n} tokens saves {prediction.flops_saved:.0%} of FLOPs and the merge "
        f"costs {prediction.merge_cost:.0%} of the unmerged time: expect ≈{prediction.speedup:.2f}× vs r=0 "
        f"({coefficients.label()}); {hint}"
    )


def manifest_entry(module, merge: dict, input_shapes: list, device: str, target: str) -> dict | None:
    """``merge.cost_model`` for the manifest: the model's shape, and with calibrated
    coefficients for this device/target the predicted speed-up and the warning line."""
    tokens, r_per_layer = merge.get("tokens_per_layer") or [], merge.get("r_per_layer") or []
    if merge.get("method") != "tome" or not r_per_layer or len(tokens) < len(r_per_layer):
        return None
    batch = input_shapes[0][0] if input_shapes and input_shapes[0] and isinstance(input_shapes[0][0], int) else 1
    protected = int(merge.get("protected_tokens", 0) or 0)
    shape = shape_of(module, batch, patch_tokens=tokens[0] - protected)
    if shape is None:
        return None
    shape = replace(shape, prop_attn=bool(merge.get("prop_attn", True)))
    entry: dict = {"shape": {k: v for k, v in asdict(shape).items() if k not in ("batch", "prop_attn")}}
    coefficients = coefficients_for(device, target)
    if coefficients is not None:
        prediction = predict(tokens, r_per_layer, shape, coefficients)
        entry.update(
            {
                "coefficients": coefficients.name,
                "predicted_speedup": round(prediction.speedup, 4),
                "flop_ratio": round(prediction.flop_ratio, 4),
                "merge_cost": round(prediction.merge_cost, 4),
                "warning": warning_line(tokens, r_per_layer, protected, shape, coefficients),
            }
        )
    return entry


def _number(value, low: float, high: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value) if low <= value <= high else None


def shape_from_manifest(manifest: dict) -> ModelShape | None:
    """The model shape recorded in a (untrusted) manifest, or None if absent or implausible."""
    merge = manifest.get("merge") if isinstance(manifest.get("merge"), dict) else {}
    entry = merge.get("cost_model") if isinstance(merge.get("cost_model"), dict) else {}
    shape = entry.get("shape") if isinstance(entry.get("shape"), dict) else {}
    dim, heads = _number(shape.get("dim"), 1, 1 << 20), _number(shape.get("heads"), 1, 4096)
    ratio, stem = _number(shape.get("mlp_ratio"), 0, 64), _number(shape.get("stem_gflop"), 0, 1e6)
    if dim is None or heads is None or ratio is None:
        return None
    inputs = manifest.get("inputs") or [{}]
    first = (inputs[0].get("shape") or [1]) if isinstance(inputs[0], dict) else [1]
    batch = first[0] if first and isinstance(first[0], int) and first[0] > 0 else 1
    prop_attn = merge.get("prop_attn") is not False
    return ModelShape(int(dim), int(heads), ratio, batch, stem or 0.0, prop_attn)


def predicted_for(manifest: dict, device: str) -> dict | None:
    """Predicted speed-up vs r=0 of a bundle's schedule on ``device`` (None: nothing to predict).

    Recomputed from the manifest's token counts and shape with this package's coefficients, so
    a refit applies to old bundles too and a tampered number in the manifest is never shown."""
    merge = manifest.get("merge") if isinstance(manifest.get("merge"), dict) else {}
    shape = shape_from_manifest(manifest)
    coefficients = coefficients_for(device, manifest.get("target") or "onnx")
    tokens, r_per_layer = merge.get("tokens_per_layer"), merge.get("r_per_layer")
    if shape is None or coefficients is None or not isinstance(tokens, list) or not isinstance(r_per_layer, list):
        return None
    numbers = [*tokens, *r_per_layer]
    if not r_per_layer or len(tokens) < len(r_per_layer) or any(_number(v, 0, 1 << 24) is None for v in numbers):
        return None
    if any(r > n for n, r in zip(tokens, r_per_layer)):
        return None
    prediction = predict([int(v) for v in tokens], [int(v) for v in r_per_layer], shape, coefficients)
    return {
        "coefficients": coefficients.name,
        "speedup_vs_r0": round(prediction.speedup, 4),
        "flop_ratio": round(prediction.flop_ratio, 4),
        "merge_cost": round(prediction.merge_cost, 4),
        "latency_ratio": round(prediction.total_ms / prediction.unmerged_ms, 4),
    }

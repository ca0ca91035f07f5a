"""Benchmark of concept maps for what no class names (issue 19): honest zero-shot and attributes.

Each class in turn is left out of the text-alignment head's training: its phrasings AND the
descriptor sentences of its pixels. It is then described only by its nomenclature description,
and its test-block pixels are matched against every class's description (top-1 among all
classes, mean rank), and the concept probability of its description (the other classes as the
known prototypes) is scored against its test pixels (AUC over all test pixels). Next to chance
and a shuffled-text null (training pixels' classes and sentences shuffled). Over several seeds.

Three pixel encoders, from leaky to honest:
- `supervised`: the classifier's encoder, trained on every class (as `pivotmap train` does);
- `supervised-loo` (`--encoder-loo`): the classifier retrained without the held-out class's
  labels, once per class and seed (slow: K × seeds trainings);
- `ssl`: the masked-reconstruction pretrained encoder, which never saw a label;
- `features`: monthly means of the network's input channels (no training at all).
Each with the head fitted on class phrasings only (`classes`) and with descriptor sentences
(`sentences`).

And with no encoder and no training at all: `grounded/facts` scores each class description by
the facts it states that a pixel's descriptors hold (`models.grounding`; null: the test pixels'
facts shuffled among them), and `<encoder>+facts/<arm>` blends those fact scores with the head's
as the concept map does (by the share of the description that grounds).

Attribute prompts ("harvested before August", "flooded in winter", ...) are scored against the
descriptors computed from the cube: the retrieval AUC of the head's cosine to the prompt over
test pixels, the positives being those whose descriptors say so.

    .venv/bin/python tests/benchmarks/bench_concept.py --config /tmp/demo/demo.yaml \
        --out /tmp/demo --seeds 0 1 2

Builds the cube first (ingest + pivot flows) when `--out` has none. Prints one JSON object on
the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from pivotmap.models.grounding import FIGURES, auc, calibrate, rank_of, ranking, summarise

ATTRIBUTES = {  # prompt -> (descriptor rule, description of the rule)
    "harvested before August": (
        lambda d: (d["drop"] > 0.25) & (d["drop_doy"] < 213),
        "lasting NDVI fall > 0.25 before day 213",
    ),
    "flooded in winter": (lambda d: _get(d, "water_winter") > 0.5, "NDWI > 0 on > 50 % of winter"),
    "open water all year": (lambda d: _get(d, "water") > 0.8, "NDWI > 0 on > 80 % of days"),
    "green all year": (lambda d: d["ndvi_min"] > 0.5, "5th-percentile NDVI > 0.5"),
    "bare soil in spring": (
        lambda d: _get(d, "bare_spring") > 0.6,
        "NDVI < 0.3 on > 60 % of spring",
    ),
    "bright in radar": (lambda d: d["vv_mean"] > -8, "mean VV > -8 dB"),
    "green from June": (
        lambda d: (d["greenup_doy"] >= 152) & (d["greenup_doy"] < 182),
        "green-up day in June",
    ),
}


ARMS = {  # text arm -> (descriptor sentences?, weight of the class-phrasing term)
    "classes": (False, 1.0),
    "sentences": (True, 1.0),
    "sentences-only": (True, 0.0),
}


def _get(d, key: str) -> np.ndarray:
    return np.nan_to_num(d[key], nan=0.0) if key in d.values else np.zeros(len(d))


def build_cube(config, out: Path) -> None:
    if (out / "cube" / "pivot.zarr").exists() and (out / "reports" / "pivot.json").is_file():
        return
    from pivotmap.flows.ingest import ingest_flow
    from pivotmap.flows.pivot import pivot_flow

    ingest_flow(config, str(out))
    pivot_flow(config, str(out))


def load(config, out: Path):
    from pivotmap.models.datamodule import prepare_data, read_tables
    from pivotmap.tasks.sampling import sample
    from pivotmap.tasks.workspace import Workspace

    return prepare_data(config, read_tables([sample(Workspace.open(config, out))]))


def monthly_features(x: np.ndarray) -> np.ndarray:
    """A label-free embedding: each input channel's mean over ~monthly blocks of steps."""
    blocks = np.array_split(np.arange(x.shape[1]), 12)
    return np.concatenate([x[:, b, :-2].mean(1) for b in blocks], axis=1).astype(np.float32)


def embeddings(model, x) -> np.ndarray:
    from pivotmap.models.text_align import pixel_embeddings

    return pixel_embeddings(model, x)


def standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(0), train.std(0) + 1e-6
    return (train - mean) / std, (test - mean) / std


class Texts:
    """Embeddings of the class texts and of descriptor sentences, computed once."""

    def __init__(self, nomenclature, codes) -> None:
        from pivotmap.models.text_align import embed_texts

        self.classes = [nomenclature.by_code(c) for c in codes]
        self.phrase_vectors = [embed_texts(c.phrasings) for c in self.classes]
        self.descriptions = embed_texts([c.description for c in self.classes])
        self.cache: dict[str, np.ndarray] = {}

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embeddings of `texts`, through the cache."""
        from pivotmap.models.text_align import embed_cached

        return embed_cached(texts, self.cache)

    def sentences(self, x_train, spec, seed: int, per_pixel: int, max_sentences: int):
        from pivotmap.models.text_align import describe_pixels

        return describe_pixels(x_train, spec, self.cache, per_pixel, seed, max_sentences)[0]

    def expand(self) -> None:
        """Each description's vector: the mean of its own and of its `sensor_text` (the facts
        it grounds, through the land-cover lexicon too), where it grounds any."""
        from pivotmap.models import grounding

        for i, c in enumerate(self.classes):
            said = grounding.sensor_text(grounding.ground(c.description, self.embed))
            if said:
                v = self.descriptions[i] + self.embed([said])[0]
                self.descriptions[i] = v / np.linalg.norm(v)

    def load(self, path: Path) -> None:
        """Sentence embeddings of an earlier run (the encoder is the slow part on a CPU)."""
        if path.is_file():
            saved = np.load(path)
            self.cache.update(zip(saved["texts"].tolist(), saved["vectors"], strict=True))

    def save(self, path: Path) -> None:
        texts = list(self.cache)
        vectors = np.stack([self.cache[t] for t in texts]) if texts else np.zeros((0, 384))
        np.savez(path, texts=np.array(texts), vectors=vectors)


def heldout_scores(heads: dict, emb_test, y_test, texts: Texts, k: int, grounded=None) -> dict:
    """Per held-out class c (head c never saw it): top-1 / mean rank (ties count half:
    `grounding.rank_of`) among all K descriptions, and the AUC of the concept probability of
    c's description against c's test pixels.
    With `grounded` (fact scores [N, K], each description's grounded share), both are of the
    blend the concept map uses: share × fact score + (1 - share) × the head's score (for the
    rank, of both `calibrate`d within the test pixels: the fact scores of two descriptions
    are on different scales)."""
    from pivotmap.models.text_align import (
        TextAlignment,
        class_similarity,
        concept_probability,
        prototypes,
    )

    rows = {}
    for c, head in heads.items():
        own = y_test == c
        if not own.any():
            continue
        every = class_similarity(head, emb_test, texts.descriptions)
        if grounded is not None:
            facts, share = grounded
            every = share * calibrate(facts) + (1 - share) * calibrate(every)
        rank = rank_of(every[own], c)
        seen = [o for o in range(k) if o != c]
        known = TextAlignment(
            head=head, codes=tuple(seen), names=tuple(str(o) for o in seen),
            protos=prototypes([texts.phrase_vectors[o] for o in seen]), phrasings={},
        )  # fmt: skip
        p = concept_probability(known, emb_test, texts.descriptions[c])
        if grounded is not None:
            p = grounded[1][c] * grounded[0][:, c] + (1 - grounded[1][c]) * p
        rows[c] = {
            "top1": float((rank == 1).mean()), "mean_rank": float(rank.mean()),
            "auc": auc(p, own), "pixels": int(own.sum()),
        }  # fmt: skip
    return rows


def arm(
    emb_tr, y_tr, emb_te, y_te, texts, k, seed, steps, sentences, weight=1.0, grounded=None
) -> dict:
    """Leave-one-class-out heads (and their shuffled-text nulls) on one embedding; with
    `grounded`, also their blend with the fact scores (`blend`; null: shuffled fact scores)."""
    from pivotmap.models.text_align import fit_heads

    left_out = [[o for o in range(k) if o != c] for c in range(k)]
    out = {}
    heads = fit_heads(
        emb_tr, [(y_tr, keep) for keep in left_out], texts.phrase_vectors, steps=steps,
        seed=seed, sentences=sentences, class_weight=weight,
    )  # fmt: skip
    out["heldout"] = summarise(heldout_scores(dict(enumerate(heads)), emb_te, y_te, texts, k))
    shuffled = np.random.default_rng(seed + 1000).permutation(y_tr)
    nulls = fit_heads(
        emb_tr, [(shuffled, keep) for keep in left_out], texts.phrase_vectors, steps=steps,
        seed=seed, sentences=sentences.permuted(seed + 1000) if sentences else None,
        class_weight=weight,
    )  # fmt: skip
    out["null"] = summarise(heldout_scores(dict(enumerate(nulls)), emb_te, y_te, texts, k))
    if grounded is not None:
        facts, share = grounded
        shuffled = facts[np.random.default_rng(seed + 1000).permutation(len(facts))]
        out["blend"] = {
            "heldout": summarise(
                heldout_scores(dict(enumerate(heads)), emb_te, y_te, texts, k, grounded)
            ),
            "null": summarise(
                heldout_scores(dict(enumerate(nulls)), emb_te, y_te, texts, k, (shuffled, share))
            ),
        }
    return out


def attributes(emb_tr, y_tr, emb_te, d_test, texts, k, seed, steps, sentences, weight) -> dict:
    """Retrieval AUC of each attribute prompt, head fitted on all classes (and sentences)."""
    from pivotmap.models.text_align import class_similarity, embed_texts, fit_heads

    prompts = list(ATTRIBUTES)
    vectors = embed_texts(prompts)
    head = fit_heads(
        emb_tr, [(y_tr, list(range(k)))], texts.phrase_vectors, steps=steps, seed=seed,
        sentences=sentences, class_weight=weight,
    )[0]  # fmt: skip
    sim = class_similarity(head, emb_te, vectors)
    out = {}
    for i, prompt in enumerate(prompts):
        positive = np.asarray(ATTRIBUTES[prompt][0](d_test), dtype=bool)
        out[prompt] = {"auc": auc(sim[:, i], positive), "positives": int(positive.sum())}
    return out


def text_oracle(raw_te, y_te, spec, texts: Texts, k: int, seed: int, per_class: int = 100):
    """The ceiling the descriptor sentences set, with no pixel encoder or head at all: each test
    pixel is its own sentences' mean embedding, matched against every class's description
    (top-1, mean rank, AUC per class). If this is near chance, the text side is the bottleneck."""
    from pivotmap.models import descriptors
    from pivotmap.models.text_align import embed_texts

    rng = np.random.default_rng(seed)
    pick = np.concatenate([
        rng.choice(np.flatnonzero(y_te == c), min(per_class, int((y_te == c).sum())), replace=False)
        for c in range(k) if (y_te == c).any()
    ])  # fmt: skip
    d = descriptors.compute(raw_te[pick], spec)
    per = descriptors.describe(d, 4, seed)
    missing = list(dict.fromkeys(t for ss in per for t in ss if t not in texts.cache))
    texts.cache.update(zip(missing, embed_texts(missing), strict=True))
    has = np.array([len(ss) > 0 for ss in per])
    mean = np.stack([
        np.mean([texts.cache[t] for t in ss], axis=0) if ss else np.zeros(384) for ss in per
    ])  # fmt: skip
    sim = mean[has] @ texts.descriptions.T
    return {"pixels": int(has.sum()), **ranking(sim, y_te[pick][has])}


def grounded_attributes(d_test, texts: Texts) -> dict:
    """Retrieval AUC of each attribute prompt read as descriptor facts. The rule and the facts
    come from the same descriptors, so this checks how the words are read, not the sensors."""
    from pivotmap.models import grounding

    out = {}
    facts = grounding.pixel_facts(d_test)
    for prompt, (rule, _) in ATTRIBUTES.items():
        read = grounding.ground(prompt, texts.embed)
        score = grounding.fact_score(d_test, read, facts)
        positive = np.asarray(rule(d_test), dtype=bool)
        out[prompt] = {
            "auc": auc(score, positive), "positives": int(positive.sum()),
            "read_as": [p.phrase for p in read.parts],
        }  # fmt: skip
    return out


def run_seed(data, tc, texts, seed: int, args) -> dict:
    from pivotmap.models import descriptors, grounding
    from pivotmap.models.datamodule import stratified_sample
    from pivotmap.models.trainer import pretrain_encoder, train_classifier
    from pivotmap.models.training import build_model

    k = len(data.spec.classes)
    train = data.train_idx[stratified_sample(data.codes[data.train_idx], args.max_pixels, seed)]
    test = np.flatnonzero(data.is_test)
    x_tr, x_te = data.x.subset(train), data.x.subset(test)
    raw_tr, raw_te = x_tr[slice(0, len(x_tr))], x_te[slice(0, len(x_te))]
    y_tr, y_te = data.y[train], data.y[test]
    started = time.monotonic()
    sentences = texts.sentences(raw_tr, data.spec, seed, args.per_pixel, args.max_sentences)
    d_test = descriptors.compute(raw_te, data.spec)
    timing = {"sentences_s": round(time.monotonic() - started, 1)}
    oracle = text_oracle(raw_te, y_te, data.spec, texts, k, seed)
    print("text oracle", json.dumps(oracle), flush=True)
    descriptions = [c.description for c in texts.classes]
    facts, groundings = grounding.class_scores(d_test, descriptions, texts.embed)
    encoders: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    seed_tc = tc.model_copy(update={"seed": seed})
    if "features" in args.encoders:
        encoders["features"] = standardise(monthly_features(raw_tr), monthly_features(raw_te))
    if "ssl" in args.encoders:
        t = time.monotonic()
        state = pretrain_encoder(data, seed_tc, "cpu")["state"]
        model = build_model(data.spec)
        model.load_state_dict(state, strict=False)
        encoders["ssl"] = (embeddings(model, raw_tr), embeddings(model, raw_te))
        timing["ssl_s"] = round(time.monotonic() - t, 1)
    if "supervised" in args.encoders:
        t = time.monotonic()
        model = train_classifier(data, seed_tc, "cpu").model
        encoders["supervised"] = (embeddings(model, raw_tr), embeddings(model, raw_te))
        timing["supervised_s"] = round(time.monotonic() - t, 1)
    out: dict = {
        "seed": seed, "sentences": len(sentences.vectors), "timing": timing, "text_oracle": oracle,
        "groundings": {texts.classes[c].name: g.to_dict() for c, g in enumerate(groundings)},
    }  # fmt: skip
    out["grounded/facts"] = grounding.zero_shot_figures(facts, y_te, seed + 1000)
    out["grounded/facts"]["attributes"] = grounded_attributes(d_test, texts)
    print("grounded facts", json.dumps(_short(out["grounded/facts"])), flush=True)
    for name, (e_tr, e_te) in encoders.items():
        for text_arm in args.arms:
            s, weight = ARMS[text_arm]
            s = sentences if s else None
            t = time.monotonic()
            key = f"{name}/{text_arm}"
            share = np.array([g.share for g in groundings], dtype=np.float32)
            out[key] = arm(
                e_tr, y_tr, e_te, y_te, texts, k, seed, args.steps, s, weight, (facts, share)
            )
            out[f"{name}+facts/{text_arm}"] = out[key].pop("blend") | {"attributes": {}}
            out[key]["attributes"] = attributes(
                e_tr, y_tr, e_te, d_test, texts, k, seed, args.steps, s, weight
            )
            timing[f"{name}/{text_arm}_s"] = round(time.monotonic() - t, 1)
            print(name, text_arm, json.dumps(_short(out[key])), flush=True)
            print(name + "+facts", text_arm, json.dumps(_short(out[f"{name}+facts/{text_arm}"])))
    if args.encoder_loo:
        loo = encoder_loo(data, seed_tc, texts, sentences, train, test, args)
        out["supervised-loo/sentences"] = {"heldout": loo, "attributes": {}}
    return out


def encoder_loo(data, tc, texts, sentences, train, test, args) -> dict:
    """The classifier retrained without each class's labels, then that class's held-out head."""
    from dataclasses import replace

    from pivotmap.models.text_align import fit_heads
    from pivotmap.models.trainer import train_classifier

    k = len(data.spec.classes)
    rows = {}
    raw_tr, raw_te = data.x.subset(train)[slice(0, len(train))], data.x.subset(test)[:]
    for c in range(k):
        keep = data.train_idx[data.y[data.train_idx] != c]
        model = train_classifier(replace(data, train_idx=keep), tc, "cpu").model
        e_tr, e_te = embeddings(model, raw_tr), embeddings(model, raw_te)
        keep_classes = [o for o in range(k) if o != c]
        head = fit_heads(
            e_tr, [(data.y[train], keep_classes)], texts.phrase_vectors, steps=args.steps,
            seed=tc.seed, sentences=sentences,
        )[0]  # fmt: skip
        rows.update(heldout_scores({c: head}, e_te, data.y[test], texts, k))
    return summarise(rows)


def _short(result: dict) -> dict:
    return {
        part: {k: result[part][k] for k in FIGURES if k in result[part]}
        for part in ("heldout", "null")
        if part in result
    } | {"attr": {p: a["auc"] and round(a["auc"], 3) for p, a in result["attributes"].items()}}


def mean_over_seeds(runs: list[dict]) -> dict:
    out: dict = {
        "text_oracle": {
            m: round(float(np.mean([r["text_oracle"][m] for r in runs])), 4)
            for m in ("top1", "mean_rank", "auc_class_mean")
        }
    }
    for key in runs[0]:
        if "/" not in key:
            continue
        row = {}
        for part in ("heldout", "null"):
            for metric in FIGURES:
                values = [r[key][part].get(metric) for r in runs if part in r[key]]
                values = [v for v in values if v is not None]
                if values:
                    row[f"{part}_{metric}"] = round(float(np.mean(values)), 4)
                    row[f"{part}_{metric}_sd"] = round(float(np.std(values)), 4)
        attrs = runs[0][key].get("attributes", {})
        row["attributes_auc"] = {
            p: round(float(np.mean([r[key]["attributes"][p]["auc"] for r in runs])), 4)
            for p in attrs
            if all(r[key]["attributes"][p]["auc"] is not None for r in runs)
        }
        out[key] = row
    return out


def main(argv: list[str] | None = None) -> dict:
    import torch

    from pivotmap.config import load_run_config
    from pivotmap.runtime import apply_offline_defaults
    from pivotmap.tasks.nomenclature import load_nomenclature

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--max-pixels", type=int, default=4000)
    parser.add_argument("--per-pixel", type=int, default=4)
    parser.add_argument("--max-sentences", type=int, default=1000)
    parser.add_argument(
        "--encoders", nargs="+", default=["features", "ssl", "supervised"],
        help="pixel encoders to compare ('none': the text oracle alone)",
    )  # fmt: skip
    parser.add_argument("--encoder-loo", action="store_true")
    parser.add_argument(
        "--expand", action="store_true",
        help="match each description with what it says the sensors see added (lexicon facts)",
    )  # fmt: skip
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    apply_offline_defaults()
    config = load_run_config(args.config)
    out = Path(args.out)
    build_cube(config, out)
    data = load(config, out)
    nomenclature = load_nomenclature(config.labels.nomenclature)
    texts = Texts(nomenclature, data.spec.classes)
    texts.load(out / "bench_concept_sentences.npz")
    if args.expand:
        texts.expand()
    k = len(data.spec.classes)
    torch.set_num_threads(args.threads)
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(data, config.train, texts, seed, args))
        texts.save(out / "bench_concept_sentences.npz")
    result = {
        "region": config.name, "classes": k, "codes": list(data.spec.classes),
        "chance_top1": round(1 / k, 4), "chance_mean_rank": (k + 1) / 2, "chance_auc": 0.5,
        "seeds": args.seeds, "steps": args.steps, "attributes": {
            p: rule for p, (_, rule) in ATTRIBUTES.items()
        }, "mean": mean_over_seeds(runs), "runs": runs,
    }  # fmt: skip
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)

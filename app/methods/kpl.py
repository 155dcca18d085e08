"""KPL (knowledge-proxy learning): text proxies from the best-matching class descriptions, balanced pseudo-labels,
then vision proxies fitted on the pool of images -- the pure cores, on torch tensors, no model or service.

Follows what the authors' script computes (see shared/notes/kpl.md), not only the paper's prose. Notation:
X (n, d) L2-normalised image embeddings of the pool; T (d, c) text proxies; W (d, c) vision proxies; columns
L2-normalised; M = X·T (n, c) cosine logits. Every function returns the dtype it is given (float32 or float64);
the two iterative steps run in float64 inside: in float32, rounding noise in the gradient near convergence flips
late step-halving decisions and W wanders by up to ~1e-4 in cosine from the float64 answer.

1. ``text_proxy``: per class, keep the k descriptions with the highest mean cosine to the pool; t_j = their
   normalised mean. The kept indices and scores are the evidence shown to the user.
2. ``balance``: pseudo-labels from M. ``reference`` is the script's StableGreenkhorn (one row or column rescaled per
   iteration; rows end near 1/n, not 1); ``sinkhorn`` is the paper's full alternation with rows scaled back to 1.
3. ``fit_vision_proxies``: gradient steps on the cross-entropy between softmax(X·W/τi) and the pseudo-labels,
   starting from W = T, step size halved whenever the gradient norm grows.
"""
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from app.errors import InvalidInput
from app.knowledge.index import DescriptionItem, Retrieved
from app.methods.base import ClassEvidence, ClassHead, EvidenceItem, ProxyKind, Scores

Balancing = Literal["reference", "sinkhorn"]
BALANCINGS: tuple[Balancing, ...] = ("reference", "sinkhorn")
SOLVER_DTYPE = torch.float64                   # balance and fit_vision_proxies iterate in this, return the input dtype


@dataclass(frozen=True)
class KPLConfig:
    """Hyperparameters of one KPL fit; defaults follow the reference implementation. Saved as JSON beside a fit."""
    top_k_descriptions: int = 8
    tau_text: float = 0.01                     # τt, temperature of the logits being balanced
    balance_iters: int = 20
    balancing: Balancing = "reference"         # "reference": the script's StableGreenkhorn; "sinkhorn": the paper's
    alpha: float = 0.6                         # pseudo-labels more confident than this become one-hot
    tau_image: float = 0.04                    # τi, temperature of the vision proxies
    lr: float = 10.0                           # initial step size, halved whenever the gradient norm grows
    proxy_iters: int = 2000


@dataclass(frozen=True)
class ProxyEvidence:
    """The descriptions a class's text proxy was built from, best first."""
    indices: torch.Tensor                      # (k',) int64 indices into that class's descriptions
    scores: torch.Tensor                       # (k',) their mean cosine similarity to the image pool


@dataclass(frozen=True)
class KPLSolution:
    """The result of ``fit_kpl`` on one image pool."""
    text_proxies: torch.Tensor                 # T (dim, n_classes), columns L2-normalised
    vision_proxies: torch.Tensor               # W (dim, n_classes), columns L2-normalised; predict with these
    pseudo_labels: torch.Tensor                # (n_images, n_classes), as ``balance`` returned them
    evidence: tuple[ProxyEvidence, ...]        # one per class


def text_proxy(image_features: torch.Tensor, description_features: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, d) normalised images and (m, d) normalised descriptions of ONE class -> (proxy (d,) normalised,
    indices (k',) of the kept descriptions in descending score order, their scores (k',)), k' = min(k, m).
    A description's score is its mean cosine similarity to the images."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if description_features.ndim != 2 or description_features.shape[0] == 0:
        raise ValueError(f"description_features must be (m >= 1, dim), got {tuple(description_features.shape)}")
    scores = (image_features @ description_features.T).mean(dim=0)               # (m,)
    top_scores, indices = torch.topk(scores, min(k, scores.shape[0]), sorted=True)
    proxy = F.normalize(description_features[indices].mean(dim=0), dim=0)
    return proxy, indices, top_scores


def build_text_proxies(image_features: torch.Tensor, class_descriptions: Sequence[torch.Tensor],
                       k: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """``text_proxy`` for every class -> (T (d, c) with normalised columns, [(indices, scores)] per class)."""
    proxies, evidence = [], []
    for descriptions in class_descriptions:
        proxy, indices, scores = text_proxy(image_features, descriptions, k)
        proxies.append(proxy)
        evidence.append((indices, scores))
    return torch.stack(proxies, dim=1), evidence


def balance(logits: torch.Tensor, tau_t: float, iters: int, reading: Balancing,
            class_prior: torch.Tensor | None = None) -> torch.Tensor:
    """(n, c) logits -> (n, c) balanced pseudo-labels, all in log space.

    Starts from log P = logits/τt − logsumexp over each row; targets are rows summing to r = 1/n and columns to
    q = class_prior normalised to sum to 1 (uniform by default).
    ``reference``: ``iters`` times, rescale only the one column or row whose sum is furthest from its target
    (a column when the worst column violation is strictly larger, else a row); returns P unchanged, so most
    rows sum to about 1/n (the authors' script passes it on like that).
    ``sinkhorn``: ``iters`` rounds of rescaling all columns to q, then all rows to r; returns P·n, rows sum to 1.
    """
    if reading not in BALANCINGS:
        raise ValueError(f"unknown balancing {reading!r}; expected one of {BALANCINGS}")
    n, c = logits.shape
    dtype, logits = logits.dtype, logits.to(SOLVER_DTYPE)
    scaled = logits / tau_t
    log_p = scaled - torch.logsumexp(scaled, dim=1, keepdim=True)
    log_q = _log_column_targets(class_prior, c, logits)                         # (c,)
    log_r = -math.log(n)
    if reading == "sinkhorn":
        for _ in range(iters):
            log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True) + log_q
            log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True) + log_r
        return (log_p + math.log(n)).exp().to(dtype)
    q, r = log_q.exp(), 1.0 / n
    for _ in range(iters):
        p = log_p.exp()
        column_violation = (p.sum(dim=0) - q).abs()
        row_violation = (p.sum(dim=1) - r).abs()
        if column_violation.max() > row_violation.max():
            j = int(column_violation.argmax())
            log_p[:, j] += log_q[j] - torch.logsumexp(log_p[:, j], dim=0)
        else:
            i = int(row_violation.argmax())
            log_p[i] += log_r - torch.logsumexp(log_p[i], dim=0)
    return log_p.exp().to(dtype)


def _log_column_targets(class_prior: torch.Tensor | None, n_classes: int, like: torch.Tensor) -> torch.Tensor:
    if class_prior is None:
        return torch.full((n_classes,), -math.log(n_classes), dtype=like.dtype, device=like.device)
    prior = class_prior.to(dtype=like.dtype, device=like.device)
    if prior.shape != (n_classes,) or bool((prior <= 0).any()):
        raise ValueError(f"class_prior must hold {n_classes} positive weights, got {class_prior.tolist()}")
    return prior.log() - prior.sum().log()


def fit_vision_proxies(image_features: torch.Tensor, text_proxies: torch.Tensor, pseudo_labels: torch.Tensor, *,
                       lr: float, iters: int, tau_i: float, alpha: float) -> torch.Tensor:
    """Vision proxies W (d, c), columns normalised, fitted on X (n, d) from W = T (d, c) against Q (n, c).

    Rows of Q whose largest entry exceeds ``alpha`` become one-hot. Each step: prob = softmax(X·W/τi);
    grad = Xᵀ·prob − Xᵀ·Q (n·τi times the mean cross-entropy's gradient); halve ``lr`` when ‖grad‖_F grew since
    the previous step; W ← W − lr/(n·τi)·grad; renormalise W's columns.
    """
    n, c = pseudo_labels.shape
    dtype = text_proxies.dtype
    image_features, text_proxies = image_features.to(SOLVER_DTYPE), text_proxies.to(SOLVER_DTYPE)
    targets = pseudo_labels.to(SOLVER_DTYPE, copy=True)
    confidence, label = targets.max(dim=1)
    confident = confidence > alpha
    targets[confident] = F.one_hot(label[confident], c).to(targets.dtype)
    base = image_features.T @ targets                                            # (d, c)
    weights = text_proxies.clone()
    previous_norm = math.inf
    for _ in range(iters):
        prob = torch.softmax(image_features @ weights / tau_i, dim=1)           # (n, c)
        grad = image_features.T @ prob - base
        grad_norm = float(torch.linalg.matrix_norm(grad))
        if grad_norm > previous_norm:
            lr /= 2
        previous_norm = grad_norm
        weights = F.normalize(weights - lr / (n * tau_i) * grad, dim=0)
    return weights.to(dtype)


def predict(image_features: torch.Tensor, vision_proxies: torch.Tensor, tau_i: float) -> torch.Tensor:
    """(n, d) normalised images, W (d, c) -> (n, c) probabilities softmax(X·W/τi)."""
    return torch.softmax(image_features @ vision_proxies / tau_i, dim=1)


def fit_kpl(image_features: torch.Tensor, class_descriptions: Sequence[torch.Tensor], config: KPLConfig = KPLConfig(),
            *, class_prior: torch.Tensor | None = None) -> KPLSolution:
    """The transductive pipeline on one pool: text proxies from descriptions, balanced pseudo-labels from the
    cosine logits X·T, vision proxies fitted from T. ``class_descriptions``: per class, (m_j, d) normalised."""
    text_proxies, evidence = build_text_proxies(image_features, class_descriptions, config.top_k_descriptions)
    pseudo_labels = balance(image_features @ text_proxies, config.tau_text, config.balance_iters, config.balancing,
                            class_prior)
    vision_proxies = fit_vision_proxies(image_features, text_proxies, pseudo_labels, lr=config.lr,
                                        iters=config.proxy_iters, tau_i=config.tau_image, alpha=config.alpha)
    return KPLSolution(text_proxies, vision_proxies, pseudo_labels,
                       tuple(ProxyEvidence(indices, scores) for indices, scores in evidence))


# ---------------------------------------------------------------------------------------------------------------
# The service's `kpl` method: the cores above, fed from a description source and a resolved fit.

class DescriptionSource(Protocol):
    """Where descriptions come from (app.knowledge.KnowledgeBase): per-class FAISS search and per-class vectors."""

    def retrieve(self, image_features: np.ndarray, label_set: str, class_name: str, k: int) -> list[list[Retrieved]]:
        ...

    def class_descriptions(self, label_set: str, class_name: str) -> tuple[np.ndarray, list[DescriptionItem]]:
        ...


@dataclass(frozen=True)
class EvidenceEntry:
    text: str
    source: str
    score: float            # mean cosine to the fitting pool when the description was chosen


@dataclass(frozen=True)
class KPLFit:
    """A fit of a label-set version under one model, as stored (state kind "kpl") and used for scoring."""
    label_set: str
    label_set_version: int
    model_id: str
    class_names: tuple[str, ...]
    text_proxies: np.ndarray                   # (n_classes, dim) float32
    vision_proxies: np.ndarray                 # (n_classes, dim) float32; predictions use these
    evidence: tuple[tuple[EvidenceEntry, ...], ...]   # per class, the descriptions behind its text proxy
    evidence_vectors: tuple[np.ndarray, ...]   # per class (k_c, dim): their embeddings
    pool_size: int
    class_balance: dict[str, float]            # share of the pool's pseudo-labels per class
    config: dict                               # the KPLConfig it used, and the class prior
    fit_seconds: float
    version: int = 0                           # 1, 2, ... once stored (0: not stored, e.g. transductive)
    created_at: datetime | None = None

    def to_state(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, JSON meta) for MethodStateRepository; `from_state` reads them back."""
        dim = self.text_proxies.shape[1]
        vectors = [v for v in self.evidence_vectors if len(v)]
        arrays = {"text_proxies": self.text_proxies.astype(np.float32),
                  "vision_proxies": self.vision_proxies.astype(np.float32),
                  "evidence_vectors": (np.concatenate(vectors) if vectors else np.empty((0, dim))).astype(np.float32)}
        meta = {"label_set": self.label_set, "label_set_version": self.label_set_version, "model_id": self.model_id,
                "class_names": list(self.class_names),
                "evidence": [[asdict(entry) for entry in entries] for entries in self.evidence],
                "evidence_sizes": [len(v) for v in self.evidence_vectors], "pool_size": self.pool_size,
                "class_balance": self.class_balance, "config": self.config, "fit_seconds": self.fit_seconds}
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict[str, np.ndarray], meta: dict, version: int, created_at: datetime) -> "KPLFit":
        split_at = np.cumsum(meta["evidence_sizes"])[:-1]
        return cls(label_set=meta["label_set"], label_set_version=meta["label_set_version"],
                   model_id=meta["model_id"], class_names=tuple(meta["class_names"]),
                   text_proxies=arrays["text_proxies"], vision_proxies=arrays["vision_proxies"],
                   evidence=tuple(tuple(EvidenceEntry(**e) for e in entries) for entries in meta["evidence"]),
                   evidence_vectors=tuple(np.split(arrays["evidence_vectors"], split_at)),
                   pool_size=meta["pool_size"], class_balance=meta["class_balance"], config=meta["config"],
                   fit_seconds=meta["fit_seconds"], version=version, created_at=created_at)


def prior_vector(head: ClassHead, class_prior: dict[str, float] | None) -> torch.Tensor | None:
    """A {class: weight} prior as a tensor in the head's class order; every class must be named."""
    if class_prior is None:
        return None
    missing, unknown = set(head.class_names) - set(class_prior), set(class_prior) - set(head.class_names)
    if missing or unknown:
        raise InvalidInput(f"class_prior needs a positive weight for each class of {head.label_set} "
                           f"({', '.join(head.class_names)}); missing: {sorted(missing)}, unknown: {sorted(unknown)}")
    return torch.tensor([float(class_prior[name]) for name in head.class_names], dtype=torch.float64)


class KPL:
    """method=kpl. With a fit for the label set's current version: softmax(X·W/τi). Without one: per image, each
    class's proxy is the mean of its k best-fitting descriptions (FAISS, restricted to the class). Transductive (a
    batch): the whole pipeline fitted on the batch itself. Classes without descriptions use their prompt ensemble
    as their only 'description'."""
    name = "kpl"
    state_kind = "kpl"
    supports_transductive = True

    def __init__(self, descriptions: DescriptionSource, config: KPLConfig) -> None:
        self.descriptions = descriptions
        self.config = config

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict, version: int, created_at: datetime) -> KPLFit:
        return KPLFit.from_state(arrays, meta, version, created_at)

    def score(self, image_features: torch.Tensor, head: ClassHead, state: KPLFit | None, *, logit_scale: float,
              transductive: bool = False) -> Scores:
        if transductive:
            if len(image_features) < 2:
                raise InvalidInput(f"a transductive batch needs at least 2 images; got {len(image_features)}")
            return self._score_with_fit(image_features, self.fit(image_features, head), proxy="transductive")
        if state is not None:
            return self._score_with_fit(image_features, state, proxy="fitted")
        return self._score_per_image(image_features, head, logit_scale)

    def fit(self, image_features: torch.Tensor, head: ClassHead,
            class_prior: dict[str, float] | None = None) -> KPLFit:
        """Text proxies, balancing and vision proxies on a pool of images (version 0 until stored).
        `class_prior`: expected class shares for the balancing (uniform when None); any positive weights."""
        started = time.perf_counter()
        prior = prior_vector(head, class_prior)
        descriptions = [self._class_descriptions(head, c) for c in range(len(head.class_names))]
        result = fit_kpl(image_features.float(), [torch.from_numpy(vectors) for vectors, _ in descriptions],
                         self.config, class_prior=prior)
        evidence, evidence_vectors = [], []
        for (vectors, items), chosen in zip(descriptions, result.evidence):
            picked = chosen.indices.tolist()
            evidence.append(tuple(EvidenceEntry(items[i].text, items[i].source, round(float(s), 6))
                                  for i, s in zip(picked, chosen.scores.tolist())))
            evidence_vectors.append(vectors[picked])
        pseudo = result.pseudo_labels.argmax(dim=1).bincount(minlength=len(head.class_names)).float()
        return KPLFit(
            label_set=head.label_set, label_set_version=head.version, model_id=head.model_id,
            class_names=head.class_names, text_proxies=result.text_proxies.T.contiguous().numpy(),
            vision_proxies=result.vision_proxies.T.contiguous().numpy(), evidence=tuple(evidence),
            evidence_vectors=tuple(evidence_vectors), pool_size=len(image_features),
            class_balance={name: round(float(share), 6) for name, share in zip(head.class_names, pseudo / pseudo.sum())},
            config={**asdict(self.config), "class_prior": class_prior},
            fit_seconds=round(time.perf_counter() - started, 3))

    def _class_descriptions(self, head: ClassHead, class_index: int) -> tuple[np.ndarray, list[DescriptionItem]]:
        vectors, items = self.descriptions.class_descriptions(head.label_set, head.class_names[class_index])
        if len(items) == 0:
            name = head.class_names[class_index]
            prompts = head.class_weights[class_index:class_index + 1].numpy()
            return prompts.astype(np.float32), [DescriptionItem(head.label_set, "", name, name,
                                                                "(class prompts: no descriptions)", "prompts")]
        return vectors.astype(np.float32), items

    def _score_with_fit(self, image_features: torch.Tensor, fit: KPLFit, proxy: ProxyKind) -> Scores:
        vision_proxies = torch.from_numpy(fit.vision_proxies)                   # (n_classes, dim)
        similarities = image_features @ vision_proxies.T
        logits = similarities / self.config.tau_image                           # predict(): softmax(X·W/τi)
        evidence = []
        for x in image_features.numpy():
            evidence.append([ClassEvidence(proxy, tuple(
                EvidenceItem(entry.text, entry.source, round(float(vector @ x), 6))
                for entry, vector in zip(entries, vectors)))
                for entries, vectors in zip(fit.evidence, fit.evidence_vectors)])
        details = {"fit_version": fit.version, "pool_size": fit.pool_size, "class_balance": fit.class_balance,
                   "fit_seconds": fit.fit_seconds, "balancing": fit.config.get("balancing")}
        return Scores(logits, similarities, evidence, details)

    def _score_per_image(self, image_features: torch.Tensor, head: ClassHead, logit_scale: float) -> Scores:
        queries = image_features.numpy().astype(np.float32)
        n_images, n_classes = len(queries), len(head.class_names)
        similarities = torch.empty(n_images, n_classes)
        evidence: list[list[ClassEvidence]] = [[] for _ in range(n_images)]
        for c, class_name in enumerate(head.class_names):
            retrieved = self.descriptions.retrieve(queries, head.label_set, class_name,
                                                   self.config.top_k_descriptions)
            for i, found in enumerate(retrieved):
                if found:
                    proxy = F.normalize(torch.from_numpy(np.mean([r.vector for r in found], axis=0)), dim=0)
                    evidence[i].append(ClassEvidence("per-image", tuple(
                        EvidenceItem(r.text, r.source, round(r.similarity, 6)) for r in found)))
                else:
                    proxy = head.class_weights[c]
                    evidence[i].append(ClassEvidence("prompts"))
                similarities[i, c] = image_features[i] @ proxy
        return Scores(logit_scale * similarities, similarities, evidence)

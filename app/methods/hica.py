"""HiCA (few-shot, "Efficient Few-Shot Medical Image Analysis via Hierarchical Contrastive Vision-Language
Learning", arXiv 2501.09294): the losses, the tuned tower and method=hica, as medzero implements them.

The paper has no public code. It gives the structure: two stages; stage 1 adapts the image encoder to the site's
images with pseudo-labels from unsupervised clustering and the text side with a medical text corpus; stage 2 aligns
images and text at three levels (global, local/region, cross-category) with a weighted sum of the three losses. It
gives no reproducible equations, temperatures, weights or choice of trainable parameters, so everything concrete
below is ours; each choice is listed with its setting (app.methods.hica_config).

Notation: f = normalised image embedding of the tuned tower; e = a text embedding as the frozen text tower gives it
(class prompt ensembles: the label set's class head; descriptions: the knowledge base's index); g(e) = normalise(e +
M e), the text projection (M: dim × dim, zero at the start, so g starts as the identity); t_c = g(e_c), the class
text embedding; u_d = g(e_d) for a description d of class c(d); y_i the class of labelled image i.

What is trained. The text side: M only (the text tower stays frozen; the paper fine-tunes the text encoder, a
projection is our light-weight stand-in). The image side (`tuning.mode`): "lora" (default) adds ΔW = (α/r)·B A to
every attention weight matrix (q/k/v in-projection and out-projection) of the last `tuning.blocks` transformer
blocks, A (r × in) drawn N(0, 1/in), B (out × r) zero, so the tower starts unchanged; "blocks" trains every
parameter of those blocks. Served weights are W + ΔW (or the trained block weights), swapped in per forward
(app.encoders.tower_variants.TunedWeights); the loaded model is never changed.

Stage 1, domain pre-adaptation.
- Image: k-means (k = classes × `clusters_per_class`, or `clusters`) on the frozen tower's embeddings of the
  unlabelled images gives centroids μ_j (normalised) and assignments a_i. The tuned tower learns to predict them:
      L_cluster = mean_i −log softmax_j(f_i·μ_j / τ_k)[a_i]                        τ_k = cluster_temperature (0.1)
  (centroids fixed: a moving target with few images collapses).
- Text: supervised contrast (SupCon, Khosla et al. 2020) over the label set's descriptions and class prompts z = g(e),
  positives = the other texts of the same class:
      L_text = mean_{a: P(a)≠∅} −(1/|P(a)|) Σ_{p∈P(a)} log( exp(z_a·z_p/τ_t) / Σ_{b≠a} exp(z_a·z_b/τ_t) )
  τ_t = text_temperature (0.07).

Stage 2, hierarchical contrastive alignment on the k labelled shots, L = λ_g L_global + λ_l L_local + λ_x L_cross:
- Global (InfoNCE over classes):
      L_global = mean_i −log softmax_c(f_i·t_c / τ_g)[y_i]
  τ_g = global_temperature, by default the model's own 1 / logit scale: with nothing trained yet, method=hica scores
  exactly as zeroshot does.
- Local (regions ↔ the findings they show): each image is tiled grid × grid (the paper's ROIs; a coarse grid needs
  no detector and works for every tower), each tile resized to the input size and encoded: r_{i,m}. A class's local
  score is, per tile, its best-matching description, averaged over tiles:
      ℓ_{i,c} = (1/G²) Σ_m max_{d: c(d)=c} r_{i,m}·u_d        L_local = mean_i −log softmax_c(ℓ_{i,c} / τ_l)[y_i]
  τ_l = local_temperature (0.07); a class without descriptions stands for itself (u = t_c).
- Cross-category: the hardest other class as a negative with a margin, and the classes' image prototypes
  p_c = normalise(mean_{i: y_i=c} f_i) pushed apart (pairs of classes present in the batch):
      L_hard = mean_i max(0, m + max_{c≠y_i} f_i·t_c − f_i·t_{y_i})                m = margin (0.2)
      L_sep = mean_{c≠c'} max(0, p_c·p_{c'})                 L_cross = L_hard + L_sep
  λ_g, λ_l, λ_x = global_weight (1.0), local_weight (0.5), cross_weight (0.5).

Serving (method=hica): logits_c = f·t_c / τ_g with the tuned tower's f and the stored t_c (the class embeddings
through the trained projection), softmax for probabilities; similarities are f·t_c.
"""
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from torch import nn

from app.encoders.tower_variants import TunedWeights
from app.errors import AdapterNotFound, InvalidAdapter
from app.methods.base import ClassHead, Scores
from app.methods.hica_config import AlignConfig, TuningConfig, TuningMode

BUNDLE_FORMAT = "medzero-hica/1"
LORA_A, LORA_B = ".lora_a", ".lora_b"      # suffixes of a LoRA factor's name after its weight's name
MAX_LORA_RANK, MAX_LORA_ALPHA = 1024, 1e4
MIN_TEMPERATURE = 1e-3                     # CLIP clamps its logit scale at 100 (τ 0.01); below this: saturation


# --- losses ------------------------------------------------------------------------------------------------------

def supervised_contrastive(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """L_text: SupCon over normalised (n, d) embeddings and their (n,) classes; anchors without a positive are
    left out (0 when none has one)."""
    similarity = embeddings @ embeddings.T / temperature
    self_pair = torch.eye(len(labels), dtype=torch.bool, device=embeddings.device)
    log_denominator = torch.logsumexp(similarity.masked_fill(self_pair, float("-inf")), dim=1, keepdim=True)
    log_probability = similarity - log_denominator
    positives = (labels[:, None] == labels[None, :]) & ~self_pair
    counts = positives.sum(dim=1)
    anchors = counts > 0
    if not anchors.any():
        return similarity.sum() * 0
    per_anchor = -(log_probability * positives).sum(dim=1)[anchors] / counts[anchors]
    return per_anchor.mean()


def cluster_loss(features: torch.Tensor, centroids: torch.Tensor, assignments: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """L_cluster: normalised (n, d) features against fixed normalised (k, d) centroids, CE to (n,) assignments."""
    return F.cross_entropy(features @ centroids.T / temperature, assignments)


def global_loss(features: torch.Tensor, class_text: torch.Tensor, labels: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """L_global: InfoNCE of each image over the (c, d) class text embeddings."""
    return F.cross_entropy(features @ class_text.T / temperature, labels)


def local_scores(region_features: torch.Tensor, descriptions: torch.Tensor, description_classes: torch.Tensor,
                 n_classes: int) -> torch.Tensor:
    """ℓ: (n, m, d) tile embeddings, (D, d) description embeddings of (D,) classes -> (n, c), per class the mean over
    tiles of the best-matching description's cosine."""
    similarity = region_features @ descriptions.T                      # (n, m, D)
    per_class = [similarity[..., description_classes == c].amax(dim=-1) for c in range(n_classes)]
    return torch.stack(per_class, dim=-1).mean(dim=1)


def local_loss(region_features: torch.Tensor, descriptions: torch.Tensor, description_classes: torch.Tensor,
               labels: torch.Tensor, n_classes: int, temperature: float) -> torch.Tensor:
    scores = local_scores(region_features, descriptions, description_classes, n_classes)
    return F.cross_entropy(scores / temperature, labels)


def hard_negative_loss(features: torch.Tensor, class_text: torch.Tensor, labels: torch.Tensor,
                       margin: float) -> torch.Tensor:
    """L_hard: the true class's cosine must beat the best other class's by `margin`."""
    similarity = features @ class_text.T
    true = similarity.gather(1, labels[:, None]).squeeze(1)
    others = similarity.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return F.relu(margin + others - true).mean()


def prototype_separation(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_sep: mean positive cosine between the image prototypes of every two classes present (0 with one)."""
    present = torch.unique(labels)
    if len(present) < 2:
        return features.sum() * 0
    prototypes = F.normalize(torch.stack([features[labels == c].mean(dim=0) for c in present]), dim=-1)
    cosine = prototypes @ prototypes.T
    off_diagonal = ~torch.eye(len(present), dtype=torch.bool, device=features.device)
    return F.relu(cosine[off_diagonal]).mean()


@dataclass(frozen=True)
class AlignTerms:
    total: torch.Tensor
    global_: torch.Tensor
    local: torch.Tensor
    hard: torch.Tensor
    separation: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {"loss": self.total.item(), "global": self.global_.item(), "local": self.local.item(),
                "hard_negative": self.hard.item(), "separation": self.separation.item()}


def align_loss(features: torch.Tensor, region_features: torch.Tensor, class_text: torch.Tensor,
               descriptions: torch.Tensor, description_classes: torch.Tensor, labels: torch.Tensor,
               config: AlignConfig, global_temperature: float) -> AlignTerms:
    """Stage 2's L = λ_g L_global + λ_l L_local + λ_x (L_hard + L_sep), every input normalised."""
    n_classes = len(class_text)
    global_ = global_loss(features, class_text, labels, global_temperature)
    local = local_loss(region_features, descriptions, description_classes, labels, n_classes,
                       config.local_temperature)
    hard = hard_negative_loss(features, class_text, labels, config.margin)
    separation = prototype_separation(features, labels)
    total = config.global_weight * global_ + config.local_weight * local + config.cross_weight * (hard + separation)
    return AlignTerms(total, global_, local, hard, separation)


# --- the text projection and the tuned tower ---------------------------------------------------------------------

def project_text(embeddings: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """g(e) = normalise(e + e Mᵀ) for (n, d) embeddings and the (d, d) projection M."""
    return F.normalize(embeddings + embeddings @ projection.T, dim=-1)


def transformer_blocks(visual: nn.Module) -> list[str]:
    """Parameter-name prefixes of the vision transformer's blocks, first to last (open_clip's ViT or a timm ViT
    trunk inside TimmModel); TypeError for other towers."""
    if isinstance(visual, OpenClipVisionTransformer):
        return [f"transformer.resblocks.{i}" for i in range(len(visual.transformer.resblocks))]
    if isinstance(visual, TimmModel) and hasattr(visual.trunk, "blocks"):
        return [f"trunk.blocks.{i}" for i in range(len(visual.trunk.blocks))]
    raise TypeError(f"HiCA tunes vision transformer blocks; {type(visual).__name__} has none it knows")


def tuned_parameter_names(visual: nn.Module, mode: TuningMode, blocks: int) -> list[str]:
    """The tower parameters stage 1 and 2 change: in the last `blocks` blocks, the attention weight matrices
    (lora) or every parameter (blocks)."""
    prefixes = transformer_blocks(visual)
    if not 1 <= blocks <= len(prefixes):
        raise ValueError(f"tuning.blocks={blocks}; this tower has {len(prefixes)} transformer blocks")
    chosen = tuple(f"{prefix}." for prefix in prefixes[-blocks:])
    names = []
    for name, parameter in visual.named_parameters():
        if not name.startswith(chosen):
            continue
        in_attention = ".attn." in name and name.endswith("weight") and parameter.ndim == 2
        if mode == "blocks" or in_attention:
            names.append(name)
    if not names:
        raise TypeError(f"no {'attention weight matrices' if mode == 'lora' else 'parameters'} in the last "
                        f"{blocks} blocks of {type(visual).__name__}")
    return names


def init_trainable(visual: nn.Module, tuning: TuningConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fresh trainable tensors: LoRA factors (A ~ N(0, 1/in), B = 0) or copies of the block parameters."""
    parameters = dict(visual.named_parameters())
    trainable = {}
    for name in tuned_parameter_names(visual, tuning.mode, tuning.blocks):
        weight = parameters[name].detach().float().cpu()
        if tuning.mode == "lora":
            out_features, in_features = weight.shape
            trainable[name + LORA_A] = torch.randn(tuning.lora_rank, in_features,
                                                   generator=generator) / math.sqrt(in_features)
            trainable[name + LORA_B] = torch.zeros(out_features, tuning.lora_rank)
        else:
            trainable[name] = weight.clone()
    return trainable


def tuned_weights(base: Mapping[str, torch.Tensor], trainable: Mapping[str, torch.Tensor], mode: TuningMode,
                  lora_scale: float) -> dict[str, torch.Tensor]:
    """The replacement tower weights: W + scale · B A per LoRA pair, or the trained tensors themselves
    (differentiable in `trainable`)."""
    if mode == "blocks":
        return dict(trainable)
    weights = {}
    for name in trainable:
        if name.endswith(LORA_A):
            weight = name[:-len(LORA_A)]
            low_rank = trainable[weight + LORA_B] @ trainable[name]
            weights[weight] = base[weight] + lora_scale * low_rank.to(base[weight].dtype)
    return weights


def served_weights(base: Mapping[str, torch.Tensor], trainable: Mapping[str, torch.Tensor], mode: TuningMode,
                   lora_scale: float) -> dict[str, torch.Tensor]:
    """The replacement weights the server swaps in: merged in float32 on the CPU, then placed on each loaded
    parameter's device and dtype. InvalidAdapter when the merge is not finite (a huge alpha, say)."""
    cpu_base = {name: base[name].detach().float().cpu() for name in _targets(trainable, mode)}
    with torch.no_grad():
        merged = tuned_weights(cpu_base, {k: v.float().cpu() for k, v in trainable.items()}, mode, lora_scale)
    placed = {name: weight.to(base[name].device, base[name].dtype) for name, weight in merged.items()}
    for name, weight in placed.items():
        if not torch.isfinite(weight).all():
            raise InvalidAdapter(f"the tuned weight {name} is not finite after the LoRA merge (lora_alpha / rank "
                                 f"= {lora_scale:g}) at the model's precision")
    return placed


def _targets(trainable: Mapping[str, torch.Tensor], mode: TuningMode) -> list[str]:
    return list(trainable) if mode == "blocks" else [n[:-len(LORA_A)] for n in trainable if n.endswith(LORA_A)]


def check_trainable(visual: nn.Module, trainable: Mapping[str, torch.Tensor], mode: TuningMode, lora_rank: int,
                    blocks: int) -> None:
    """InvalidAdapter unless `trainable` is exactly what training with (mode, rank, blocks) gives this tower: the
    same tensor names (LoRA pairs of the last blocks' attention weights, or every parameter of the last blocks),
    each of the right shape and finite."""
    try:
        targets = tuned_parameter_names(visual, mode, blocks)
    except (TypeError, ValueError) as exc:
        raise InvalidAdapter(f"tuning does not fit this model's vision tower: {exc}") from exc
    expected_names = targets if mode == "blocks" else [t + suffix for t in targets for suffix in (LORA_A, LORA_B)]
    missing, extra = sorted(set(expected_names) - set(trainable)), sorted(set(trainable) - set(expected_names))
    if missing or extra:
        raise InvalidAdapter(f"the tower tensors do not fit {mode} tuning of the last {blocks} blocks of this "
                             f"model's vision tower ({type(visual).__name__}): "
                             + "; ".join(part for part in (missing and f"missing {', '.join(missing[:3])}",
                                                           extra and f"no parameter for {', '.join(extra[:3])}")
                                         if part))
    parameters = dict(visual.named_parameters())
    for name, tensor in trainable.items():
        if mode == "blocks":
            expected = tuple(parameters[name].shape)
        else:
            weight = parameters[name[:-len(LORA_A)]]    # both suffixes have the same length
            out_features, in_features = weight.shape
            expected = (lora_rank, in_features) if name.endswith(LORA_A) else (out_features, lora_rank)
        if tuple(tensor.shape) != expected:
            raise InvalidAdapter(f"tower tensor {name} has shape {tuple(tensor.shape)}; this model needs {expected}")
        if not torch.isfinite(tensor).all():
            raise InvalidAdapter(f"tower tensor {name} holds NaN or infinite values")


# --- served state and method=hica --------------------------------------------------------------------------------

@dataclass(frozen=True)
class HiCAAdapter:
    """A trained HiCA bundle as the server keeps it (method state kind "hica" of its label-set version)."""
    adapter_id: str                    # sha256 of its adapter.safetensors
    label_set: str
    label_set_version: int
    model_id: str
    class_names: tuple[str, ...]
    class_embeddings: torch.Tensor     # (n_classes, dim): t_c, normalised
    text_projection: torch.Tensor      # (dim, dim): M, kept for provenance (t_c already went through it)
    trainable: dict[str, torch.Tensor]  # what the job trained in the tower (LoRA factors or block weights)
    temperature: float                 # τ_g
    tower_variant: TunedWeights        # the replacement weights the encoder runs with for method=hica
    manifest: dict = field(default_factory=dict)
    version: int = 0
    created_at: datetime | None = None

    @property
    def mode(self) -> TuningMode:
        return self.manifest["tuning"]["mode"]

    def to_state(self) -> tuple[dict[str, np.ndarray], dict]:
        arrays = {"class_embeddings": self.class_embeddings.numpy(), "text_projection": self.text_projection.numpy(),
                  **{f"tower.{name}": value.numpy() for name, value in self.trainable.items()}}
        return arrays, {"adapter_id": self.adapter_id, "class_names": list(self.class_names),
                        "temperature": self.temperature, "manifest": self.manifest}


class HiCA:
    """method=hica: the tower with the bundle's tuned weights (the service encodes with `state.tower_variant`),
    scored against the bundle's class text embeddings at its temperature; no bundle -> 409 naming the job."""
    name = "hica"
    state_kind = "hica"
    supports_transductive = False
    bundle_format = BUNDLE_FORMAT

    def __init__(self, visual: nn.Module) -> None:
        self._visual = visual
        # the loaded weights LoRA updates add to, referenced now: during a tuned forward (on the encoder thread)
        # the tower's own attributes are another adapter's tensors (app.encoders.tower_variants)
        self._base = {name: p.detach() for name, p in visual.named_parameters()}

    def adapter(self, *, adapter_id: str, manifest: dict, class_embeddings: torch.Tensor,
                text_projection: torch.Tensor, trainable: dict[str, torch.Tensor], temperature: float,
                version: int = 0, created_at: datetime | None = None) -> HiCAAdapter:
        """The served state: the tower's replacement weights are built here, once per decoded state."""
        tuning = manifest["tuning"]
        weights = served_weights(self._base, trainable, tuning["mode"], tuning["lora_alpha"] / tuning["lora_rank"])
        return HiCAAdapter(adapter_id, manifest["label_set"], manifest["label_set_version"], manifest["model_id"],
                           tuple(manifest["class_names"]), class_embeddings, text_projection, trainable, temperature,
                           TunedWeights(weights), manifest, version, created_at)

    def from_bundle(self, tensors: dict[str, torch.Tensor], manifest: dict, head: ClassHead, adapter_id: str, *,
                    embed_dim: int, vision_width: int | None) -> HiCAAdapter:
        """A bundle's tensors checked against this model and label set (InvalidAdapter naming what is wrong); the
        manifest's identity fields were checked against the live label set already (AdapterService)."""
        tuning = manifest.get("tuning")
        if not (isinstance(tuning, dict) and tuning.get("mode") in ("lora", "blocks")
                and _is_int(tuning.get("lora_rank"), 1, MAX_LORA_RANK) and _is_int(tuning.get("blocks"), 1, 1024)
                and _is_number(tuning.get("lora_alpha"), 0, MAX_LORA_ALPHA)):
            raise InvalidAdapter(f"manifest.json needs 'tuning' with mode lora|blocks, blocks >= 1, lora_rank in "
                                 f"1..{MAX_LORA_RANK} and lora_alpha in (0, {MAX_LORA_ALPHA:g}]; got {tuning!r}")
        temperature = manifest.get("temperature")
        if not _is_number(temperature, MIN_TEMPERATURE, 100):
            raise InvalidAdapter(f"manifest.json needs a 'temperature' in [{MIN_TEMPERATURE:g}, 100); got "
                                 f"{temperature!r}")
        classes, projection = tensors.get("class_embeddings"), tensors.get("text_projection")
        if classes is None or projection is None:
            raise InvalidAdapter(f"a HiCA adapter.safetensors needs 'class_embeddings' and 'text_projection'; has "
                                 f"{sorted(tensors)[:8]}")
        classes, projection = classes.float().contiguous(), projection.float().contiguous()
        if tuple(classes.shape) != (len(head.class_names), embed_dim) or tuple(projection.shape) != (embed_dim,
                                                                                                   embed_dim):
            raise InvalidAdapter(f"class embeddings {tuple(classes.shape)} / projection {tuple(projection.shape)}; "
                                 f"the label set and model need {(len(head.class_names), embed_dim)} / "
                                 f"{(embed_dim, embed_dim)}")
        if not (torch.isfinite(classes).all() and torch.isfinite(projection).all()) or not classes.norm(dim=-1).all():
            raise InvalidAdapter("adapter.safetensors holds NaN, infinite or all-zero class embeddings")
        trainable = {name.removeprefix("tower."): value.float().contiguous() for name, value in tensors.items()
                     if name.startswith("tower.")}
        if not trainable:
            raise InvalidAdapter("a HiCA adapter.safetensors needs its tuned tower tensors ('tower.*')")
        check_trainable(self._visual, trainable, tuning["mode"], tuning["lora_rank"], tuning["blocks"])
        return self.adapter(adapter_id=adapter_id, manifest=manifest,
                            class_embeddings=F.normalize(classes, dim=-1), text_projection=projection,
                            trainable=trainable,
                            temperature=float(temperature))

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict, version: int,
                   created_at: datetime) -> HiCAAdapter:
        trainable = {name.removeprefix("tower."): torch.from_numpy(value) for name, value in arrays.items()
                     if name.startswith("tower.")}
        return self.adapter(adapter_id=meta["adapter_id"], manifest=meta["manifest"],
                            class_embeddings=torch.from_numpy(arrays["class_embeddings"]),
                            text_projection=torch.from_numpy(arrays["text_projection"]), trainable=trainable,
                            temperature=float(meta["temperature"]), version=version, created_at=created_at)

    def require(self, head: ClassHead, state: HiCAAdapter | None) -> HiCAAdapter:
        if state is None:
            raise AdapterNotFound(
                f"label set {head.label_set!r} v{head.version} has no HiCA adapter under {head.model_id}; train one "
                f"with `medzero train hica --label-set {head.label_set} --shots DIR --out DIR` and load it with "
                "POST /adapters (or put it under MEDZERO_ADAPTERS_DIR)")
        return state

    def score(self, image_features: torch.Tensor, head: ClassHead, state: HiCAAdapter | None, *,
              logit_scale: float, transductive: bool = False) -> Scores:
        adapter = self.require(head, state)
        similarities = F.normalize(image_features, dim=-1) @ adapter.class_embeddings.to(image_features.dtype).T
        return Scores(similarities / adapter.temperature, similarities,
                      details={"adapter_id": adapter.adapter_id, "adapter_version": adapter.version})


def _is_int(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_number(value: object, low: float, high: float) -> bool:
    """A finite number with low < value <= high (low itself allowed when it is not 0)."""
    return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and (low < value if low == 0 else low <= value) and value <= high)

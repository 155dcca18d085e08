"""Zero-shot CLIP: prompt ensembles per class -> text embeddings; cosine similarity x logit scale -> softmax."""
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from app.methods.base import ClassHead, Scores

TEXT_BATCH_SIZE = 256


def build_class_weights(encode_texts: Callable[[Sequence[str]], torch.Tensor],
                        class_prompts: Sequence[Sequence[str]]) -> torch.Tensor:
    """Per class, the normalised mean of its normalised prompt embeddings (CLIP's prompt ensembling, as in
    open_clip's build_zero_shot_classifier, but each class may have its own prompts). -> (n_classes, dim)"""
    flat = [prompt for prompts in class_prompts for prompt in prompts]
    prompt_features = torch.cat([encode_texts(flat[i:i + TEXT_BATCH_SIZE])
                                 for i in range(0, len(flat), TEXT_BATCH_SIZE)])   # (n_prompts, dim), normalised
    per_class = torch.split(prompt_features, [len(prompts) for prompts in class_prompts])
    return F.normalize(torch.stack([features.mean(dim=0) for features in per_class]), dim=-1)


class ZeroShot:
    name = "zeroshot"
    state_kind = None
    supports_transductive = False

    def score(self, image_features: torch.Tensor, head: ClassHead, state: None = None, *, logit_scale: float,
              transductive: bool = False) -> Scores:
        similarities = image_features @ head.class_weights.T          # (n_images, n_classes)
        return Scores(logits=logit_scale * similarities, similarities=similarities)

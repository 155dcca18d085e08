"""A tiny, random-init model of BiomedCLIP's exact shape, written from local files only.

BiomedCLIP (hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224) is an open_clip CustomTextCLIP: a timm
ViT trunk (vit_base_patch16_224, timm_pool "", timm_proj "linear"), a Hugging Face BERT text tower (hf_proj_type
"mlp", hf_pooler_type "cls_last_hidden_state_pooler", context length 256) and a BERT wordpiece tokenizer. This builds
the same thing small: timm's own test ViT (`test_vit`: a VisionTransformer of width 64, 6 blocks, dynamic image size,
so it runs at 64 px), a 2-layer BERT of width 32 and a ~170-piece vocabulary, in the hub repo's layout:

    <root>/bert/          config.json + tokenizer files (what text_cfg.hf_model_name / hf_tokenizer_name point at)
    <root>/biomedclip/    open_clip_config.json, open_clip_pytorch_model.bin, tokenizer files (the `local-dir:` folder)

open_clip reads a `local-dir:` model's tokenizer from that folder itself, as the hub repo ships it.
"""
import json
import shutil
import string
from pathlib import Path

import open_clip
import torch
from transformers import BertConfig, BertTokenizerFast

EMBED_DIM = 48                 # BiomedCLIP: 512
BERT_WIDTH = 32                # BiomedBERT: 768
CONTEXT_LENGTH = 256           # as BiomedCLIP
IMAGE_SIZE = 64                # BiomedCLIP: 224; test_vit has dynamic_img_size, so any multiple of 16 runs
PREPROCESS_CFG = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]    # [PAD] first: BertConfig.pad_token_id is 0
# Whole words of the prompts medzero writes (templates, class names, the KPL description prompt); every other word
# falls back to the single-character pieces below, so no lowercase ASCII text is ever [UNK].
WORDS = [
    "a", "an", "the", "of", "with", "and", "or", "in", "on", "no", "which", "has", "image", "showing", "photo",
    "radiograph", "scan", "view", "medical", "chest", "x", "ray", "lung", "lungs", "normal", "pneumonia", "opacity",
    "consolidation", "effusion", "pleural", "edema", "cardiomegaly", "atelectasis", "pneumothorax", "finding",
    "covid19", "other", "heart", "dermoscopy", "skin", "lesion", "fundus", "retina", "retinopathy", "breast",
    "ultrasound", "benign", "malignant", "mass", "nodule", "air", "bronchograms", "lobar", "dense", "clear", "sharp",
]
SUFFIXES = ["##s", "##es", "##ed", "##ing", "##al", "##ia", "##ic", "##ity", "##ary", "##ous"]


def vocabulary() -> list[str]:
    characters = list(string.ascii_lowercase + string.digits)
    pieces = [*SPECIAL_TOKENS, *string.punctuation, *characters, *WORDS, *SUFFIXES, *(f"##{c}" for c in characters)]
    return list(dict.fromkeys(pieces))       # one line per piece, in order: a line number is a token id


def model_config(bert_dir: Path) -> dict:
    """BiomedCLIP's open_clip_config.json "model_cfg", shrunk: the same keys and values but names and sizes."""
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": IMAGE_SIZE},
        "text_cfg": {"hf_model_name": str(bert_dir), "hf_tokenizer_name": str(bert_dir), "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": CONTEXT_LENGTH},
    }



def build_tiny_biomedclip(root: Path, seed: int = 0) -> Path:
    """Write the tiny model under `root` and return its `local-dir:` folder. Needs no network."""
    bert_dir, model_dir = root / "bert", root / "biomedclip"
    bert_dir.mkdir(parents=True)
    model_dir.mkdir()
    vocab_file = bert_dir / "vocab.txt"
    vocab_file.write_text("\n".join(vocabulary()) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast.from_pretrained(bert_dir, do_lower_case=True, model_max_length=512)  # from vocab.txt
    tokenizer.save_pretrained(bert_dir)
    tokenizer.save_pretrained(model_dir)
    shutil.copy(vocab_file, model_dir / "vocab.txt")       # as the hub repo ships it
    # initializer_range 0.2, not BERT's 0.02: at 0.02 a random 2-layer BERT's [CLS] output hardly depends on the
    # text (prompts come out at cosine 0.9999), so tests could not tell the tokens reached the tower
    BertConfig(vocab_size=len(vocabulary()), hidden_size=BERT_WIDTH, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=2 * BERT_WIDTH, max_position_embeddings=512, pad_token_id=0,
               initializer_range=0.2).save_pretrained(bert_dir)

    (model_dir / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_config(bert_dir), "preprocess_cfg": PREPROCESS_CFG}, indent=2))
    torch.manual_seed(seed)
    # no weights in the folder yet: open_clip builds it random-init (pretrained_text=False: nor BERT weights to load)
    model = open_clip.create_model(f"local-dir:{model_dir}", pretrained_text=False)
    torch.save(model.state_dict(), model_dir / "open_clip_pytorch_model.bin")
    return model_dir

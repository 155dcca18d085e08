"""Label sets installed on first start. Class names match the folder names of the evaluation datasets
(../shared/data/datasets), so `medzero eval` can score them without a mapping table."""
from app.domain import LabelClass, LabelSetSpec


def _c(name: str, display_name: str, *synonyms: str) -> LabelClass:
    return LabelClass(name=name, display_name=display_name, synonyms=list(synonyms))


BUILTIN_LABEL_SETS: tuple[LabelSetSpec, ...] = (
    LabelSetSpec(
        name="chest-xray-pneumonia",
        modality="chest-xray",
        description="Chest X-ray: normal vs pneumonia (Kermany et al. style paediatric CXR).",
        classes=[
            _c("normal", "normal lungs", "clear lungs", "no acute cardiopulmonary abnormality"),
            _c("pneumonia", "pneumonia", "lung infection with airspace opacities", "pulmonary consolidation"),
        ],
    ),
    LabelSetSpec(
        name="chest-xray-findings",
        modality="chest-xray",
        description="Chest X-ray findings (ChestX-ray14 / CheXpert style).",
        classes=[
            _c("atelectasis", "atelectasis", "collapsed lung segment", "volume loss"),
            _c("cardiomegaly", "cardiomegaly", "enlarged heart", "enlarged cardiac silhouette"),
            _c("consolidation", "consolidation", "airspace consolidation", "lobar opacity"),
            _c("edema", "pulmonary edema", "interstitial edema", "vascular congestion"),
            _c("pleural_effusion", "pleural effusion", "fluid in the pleural space", "blunted costophrenic angle"),
            _c("pneumothorax", "pneumothorax", "collapsed lung with air in the pleural space"),
            _c("no_finding", "no finding", "a normal chest", "clear lungs"),
        ],
    ),
    LabelSetSpec(
        name="chest-xray-covid",
        modality="chest-xray",
        description="Chest X-ray: COVID-19 vs other pneumonia vs no finding.",
        classes=[
            _c("covid19", "COVID-19 pneumonia", "bilateral peripheral ground-glass opacities", "SARS-CoV-2 pneumonia"),
            _c("other_pneumonia", "bacterial or viral pneumonia", "lobar pneumonia", "lung infection"),
            _c("no_finding", "no finding", "a normal chest", "clear lungs"),
        ],
    ),
    LabelSetSpec(
        name="ham10000",
        modality="dermoscopy",
        description="HAM10000 pigmented skin lesion classes.",
        classes=[
            _c("akiec", "actinic keratosis", "intraepithelial carcinoma", "Bowen's disease"),
            _c("bcc", "basal cell carcinoma"),
            _c("bkl", "benign keratosis", "seborrheic keratosis", "solar lentigo", "lichen planus-like keratosis"),
            _c("df", "dermatofibroma"),
            _c("mel", "melanoma", "malignant melanoma"),
            _c("nv", "melanocytic nevus", "benign mole"),
            _c("vasc", "vascular lesion", "angioma", "angiokeratoma", "pyogenic granuloma"),
        ],
    ),
    LabelSetSpec(
        name="diabetic-retinopathy",
        modality="fundus",
        description="Diabetic retinopathy grade on the international clinical scale (APTOS 2019).",
        classes=[
            _c("0_no_dr", "no diabetic retinopathy", "a healthy retina"),
            _c("1_mild", "mild non-proliferative diabetic retinopathy", "a few microaneurysms"),
            _c("2_moderate", "moderate non-proliferative diabetic retinopathy", "hemorrhages and hard exudates"),
            _c("3_severe", "severe non-proliferative diabetic retinopathy", "extensive intraretinal hemorrhages"),
            _c("4_proliferative", "proliferative diabetic retinopathy", "retinal neovascularization"),
        ],
    ),
    LabelSetSpec(
        name="breast-ultrasound",
        modality="breast-ultrasound",
        description="Breast ultrasound: normal / benign / malignant (BUSI).",
        classes=[
            _c("normal", "normal breast tissue", "no lesion"),
            _c("benign", "a benign breast lesion", "a well-circumscribed oval mass", "a fibroadenoma"),
            _c("malignant", "a malignant breast tumor", "an irregular spiculated hypoechoic mass", "breast cancer"),
        ],
    ),
)

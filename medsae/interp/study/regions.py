"""The study's structure -> anatomical region table (docs/method.md#interpret-study-protocol), for its prompts.

The study shows the explainer and the judge, beside each sample's structure list, the clinical
regions those structures belong to: 121 TotalSegmentator structures in 30 regions (the study's
``clinical_region_mapping.py``), deduplicated and sorted. A structure outside the table adds no region.
"""

from __future__ import annotations

from collections.abc import Iterable


def _sides(*names: str) -> list[str]:
    return [f"{n}_{side}" for n in names for side in ("left", "right")]


#: region -> its structures
REGIONS: dict[str, list[str]] = {
    "cervical spine": [f"vertebrae_C{i}" for i in range(1, 8)],
    "thoracic spine": [f"vertebrae_T{i}" for i in range(1, 13)],
    "lumbar spine": [f"vertebrae_L{i}" for i in range(1, 6)],
    "sacrum": ["sacrum", "vertebrae_S1"],
    "spinal canal": ["spinal_cord", "intervertebral_discs", "vertebrae"],
    "paraspinal muscles": _sides("autochthon"),
    "brain": ["brain"],
    "skull": ["skull"],
    "thyroid": ["thyroid_gland"],
    "lungs": [
        "lung_left",
        "lung_right",
        "lung_lower_lobe_left",
        "lung_lower_lobe_right",
        "lung_middle_lobe_right",
        "lung_upper_lobe_left",
        "lung_upper_lobe_right",
    ],
    "heart": ["heart", "atrial_appendage_left", "pulmonary_vein"],
    "mediastinum": [
        "trachea",
        "esophagus",
        "brachiocephalic_trunk",
        *_sides("brachiocephalic_vein"),
        "superior_vena_cava",
        *_sides("subclavian_artery", "common_carotid_artery"),
    ],
    "rib cage": ["sternum", "costal_cartilages"] + [f"rib_{s}_{i}" for s in ("left", "right") for i in range(1, 13)],
    "shoulder girdle": _sides("scapula", "humerus", "clavicula"),
    "liver": ["liver"],
    "gallbladder": ["gallbladder"],
    "spleen": ["spleen"],
    "pancreas": ["pancreas"],
    "stomach": ["stomach"],
    "kidneys": _sides("kidney", "kidney_cyst"),
    "adrenal glands": _sides("adrenal_gland"),
    "bowel": ["colon", "small_bowel", "duodenum"],
    "abdominal vasculature": ["aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein"],
    "pelvic vasculature": _sides("iliac_artery", "iliac_vena"),
    "bony pelvis": _sides("hip"),
    "proximal femur": _sides("femur"),
    "gluteal muscles": _sides("gluteus_maximus", "gluteus_medius", "gluteus_minimus"),
    "hip flexors": _sides("iliopsoas"),
    "urinary bladder": ["urinary_bladder"],
    "prostate": ["prostate"],
}

#: structure -> its region
REGION_OF: dict[str, str] = {s: region for region, members in REGIONS.items() for s in members}


def regions_of(structures: Iterable[str]) -> list[str]:
    """The distinct regions of ``structures``, sorted (structures outside the table add none)."""
    return sorted({REGION_OF[s] for s in structures if s in REGION_OF})

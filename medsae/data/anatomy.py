"""Structure names of TotalSegmentator and their anatomical regions.

Two mappings:

* :data:`CLINICAL_REGION` — each of the 121 TotalSegmentator v2 labels (CT 117 + MRI-only 4) to one
  of the study's 30 clinical regions (docs/method.md#regions), used to describe slices.
* :data:`BODY_REGION` — each clinical region to a coarse body region (head, neck, thorax, abdomen,
  pelvis, extremities) or ``None`` for structures that span several regions (aorta, spinal canal,
  paraspinal and hip-flexor muscles). :func:`medsae.data.ingest.body_region_codes` gives a slice the
  coarse region with the largest summed area among its present, region-specific structures.
"""

from __future__ import annotations

_VERTEBRAE_C = [f"vertebrae_C{i}" for i in range(1, 8)]
_VERTEBRAE_T = [f"vertebrae_T{i}" for i in range(1, 13)]
_VERTEBRAE_L = [f"vertebrae_L{i}" for i in range(1, 6)]
_RIBS = [f"rib_{side}_{i}" for side in ("left", "right") for i in range(1, 13)]


def _lr(*names: str) -> list[str]:
    return [f"{n}_{side}" for n in names for side in ("left", "right")]


#: structure -> clinical region (docs/method.md#regions; 121 labels, 30 regions)
CLINICAL_REGION: dict[str, str] = {
    **{n: "cervical spine" for n in _VERTEBRAE_C},
    **{n: "thoracic spine" for n in _VERTEBRAE_T},
    **{n: "lumbar spine" for n in _VERTEBRAE_L},
    "sacrum": "sacrum",
    "vertebrae_S1": "sacrum",
    "spinal_cord": "spinal canal",
    "intervertebral_discs": "spinal canal",
    "vertebrae": "spinal canal",
    **{n: "paraspinal muscles" for n in _lr("autochthon")},
    "brain": "brain",
    "skull": "skull",
    "thyroid_gland": "thyroid",
    **{
        n: "lungs"
        for n in [
            "lung_left",
            "lung_right",
            "lung_upper_lobe_left",
            "lung_lower_lobe_left",
            "lung_upper_lobe_right",
            "lung_middle_lobe_right",
            "lung_lower_lobe_right",
        ]
    },
    "heart": "heart",
    "atrial_appendage_left": "heart",
    "pulmonary_vein": "heart",
    **{
        n: "mediastinum"
        for n in [
            "trachea",
            "esophagus",
            "brachiocephalic_trunk",
            "brachiocephalic_vein_left",
            "brachiocephalic_vein_right",
            "superior_vena_cava",
            "subclavian_artery_left",
            "subclavian_artery_right",
            "common_carotid_artery_left",
            "common_carotid_artery_right",
        ]
    },
    "sternum": "rib cage",
    "costal_cartilages": "rib cage",
    **{n: "rib cage" for n in _RIBS},
    **{n: "shoulder girdle" for n in _lr("scapula", "humerus", "clavicula")},
    "liver": "liver",
    "gallbladder": "gallbladder",
    "spleen": "spleen",
    "pancreas": "pancreas",
    "stomach": "stomach",
    **{n: "kidneys" for n in _lr("kidney", "kidney_cyst")},
    **{n: "adrenal glands" for n in _lr("adrenal_gland")},
    "colon": "bowel",
    "small_bowel": "bowel",
    "duodenum": "bowel",
    "aorta": "abdominal vasculature",
    "inferior_vena_cava": "abdominal vasculature",
    "portal_vein_and_splenic_vein": "abdominal vasculature",
    **{n: "pelvic vasculature" for n in _lr("iliac_artery", "iliac_vena")},
    **{n: "bony pelvis" for n in _lr("hip")},
    **{n: "proximal femur" for n in _lr("femur")},
    **{n: "gluteal muscles" for n in _lr("gluteus_maximus", "gluteus_medius", "gluteus_minimus")},
    **{n: "hip flexors" for n in _lr("iliopsoas")},
    "urinary_bladder": "urinary bladder",
    "prostate": "prostate",
}

#: clinical region -> coarse body region; None = spans regions, ignored when voting
BODY_REGION: dict[str, str | None] = {
    "cervical spine": "neck",
    "thoracic spine": "thorax",
    "lumbar spine": "abdomen",
    "sacrum": "pelvis",
    "spinal canal": None,
    "paraspinal muscles": None,
    "brain": "head",
    "skull": "head",
    "thyroid": "neck",
    "lungs": "thorax",
    "heart": "thorax",
    "mediastinum": "thorax",
    "rib cage": "thorax",
    "shoulder girdle": "thorax",
    "liver": "abdomen",
    "gallbladder": "abdomen",
    "spleen": "abdomen",
    "pancreas": "abdomen",
    "stomach": "abdomen",
    "kidneys": "abdomen",
    "adrenal glands": "abdomen",
    "bowel": "abdomen",
    "abdominal vasculature": None,
    "pelvic vasculature": "pelvis",
    "bony pelvis": "pelvis",
    "proximal femur": "extremities",
    "gluteal muscles": "pelvis",
    "hip flexors": None,
    "urinary bladder": "pelvis",
    "prostate": "pelvis",
}

#: the coarse regions, head to foot
BODY_REGIONS = ("head", "neck", "thorax", "abdomen", "pelvis", "extremities")

# the humerus is an extremity even though the study files it under the shoulder girdle
_BODY_OVERRIDE = {"humerus_left": "extremities", "humerus_right": "extremities"}


def structure_body_region(structure: str) -> str | None:
    """Coarse body region of one structure (None for spanning or unknown structures)."""
    if structure in _BODY_OVERRIDE:
        return _BODY_OVERRIDE[structure]
    clinical = CLINICAL_REGION.get(structure)
    return BODY_REGION.get(clinical) if clinical else None

"""Explanations matched against TotalSegmentator class names: synonyms, plurals, laterality, sub-parts."""

from __future__ import annotations

import pytest

from medsae.ground.names import mask_match_score, names_structure, split_name


@pytest.mark.parametrize(
    ("text", "structure", "expected"),
    [
        ("Axial CT through the left kidney", "kidney_left", True),
        ("kidney_left and spleen", "kidney_left", True),
        ("Both kidneys at the renal hilum", "kidney_right", True),
        ("Renal parenchyma", "kidney_left", True),
        ("The right kidney and liver", "kidney_left", False),
        ("Upper abdomen with the hepatic dome", "liver", True),
        ("Lower lobes of the lungs", "lung_lower_lobe_left", True),
        ("Right lung apex", "lung_upper_lobe_left", False),
        ("Lumbar vertebral bodies", "vertebrae_L3", True),
        ("The urinary bladder, filled", "urinary_bladder", True),
        ("Pelvis with the bladder", "urinary_bladder", True),
        ("Thoracic slices through the heart", "aorta", False),
        ("Thyroid gland in the neck", "thyroid_gland", True),
        ("Left femoral head", "femur_left", True),
        ("Left femoral head", "femur_right", False),
    ],
)
def test_names_structure(text, structure, expected):
    assert names_structure(text, structure) is expected


def test_split_name_and_score():
    assert split_name("lung_upper_lobe_right") == ("lung", "right")
    assert split_name("vertebrae_T12") == ("vertebrae", None)
    assert split_name("portal_vein_and_splenic_vein") == ("portal_vein_and_splenic_vein", None)
    assert mask_match_score("left kidney", "kidney_left") == 1.0
    assert mask_match_score("spleen", "kidney_left") == 0.0
    assert mask_match_score(None, "liver") is None and mask_match_score("liver", None) is None

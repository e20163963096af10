"""Does an explanation name a structure? TotalSegmentator class names matched with synonyms and laterality.

A class name such as ``kidney_left``, ``lung_upper_lobe_right`` or ``vertebrae_L3`` is split into
its organ (``kidney``, ``lung``, ``vertebrae``), its side (``left`` / ``right`` / none) and the
rest (lobe, level, number). An explanation names the structure when it mentions the organ by any
synonym (``renal``, ``hepatic``, ``vertebral``, ...) and, for a sided structure, does not give
that mention the opposite side only: "left kidney", "kidney (left)", "kidney_left", "both kidneys"
and plain "kidneys" name ``kidney_left``; "right kidney" does not. Sub-parts are not required
("lung" names ``lung_upper_lobe_left``). Used to check an LLM's explanation against the
structure a latent grounds in (docs/method.md#grounding).
"""

from __future__ import annotations

import re

#: organ word of a class name -> words that name it (lower case; matched as whole words, plural 's' allowed)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "adrenal": ("adrenal", "suprarenal"),
    "aorta": ("aorta", "aortic"),
    "autochthon": ("autochthon", "erector spinae", "paraspinal", "back muscle"),
    "brain": ("brain", "cerebral", "cerebrum", "intracranial"),
    "clavicula": ("clavicle", "clavicula", "collarbone"),
    "colon": ("colon", "colonic", "large bowel", "large intestine"),
    "duodenum": ("duodenum", "duodenal"),
    "esophagus": ("esophagus", "oesophagus", "esophageal", "oesophageal"),
    "femur": ("femur", "femora", "femoral", "thigh bone"),
    "gallbladder": ("gallbladder", "gall bladder", "biliary"),
    "gluteus": ("gluteus", "gluteal", "buttock"),
    "heart": ("heart", "cardiac", "myocardium", "ventricle", "atrium"),
    "hip": ("hip", "hip bone", "iliac", "ilium", "pelvic bone", "acetabulum"),
    "humerus": ("humerus", "humeral"),
    "iliopsoas": ("iliopsoas", "psoas"),
    "inferior_vena_cava": ("inferior vena cava", "ivc", "vena cava"),
    "kidney": ("kidney", "renal"),
    "liver": ("liver", "hepatic"),
    "lung": ("lung", "pulmonary", "lobe"),
    "pancreas": ("pancreas", "pancreatic"),
    "portal_vein_and_splenic_vein": ("portal vein", "splenic vein", "portal"),
    "prostate": ("prostate", "prostatic"),
    "rib": ("rib", "costal"),
    "sacrum": ("sacrum", "sacral"),
    "scapula": ("scapula", "scapular", "shoulder blade"),
    "skull": ("skull", "cranium", "cranial", "calvarium"),
    "small_bowel": ("small bowel", "small intestine", "jejunum", "ileum"),
    "spinal_cord": ("spinal cord",),
    "spleen": ("spleen", "splenic"),
    "stomach": ("stomach", "gastric"),
    "thyroid_gland": ("thyroid",),
    "trachea": ("trachea", "tracheal", "windpipe"),
    "urinary_bladder": ("bladder", "urinary bladder", "vesical"),
    "vertebrae": ("vertebra", "vertebrae", "vertebral", "spine", "spinal column"),
}
SIDES = ("left", "right")
_BOTH = ("both", "bilateral", "bilaterally", "paired")
_WINDOW = 3  # words before / after a mention that can carry its side


def split_name(structure: str) -> tuple[str, str | None]:
    """``kidney_left`` -> ('kidney', 'left'); ``lung_upper_lobe_right`` -> ('lung', 'right') (longest known organ)."""
    parts = structure.lower().split("_")
    side = next((p for p in parts if p in SIDES), None)
    rest = [p for p in parts if p not in SIDES]
    for n in range(len(rest), 0, -1):
        organ = "_".join(rest[:n])
        if organ in SYNONYMS:
            return organ, side
    return rest[0] if rest else structure.lower(), side


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower().replace("_", " "))


def _mentions(words: list[str], phrase: str) -> list[tuple[int, int]]:
    """(start, stop) word spans where ``phrase`` occurs (its last word may take a plural 's'/'es')."""
    target = phrase.split()
    spans = []
    for i in range(len(words) - len(target) + 1):
        window = words[i : i + len(target)]
        if window[:-1] == target[:-1] and window[-1] in (target[-1], target[-1] + "s", target[-1] + "es"):
            spans.append((i, i + len(target)))
    return spans


def names_structure(text: str, structure: str) -> bool:
    """Whether ``text`` names ``structure`` (module docstring: synonyms, laterality, sub-parts optional)."""
    organ, side = split_name(structure)
    words = _words(text)
    synonyms = SYNONYMS.get(organ, (organ.replace("_", " "),))
    for phrase in synonyms:
        for start, stop in _mentions(words, phrase):
            if side is None:
                return True
            near = words[max(0, start - _WINDOW) : start] + words[stop : stop + _WINDOW]
            sides = {w for w in near if w in SIDES}
            if side in sides or not sides or any(w in _BOTH for w in near):
                return True
    return False


def mask_match_score(text: str | None, structure: str | None) -> float | None:
    """1.0 when the explanation names the latent's best-grounded structure, 0.0 when not; None without both."""
    if not text or not structure:
        return None
    return 1.0 if names_structure(text, structure) else 0.0

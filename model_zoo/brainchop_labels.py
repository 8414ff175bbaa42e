"""Label tables of brainchop's MeshNet models: FreeSurfer name (colormap.json) -> human name and code.

SNOMED CT codes are taken from pydicom's code dictionary (`pydicom.sr.codedict.codes.SCT`, i.e. the codes of
DICOM PS3.16), looked up by keyword, so no code is typed in here by hand. A structure with no SNOMED CT
concept in that dictionary gets the private scheme `99RADAI` with a stable token: the Desikan-Killiany cortical
parcels (except entorhinal cortex and insula) and FreeSurfer's "ventral diencephalon", which is a FreeSurfer
grouping (hypothalamus, mammillary bodies, substantia nigra, ...) rather than an anatomical concept.
None of these models tells left from right (FreeSurfer's left and right labels were merged before training),
so no label needs a laterality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydicom.sr.codedict import codes

PRIVATE_SCHEME = "99RADAI"


@dataclass(frozen=True)
class LabelSpec:
    """One class: its colormap.json name, the name on the card, and a SNOMED keyword or a private token."""

    source: str
    name: str
    sct: str | None = None  # keyword in pydicom's codes.SCT
    token: str | None = None  # 99RADAI code value when there is no SNOMED CT concept
    category: str = "AnatomicalStructure"


def _code(keyword: str) -> dict[str, str]:
    c: Any = getattr(codes.SCT, keyword)
    return {"scheme": "SCT", "value": str(c.value), "meaning": str(c.meaning)}


def coded(spec: LabelSpec) -> tuple[dict[str, str], dict[str, str]]:
    """(category, type) of a label as card dictionaries."""
    if spec.sct is not None:
        kind = _code(spec.sct)
    elif spec.token is not None:
        kind = {"scheme": PRIVATE_SCHEME, "value": spec.token, "meaning": spec.name}
    else:
        raise ValueError(f"label {spec.source!r}: neither a SNOMED keyword nor a private token")
    return _code(spec.category), kind


def _dk(region: str, name: str, sct: str | None = None) -> LabelSpec:
    """A Desikan-Killiany cortical parcel (`ctx-<region>` in the colormap), both hemispheres together."""
    token = None if sct else f"dk-{region}"
    return LabelSpec(f"ctx-{region}", name, sct=sct, token=token)


VENTRAL_DC = LabelSpec("VentralDC", "Ventral diencephalon", token="ventral-dc")

SUBCORTICAL: tuple[LabelSpec, ...] = (
    LabelSpec("Cerebral-White-Matter", "Cerebral white matter", "CerebralWhiteMatter"),
    LabelSpec("Cerebral-Cortex", "Cerebral cortex", "CerebralCortex"),
    LabelSpec("Lateral-Ventricle", "Lateral ventricle", "LateralVentricle"),
    LabelSpec(
        "Inferior-Lateral-Ventricle", "Inferior horn of lateral ventricle", "InferiorHornOfLateralVentricle"
    ),
    LabelSpec("Cerebellum-White-Matter", "Cerebellar white matter", "CerebellarWhiteMatter"),
    LabelSpec("Cerebellum-Cortex", "Cerebellar cortex", "CerebellarCortex"),
    LabelSpec("Thalamus", "Thalamus", "Thalamus"),
    LabelSpec("Caudate", "Caudate nucleus", "CaudateNucleus"),
    LabelSpec("Putamen", "Putamen", "Putamen"),
    LabelSpec("Pallidum", "Globus pallidus", "GlobusPallidus"),
    LabelSpec("3rd-Ventricle", "Third ventricle", "ThirdVentricle"),
    LabelSpec("4th-Ventricle", "Fourth ventricle", "FourthVentricle"),
    LabelSpec("Brain-Stem", "Brainstem", "BrainStem"),
    LabelSpec("Hippocampus", "Hippocampus", "Hippocampus"),
    LabelSpec("Amygdala", "Amygdala", "Amygdala"),
    LabelSpec("Accumbens-area", "Nucleus accumbens", "NucleusAccumbens"),
    VENTRAL_DC,
)

PARCELLATION: tuple[LabelSpec, ...] = (
    LabelSpec("Cerebral-White-Matter", "Cerebral white matter", "CerebralWhiteMatter"),
    LabelSpec("Ventricle", "Ventricles", "BrainVentricle"),
    LabelSpec("Cerebellum-White-Matter", "Cerebellar white matter", "CerebellarWhiteMatter"),
    # FreeSurfer's cerebellar cortex colour (230, 148, 34); cerebellar white matter is its own class.
    LabelSpec("Cerebellum", "Cerebellar cortex", "CerebellarCortex"),
    LabelSpec("Thalamus-Proper*", "Thalamus", "Thalamus"),
    LabelSpec("Caudate", "Caudate nucleus", "CaudateNucleus"),
    LabelSpec("Putamen", "Putamen", "Putamen"),
    LabelSpec("Pallidum", "Globus pallidus", "GlobusPallidus"),
    LabelSpec("Brain-Stem", "Brainstem", "BrainStem"),
    LabelSpec("Hippocampus", "Hippocampus", "Hippocampus"),
    LabelSpec("Amygdala", "Amygdala", "Amygdala"),
    LabelSpec("CSF", "Cerebrospinal fluid", "CerebrospinalFluid", category="BodySubstance"),
    LabelSpec("Accumbens-area", "Nucleus accumbens", "NucleusAccumbens"),
    LabelSpec("VentralDC", VENTRAL_DC.name, token=VENTRAL_DC.token),
    LabelSpec("Corpus callosum", "Corpus callosum", "CorpusCallosum"),
    _dk("bankssts", "Banks of superior temporal sulcus (cortex)"),
    _dk("caudalanteriorcingulate", "Caudal anterior cingulate cortex"),
    _dk("caudalmiddlefrontal", "Caudal middle frontal cortex"),
    _dk("cuneus", "Cuneus cortex"),
    _dk("entorhinal", "Entorhinal cortex", "EntorhinalCortex"),
    _dk("fusiform", "Fusiform cortex"),
    _dk("inferiorparietal", "Inferior parietal cortex"),
    _dk("inferiortemporal", "Inferior temporal cortex"),
    _dk("isthmuscingulate", "Isthmus cingulate cortex"),
    _dk("lateraloccipital", "Lateral occipital cortex"),
    _dk("lateralorbitofrontal", "Lateral orbitofrontal cortex"),
    _dk("lingual", "Lingual cortex"),
    _dk("medialorbitofrontal", "Medial orbitofrontal cortex"),
    _dk("middletemporal", "Middle temporal cortex"),
    _dk("parahippocampal", "Parahippocampal cortex"),
    _dk("paracentral", "Paracentral cortex"),
    _dk("parsopercularis", "Pars opercularis cortex"),
    _dk("parsorbitalis", "Pars orbitalis cortex"),
    _dk("parstriangularis", "Pars triangularis cortex"),
    _dk("pericalcarine", "Pericalcarine cortex"),
    _dk("postcentral", "Postcentral cortex"),
    _dk("posteriorcingulate", "Posterior cingulate cortex"),
    _dk("precentral", "Precentral cortex"),
    _dk("precuneus", "Precuneus cortex"),
    _dk("rostralanteriorcingulate", "Rostral anterior cingulate cortex"),
    _dk("rostralmiddlefrontal", "Rostral middle frontal cortex"),
    _dk("superiorfrontal", "Superior frontal cortex"),
    _dk("superiorparietal", "Superior parietal cortex"),
    _dk("superiortemporal", "Superior temporal cortex"),
    _dk("supramarginal", "Supramarginal cortex"),
    _dk("frontalpole", "Frontal pole cortex"),
    _dk("temporalpole", "Temporal pole cortex"),
    _dk("transversetemporal", "Transverse temporal cortex"),
    _dk("insula", "Insula", "Insula"),
)

BRAIN_MASK: tuple[LabelSpec, ...] = (LabelSpec("brain mask", "Brain", "Brain"),)

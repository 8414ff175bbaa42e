"""Imaging: DICOM series -> `Volume` (volume.py), model space and back with MONAI (resample.py), and a
synthetic MR series from a NIfTI file (synth.py).

Import from the submodules: `radai.imaging.volume` needs only numpy and pydicom, whereas `resample` pulls
in torch and MONAI (seconds to import), which processes that only assemble volumes should not pay for.
"""

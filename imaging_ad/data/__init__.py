"""Datasets: find labelled normal/anomalous images (and their masks) in a folder or CSV manifest.

``discover_dataset(path)`` recognises MVTec AD folders, train/test class folders (chest X-ray style),
class folders without a split, plain folders of normal images and CSV manifests; class folders whose
names say nothing (``yes/``, ``no/``) are reported as unknown, never guessed. ``folder_dataset`` takes
explicit normal, anomalous and mask folders instead (like anomalib's Folder). Nothing here imports
torch: discovery reads file names and image headers only.
"""

from imaging_ad.data.dataset import (
    ANOMALOUS,
    LAYOUTS,
    NORMAL,
    Dataset,
    DatasetError,
    Sample,
    check_mask_sizes,
    image_size,
    load_mask,
    split_normals,
)
from imaging_ad.data.discovery import (
    ACCEPTED_LAYOUTS,
    NORMAL_NAMES,
    collect_images,
    discover_dataset,
    is_normal_name,
)
from imaging_ad.data.explicit import folder_dataset, open_dataset, parse_folder_spec
from imaging_ad.data.manifest import read_manifest

__all__ = [
    "ACCEPTED_LAYOUTS",
    "ANOMALOUS",
    "LAYOUTS",
    "NORMAL",
    "NORMAL_NAMES",
    "Dataset",
    "DatasetError",
    "Sample",
    "check_mask_sizes",
    "collect_images",
    "discover_dataset",
    "folder_dataset",
    "image_size",
    "is_normal_name",
    "load_mask",
    "open_dataset",
    "parse_folder_spec",
    "read_manifest",
    "split_normals",
]

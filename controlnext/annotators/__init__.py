"""Condition preprocessors ("annotators"): turn a photo into the condition image a control was trained on.

    from controlnext.annotators import annotate
    edges = annotate("canny", photo, output_size=(512, 512), low_threshold=100, high_threshold=200)

Every annotator has one signature, `fn(image, *, options...) -> RGB image`, and one registry line below.
Conditions are annotated at the size they are used at (`output_size`, `annotate_at_size`).
Weight-free annotators use OpenCV/numpy; `openpose` and `mask source=person` need the `pose` extra
(mediapipe, offline); `depth`, `normals`, `segmentation` and learned `softedge` load weights from a
local folder (`model_path`). Importing this package does not import torch or mediapipe.
"""

from .depth_estimation import depth, normals
from .edges import canny, lineart, scribble, softedge
from .lines import straight_lines
from .masks import mask
from .mediapipe_pose import detect_people, openpose
from .openpose_format import (
    PersonKeypoints,
    draw_openpose,
    openpose_json,
    openpose_json_data,
    read_openpose_json,
    render_openpose_json,
)
from .registry import AnnotatorSpec, annotate, annotate_at_size, check_annotator, get_annotator, list_annotators, parse_options, register_annotator
from .segments import color_segments
from .semantic_segmentation import segmentation
from .shuffle import content_shuffle
from .upscaling import blur, tile


register_annotator("canny", canny, resample="lines")
register_annotator("lineart", lineart)
register_annotator("scribble", scribble, resample="lines")
register_annotator("softedge", softedge)
register_annotator("lines", straight_lines, resample="lines")
register_annotator("mask", mask, resample="binary")
register_annotator("shuffle", content_shuffle)
register_annotator("color_segments", color_segments, resample="nearest")
register_annotator("tile", tile)
register_annotator("blur", blur)
register_annotator("openpose", openpose)
register_annotator("openpose_json", openpose_json, native_resolution=True)
register_annotator("depth", depth)
register_annotator("normals", normals)
register_annotator("segmentation", segmentation, resample="nearest")

__all__ = [
    "AnnotatorSpec",
    "PersonKeypoints",
    "annotate",
    "annotate_at_size",
    "check_annotator",
    "detect_people",
    "draw_openpose",
    "get_annotator",
    "list_annotators",
    "openpose_json_data",
    "parse_options",
    "read_openpose_json",
    "register_annotator",
    "render_openpose_json",
]
